r"""Sparse and offline teacher targets: random-sampling KD and top-k with a tail bucket.

**Random-sampling KD** (Anshumann et al., *Sparse Logit Sampling*, arXiv:2503.16870, ACL 2025)
[paper]: draw N token ids i.i.d. from a proposal r ∝ p_T^τ and store the sparse target

.. math:: \hat t = \frac1N\sum_{n=1}^N \frac{p_T(x_n)}{r(x_n)}\,e_{x_n},\qquad
          \mathbb E\,\hat t = p_T,

so −Σ_v t̂_v log q_S(v) is an unbiased estimate of CE(p_T, q_S) and its gradient
(Σ t̂) q_S − t̂ an unbiased estimate of the full-KD gradient q_S − p_T (for τ = 1, t̂ = counts/N and
Σ t̂ = 1). Caching the top-k probabilities instead gives a *biased* target.

**Top-k with a tail bucket** [proposed] (after verl RFC #7856 and Gen-Verse/OpenClaw-RL PR #4):
with S the teacher's top-k set, coarsen both distributions to k + 1 categories,
p̄ = (p_S, 1 − Σ_S p), q̄ = (q_S, 1 − Σ_S q), and use KL(p̄ ‖ q̄). By the data-processing
inequality 0 ≤ KL(p̄ ‖ q̄) ≤ KL(p ‖ q), with equality for k ≥ V − 1. The truncated sum
Σ_{v∈S} p_v log(p_v/q_v) used by several libraries is not a divergence and can be negative
(:func:`truncated_topk_kl`, kept for comparison only).

Layout: ids/weights/log-probs carry the sample (or top-k) axis last; ``student_logits`` has the
vocabulary on ``axis``; the batch shapes must agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace as LS
from kdjax.losses import _common

Array = jax.Array

__all__ = ["sample_sparse_targets", "random_sampling_kd", "topk_teacher", "topk_tail_kl",
           "truncated_topk_kl"]


def _student(student_logits, temperature, axis, where):
  """(log q_S with the vocabulary last, batch mask) — `where` by the one rule (a position mask
  broadcastable to the logits with size 1 on the vocabulary axis, or a vocabulary mask)."""
  s = _checks.check_array("student_logits", student_logits)
  ax = _checks.normalize_axis(axis, s.ndim)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  lq, _, _ = _common.log_probs("student_logits", s, temperature, ax, vocab_mask)
  return jnp.moveaxis(lq, ax, -1), batch_mask


def _check_ids(name, ids, batch_shape, vocab, *, present=None):
  """Integer ids [*batch, n] in [0, vocab); concrete duplicates in a row (among the entries
  `present` marks, e.g. not padding) are an error."""
  i = _checks.check_array(name, ids)
  if not jnp.issubdtype(i.dtype, jnp.integer) or i.dtype == jnp.bool_:
    raise TypeError(f"`{name}` must hold integer token ids, got dtype {i.dtype}.")
  if i.shape[:-1] != tuple(batch_shape):
    raise ValueError(f"`{name}` must have shape [*batch, n] with batch {tuple(batch_shape)} "
                     f"(the student logits without the vocabulary axis), got {i.shape}.")
  arr = _checks.concrete_array(ids)
  if arr is not None and arr.size:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
      raise ValueError(f"`{name}` must lie in [0, {vocab}), got range [{lo}, {hi}].")
    if present is not None:
      keep = np.broadcast_to(present, arr.shape)
      a = np.where(keep, arr.astype(np.int64), -1 - np.arange(arr.shape[-1]))  # padding: unique
      srt = np.sort(a.reshape(-1, arr.shape[-1]), axis=-1)
      if np.any(srt[:, 1:] == srt[:, :-1]):
        raise ValueError(f"`{name}` must not repeat an id within a row (a top-k set); merge "
                         f"duplicates first.")
  return i


def _check_topk_log_probs(name, log_probs, axis=-1):
  """Concrete top-k teacher log-probs: <= 0 and a total mass of at most 1 per row (-inf is
  padding; NaN propagates)."""
  arr = _checks.concrete_array(log_probs)
  if arr is None or arr.size == 0:
    return None
  atol = _checks.simplex_atol(arr.dtype)
  a = arr.astype(np.float64)
  if np.any(np.isnan(a)):
    return a
  if np.any(a > atol):
    raise ValueError(f"`{name}` must be log-probabilities (<= 0), got a maximum of "
                     f"{a.max():.4g}.")
  mass = np.sum(np.exp(a), axis=axis)
  if np.any(mass > 1.0 + atol):
    raise ValueError(f"`{name}` must be log-probabilities of a part of the vocabulary (total "
                     f"mass <= 1 per row), got a mass of {mass.max():.4g}.")
  return a


def _finish(values, lq, batch_mask, teacher_nonempty=None):
  """Zeroes masked positions and empty rows (student or teacher side); NaN propagates."""
  keep = LS.row_nonempty(lq, -1)
  if teacher_nonempty is not None:
    keep = keep & teacher_nonempty
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)


def sample_sparse_targets(key: Array, teacher_logits: Array, *, num_samples: int,
                          proposal_temperature: float = 1.0, temperature: float = 1.0,
                          axis: int = -1) -> tuple[Array, Array]:
  r"""Importance-sampled sparse teacher targets (ids, weights) [paper] (arXiv:2503.16870).

  Draws ``num_samples`` ids i.i.d. from r ∝ p_T^τ (τ = ``proposal_temperature``; τ = 1 samples
  the teacher itself) and returns weights w_n = p_T(x_n) / (N r(x_n)) so that
  t̂ = Σ_n w_n e_{x_n} has E t̂ = p_T. Duplicates are kept (merge them when caching, see
  :mod:`kdjax.teacher_cache`). p_T = softmax(z_T / T) (T scalar or per position ``[*batch]``).

  The samples are drawn one at a time (``lax.scan`` over N, exact Gumbel-max per draw), so the
  temporaries stay O(batch·V) instead of the O(batch·N·V) of a batched categorical draw.
  A NaN teacher row gives NaN weights.

  Returns:
    ``ids`` (int32, ``[*batch, N]``) and ``weights`` (``[*batch, N]``, float32 / float64).
  """
  z = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_no_posinf("teacher_logits", teacher_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("proposal_temperature", proposal_temperature)
  num_samples = _checks.check_int("num_samples", num_samples, low=1)
  lp, _, _ = _common.log_probs("teacher_logits", z, temperature, ax)
  lp = jnp.moveaxis(lp, ax, -1)
  tau = jnp.asarray(proposal_temperature, lp.dtype)
  present = LS.valid_entries(lp)
  lr = LS.masked_log_softmax(jnp.where(present, tau * jnp.where(present, lp, 0.0), -jnp.inf),
                             axis=-1)
  # Sampling logits: -inf entries are never drawn; a NaN or empty row samples uniformly (its
  # weights are NaN resp. 0 below).
  safe_lr = jnp.where(jnp.isnan(lr), 0.0, lr)
  safe_lr = jnp.where(LS.row_nonempty(safe_lr, -1)[..., None], safe_lr, 0.0)

  def draw(_, k):
    return None, jax.random.categorical(k, safe_lr, axis=-1).astype(jnp.int32)

  _, ids = jax.lax.scan(draw, None, jax.random.split(key, num_samples))
  ids = jnp.moveaxis(ids, 0, -1)                                       # [*batch, N]
  lp_x = jnp.take_along_axis(lp, ids, axis=-1)
  lr_x = jnp.take_along_axis(lr, ids, axis=-1)
  ok = (lp_x != -jnp.inf) & (lr_x != -jnp.inf)
  w = jnp.where(ok, jnp.exp(jnp.where(ok, lp_x - lr_x, 0.0)), 0.0) / num_samples
  return ids, w


def random_sampling_kd(student_logits: Array, target_ids: Array, target_weights: Array, *,
                       teacher_log_probs: Array | None = None, temperature: float = 1.0,
                       axis: int = -1, where: Array | None = None) -> Array:
  r"""Random-sampling KD loss on sparse targets, per position [paper] (arXiv:2503.16870).

  .. math:: \mathcal L = -\sum_n w_n \log q_S(x_n)\quad\big(+\textstyle\sum_n w_n
            \log p_T(x_n)\ \text{if teacher\_log\_probs is given}\big),

  an unbiased estimate of CE(p_T, q_S) (resp. of KL(p_T ‖ q_S) — the added term is the
  unbiased estimate of −H(p_T), so the value is comparable with forward KL; a single estimate
  may be negative). Gradient in z_S: ((Σ w) q_S − t̂)/T [proposed, derived].

  Args:
    student_logits: ``[..., V]`` student logits.
    target_ids: integer ids ``[*batch, N]`` (from :func:`sample_sparse_targets` or a cache).
    target_weights: non-negative weights ``[*batch, N]`` (0 for padding).
    teacher_log_probs: optional log p_T at the ids, ``[*batch, N]``.
    temperature: T > 0 applied to the student (scalar or per position ``[*batch]``).
    axis: the vocabulary axis of ``student_logits``.
    where: optional boolean mask broadcastable to the logits (a position mask, size 1 on the
      vocabulary axis or the batch shape: value 0 and gradient 0 there).
  """
  lq, batch_mask = _student(student_logits, temperature, axis, where)
  ids = _check_ids("target_ids", target_ids, lq.shape[:-1], lq.shape[-1])
  _checks.check_nonneg("target_weights", target_weights)
  w = _checks.check_array("target_weights", target_weights).astype(lq.dtype)
  _checks.check_same_shape("target_ids", ids, "target_weights", w)
  lq_x = jnp.take_along_axis(lq, ids, axis=-1)
  used = w != 0
  terms = jnp.where(used, -w * jnp.where(used, lq_x, 0.0), 0.0)
  if teacher_log_probs is not None:
    lp_x = _checks.check_array("teacher_log_probs", teacher_log_probs).astype(lq.dtype)
    _checks.check_same_shape("target_ids", ids, "teacher_log_probs", lp_x)
    has = used & (lp_x != -jnp.inf)
    terms = terms + jnp.where(has, w * jnp.where(has, lp_x, 0.0), 0.0)
  return _finish(jnp.sum(terms, axis=-1), lq, batch_mask)


def topk_teacher(teacher_logits: Array, *, k: int, temperature: float = 1.0,
                 axis: int = -1) -> tuple[Array, Array]:
  """The teacher's top-k ids and their log-probabilities (normalised over the full vocabulary).

  This is what a top-k cache stores per token. Returns ``(ids [*batch, k] int32,
  log_probs [*batch, k])``; a NaN teacher row gives NaN log-probs.
  """
  z = _checks.check_array("teacher_logits", teacher_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  k = _checks.check_int("k", k, low=1, high=z.shape[ax])
  lp, _, _ = _common.log_probs("teacher_logits", z, temperature, ax)
  vals, ids = jax.lax.top_k(jnp.moveaxis(lp, ax, -1), k)
  return ids.astype(jnp.int32), vals


def _log1mexp(x):
  """log(1 − e^x) for x ≤ 0, −inf at x = 0 (no NaN created in value or gradient; NaN stays)."""
  zero = x >= 0
  xs = jnp.where(zero, -1.0, x)
  out = jnp.where(xs > -0.6931, jnp.log(-jnp.expm1(xs)), jnp.log1p(-jnp.exp(xs)))
  return jnp.where(zero, -jnp.inf, out)


def _in_set(ids, vocab):
  """Boolean [*batch, V] membership of the ids (scatter, no [*batch, k, V] one-hot)."""
  flat = ids.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True)
  return mask.reshape(ids.shape[:-1] + (vocab,))


def _topk_inputs(student_logits, topk_ids, topk_log_probs, temperature, axis, where):
  lq, batch_mask = _student(student_logits, temperature, axis, where)
  lp_np = _check_topk_log_probs("topk_log_probs", topk_log_probs)
  present = None if lp_np is None else (lp_np != -np.inf)
  ids = _check_ids("topk_ids", topk_ids, lq.shape[:-1], lq.shape[-1], present=present)
  lp = _checks.check_array("topk_log_probs", topk_log_probs).astype(lq.dtype)
  _checks.check_same_shape("topk_ids", ids, "topk_log_probs", lp)
  return lq, batch_mask, ids, lp


def topk_tail_kl(student_logits: Array, topk_ids: Array, topk_log_probs: Array, *,
                 temperature: float = 1.0, axis: int = -1, where: Array | None = None) -> Array:
  r"""KL between the (k+1)-category coarsenings p̄ = (p_S, p_tail), q̄ = (q_S, q_tail) [proposed].

  .. math:: \mathrm{KL}(\bar p\|\bar q) = \sum_{v\in S}p_v\log\frac{p_v}{q_v}
            + p_{\rm tail}\log\frac{p_{\rm tail}}{q_{\rm tail}},\quad
            p_{\rm tail} = 1-\sum_{v\in S}p_v,\ q_{\rm tail} = \sum_{v\notin S}q_v .

  A valid divergence: 0 ≤ KL(p̄‖q̄) ≤ KL(p‖q) (data processing), equal at k ≥ V − 1. Needs only
  the teacher's top-k log-probs (normalised over the full vocabulary, e.g. from
  :func:`topk_teacher` or a cache) and the student's full logits; q_tail is computed as a
  log-sum-exp over the student's non-S logits (no cancellation). Design choice (kdjax)
  [proposed] after verl RFC #7856 / OpenClaw-RL PR #4.

  Args:
    student_logits: ``[..., V]`` student logits (temperature ``temperature``).
    topk_ids: distinct teacher ids ``[*batch, k]``.
    topk_log_probs: teacher log-probabilities at ``topk_ids`` ``[*batch, k]`` (at the temperature
      used when caching).
    temperature: T > 0 applied to the student.
    axis: the vocabulary axis of ``student_logits``.
    where: optional boolean mask broadcastable to the logits (a position mask, size 1 on the
      vocabulary axis or the batch shape: value 0 and gradient 0 there).

  A row whose top-k values are all −inf (padding) gives 0 with zero gradient. Concrete inputs
  are checked: ids in range and distinct within a row, log-probs ≤ 0 with total mass ≤ 1.
  """
  lq, batch_mask, ids, lp = _topk_inputs(student_logits, topk_ids, topk_log_probs, temperature,
                                         axis, where)
  head = LS.plogratio(lp, jnp.take_along_axis(lq, ids, axis=-1), -1)
  lp_tail = _log1mexp(jnp.minimum(LS.masked_logsumexp(lp, axis=-1), 0.0))
  lq_tail = LS.masked_logsumexp(lq, axis=-1, where=~_in_set(ids, lq.shape[-1]))
  # When S covers the whole (valid) vocabulary the teacher's residual tail mass is rounding
  # error: the tail category does not exist and contributes 0.
  tail = jnp.where(lq_tail != -jnp.inf, LS.plogratio(lp_tail[..., None], lq_tail[..., None], -1),
                   0.0)
  # A padded row (every top-k value -inf, e.g. from a cache) is empty: 0 and zero gradient.
  return _finish(head + tail, lq, batch_mask, LS.row_nonempty(lp, -1))


def truncated_topk_kl(student_logits: Array, topk_ids: Array, topk_log_probs: Array, *,
                      temperature: float = 1.0, axis: int = -1,
                      where: Array | None = None) -> Array:
  r"""The truncated sum Σ_{v∈S} p_v log(p_v / q_v) — NOT a divergence (can be negative).

  Provided only to reproduce the bias reported in verl RFC #7856 (a clamp at 0 fired in 415/467
  steps); use :func:`topk_tail_kl` instead. Arguments as in :func:`topk_tail_kl`.
  """
  lq, batch_mask, ids, lp = _topk_inputs(student_logits, topk_ids, topk_log_probs, temperature,
                                         axis, where)
  head = LS.plogratio(lp, jnp.take_along_axis(lq, ids, axis=-1), -1)
  return _finish(head, lq, batch_mask, LS.row_nonempty(lp, -1))
