r"""Divergences between teacher and student distributions — the core every kdjax loss builds on.

Two families:

* **On logits** (losses): ``fn(student_logits, teacher_logits, *, temperature=1.0, axis=-1,
  where=None, ...)``. Student first, teacher second, the direction in the name:
  ``forward_kl`` is KL(p_T ‖ p_S), ``reverse_kl`` is KL(p_S ‖ p_T), with
  p = softmax(z / T) on both sides. They return one value per position (the logits shape without
  ``axis``); nothing is averaged. Reduce with :mod:`kdjax.reductions`.
* **On (log-)probabilities** (the operator library): ``kl(p, q)``, ``kl_from_log(log_p, log_q)``,
  ``generalized_jsd_from_log``, ``total_variation_from_probs``, ``entropy_from_log``. Here the
  *first* argument is the reference distribution: ``kl(p, q)`` = KL(p ‖ q), as in the
  mathematics. 0·log 0 = 0; KL is +inf where p has mass that q lacks.

Numerics (all functions): computed in log space in float32 (float64 if an input is float64;
bfloat16/float16 inputs are up-cast); finite values and gradients for logits of ±1e4; ``-inf``
logits are removed from the vocabulary; a row with no finite logit on either side (or whose
vocabulary mask is all False) has value 0 and gradient 0. A support violation (teacher mass where
the student logit is ``-inf``) gives +inf for the KLs, never NaN.

``where`` may have the logits shape (a vocabulary mask: False entries are removed from both
distributions, which are renormalised over the rest) or the batch shape (a position mask: masked
positions give value 0 and gradient 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import _checks

Array = jax.Array

__all__ = [
    "log_softmax",
    "forward_kl",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "generalized_jsd",
    "total_variation",
    "kl",
    "kl_from_log",
    "generalized_jsd_from_log",
    "total_variation_from_probs",
    "entropy_from_log",
    "log_mixture",
]


# ----------------------------------------------------------------------------- primitives


def log_softmax(logits: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Masked log-softmax that never produces NaN.

  Entries that are ``-inf`` or masked out by ``where`` (logits shape) get log-probability
  ``-inf``. A row with no valid entry gets ``-inf`` everywhere (and the divergences below treat
  it as empty: value 0, gradient 0). Gradients flow only through valid entries.
  """
  valid = logits > -jnp.inf
  if where is not None:
    valid = valid & where
  safe = jnp.where(valid, logits, 0.0)
  row_max = jnp.max(jnp.where(valid, safe, -jnp.inf), axis=axis, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  shifted = safe - row_max
  total = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, shifted, 0.0)), 0.0),
                  axis=axis, keepdims=True)
  nonempty = total > 0
  log_total = jnp.log(jnp.where(nonempty, total, 1.0))
  return jnp.where(valid & nonempty, shifted - log_total, -jnp.inf)


def _plogratio(log_p: Array, log_q: Array, axis: int) -> Array:
  """sum_k p_k (log p_k - log q_k) with 0·log 0 = 0 (and +inf where q_k = 0 < p_k).

  The +inf branch is a constant, so a support violation never sends NaN into a gradient.
  """
  p_pos = log_p > -jnp.inf
  both = p_pos & (log_q > -jnp.inf)
  lp = jnp.where(both, log_p, 0.0)
  lq = jnp.where(both, log_q, 0.0)
  terms = jnp.where(both, jnp.exp(lp) * (lp - lq), jnp.where(p_pos, jnp.inf, 0.0))
  return jnp.sum(terms, axis=axis)


def log_mixture(weight: Any, log_a: Array, log_b: Array) -> Array:
  """log(w·a + (1 − w)·b) computed from log a and log b, safe at w ∈ {0, 1} and for zeros."""
  w = jnp.asarray(weight, dtype=log_a.dtype)
  support = (log_a > -jnp.inf) | (log_b > -jnp.inf)
  la = jnp.where(support, log_a, 0.0)
  lb = jnp.where(support, log_b, 0.0)
  # Terms with zero weight or zero mass are dropped explicitly, so that no -inf reaches
  # logaddexp's gradient.
  use_a = (log_a > -jnp.inf) & (w > 0)
  use_b = (log_b > -jnp.inf) & (w < 1)
  log_w = jnp.log(jnp.where(w > 0, w, 1.0))
  log_1mw = jnp.log1p(-jnp.where(w < 1, w, 0.0))
  ta = la + log_w
  tb = lb + log_1mw
  both = use_a & use_b
  mixed = jnp.logaddexp(jnp.where(both, ta, 0.0), jnp.where(both, tb, 0.0))
  out = jnp.where(both, mixed, jnp.where(use_a, ta, tb))
  return jnp.where(use_a | use_b, out, -jnp.inf)


# ----------------------------------------------------------------------------- logits front end


def _prepare(student_logits, teacher_logits, temperature, axis, where):
  """Validates inputs and returns (log p_S, log p_T, axis, batch mask)."""
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  ax = _checks.normalize_axis(axis, s.ndim)
  _checks.check_positive("temperature", temperature)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  dtype = _checks.compute_dtype(s, t)
  temp = jnp.asarray(temperature, dtype)
  log_ps = log_softmax(s.astype(dtype) / temp, axis=ax, where=vocab_mask)
  log_pt = log_softmax(t.astype(dtype) / temp, axis=ax, where=vocab_mask)
  return log_ps, log_pt, ax, batch_mask


def _finish(values: Array, log_ps: Array, log_pt: Array, axis: int, batch_mask) -> Array:
  """Zeroes empty rows (no valid entry on one side: an all-masked row) and masked positions."""
  nonempty = jnp.any(log_ps > -jnp.inf, axis=axis) & jnp.any(log_pt > -jnp.inf, axis=axis)
  keep = nonempty if batch_mask is None else nonempty & batch_mask
  return jnp.where(keep, values, 0.0)


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               axis: int = -1, where: Array | None = None) -> Array:
  r"""Forward KL, KL(p_T ‖ p_S): the classic (Hinton) distillation divergence. Mode-covering.

  .. math:: \mathrm{KL}(p_T\|p_S) = \sum_k p_{T,k}\,(\log p_{T,k} - \log p_{S,k}),
            \quad p = \mathrm{softmax}(z / T).

  Gradient in the student logits: (p_S − p_T) / T. No T² factor is applied (that is a loss-level
  option). Reference: Hinton, Vinyals & Dean, arXiv:1503.02531 [paper].

  Args:
    student_logits: ``[..., V]`` student logits.
    teacher_logits: teacher logits, same shape (not stop-gradiented here: wrap the teacher in
      ``jax.lax.stop_gradient`` if it is being trained).
    temperature: T > 0, applied to both sides.
    axis: the class/vocabulary axis.
    where: optional mask of the logits shape (vocabulary) or the batch shape (positions).

  Returns:
    The per-position divergence, shape ``logits.shape`` without ``axis``.
  """
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  return _finish(_plogratio(log_pt, log_ps, ax), log_ps, log_pt, ax, bm)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               axis: int = -1, where: Array | None = None) -> Array:
  r"""Reverse KL, KL(p_S ‖ p_T): mode-seeking (MiniLLM, on-policy distillation).

  .. math:: \mathrm{KL}(p_S\|p_T) = \sum_k p_{S,k}\,(\log p_{S,k} - \log p_{T,k}).

  Gradient in the student logits: p_S ⊙ (log p_S − log p_T − KL) / T.
  Reference: Gu et al., arXiv:2306.08543 [paper]. Arguments as in :func:`forward_kl`.
  """
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  return _finish(_plogratio(log_ps, log_pt, ax), log_ps, log_pt, ax, bm)


def skew_forward_kl(student_logits: Array, teacher_logits: Array, *, skew: float = 0.1,
                    temperature: float = 1.0, axis: int = -1,
                    where: Array | None = None) -> Array:
  r"""Skew forward KL (DistiLLM): KL(p_T ‖ λ·p_T + (1 − λ)·p_S), λ = ``skew``.

  λ = 0 is :func:`forward_kl`; λ = 1 gives 0. Bounded: 0 ≤ SKL ≤ log(1/λ), since the mixture
  dominates λ·p_T; its gradient stays finite where p_S → 0 < p_T.
  Reference: Ko et al., arXiv:2402.03898 [paper] (default λ = 0.1 [paper]; the bound is
  [proposed, derived]).
  """
  _checks.check_unit_interval("skew", skew)
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  log_m = log_mixture(skew, log_pt, log_ps)
  return _finish(_plogratio(log_pt, log_m, ax), log_ps, log_pt, ax, bm)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *, skew: float = 0.1,
                    temperature: float = 1.0, axis: int = -1,
                    where: Array | None = None) -> Array:
  r"""Skew reverse KL (DistiLLM): KL(p_S ‖ λ·p_S + (1 − λ)·p_T), λ = ``skew``.

  λ = 0 is :func:`reverse_kl`; λ = 1 gives 0; 0 ≤ SRKL ≤ log(1/λ).
  Reference: Ko et al., arXiv:2402.03898 [paper].
  """
  _checks.check_unit_interval("skew", skew)
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  log_m = log_mixture(skew, log_ps, log_pt)
  return _finish(_plogratio(log_ps, log_m, ax), log_ps, log_pt, ax, bm)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *, beta: float = 0.5,
                    temperature: float = 1.0, axis: int = -1, where: Array | None = None,
                    endpoint: str = "kl") -> Array:
  r"""Generalized Jensen–Shannon divergence of GKD.

  .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_T\|M) + (1-\beta)\,\mathrm{KL}(p_S\|M),
            \quad M = \beta p_T + (1-\beta) p_S.

  0 ≤ JSD_β ≤ H_b(β) ≤ log 2; symmetric at β = 0.5. Reference: Agarwal et al., arXiv:2306.13649
  [paper].

  **Endpoints.** The formula itself is 0 at β = 0 and at β = 1 (M equals one of the two
  distributions and that term's weight vanishes): only the rescaled values interpolate,
  JSD_β/β → KL(p_T‖p_S) as β → 0 and JSD_β/(1 − β) → KL(p_S‖p_T) as β → 1. Design choice
  (kdjax) [proposed, following TRL and Liger]: with ``endpoint="kl"`` (default) a concrete
  β = 0 returns :func:`forward_kl` and β = 1 returns :func:`reverse_kl`, so the value jumps at the
  endpoints; ``endpoint="raw"`` returns the formula (0 at both ends). A traced β always uses the
  formula.
  """
  _checks.check_unit_interval("beta", beta)
  if endpoint not in ("kl", "raw"):
    raise ValueError(f"`endpoint` must be 'kl' or 'raw', got {endpoint!r}.")
  b = _checks.concrete_scalar(beta)
  if endpoint == "kl" and b == 0.0:
    return forward_kl(student_logits, teacher_logits, temperature=temperature, axis=axis,
                      where=where)
  if endpoint == "kl" and b == 1.0:
    return reverse_kl(student_logits, teacher_logits, temperature=temperature, axis=axis,
                      where=where)
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  values = generalized_jsd_from_log(log_pt, log_ps, beta=beta, axis=ax)
  return _finish(values, log_ps, log_pt, ax, bm)


def total_variation(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
                    axis: int = -1, where: Array | None = None) -> Array:
  r"""Total variation distance ½ Σ_k |p_T,k − p_S,k| ∈ [0, 1] (symmetric)."""
  log_ps, log_pt, ax, bm = _prepare(student_logits, teacher_logits, temperature, axis, where)
  values = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps)), axis=ax)
  return _finish(values, log_ps, log_pt, ax, bm)


# ----------------------------------------------------------------------------- probabilities


def _batch_where(values: Array, where: Array | None) -> Array:
  return values if where is None else jnp.where(where, values, 0.0)


def kl_from_log(log_p: Array, log_q: Array, *, axis: int = -1,
                where: Array | None = None) -> Array:
  r"""KL(p ‖ q) from log-probabilities (reference first). 0·log 0 = 0; +inf if q_k = 0 < p_k.

  ``where`` has the batch shape (positions). Inputs are not renormalised.
  """
  lp = _checks.check_array("log_p", log_p)
  lq = _checks.check_array("log_q", log_q)
  _checks.check_same_shape("log_p", lp, "log_q", lq)
  ax = _checks.normalize_axis(axis, lp.ndim)
  dtype = _checks.compute_dtype(lp, lq)
  return _batch_where(_plogratio(lp.astype(dtype), lq.astype(dtype), ax), where)


def _safe_log(p: Array) -> Array:
  pos = p > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, p, 1.0)), -jnp.inf)


def kl(p: Array, q: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  r"""KL(p ‖ q) = Σ_k p_k log(p_k / q_k) on probability vectors (reference first).

  0·log 0 = 0; +inf where q_k = 0 < p_k (a support violation). Negative entries are an error
  when the input is concrete.
  """
  p = _checks.check_array("p", p)
  q = _checks.check_array("q", q)
  _checks.check_same_shape("p", p, "q", q)
  for name, x in (("p", p), ("q", q)):
    if not isinstance(x, jax.core.Tracer) and bool(jnp.any(x < 0)):
      raise ValueError(f"`{name}` must be non-negative (a probability vector).")
  dtype = _checks.compute_dtype(p, q)
  return kl_from_log(_safe_log(p.astype(dtype)), _safe_log(q.astype(dtype)), axis=axis,
                     where=where)


def generalized_jsd_from_log(log_p: Array, log_q: Array, *, beta: float = 0.5, axis: int = -1,
                             where: Array | None = None) -> Array:
  r"""β·KL(p ‖ M) + (1 − β)·KL(q ‖ M), M = β·p + (1 − β)·q, from log-probabilities.

  The raw formula (0 at β ∈ {0, 1}); see :func:`generalized_jsd` for the endpoint convention.
  """
  _checks.check_unit_interval("beta", beta)
  lp = jnp.asarray(log_p)
  lq = jnp.asarray(log_q)
  _checks.check_same_shape("log_p", lp, "log_q", lq)
  ax = _checks.normalize_axis(axis, lp.ndim)
  log_m = log_mixture(beta, lp, lq)
  b = jnp.asarray(beta, log_m.dtype)
  values = b * _plogratio(lp, log_m, ax) + (1.0 - b) * _plogratio(lq, log_m, ax)
  return _batch_where(values, where)


def total_variation_from_probs(p: Array, q: Array, *, axis: int = -1,
                               where: Array | None = None) -> Array:
  """½ Σ_k |p_k − q_k|."""
  p = _checks.check_array("p", p)
  q = _checks.check_array("q", q)
  _checks.check_same_shape("p", p, "q", q)
  return _batch_where(0.5 * jnp.sum(jnp.abs(p - q), axis=axis), where)


def entropy_from_log(log_p: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Shannon entropy −Σ_k p_k log p_k (nats) from log-probabilities, with 0·log 0 = 0."""
  lp = jnp.asarray(log_p)
  pos = lp > -jnp.inf
  safe = jnp.where(pos, lp, 0.0)
  return _batch_where(-jnp.sum(jnp.where(pos, jnp.exp(safe) * safe, 0.0), axis=axis), where)
