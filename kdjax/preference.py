r"""ADPO — anchored preference objectives (arXiv:2510.18913, Wang Zixian; spec: adpo.md).

ADPO minimises, per context x with a finite candidate set S_x = {y_1, ..., y_P},

.. math:: \mathcal L = -\sum_i q_i \log \tilde p_i,\qquad
          \tilde p = \mathrm{softmax}(u),\quad u_i = (\ell_i - \ell^{\rm ref}_i)/\tau,

with student log-probs ℓ, anchor log-probs ℓ_ref, the anchor temperature τ (keyword
``temperature``) and a target distribution q. It equals
KL(q ‖ p̃) + H(q); its gradient in ℓ is (p̃ − q)/τ and its Hessian in ℓ is
(Diag(p̃) − p̃p̃ᵀ)/τ² (the "implicit trust region"). It contains SFT, Hinton KD, max-ent RL, DPO
and soft DPO as special cases (see theory/adpo.md, all checked numerically).

Conventions (all functions):

* The candidate axis is the **last** axis. Nothing is reduced over the batch: functions return
  one value per group (the input shape without the candidate axis); reduce with
  :mod:`kdjax.reductions` (e.g. ``masked_mean(loss, where=batch_mask)``).
* ``where`` may have the candidate shape (False removes a candidate from the group: the softmax
  and the target are renormalised over the rest) or the batch shape (False gives value 0 and
  gradient 0 for the whole group). A group with no valid candidate gives 0, never NaN.
  ``where`` is boolean (a float mask is a ``TypeError``) and broadcastable to the input.
* A candidate whose log-prob (student or anchor) or anchored logit is ``-inf`` drops out of its
  group exactly as if ``where`` removed it (value and gradient finite; the target is
  renormalised over the rest). NaN is never treated as missing: it propagates to the output.
* Concrete inputs are validated (targets must be distributions, pair labels in [0, 1], every
  entry of an array hyper-parameter in range); traced values are not checked.
* Hyper-parameters are keyword-only. Computed in float32 (float64 if an input is float64).
* Labels: [paper] = the paper / the author's LaTeX draft / the author's code
  (github.com/wk222/verlm ``verl/trainer/adpo/core_algos.py``); [proposed] = kdjax's choice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace
from kdjax import policy

Array = jax.Array

__all__ = [
    # core
    "anchored_logits", "adpo_loss", "adpo_kl", "anchored_ce",
    # sequences
    "sequence_log_prob", "anchored_scores", "mean_abs_logratio", "k3_kl_penalty",
    # targets
    "group_zscore", "target_from_rewards", "bradley_terry_target", "pair_labels",
    "one_hot_winner", "teacher_target", "positive_reward_groups",
    # variants
    "adpo_direct_loss", "adpo_top1_loss", "adpo_pairwise_loss", "adpo_soft_pairwise_loss",
    "adpo_plackett_luce_loss", "adpo_softmax_variant_loss", "z_loss", "ordered_pair_count",
    # DPO
    "dpo_loss", "soft_dpo_loss",
    # anchors
    "fixed_anchor", "on_policy_anchor", "ema_anchor", "periodic_anchor", "KLWindow",
    "kl_window_init", "kl_triggered", "copy_if",
    # adaptive temperature
    "tau_entropy_rule", "tau_smooth_hybrid", "tau_batch_scalar", "normalized_entropy",
    "minmax_normalize",
    # author defaults
    "AUTHOR_CLIP_RATIO", "AUTHOR_CLIP_U",
]

# The author's code clips log-ratios to ±5 and anchored logits to ±10 [paper, code].
AUTHOR_CLIP_RATIO = 5.0
AUTHOR_CLIP_U = 10.0


# ----------------------------------------------------------------------------- helpers


def _prep(name: str, x: Any, *others: tuple[str, Any]):
  """Validates arrays of one shape (rank >= 1, no concrete +inf) and casts them to the compute
  dtype."""
  arrs = [_checks.check_array(name, x)]
  for n, o in others:
    a = _checks.check_array(n, o)
    _checks.check_same_shape(name, arrs[0], n, a)
    arrs.append(a)
  for n, a in [(name, x)] + list(others):
    _checks.check_no_posinf(n, a)
  dtype = _checks.compute_dtype(*arrs)
  return [a.astype(dtype) for a in arrs]


def _masks(where, shape):
  """(candidate mask [shape], batch mask [shape[:-1]] or None), candidate mask never None."""
  cand, batch = _checks.split_where(where, tuple(shape), len(shape) - 1)
  if cand is None:
    cand = jnp.ones(shape, bool)
  return cand, batch


def _u_masks(where, u):
  """As :func:`_masks`, with -inf anchored logits removed from the candidate mask."""
  cand, batch = _masks(where, u.shape)
  return cand & _logspace.valid_entries(u), batch


def _finish(values: Array, cand: Array, batch: Array | None) -> Array:
  keep = jnp.any(cand, axis=-1)
  if batch is not None:
    keep = keep & batch
  return jnp.where(keep, values, 0.0)


def _renormalise(q: Array, cand: Array) -> Array:
  """q restricted to the valid candidates and renormalised; an all-zero row stays 0 (NaN
  propagates)."""
  q = jnp.where(cand, q, 0.0)
  s = jnp.sum(q, axis=-1, keepdims=True)
  return jnp.where(s == 0, 0.0, q / jnp.where(s == 0, 1.0, s))


def _entropy(log_q: Array) -> Array:
  """−Σ q log q over the last axis (0·log 0 = 0; NaN propagates)."""
  pos = log_q != -jnp.inf
  lq = jnp.where(pos, log_q, 0.0)
  return -jnp.sum(jnp.where(pos, jnp.exp(lq) * lq, 0.0), axis=-1)


def _check_target(name: str, q: Any, cand: Array, batch: Array | None) -> None:
  """A concrete target must be a distribution over the candidates: entries >= 0 and every row
  of a kept group summing to 1 (NaN entries are not checked: they propagate)."""
  arr = _checks.concrete_array(q)
  if arr is None or arr.size == 0:
    return
  arr = arr.astype(np.float64)
  if np.any(arr < 0):
    raise ValueError(f"`{name}` must be a probability vector over the candidates (entries "
                     f">= 0), got a minimum of {np.nanmin(arr):.4g}.")
  sums = arr.sum(axis=-1)
  keep = np.ones(sums.shape, bool)
  c = _checks.concrete_array(cand)
  if c is not None:
    keep &= c.any(axis=-1)
  if batch is not None:
    b = _checks.concrete_array(batch)
    if b is not None:
      keep &= b
  bad = keep & ~np.isnan(sums) & (np.abs(sums - 1.0) > 1e-3)
  if np.any(bad):
    raise ValueError(f"`{name}` must sum to 1 over the candidate axis (a probability vector), "
                     f"got sums {np.unique(np.round(sums[bad], 4))[:4].tolist()}.")


def _check_unit_entries(name: str, x: Any) -> None:
  """Concrete data in [0, 1] (NaN passes: it propagates)."""
  arr = _checks.concrete_array(x)
  if arr is None or arr.size == 0:
    return
  arr = arr.astype(np.float64)
  if np.any((arr < 0) | (arr > 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got values in "
                     f"[{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}].")


def _temperature(name: str, value: Any, batch_shape: tuple[int, ...], dtype) -> Array:
  """A positive temperature, scalar or one per group (``[...]`` or ``[..., 1]``), returned as
  ``[*batch, 1]``."""
  _checks.check_positive(name, value)
  v = jnp.asarray(value, dtype)
  if v.ndim == len(batch_shape) + 1 and v.ndim and v.shape[-1] == 1:
    v = v[..., 0]
  return _checks.per_position(name, v, tuple(batch_shape), -1, dtype)


def _log_ratio(a: Array, b: Array) -> tuple[Array, Array]:
  """(a − b, ok) with ok = both entries not -inf; the difference is 0 (and NaN-free in the
  gradient) where not ok."""
  ok = _logspace.valid_entries(a) & _logspace.valid_entries(b)
  return jnp.where(ok, a, 0.0) - jnp.where(ok, b, 0.0), ok


def _same_shape_or_scalar(*named):
  """Validates numeric inputs that share one shape (0-d inputs broadcast); casts to float."""
  arrs = [_checks.check_array(n, x, min_rank=0) for n, x in named]
  shapes = {a.shape for a in arrs if a.ndim}
  if len(shapes) > 1:
    got = ", ".join(f"`{n}` {a.shape}" for (n, _), a in zip(named, arrs))
    raise ValueError(f"inputs must share one shape (scalars broadcast), got {got}.")
  shape = shapes.pop() if shapes else ()
  for (n, x), a in zip(named, arrs):
    _checks.check_no_posinf(n, x)
  dtype = _checks.compute_dtype(*arrs)
  return [jnp.broadcast_to(a.astype(dtype), shape) for a in arrs]


def _check_scores(name, scores, shape):
  s = _checks.check_array(name, scores)
  if s.shape != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)} (one score per candidate), "
                     f"got {s.shape}.")
  return s


def _nan_scores(values: Array, scores: Array, cand: Array) -> Array:
  """NaN where a kept candidate of the group has a NaN score (a comparison with NaN is False,
  which would otherwise silently drop the candidate from the ordering)."""
  bad = jnp.any(jnp.isnan(scores) & cand, axis=-1)
  return jnp.where(bad, jnp.nan, values)


# ----------------------------------------------------------------------------- core objective


def anchored_logits(logp: Array, logp_ref: Array, *, temperature: Any = 1.0) -> Array:
  r"""u = (ℓ − ℓ_ref)/τ, the anchored logits [paper, arXiv:2510.18913].

  ``temperature`` is τ > 0, a scalar or one value per group (``[...]``). A candidate with
  ℓ = −inf or ℓ_ref = −inf gets u = −inf (it drops out of every ADPO loss).
  """
  lp, lr = _prep("logp", logp, ("logp_ref", logp_ref))
  t = _temperature("temperature", temperature, lp.shape[:-1], lp.dtype)
  d, ok = _log_ratio(lp, lr)
  return jnp.where(ok, d / t, -jnp.inf)


def anchored_ce(u: Array, q: Array, *, where: Array | None = None) -> Array:
  r"""CE(q, softmax(u)) = −Σ_i q_i log softmax(u)_i on anchored logits ``u`` [paper].

  Computed as KL(q ‖ softmax(u)) + H(q). ``q`` must be a distribution over the candidates
  (checked when concrete); it is renormalised over the valid candidates (``where`` and u ≠ −inf).
  Gradient in u: softmax(u) − q.
  """
  u, q = _prep("u", u, ("q", q))
  cand, batch = _u_masks(where, u)
  _check_target("q", q, cand, batch)
  log_p = _logspace.masked_log_softmax(u, where=cand)
  log_q = _logspace.safe_log(_renormalise(q, cand))
  values = _logspace.plogratio(log_q, log_p, -1) + _entropy(log_q)
  return _finish(values, cand, batch)


def adpo_loss(logp: Array, logp_ref: Array, q: Array, *, temperature: Any = 1.0,
              where: Array | None = None) -> Array:
  r"""The general ADPO loss, per group [paper, arXiv:2510.18913 v6 Eq. (1)].

  .. math:: \mathcal L = -\sum_i q_i\,\log\mathrm{softmax}\Big(\frac{\ell-\ell^{\rm ref}}{\tau}
            \Big)_i = \mathrm{KL}(q\,\|\,\tilde p) + H(q).

  Args:
    logp: ``[..., P]`` student log-probabilities ℓ_i = log π_θ(y_i|x) of the candidates (any
      per-group shift cancels, so unnormalised scores work too).
    logp_ref: anchor log-probs ℓ_ref, same shape (stop-gradient it for a frozen anchor; use
      zeros for the uniform anchor).
    q: target distribution over the candidates, same shape (see the ``*_target`` helpers);
      a concrete ``q`` with a negative entry or a row not summing to 1 is a ``ValueError``.
    temperature: the anchor temperature τ > 0 (= 1/β of DPO); a scalar or one value per group.
    where: candidate mask (``[..., P]``) or group mask (``[...]``).

  Returns:
    ``[...]`` per-group loss. A candidate with ℓ or ℓ_ref = −inf drops out (as if masked).
    Special cases (theory/adpo.md): SFT (q one-hot, uniform anchor, τ=1), KD (q = softmax(z_T/T),
    uniform anchor, τ=T), max-ent RL (q = softmax(Q/α)), DPO (P=2, q=(1,0), τ=1/β), soft DPO
    (q=(q_w, 1−q_w)).
  """
  return anchored_ce(anchored_logits(logp, logp_ref, temperature=temperature), q, where=where)


def adpo_kl(logp: Array, logp_ref: Array, q: Array, *, temperature: Any = 1.0,
            where: Array | None = None) -> Array:
  r"""J = KL(q ‖ softmax((ℓ − ℓ_ref)/τ)) [paper]: :func:`adpo_loss` minus H(q) (same gradient).
  τ is ``temperature``."""
  u = anchored_logits(logp, logp_ref, temperature=temperature)
  u, q = _prep("u", u, ("q", q))
  cand, batch = _u_masks(where, u)
  _check_target("q", q, cand, batch)
  values = _logspace.plogratio(_logspace.safe_log(_renormalise(q, cand)),
                               _logspace.masked_log_softmax(u, where=cand), -1)
  return _finish(values, cand, batch)


# ----------------------------------------------------------------------------- sequences


def sequence_log_prob(token_logp: Array, *, where: Array | None = None,
                      length_normalize: bool = True) -> Array:
  r"""Sequence score s = mean_t log π(y_t|·) over response tokens (sum if not normalised).

  The author's code uses the length-normalised mean [paper, code]. ``token_logp`` is
  ``[..., T]``; ``where`` a boolean token mask broadcastable to it (None: every token); returns
  ``[...]``. An empty response scores 0.
  """
  lp = _checks.check_array("token_logp", token_logp)
  _checks.check_no_posinf("token_logp", token_logp)
  m = _checks.check_where(where, lp.shape)
  if m is None:
    m = jnp.ones(lp.shape, bool)
  dtype = _checks.compute_dtype(lp)
  total = jnp.sum(jnp.where(m, lp.astype(dtype), 0.0), axis=-1)
  if not length_normalize:
    return total
  n = jnp.sum(m, axis=-1)
  return jnp.where(n > 0, total / jnp.maximum(n, 1).astype(dtype), 0.0)


def anchored_scores(seq_logp: Array, seq_logp_ref: Array, *, temperature: Any = 1.0,
                    clip_ratio: float | None = None, clip_u: float | None = None) -> Array:
  r"""Anchored logits for sequences: u = clip(clip(s − s_ref, ±c_r)/τ, ±c_u), τ = ``temperature``.

  The author's code clips with c_r = 5, c_u = 10 (:data:`AUTHOR_CLIP_RATIO`,
  :data:`AUTHOR_CLIP_U`) [paper, code]. Design choice (kdjax) [proposed]: no clipping by default,
  because clipping zeroes the gradient of saturated candidates and breaks the exact identities
  of theory/adpo.md; pass the author's values to reproduce the code. A candidate with s or
  s_ref = −inf gets u = −inf (it drops out).
  """
  if clip_ratio is not None:
    _checks.check_positive("clip_ratio", clip_ratio)
  if clip_u is not None:
    _checks.check_positive("clip_u", clip_u)
  s, sr = _prep("seq_logp", seq_logp, ("seq_logp_ref", seq_logp_ref))
  t = _temperature("temperature", temperature, s.shape[:-1], s.dtype)
  ratio, ok = _log_ratio(s, sr)
  if clip_ratio is not None:
    ratio = jnp.clip(ratio, -clip_ratio, clip_ratio)
  u = ratio / t
  if clip_u is not None:
    u = jnp.clip(u, -clip_u, clip_u)
  return jnp.where(ok, u, -jnp.inf)


def mean_abs_logratio(seq_logp: Array, seq_logp_ref: Array, *, where: Array | None = None
                      ) -> Array:
  r"""mean_i ``|s_i − s_ref,i|`` per group: what the author's code logs as "anchor KL" (a proxy,
  not a KL) [paper, code]; named honestly here [proposed]. −inf candidates drop out."""
  s, sr = _prep("seq_logp", seq_logp, ("seq_logp_ref", seq_logp_ref))
  cand, batch = _masks(where, s.shape)
  d, ok = _log_ratio(s, sr)
  cand = cand & ok
  n = jnp.sum(cand, axis=-1)
  v = jnp.sum(jnp.where(cand, jnp.abs(d), 0.0), axis=-1) / jnp.maximum(n, 1)
  return _finish(v, cand, batch)


def k3_kl_penalty(token_logp: Array, token_logp_ref: Array, *,
                  where: Array | None = None) -> Array:
  r"""k3 estimator mean_t[e^{ℓ_ref−ℓ} − (ℓ_ref − ℓ) − 1] ≥ 0 per sequence [paper, code]
  (weight β_kl, default 0 in the author's code). Shapes ``[..., T]`` → ``[...]``; ``where`` is
  a boolean token mask broadcastable to them. A token with ℓ or ℓ_ref = −inf drops out of the
  mean (finite value and gradient); a sequence without tokens gives 0. The token mean of
  :func:`kdjax.losses.onpolicy.kl_estimate` (``kind="k3"``)."""
  lp, lr = _prep("token_logp", token_logp, ("token_logp_ref", token_logp_ref))
  m = _checks.check_where(where, lp.shape)
  _, ok = _log_ratio(lr, lp)
  if m is not None:
    ok = ok & m
  from kdjax.losses.onpolicy import kl_estimate  # pylint: disable=import-outside-toplevel
  k3 = kl_estimate(lp, lr, kind="k3", where=ok)
  n = jnp.sum(ok, axis=-1)
  return jnp.sum(k3, axis=-1) / jnp.maximum(n, 1)


# ----------------------------------------------------------------------------- targets


def group_zscore(rewards: Array, *, where: Array | None = None, eps: Any = 1e-8) -> Array:
  r"""Group-relative advantages A_i = (r_i − mean r)/(std r + ε) over the candidate axis
  [paper, code]: :func:`kdjax.policy.group_relative_advantages` with the Bessel-corrected std
  (``ddof=1``) of the author's code.

  A constant or singleton group gives A = 0 (also at ε = 0); masked candidates get A = 0 and a
  group mask gives 0 for the whole group. NaN rewards propagate to their group.
  """
  return policy.group_relative_advantages(rewards, ddof=1, eps=eps, where=where)


def target_from_rewards(rewards: Array, *, beta_r: Any = 0.3, zscore: bool = True,
                        where: Array | None = None) -> Array:
  r"""Listwise target q = softmax(A/β_r), A = z-scored group rewards [paper, Alg. 1].

  β_r = 0.3 in the author's later code (0.5 in the first code and the LLM run); a scalar or one
  value per group. With ``zscore=False`` the raw rewards are used (softmax(r/β_r), a Boltzmann
  target). Masked candidates get q = 0; a NaN reward makes its group's target NaN.
  """
  (r,) = _prep("rewards", rewards)
  beta = _temperature("beta_r", beta_r, r.shape[:-1], r.dtype)
  cand, _ = _masks(where, r.shape)
  a = group_zscore(r, where=cand) if zscore else r
  return jnp.exp(_logspace.masked_log_softmax(a / beta, where=cand))


def bradley_terry_target(r_w: Array, r_l: Array, *, beta_r: Any = 1.0) -> Array:
  r"""Bradley–Terry soft label for a pair: q = (σ((r_w − r_l)/β_r), σ((r_l − r_w)/β_r)) on a new
  trailing axis of size 2 [paper, Table 1]."""
  _checks.check_positive("beta_r", beta_r)
  rw, rl = _same_shape_or_scalar(("r_w", r_w), ("r_l", r_l))
  d = (rw - rl) / jnp.asarray(beta_r, rw.dtype)
  return jnp.stack([jax.nn.sigmoid(d), jax.nn.sigmoid(-d)], axis=-1)


def pair_labels(scores: Array, *, beta_r: Any = None) -> Array:
  r"""Pairwise labels q_ij ∈ [0, 1] for every ordered pair, shape ``[..., P, P]``.

  Soft (β_r given): q_ij = σ((r_i − r_j)/β_r) [proposed]. Hard (β_r None): 1[r_i > r_j], and 1/2
  for ties. A NaN score gives NaN labels for its pairs.
  """
  (r,) = _prep("scores", scores)
  d = r[..., :, None] - r[..., None, :]
  if beta_r is None:
    hard = jnp.where(d > 0, 1.0, jnp.where(d < 0, 0.0, 0.5)).astype(r.dtype)
    return jnp.where(jnp.isnan(d), jnp.nan, hard)
  _checks.check_positive("beta_r", beta_r)
  return jax.nn.sigmoid(d / jnp.asarray(beta_r, r.dtype))


def one_hot_winner(scores: Array, *, where: Array | None = None) -> Array:
  """One-hot target on argmax of ``scores`` among the valid candidates (SFT / top-1) [paper].

  A NaN among the valid scores makes the group's target NaN (it is never picked or skipped).
  """
  (s,) = _prep("scores", scores)
  cand, _ = _masks(where, s.shape)
  has_nan = jnp.any(cand & jnp.isnan(s), axis=-1, keepdims=True)
  idx = jnp.argmax(jnp.where(cand & ~jnp.isnan(s), s, -jnp.inf), axis=-1)
  oh = jax.nn.one_hot(idx, s.shape[-1], dtype=s.dtype)
  oh = jnp.where(jnp.any(cand, axis=-1, keepdims=True), oh, 0.0)
  return jnp.where(has_nan, jnp.nan, oh)


def teacher_target(teacher_logits: Array, *, temperature: Any = 1.0,
                   where: Array | None = None) -> Array:
  """Teacher distribution q = softmax(z_T/T) over the candidates (KD, max-ent: z_T = Q,
  T = α) [paper, Table 1]; T scalar or one per group. Stop-gradiented."""
  (z,) = _prep("teacher_logits", teacher_logits)
  t = _temperature("temperature", temperature, z.shape[:-1], z.dtype)
  cand, _ = _masks(where, z.shape)
  zt = jnp.where(_logspace.valid_entries(z), z, 0.0) / t
  zt = jnp.where(_logspace.valid_entries(z), zt, -jnp.inf)
  return jax.lax.stop_gradient(jnp.exp(_logspace.masked_log_softmax(zt, where=cand)))


def positive_reward_groups(rewards: Array, *, where: Array | None = None) -> Array:
  """Group mask: False where every valid reward is ≤ 0 (the author's optional filter) [paper,
  code]. Pass it as the batch-shaped ``where`` of a loss."""
  (r,) = _prep("rewards", rewards)
  cand, _ = _masks(where, r.shape)
  return jnp.any(cand & (r > 0), axis=-1)


# ----------------------------------------------------------------------------- code variants


def adpo_direct_loss(u: Array, q: Array, *, center: bool = True,
                     where: Array | None = None) -> Array:
  r"""The code's ``direct`` variant: −Σ q_i u^c_i + logsumexp(u^c), u^c = u − sg(Σ q_i u_i)
  [paper, code]. Equal to :func:`anchored_ce` in value and gradient (the centring only changes
  logged values)."""
  u, q = _prep("u", u, ("q", q))
  cand, batch = _u_masks(where, u)
  _check_target("q", q, cand, batch)
  qn = _renormalise(q, cand)
  uu = jnp.where(cand, u, 0.0)
  if center:
    uu = uu - jax.lax.stop_gradient(jnp.sum(qn * uu, axis=-1, keepdims=True))
  values = -jnp.sum(qn * uu, axis=-1) + _logspace.masked_logsumexp(uu, where=cand)
  return _finish(values, cand, batch)


def adpo_top1_loss(u: Array, order_scores: Array, *, where: Array | None = None) -> Array:
  r"""Top-1-vs-rest (the code's ``infonce``): −u_{i*} + logsumexp(u), i* = argmax of
  ``order_scores`` (e.g. advantages) among the valid candidates [paper, code and Table 1]."""
  (uu,) = _prep("u", u)
  s = _check_scores("order_scores", order_scores, uu.shape)
  cand, batch = _u_masks(where, uu)
  oh = one_hot_winner(s, where=cand).astype(uu.dtype)
  uu = jnp.where(cand, uu, 0.0)
  values = -jnp.sum(oh * uu, axis=-1) + _logspace.masked_logsumexp(uu, where=cand)
  return _finish(_nan_scores(values, s, cand), cand, batch)


def ordered_pair_count(order_scores: Array, *, where: Array | None = None) -> Array:
  """Number of strictly ordered valid pairs per group (the hard pairwise loss's normaliser).

  Returned as a float (float32 / float64) so that a NaN score of a kept candidate gives NaN
  (never a silently smaller count)."""
  (s,) = _prep("order_scores", order_scores)
  cand, _ = _masks(where, s.shape)
  pm = (s[..., :, None] > s[..., None, :]) & cand[..., :, None] & cand[..., None, :]
  return _nan_scores(jnp.sum(pm, axis=(-2, -1)).astype(s.dtype), s, cand)


def adpo_pairwise_loss(u: Array, order_scores: Array, *, where: Array | None = None) -> Array:
  r"""The code's ``pairwise`` variant (hard labels): mean over ordered pairs with A_i > A_j of
  softplus(−(u_i − u_j)) = DPO on every strictly ordered pair; ties excluded [paper, code].

  Returns the per-group mean (0 for a group without an ordered pair). The author normalises by
  the number of pairs in the whole batch: reproduce it with
  ``kdjax.reductions.masked_mean(loss, weights=ordered_pair_count(order_scores))``.
  """
  (uu,) = _prep("u", u)
  s = _check_scores("order_scores", order_scores, uu.shape)
  cand, batch = _u_masks(where, uu)
  uu = jnp.where(cand, uu, 0.0)
  pm = (s[..., :, None] > s[..., None, :]) & cand[..., :, None] & cand[..., None, :]
  d = uu[..., :, None] - uu[..., None, :]
  total = jnp.sum(jnp.where(pm, jax.nn.softplus(-d), 0.0), axis=(-2, -1))
  n = jnp.sum(pm, axis=(-2, -1))
  return _finish(_nan_scores(jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0), s, cand), cand,
                 batch)


def adpo_soft_pairwise_loss(u: Array, q_pairs: Array, *, reduce_pairs: str = "mean",
                            where: Array | None = None) -> Array:
  r"""Soft pairwise ADPO [proposed; the v1 formula is not published]:

  .. math:: -\sum_{i<j}\big[q_{ij}\log\sigma(u_i-u_j) + (1-q_{ij})\log\sigma(u_j-u_i)\big]

  over valid pairs, divided by their number when ``reduce_pairs="mean"`` (default) or summed
  (``"sum"``, the formula as written). ``q_pairs`` ``[..., P, P]`` in [0, 1] from
  :func:`pair_labels` (only i < j is read; concrete values outside [0, 1] raise). With
  q_ij ∈ {0, 1} and no ties it equals :func:`adpo_pairwise_loss`.
  """
  if reduce_pairs not in ("mean", "sum"):
    raise ValueError(f"`reduce_pairs` must be 'mean' or 'sum', got {reduce_pairs!r}.")
  (uu,) = _prep("u", u)
  qp = _checks.check_array("q_pairs", q_pairs, min_rank=2)
  if qp.shape != uu.shape + uu.shape[-1:]:
    raise ValueError(f"`q_pairs` must have shape {uu.shape + uu.shape[-1:]}, got {qp.shape}.")
  _check_unit_entries("q_pairs", q_pairs)
  qp = qp.astype(uu.dtype)
  cand, batch = _u_masks(where, uu)
  p = uu.shape[-1]
  upper = jnp.triu(jnp.ones((p, p), bool), k=1)
  pm = upper & cand[..., :, None] & cand[..., None, :]
  uu = jnp.where(cand, uu, 0.0)
  d = uu[..., :, None] - uu[..., None, :]
  terms = qp * jax.nn.softplus(-d) + (1 - qp) * jax.nn.softplus(d)
  total = jnp.sum(jnp.where(pm, terms, 0.0), axis=(-2, -1))
  if reduce_pairs == "mean":
    n = jnp.sum(pm, axis=(-2, -1))
    total = jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0)
  return _finish(total, cand, batch)


def adpo_plackett_luce_loss(u: Array, order_scores: Array, *, top_k: int | None = None,
                            poly_eps: Any = 0.0, label_smoothing: Any = 0.0,
                            temperature: Any = 1.0, where: Array | None = None) -> Array:
  r"""Plackett–Luce / ListMLE variant (the code's ``plackett_luce``) [paper, code].

  Sort the valid candidates by ``order_scores`` descending (σ); the loss is

  .. math:: \frac1K\sum_{k=1}^{K}\ell_k,\qquad
            \ell_k = -u_{\sigma(k)} + \mathrm{logsumexp}_{j\ge k}\,u_{\sigma(j)},

  K = G − 1 (G valid candidates), or min(top_k, G − 1) with ``top_k``. Extras of later
  commits (off by default here; the author's later defaults are ``top_k=3, poly_eps=1,
  label_smoothing=0.1``): Poly-1 ℓ_k + ε(1 − e^{−ℓ_k}); label smoothing
  (1−ε)ℓ_k + ε(logsumexp_{j≥k}u − mean_{j≥k}u); u/τ first (τ = ``temperature``, scalar or per
  group). ``poly_eps``, ``label_smoothing`` and ``temperature`` may be traced (no Python branch
  on their values). Ties in the scores keep the candidates' order (stable sort).
  """
  if top_k is not None:
    top_k = _checks.check_int("top_k", top_k, low=1)
  _checks.check_nonneg("poly_eps", poly_eps)
  _checks.check_unit_interval("label_smoothing", label_smoothing)
  (uu,) = _prep("u", u)
  t = _temperature("temperature", temperature, uu.shape[:-1], uu.dtype)
  s = _check_scores("order_scores", order_scores, uu.shape)
  cand, batch = _u_masks(where, uu)
  # Valid candidates first, by score descending (stable).
  key = jnp.where(cand, -s.astype(uu.dtype), jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)
  us = jnp.take_along_axis(jnp.where(cand, uu, 0.0) / t, order, axis=-1)
  vs = jnp.take_along_axis(cand, order, axis=-1)
  p = uu.shape[-1]
  suffix = jnp.triu(jnp.ones((p, p), bool))  # suffix[k, j] = j >= k
  smask = suffix & vs[..., None, :]
  lse = _logspace.masked_logsumexp(jnp.broadcast_to(us[..., None, :], smask.shape), where=smask)
  lse = jnp.where(vs, lse, 0.0)
  lk = jnp.where(vs, lse - us, 0.0)
  ls = jnp.asarray(label_smoothing, uu.dtype)
  cnt = jnp.sum(smask, axis=-1)
  mean_suf = jnp.sum(jnp.where(smask, us[..., None, :], 0.0), axis=-1) / jnp.maximum(cnt, 1)
  lk = (1 - ls) * lk + ls * jnp.where(vs, lse - mean_suf, 0.0)
  lk = lk + jnp.asarray(poly_eps, uu.dtype) * (1.0 - jnp.exp(-lk))
  g = jnp.sum(vs, axis=-1, keepdims=True)
  k_max = g - 1 if top_k is None else jnp.minimum(g - 1, top_k)
  pos = jnp.arange(p)
  use = (pos < k_max) & vs
  total = jnp.sum(jnp.where(use, lk, 0.0), axis=-1)
  n = jnp.squeeze(k_max, -1)
  return _finish(_nan_scores(jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0), s, cand), cand,
                 batch)


def adpo_softmax_variant_loss(logp: Array, logp_ref: Array, q: Array, *, temperature: Any = 1.0,
                              a_c: Any = 1.0, b_c: Any = 0.0, c_c: Any = 0.0,
                              scale: Any = 1.0, where: Array | None = None) -> Array:
  r"""The code's ``softmax`` variant: CE(q, softmax(u')), u' = (ℓ − A_c ℓ_ref − B_c q − C_c)/τ
  (τ = ``temperature``) [paper, code]. A_c = 1, B_c = C_c = 0 is :func:`adpo_loss`; A_c = 0 is
  "SFT-like"; the ``scaled`` variant is ``scale=20`` (gradient scale only). A candidate with
  ℓ = −inf (or ℓ_ref = −inf with A_c ≠ 0) drops out."""
  for n, v in (("a_c", a_c), ("b_c", b_c), ("c_c", c_c), ("scale", scale)):
    _checks.check_range(n, v)
  lp, lr, qq = _prep("logp", logp, ("logp_ref", logp_ref), ("q", q))
  t = _temperature("temperature", temperature, lp.shape[:-1], lp.dtype)
  ac = jnp.asarray(a_c, lp.dtype)
  ref_ok = _logspace.valid_entries(lr)
  ok = _logspace.valid_entries(lp) & (ref_ok | (ac == 0))
  lp_s = jnp.where(ok, lp, 0.0)
  lr_s = jnp.where(ok & ref_ok, lr, 0.0)
  u = (lp_s - ac * lr_s - b_c * qq - c_c) / t
  u = jnp.where(ok, u, -jnp.inf)
  return scale * anchored_ce(u, qq, where=where)


def z_loss(u: Array, *, where: Array | None = None, group_where: Array | None = None) -> Array:
  r"""(mean over groups of logsumexp u)² — the author's z-loss before its coefficient c
  [paper, code]. A batch statistic by definition, so it returns a scalar (``group_where``, a
  boolean mask of the group shape, masks groups; ``where`` masks candidates)."""
  (uu,) = _prep("u", u)
  cand, batch = _u_masks(where, uu)
  gw = jnp.any(cand, -1)
  lse = jnp.where(gw, _logspace.masked_logsumexp(jnp.where(cand, uu, 0.0), where=cand), 0.0)
  g = _checks.check_where(group_where, gw.shape, name="group_where")
  if g is not None:
    gw = gw & g
  if batch is not None:
    gw = gw & batch
  from kdjax import reductions  # pylint: disable=import-outside-toplevel
  return reductions.masked_mean(lse, where=gw) ** 2


# ----------------------------------------------------------------------------- DPO


def _pair_margin(logp_w, logp_l, logp_ref_w, logp_ref_l, beta, extra=()):
  """β[(ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l)] and ok = no input is −inf (the pair drops out)."""
  _checks.check_positive("beta", beta)
  arrs = _same_shape_or_scalar(("logp_w", logp_w), ("logp_l", logp_l),
                               ("logp_ref_w", logp_ref_w), ("logp_ref_l", logp_ref_l), *extra)
  w, l, rw, rl = arrs[:4]
  b = jnp.asarray(beta, w.dtype)
  if b.ndim and jnp.broadcast_shapes(b.shape, w.shape) != w.shape:
    raise ValueError(f"`beta` must be a scalar or broadcastable to the pair shape {w.shape}, "
                     f"got shape {b.shape}.")
  dw, ok_w = _log_ratio(w, rw)
  dl, ok_l = _log_ratio(l, rl)
  ok = ok_w & ok_l
  return jnp.where(ok, b * (dw - dl), 0.0), ok, arrs[4:]


def dpo_loss(logp_w: Array, logp_l: Array, logp_ref_w: Array, logp_ref_l: Array, *,
             beta: Any = 0.1) -> Array:
  r"""DPO: −log σ(β[(ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l)]) per pair (Rafailov et al.,
  arXiv:2305.18290) [paper]. Independent implementation; :func:`adpo_loss` with P = 2,
  q = (1, 0), τ = 1/β equals it (checked in theory/adpo.md).

  The four inputs share one shape (0-d inputs broadcast; other shape mismatches raise). A pair
  with a −inf log-prob drops out (value 0, gradient 0), as the −inf candidate does in
  :func:`adpo_loss`.
  """
  d, ok, _ = _pair_margin(logp_w, logp_l, logp_ref_w, logp_ref_l, beta)
  return jnp.where(ok, jax.nn.softplus(-d), 0.0)


def soft_dpo_loss(logp_w: Array, logp_l: Array, logp_ref_w: Array, logp_ref_l: Array,
                  q_w: Array, *, beta: Any = 0.1) -> Array:
  r"""Soft-label DPO / Bradley–Terry: −q_w log σ(Δ) − (1 − q_w) log σ(−Δ),
  Δ = β[(ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l)] [paper, Table 1]. q_w ∈ [0, 1] (checked when
  concrete). Shapes and −inf as in :func:`dpo_loss`."""
  _check_unit_entries("q_w", q_w)
  d, ok, (qw,) = _pair_margin(logp_w, logp_l, logp_ref_w, logp_ref_l, beta,
                              extra=(("q_w", q_w),))
  return jnp.where(ok, qw * jax.nn.softplus(-d) + (1 - qw) * jax.nn.softplus(d), 0.0)


# ----------------------------------------------------------------------------- anchors


def fixed_anchor(params_ref, params):  # pylint: disable=unused-argument
  """Fixed anchor (reference / uniform / teacher): the anchor never moves [paper]."""
  return params_ref


def on_policy_anchor(params_ref, params):  # pylint: disable=unused-argument
  """On-policy anchor π_ref ← π_old: a stop-gradiented copy of the current parameters, taken
  when a new group is sampled [paper, code default]. At the first step after the copy u = 0
  and the gradient in ℓ is (1/G − q)/τ (theory/adpo.md#on-policy)."""
  return jax.tree.map(jax.lax.stop_gradient, params)


def ema_anchor(params_ref, params, *, decay: Any = 0.99):
  r"""EMA anchor θ_ref ← a θ_ref + (1 − a) θ, a pytree map [paper, code; a = 0.99].

  The same update as ``optax.incremental_update(params, params_ref, step_size=1 - decay)``
  (kdjax does not depend on optax; tests check the equality), with θ stop-gradiented.
  ``decay`` ∈ [0, 1] (every entry when an array; traced values are unchecked).
  """
  _checks.check_unit_interval("decay", decay)
  step = 1 - decay
  return jax.tree.map(
      lambda p, r: step * jax.lax.stop_gradient(p) + (1 - step) * r, params, params_ref)


def copy_if(do_copy: Array, params_ref, params):
  """θ_ref ← θ where ``do_copy`` (a traced bool works: no Python branch)."""
  return jax.tree.map(lambda r, p: jnp.where(do_copy, jax.lax.stop_gradient(p), r),
                      params_ref, params)


def periodic_anchor(params_ref, params, step: Array, *, every: int):
  """Offline + periodic anchor: hard copy every ``every`` steps (N is not published) [paper].

  The same update as ``optax.periodic_update(params, params_ref, step, every)`` (a select
  instead of a ``cond``, so it also works under ``vmap``), with θ stop-gradiented.
  """
  every = _checks.check_int("every", every, low=1)
  return copy_if(jnp.asarray(step) % every == 0, params_ref, params)


class KLWindow(NamedTuple):
  """Ring buffer of the last ``size`` anchor-KL values (a pytree: carry it in the train state)."""
  values: Array
  count: Array  # how many values were pushed since the last copy (saturates at size)
  head: Array


def kl_window_init(size: int = 10, dtype=jnp.float32) -> KLWindow:
  """An empty window of ``size`` anchor-KL values."""
  size = _checks.check_int("size", size, low=1)
  return KLWindow(jnp.zeros((size,), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def kl_triggered(window: KLWindow, new_kl: Array, *, threshold: Any = 0.1,
                 size: int | None = None) -> tuple[KLWindow, Array]:
  r"""KL-triggered anchor: push ``new_kl``; fire iff the window is full and its mean exceeds
  ``threshold`` [paper, code: size 10, threshold 0.1]. Returns (new window, do_copy); apply the
  copy with :func:`copy_if`. Design choice (kdjax) [proposed]: the window is emptied after a
  copy (the new anchor starts a fresh history).
  """
  _checks.check_range("threshold", threshold)
  size = window.values.shape[0] if size is None else _checks.check_int("size", size, low=1)
  if size != window.values.shape[0]:
    raise ValueError(f"`size`={size} does not match the window's {window.values.shape[0]}.")
  vals = window.values.at[window.head].set(jnp.asarray(new_kl, window.values.dtype))
  count = jnp.minimum(window.count + 1, size)
  head = (window.head + 1) % size
  fire = (count >= size) & (jnp.mean(vals) > threshold)
  new = KLWindow(jnp.where(fire, 0.0, vals), jnp.where(fire, 0, count), jnp.where(fire, 0, head))
  return new, fire


# ----------------------------------------------------------------------------- adaptive τ


def normalized_entropy(logits: Array, *, where: Array | None = None) -> Array:
  r"""H(softmax(z))/log V ∈ [0, 1] over the last axis (a Smooth-Hybrid input) [paper, code]."""
  (z,) = _prep("logits", logits)
  cand, _ = _masks(where, z.shape)
  cand = cand & _logspace.valid_entries(z)
  lp = _logspace.masked_log_softmax(z, where=cand)
  v = jnp.sum(cand, axis=-1).astype(z.dtype)
  h = _entropy(lp)
  return jax.lax.stop_gradient(
      jnp.clip(jnp.where(v > 1, h / jnp.log(jnp.maximum(v, 2)), 0.0), 0.0, 1.0))


def minmax_normalize(x: Array, *, where: Array | None = None) -> Array:
  """(x − min)/(max − min) over the whole array (masked), 0.5 if all equal [paper, code].
  NaN among the kept entries propagates."""
  x = _checks.check_array("x", x, min_rank=0)
  x = x.astype(_checks.compute_dtype(x))
  keep = _checks.check_where(where, x.shape)
  if keep is None:
    keep = jnp.ones(x.shape, bool)
  lo = jnp.min(jnp.where(keep, x, jnp.inf))
  hi = jnp.max(jnp.where(keep, x, -jnp.inf))
  rng = hi - lo
  ok = jnp.isfinite(rng) & (rng > 0)
  out = jnp.where(ok, (x - lo) / jnp.where(ok, rng, 1.0), 0.5)
  return jax.lax.stop_gradient(jnp.where(jnp.isnan(rng), jnp.nan, out))


def tau_entropy_rule(q: Array, *, tau_base: Any = 0.8, a: Any = 0.5,
                     tau_min: Any = 0.05, where: Array | None = None) -> Array:
  r"""Entropy-of-target rule τ(x) = max(τ_min, τ_base(1 − a H(q)/log G)), per group, under
  stop-gradient [paper, code: first verl commit; defaults 0.8, 0.5, 0.05]. Sharp targets get a
  larger τ. G = number of valid candidates (H/log G := 0 for G = 1). Pass the result as
  ``temperature=`` of the losses."""
  for n, v in (("tau_base", tau_base), ("tau_min", tau_min)):
    _checks.check_positive(n, v)
  _checks.check_range("a", a)
  (qq,) = _prep("q", q)
  cand, _ = _masks(where, qq.shape)
  qq = _renormalise(qq, cand)
  g = jnp.sum(cand, axis=-1).astype(qq.dtype)
  h = _entropy(_logspace.safe_log(qq))
  hn = jnp.where(g > 1, h / jnp.log(jnp.maximum(g, 2)), 0.0)
  return jax.lax.stop_gradient(jnp.maximum(tau_min, tau_base * (1 - a * hn)))


def tau_smooth_hybrid(h_norm: Array, r_norm: Array, *, tau_base: Any = 0.8, a: Any = 0.5,
                      b: Any = 0.5, tau_min: Any = 0.05, tau_max: Any = 5.0) -> Array:
  r"""Smooth Hybrid τ = clamp(τ_base(1 + aH̄ + b(1 − H̄)(1 − R)), τ_min, τ_max) [paper, LaTeX
  Eq. 8; code defaults a = b = 0.5, τ_min = 0.05, τ_max = 5]. H̄ (normalised entropy) and R
  (min–max normalised reward, :func:`minmax_normalize`) are clamped to [0, 1]. Stop-gradient."""
  _checks.check_positive("tau_base", tau_base)
  for n, v in (("a", a), ("b", b), ("tau_min", tau_min)):
    _checks.check_range(n, v)
  _checks.check_range("tau_max", tau_max, allow_inf=True)
  lo, hi = _checks.concrete_array(tau_min), _checks.concrete_array(tau_max)
  if lo is not None and hi is not None and np.any(lo > hi):
    raise ValueError(f"`tau_min` ({tau_min}) must be <= `tau_max` ({tau_max}).")
  h = jnp.clip(_checks.check_array("h_norm", h_norm, min_rank=0), 0.0, 1.0)
  r = jnp.clip(_checks.check_array("r_norm", r_norm, min_rank=0), 0.0, 1.0)
  tau = tau_base * (1 + a * h + b * (1 - h) * (1 - r))
  return jax.lax.stop_gradient(jnp.clip(tau, tau_min, tau_max))


def tau_batch_scalar(s: Array, s_ref: Array, adv: Array, *, temperature: Any = 1.0,
                     a: Any = 0.2, b: Any = 0.5, log_vocab: Any, tau_lo: Any = 0.2,
                     tau_hi: Any = 1.5, where: Array | None = None) -> Array:
  r"""Batch-scalar rule (verl HEAD, off by default) [paper, code]:
  h_static = mean clamp(−s_ref/log V, 0, 1); conf = 1 − mean clamp(−s/log V, 0, 1);
  ρ = 2 mean(minmax(A)) − 1; τ_eff = clamp(τ(1 + a h_static + b conf (−ρ)), 0.2, 1.5), with
  the base τ = ``temperature``. ``s``, ``s_ref`` are length-normalised sequence log-probs;
  returns a stop-gradiented scalar."""
  _checks.check_positive("log_vocab", log_vocab)
  _checks.check_positive("temperature", temperature)
  for n, v in (("a", a), ("b", b), ("tau_lo", tau_lo), ("tau_hi", tau_hi)):
    _checks.check_range(n, v)
  s, sr, ad = [_checks.check_array(n, x, min_rank=0)
               for n, x in (("s", s), ("s_ref", s_ref), ("adv", adv))]
  keep = _checks.check_where(where, s.shape)
  if keep is None:
    keep = jnp.ones(s.shape, bool)
  from kdjax import reductions  # pylint: disable=import-outside-toplevel
  h_static = reductions.masked_mean(jnp.clip(-sr / log_vocab, 0, 1), where=keep)
  conf = 1 - reductions.masked_mean(jnp.clip(-s / log_vocab, 0, 1), where=keep)
  rho = 2 * reductions.masked_mean(minmax_normalize(ad, where=keep), where=keep) - 1
  t = temperature * (1 + a * h_static + b * conf * (-rho))
  return jax.lax.stop_gradient(jnp.clip(t, tau_lo, tau_hi))
