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
from kdjax.divergences import log_softmax

Array = jax.Array

__all__ = ["sample_sparse_targets", "random_sampling_kd", "topk_teacher", "topk_tail_kl",
           "truncated_topk_kl"]


def _student_log_probs(student_logits, temperature, axis):
  s = _checks.check_array("student_logits", student_logits)
  ax = _checks.normalize_axis(axis, s.ndim)
  _checks.check_positive("temperature", temperature)
  dtype = _checks.compute_dtype(s)
  lq = log_softmax(s.astype(dtype) / jnp.asarray(temperature, dtype), axis=ax)
  return jnp.moveaxis(lq, ax, -1)


def _check_ids(name, ids, batch_shape, vocab):
  i = _checks.check_array(name, ids)
  if not jnp.issubdtype(i.dtype, jnp.integer):
    raise TypeError(f"`{name}` must hold integer token ids, got dtype {i.dtype}.")
  if i.shape[:-1] != tuple(batch_shape):
    raise ValueError(f"`{name}` must have shape [*batch, n] with batch {tuple(batch_shape)} "
                     f"(the student logits without the vocabulary axis), got {i.shape}.")
  if not isinstance(ids, jax.core.Tracer) and i.size:
    arr = np.asarray(ids)  # NumPy: also concrete inside an outer jit trace
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
      raise ValueError(f"`{name}` must lie in [0, {vocab}), got range [{lo}, {hi}].")
  return i


def _position_mask(values, nonempty, where):
  keep = nonempty if where is None else nonempty & jnp.asarray(where, bool)
  return jnp.where(keep, values, 0.0)


def sample_sparse_targets(key: Array, teacher_logits: Array, *, num_samples: int,
                          proposal_temperature: float = 1.0, temperature: float = 1.0,
                          axis: int = -1) -> tuple[Array, Array]:
  r"""Importance-sampled sparse teacher targets (ids, weights) [paper] (arXiv:2503.16870).

  Draws ``num_samples`` ids i.i.d. from r ∝ p_T^τ (τ = ``proposal_temperature``; τ = 1 samples
  the teacher itself) and returns weights w_n = p_T(x_n) / (N r(x_n)) so that
  t̂ = Σ_n w_n e_{x_n} has E t̂ = p_T. Duplicates are kept (merge them when caching, see
  :mod:`kdjax.teacher_cache`). p_T = softmax(z_T / T).

  Returns:
    ``ids`` (int32, ``[*batch, N]``) and ``weights`` (``[*batch, N]``).
  """
  z = _checks.check_array("teacher_logits", teacher_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("temperature", temperature)
  _checks.check_positive("proposal_temperature", proposal_temperature)
  if not (isinstance(num_samples, int) and num_samples > 0):
    raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
  dtype = _checks.compute_dtype(z)
  lp = jnp.moveaxis(log_softmax(z.astype(dtype) / jnp.asarray(temperature, dtype), axis=ax),
                    ax, -1)
  tau = jnp.asarray(proposal_temperature, dtype)
  lr = log_softmax(jnp.where(lp > -jnp.inf, tau * lp, -jnp.inf), axis=-1)
  batch = lp.shape[:-1]
  safe_lr = jnp.where(jnp.any(lr > -jnp.inf, -1, keepdims=True), lr, 0.0)
  ids = jax.random.categorical(key, safe_lr[..., None, :], axis=-1,
                               shape=batch + (num_samples,)).astype(jnp.int32)
  lp_x = jnp.take_along_axis(lp, ids, axis=-1)
  lr_x = jnp.take_along_axis(lr, ids, axis=-1)
  ok = (lp_x > -jnp.inf) & (lr_x > -jnp.inf)
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
    target_weights: weights ``[*batch, N]`` (0 for padding).
    teacher_log_probs: optional log p_T at the ids, ``[*batch, N]``.
    temperature: T > 0 applied to the student.
    axis: the vocabulary axis of ``student_logits``.
    where: optional position mask (batch shape).
  """
  lq = _student_log_probs(student_logits, temperature, axis)
  ids = _check_ids("target_ids", target_ids, lq.shape[:-1], lq.shape[-1])
  w = _checks.check_array("target_weights", target_weights).astype(lq.dtype)
  _checks.check_same_shape("target_ids", ids, "target_weights", w)
  lq_x = jnp.take_along_axis(lq, ids, axis=-1)
  used = w != 0
  terms = jnp.where(used, -w * jnp.where(used, lq_x, 0.0), 0.0)
  if teacher_log_probs is not None:
    lp_x = _checks.check_array("teacher_log_probs", teacher_log_probs).astype(lq.dtype)
    _checks.check_same_shape("target_ids", ids, "teacher_log_probs", lp_x)
    terms = terms + jnp.where(used & (lp_x > -jnp.inf), w * jnp.where(used, lp_x, 0.0), 0.0)
  nonempty = jnp.any(lq > -jnp.inf, axis=-1)
  return _position_mask(jnp.sum(terms, axis=-1), nonempty, where)


def topk_teacher(teacher_logits: Array, *, k: int, temperature: float = 1.0,
                 axis: int = -1) -> tuple[Array, Array]:
  """The teacher's top-k ids and their log-probabilities (normalised over the full vocabulary).

  This is what a top-k cache stores per token. Returns ``(ids [*batch, k] int32,
  log_probs [*batch, k])``.
  """
  z = _checks.check_array("teacher_logits", teacher_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("temperature", temperature)
  if not (isinstance(k, int) and 0 < k <= z.shape[ax]):
    raise ValueError(f"`k` must be an int in [1, {z.shape[ax]}], got {k!r}.")
  dtype = _checks.compute_dtype(z)
  lp = jnp.moveaxis(log_softmax(z.astype(dtype) / jnp.asarray(temperature, dtype), axis=ax),
                    ax, -1)
  vals, ids = jax.lax.top_k(lp, k)
  return ids.astype(jnp.int32), vals


def _log1mexp(x):
  """log(1 − e^x) for x ≤ 0, −inf at x = 0 (no NaN in value or gradient)."""
  neg = x < 0
  xs = jnp.where(neg, x, -1.0)
  out = jnp.where(xs > -0.6931, jnp.log(-jnp.expm1(xs)), jnp.log1p(-jnp.exp(xs)))
  return jnp.where(neg, out, -jnp.inf)


def _masked_lse(x, mask):
  m = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  tot = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - m, 0.0)), 0.0), axis=-1)
  pos = tot > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, tot, 1.0)) + m[..., 0], -jnp.inf)


def _in_set(ids, vocab):
  """Boolean [*batch, V] membership of the ids (scatter, no [*batch, k, V] one-hot)."""
  flat = ids.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True)
  return mask.reshape(ids.shape[:-1] + (vocab,))


def _kl_terms(lp, lq):
  """p (log p − log q) elementwise with 0 log 0 = 0 and +inf for q = 0 < p (NaN-free)."""
  p_pos = lp > -jnp.inf
  both = p_pos & (lq > -jnp.inf)
  a = jnp.where(both, lp, 0.0)
  b = jnp.where(both, lq, 0.0)
  return jnp.where(both, jnp.exp(a) * (a - b), jnp.where(p_pos, jnp.inf, 0.0))


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
    where: optional position mask (batch shape).
  """
  lq = _student_log_probs(student_logits, temperature, axis)
  ids = _check_ids("topk_ids", topk_ids, lq.shape[:-1], lq.shape[-1])
  lp = _checks.check_array("topk_log_probs", topk_log_probs).astype(lq.dtype)
  _checks.check_same_shape("topk_ids", ids, "topk_log_probs", lp)
  lq_s = jnp.take_along_axis(lq, ids, axis=-1)
  head = jnp.sum(_kl_terms(lp, lq_s), axis=-1)
  lp_head = _masked_lse(lp, lp > -jnp.inf)
  lp_tail = _log1mexp(jnp.minimum(lp_head, 0.0))
  lq_tail = _masked_lse(lq, ~_in_set(ids, lq.shape[-1]) & (lq > -jnp.inf))
  # When S covers the whole (valid) vocabulary the teacher's residual tail mass is rounding
  # error: the tail category does not exist and contributes 0.
  tail = jnp.where(lq_tail > -jnp.inf, _kl_terms(lp_tail, lq_tail), 0.0)
  nonempty = jnp.any(lq > -jnp.inf, axis=-1)
  return _position_mask(head + tail, nonempty, where)


def truncated_topk_kl(student_logits: Array, topk_ids: Array, topk_log_probs: Array, *,
                      temperature: float = 1.0, axis: int = -1,
                      where: Array | None = None) -> Array:
  r"""The truncated sum Σ_{v∈S} p_v log(p_v / q_v) — NOT a divergence (can be negative).

  Provided only to reproduce the bias reported in verl RFC #7856 (a clamp at 0 fired in 415/467
  steps); use :func:`topk_tail_kl` instead. Arguments as in :func:`topk_tail_kl`.
  """
  lq = _student_log_probs(student_logits, temperature, axis)
  ids = _check_ids("topk_ids", topk_ids, lq.shape[:-1], lq.shape[-1])
  lp = _checks.check_array("topk_log_probs", topk_log_probs).astype(lq.dtype)
  _checks.check_same_shape("topk_ids", ids, "topk_log_probs", lp)
  head = jnp.sum(_kl_terms(lp, jnp.take_along_axis(lq, ids, axis=-1)), axis=-1)
  return _position_mask(head, jnp.any(lq > -jnp.inf, axis=-1), where)
