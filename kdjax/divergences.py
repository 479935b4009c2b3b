r"""Divergences between teacher and student distributions — the core every kdjax loss builds on.

Two families:

* **On logits** (losses): ``fn(student_logits, teacher_logits, *, temperature=1.0, axis=-1,
  where=None, ...)``. Student first, teacher second, the direction in the name:
  ``forward_kl`` is KL(p_T ‖ p_S), ``reverse_kl`` is KL(p_S ‖ p_T), with
  p = softmax(z / T) on both sides. They return one value per position (the logits shape without
  ``axis``); nothing is averaged. Reduce with :mod:`kdjax.reductions`.
* **On (log-)probabilities** (the operator library): ``kl(*, p, q)``,
  ``kl_from_log(*, log_p, log_q)``, ``generalized_jsd_from_log(*, log_p, log_q, beta)``,
  ``total_variation_from_probs(*, p, q)``, ``entropy_from_log(log_p)``. The arguments are
  keyword-only, so the order cannot be confused with optax's (whose
  ``kl_divergence_with_log_targets(log_predictions, log_targets)`` is KL(targets ‖ predictions)):
  ``kl(p=p, q=q)`` = KL(p ‖ q), as in the mathematics. 0·log 0 = 0; KL is +inf where p has mass
  that q lacks. Concrete inputs must be (log-)probability vectors (non-negative, summing to 1
  within 1e-3): anything else is a ``ValueError``; traced inputs are not checked.

Numerics (all functions): computed in float32 (float64 if an input is float64;
bfloat16/float16 inputs are up-cast and the result is float32); finite values and gradients for
logits of ±1e4; ``-inf`` logits are removed from the vocabulary; a row with no remaining logit on
either side (all ``-inf`` or all masked) has value 0 and gradient 0. A support violation (teacher
mass where the student logit is ``-inf``) gives +inf for the KLs, never NaN. **NaN input
propagates**: a NaN logit (or probability) makes its row's value NaN — it is never treated as a
masked entry, so a training loop's non-finite guard fires. ``+inf`` logits are outside the
domain: a concrete ``+inf`` raises ``ValueError``; a traced one gives NaN (unchecked).

``where`` (one rule in kdjax) is a **boolean** mask broadcastable to the input (non-boolean is a
``TypeError``). If it varies along the class axis it is a vocabulary mask: False entries are
removed from both distributions, which (for the logits functions) are renormalised over the
rest. If it has size 1 along the class axis (e.g. ``[B, 1]``) or exactly the batch shape
(``[B]``), it is a position mask: masked positions give value 0 and gradient 0 (even when they
hold NaN).

Hyper-parameters (``temperature``, ``skew``, ``beta``) are scalars or arrays broadcastable to the
batch shape (one value per position, e.g. a ``[B]`` temperature is applied row by row, which
equals ``jax.vmap`` over the rows). Concrete values are checked elementwise; traced values (a
schedule computed inside the step) are unchecked. The teacher is **not** stop-gradiented here:
wrap it in ``jax.lax.stop_gradient`` if it is being trained.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax import _logspace

Array = jax.Array
_NEG_INF = -jnp.inf

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

# Transitional alias for loss modules that still import it from here; the one implementation is
# `kdjax._logspace.plogratio` (import that instead).
_plogratio = _logspace.plogratio


# ----------------------------------------------------------------------------- primitives


def log_softmax(logits: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Masked log-softmax that never creates NaN.

  Entries that are ``-inf`` or masked out by ``where`` (a boolean mask broadcastable to
  ``logits``) get log-probability ``-inf``. A row with no remaining entry gets ``-inf`` everywhere
  (the divergences treat it as empty: value 0, gradient 0). Gradients flow only through the
  remaining entries. NaN input propagates to its row; a concrete ``+inf`` is a ``ValueError``.
  bfloat16/float16 input is computed and returned in float32.
  """
  x = _checks.check_array("logits", logits)
  _checks.check_no_posinf("logits", x)
  ax = _checks.normalize_axis(axis, x.ndim)
  w = _checks.check_where(where, x.shape)
  x = x.astype(_checks.compute_dtype(x))
  return _logspace.masked_log_softmax(x, axis=ax, where=w)


def log_mixture(weight: Any, log_a: Array, log_b: Array) -> Array:
  """log(w·a + (1 − w)·b) from log a and log b, safe at w ∈ {0, 1} and for zeros.

  ``weight`` must lie in [0, 1] (concrete values are checked elementwise); it broadcasts against
  the inputs. NaN in an input propagates. bfloat16 inputs give float32.
  """
  _checks.check_unit_interval("weight", weight)
  la = _checks.check_array("log_a", log_a, min_rank=0)
  lb = _checks.check_array("log_b", log_b, min_rank=0)
  dtype = _checks.compute_dtype(la, lb)
  return _logspace.log_mixture(weight, la.astype(dtype), lb.astype(dtype))


# ----------------------------------------------------------------------------- logits front end


def _scaled_logits(student_logits, teacher_logits, temperature, axis, where):
  """Validates inputs; returns (z_S, z_T, axis, batch mask, dtype).

  z = logits / T on the remaining entries and exactly ``-inf`` on removed ones (``-inf`` logits,
  vocabulary-masked entries and every entry of a masked position). The division happens only on
  remaining entries (double ``where``), so d/dT is finite with ``-inf`` entries (N18).
  """
  s, t, ax, dtype = _checks.check_logits_pair(student_logits, teacher_logits, axis)
  _checks.check_positive("temperature", temperature)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  batch_shape = s.shape[:ax] + s.shape[ax + 1:]
  temp = _checks.per_position("temperature", temperature, batch_shape, ax, dtype)
  keep = vocab_mask
  if batch_mask is not None:
    bm = jnp.expand_dims(batch_mask, ax)
    keep = bm if keep is None else keep & bm

  def scale(x):
    x = x.astype(dtype)
    valid = _logspace.valid_entries(x, keep)
    return jnp.where(valid, jnp.where(valid, x, 0.0) / temp, _NEG_INF)

  return scale(s), scale(t), ax, batch_mask, dtype


def _prepare(student_logits, teacher_logits, temperature, axis, where):
  """Validates inputs and returns (log p_S, log p_T, axis, batch mask)."""
  zs, zt, ax, bm, _ = _scaled_logits(student_logits, teacher_logits, temperature, axis, where)
  return (_logspace.masked_log_softmax(zs, axis=ax), _logspace.masked_log_softmax(zt, axis=ax),
          ax, bm)


def _finish(values: Array, log_ps: Array, log_pt: Array, axis: int, batch_mask) -> Array:
  """Zeroes empty rows (no remaining entry on one side) and masked positions.

  Emptiness is decided from the -inf pattern of the log-probabilities (a NaN row is not empty:
  its NaN value propagates).
  """
  keep = _logspace.row_nonempty(log_ps, axis) & _logspace.row_nonempty(log_pt, axis)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)


# ----------------------------------------------------------------------------- fast KL core
#
# KL(p ‖ q) of two scaled-logit arrays (removed entries exactly -inf), with the closed-form
# backward. It needs no mask arrays (the mask is the -inf pattern, folded in by
# `_scaled_logits`), one max and one sum per side and one sum for the value, and keeps two
# [N, V] residuals (the log-probabilities). It equals the autodiff of
# `plogratio(masked_log_softmax(z_p), masked_log_softmax(z_q))` (tests check value and both
# gradients, including -inf entries, support violations, empty rows and NaN).


def _row_log_softmax(z, axis):
  m = jnp.max(z, axis=axis, keepdims=True)          # NaN propagates through max
  nonempty = m != _NEG_INF
  m0 = jnp.where(jnp.isfinite(m), m, 0.0)
  total = jnp.sum(jnp.exp(z - m0), axis=axis, keepdims=True)
  lse = jnp.log(jnp.where(nonempty, total, 1.0)) + m0
  return z - lse, jnp.squeeze(nonempty, axis)       # removed entries stay -inf


def _kl_core_fwd(z_p, z_q, axis):
  lp, ne_p = _row_log_softmax(z_p, axis)
  lq, ne_q = _row_log_softmax(z_q, axis)
  p_pos = z_p != _NEG_INF
  both = p_pos & (z_q != _NEG_INF)
  terms = jnp.where(both, jnp.exp(lp) * (lp - lq), jnp.where(p_pos, jnp.inf, 0.0))
  keep = ne_p & ne_q
  value = jnp.where(keep, jnp.sum(terms, axis=axis), 0.0)
  return value, (lp, lq, keep)


def _make_kl_core():
  def f(z_p, z_q, axis):
    return _kl_core_fwd(z_p, z_q, axis)[0]

  f = jax.custom_vjp(f, nondiff_argnums=(2,))

  def fwd(z_p, z_q, axis):
    return _kl_core_fwd(z_p, z_q, axis)

  def bwd(axis, res, g):
    lp, lq, keep = res
    both = (lp != _NEG_INF) & (lq != _NEG_INF)   # recomputed: no [N, V] mask residual
    g = jnp.expand_dims(jnp.where(keep, g, 0.0), axis)
    p = jnp.exp(lp)
    q = jnp.exp(lq)
    # d/d log p_k of Σ_both p (log p − log q) is p_k (1 + log p_k − log q_k); the log-softmax
    # backward then subtracts p_j Σ_k (·). The support-violation branch is a constant.
    a = jnp.where(both, p * (1.0 + lp - lq), 0.0)
    b = jnp.where(both, p, 0.0)
    grad_p = g * (a - p * jnp.sum(a, axis=axis, keepdims=True))
    grad_q = g * (q * jnp.sum(b, axis=axis, keepdims=True) - b)
    return grad_p, grad_q

  f.defvjp(fwd, bwd)
  return f


_kl_core = _make_kl_core()


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: Any = 1.0,
               axis: int = -1, where: Array | None = None) -> Array:
  r"""Forward KL, KL(p_T ‖ p_S): the classic (Hinton) distillation divergence. Mode-covering.

  .. math:: \mathrm{KL}(p_T\|p_S) = \sum_k p_{T,k}\,(\log p_{T,k} - \log p_{S,k}),
            \quad p = \mathrm{softmax}(z / T).

  Gradient in the student logits: (p_S − p_T) / T (computed in closed form). No T² factor is
  applied (that is a loss-level option). Reference: Hinton, Vinyals & Dean, arXiv:1503.02531
  [paper].

  Args:
    student_logits: ``[..., V]`` student logits.
    teacher_logits: teacher logits, same shape (not stop-gradiented here: wrap the teacher in
      ``jax.lax.stop_gradient`` if it is being trained).
    temperature: T > 0, applied to both sides; a scalar or one value per position (an array
      broadcastable to the batch shape).
    axis: the class/vocabulary axis.
    where: optional boolean mask: vocabulary (varies along ``axis``) or positions (size 1 along
      ``axis``, or the batch shape).

  Returns:
    The per-position divergence, shape ``logits.shape`` without ``axis``.
  """
  zs, zt, ax, _, _ = _scaled_logits(student_logits, teacher_logits, temperature, axis, where)
  return _kl_core(zt, zs, ax)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: Any = 1.0,
               axis: int = -1, where: Array | None = None) -> Array:
  r"""Reverse KL, KL(p_S ‖ p_T): mode-seeking (MiniLLM, on-policy distillation).

  .. math:: \mathrm{KL}(p_S\|p_T) = \sum_k p_{S,k}\,(\log p_{S,k} - \log p_{T,k}).

  Gradient in the student logits: p_S ⊙ (log p_S − log p_T − KL) / T.
  Reference: Gu et al., arXiv:2306.08543 [paper]. Arguments as in :func:`forward_kl`.
  """
  zs, zt, ax, _, _ = _scaled_logits(student_logits, teacher_logits, temperature, axis, where)
  return _kl_core(zs, zt, ax)


def _per_position_param(name, value, zs, ax, dtype):
  return _checks.per_position(name, value, zs.shape[:ax] + zs.shape[ax + 1:], ax, dtype)


def _skew_kl(student_logits, teacher_logits, skew, temperature, axis, where, *, reverse,
             detach_mixture=False):
  """KL(a ‖ λa + (1 − λ)b) with (a, b) = (p_T, p_S), or (p_S, p_T) when `reverse`; with
  `detach_mixture` the mixture's a is sg(a) (DistiLLM-2's rejected term)."""
  _checks.check_unit_interval("skew", skew)
  zs, zt, ax, bm, dtype = _scaled_logits(student_logits, teacher_logits, temperature, axis,
                                         where)
  lam = _per_position_param("skew", skew, zs, ax, dtype)
  log_ps = _logspace.masked_log_softmax(zs, axis=ax)
  log_pt = _logspace.masked_log_softmax(zt, axis=ax)
  a, b = (log_ps, log_pt) if reverse else (log_pt, log_ps)
  a_mix = jax.lax.stop_gradient(a) if detach_mixture else a
  return _finish(_logspace.plogratio(a, _logspace.log_mixture(lam, a_mix, b), ax), log_ps,
                 log_pt, ax, bm)


def skew_forward_kl(student_logits: Array, teacher_logits: Array, *, skew: Any = 0.1,
                    temperature: Any = 1.0, axis: int = -1,
                    where: Array | None = None) -> Array:
  r"""Skew forward KL (DistiLLM): KL(p_T ‖ λ·p_T + (1 − λ)·p_S), λ = ``skew`` ∈ [0, 1].

  λ = 0 is :func:`forward_kl`; λ = 1 gives 0. Bounded: 0 ≤ SKL ≤ log(1/λ), since the mixture
  dominates λ·p_T; its gradient stays finite where p_S → 0 < p_T. λ may be per position.
  Reference: Ko et al., arXiv:2402.03898 [paper] (default λ = 0.1 [paper]; the bound is
  [proposed, derived]).
  """
  return _skew_kl(student_logits, teacher_logits, skew, temperature, axis, where, reverse=False)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *, skew: Any = 0.1,
                    temperature: Any = 1.0, axis: int = -1,
                    where: Array | None = None) -> Array:
  r"""Skew reverse KL (DistiLLM): KL(p_S ‖ λ·p_S + (1 − λ)·p_T), λ = ``skew`` ∈ [0, 1].

  λ = 0 is :func:`reverse_kl`; λ = 1 gives 0; 0 ≤ SRKL ≤ log(1/λ). λ may be per position.
  Reference: Ko et al., arXiv:2402.03898 [paper].
  """
  return _skew_kl(student_logits, teacher_logits, skew, temperature, axis, where, reverse=True)


def _jsd_raw(log_p, log_q, b, ax):
  """β·KL(p ‖ M) + (1 − β)·KL(q ‖ M); `b` carries a singleton at `ax`."""
  log_m = _logspace.log_mixture(b, log_p, log_q)
  bs = jnp.squeeze(b, ax)
  return (bs * _logspace.plogratio(log_p, log_m, ax)
          + (1.0 - bs) * _logspace.plogratio(log_q, log_m, ax))


def generalized_jsd(student_logits: Array, teacher_logits: Array, *, beta: Any = 0.5,
                    temperature: Any = 1.0, axis: int = -1, where: Array | None = None,
                    endpoint: str = "kl") -> Array:
  r"""Generalized Jensen–Shannon divergence of GKD.

  .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_T\|M) + (1-\beta)\,\mathrm{KL}(p_S\|M),
            \quad M = \beta p_T + (1-\beta) p_S.

  0 ≤ JSD_β ≤ H_b(β) ≤ log 2; symmetric at β = 0.5. Reference: Agarwal et al., arXiv:2306.13649
  [paper].

  **Endpoints.** The formula itself is 0 at β = 0 and at β = 1 (M equals one of the two
  distributions and that term's weight vanishes): only the rescaled values interpolate,
  JSD_β/β → KL(p_T‖p_S) as β → 0 and JSD_β/(1 − β) → KL(p_S‖p_T) as β → 1. Design choice
  (kdjax) [proposed, following TRL and Liger]: with ``endpoint="kl"`` (default) β = 0 returns
  :func:`forward_kl` and β = 1 returns :func:`reverse_kl` (value and gradients), so the value
  jumps at the endpoints; ``endpoint="raw"`` returns the formula (0 at both ends). The selection
  is made with ``jnp.where`` on β, so it is the same eagerly and under ``jax.jit`` (a traced β
  schedule that starts at 0 trains on the forward KL). β may be per position; d/dβ is 0 at the
  endpoints with ``endpoint="kl"``.
  """
  _checks.check_unit_interval("beta", beta)
  if endpoint not in ("kl", "raw"):
    raise ValueError(f"`endpoint` must be 'kl' or 'raw', got {endpoint!r}.")
  zs, zt, ax, bm, dtype = _scaled_logits(student_logits, teacher_logits, temperature, axis,
                                         where)
  b = _per_position_param("beta", beta, zs, ax, dtype)
  log_ps = _logspace.masked_log_softmax(zs, axis=ax)
  log_pt = _logspace.masked_log_softmax(zt, axis=ax)
  values = _jsd_raw(log_pt, log_ps, b, ax)
  if endpoint == "kl":
    # + zeros_like(values): the condition takes the values' sharding (a select on an Explicit
    # mesh needs one sharding for condition and cases; a broadcast scalar β has none).
    bs = jnp.squeeze(b, ax) + jnp.zeros_like(values)
    values = jnp.where(bs == 0.0, _logspace.plogratio(log_pt, log_ps, ax),
                       jnp.where(bs == 1.0, _logspace.plogratio(log_ps, log_pt, ax), values))
  return _finish(values, log_ps, log_pt, ax, bm)


def total_variation(student_logits: Array, teacher_logits: Array, *, temperature: Any = 1.0,
                    axis: int = -1, where: Array | None = None) -> Array:
  r"""Total variation distance ½ Σ_k ``|p_T,k − p_S,k|`` ∈ [0, 1] (symmetric)."""
  zs, zt, ax, bm, _ = _scaled_logits(student_logits, teacher_logits, temperature, axis, where)
  log_ps = _logspace.masked_log_softmax(zs, axis=ax)
  log_pt = _logspace.masked_log_softmax(zt, axis=ax)
  values = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps)), axis=ax)
  return _finish(values, log_ps, log_pt, ax, bm)


# ----------------------------------------------------------------------------- probabilities


def _prob_inputs(names, arrays, axis, where, *, log):
  """Checks and up-casts (log-)probability inputs; returns (arrays, axis, keep mask)."""
  xs = [_checks.check_array(n, a) for n, a in zip(names, arrays)]
  for n, x in zip(names[1:], xs[1:]):
    _checks.check_same_shape(names[0], xs[0], n, x)
  ax = _checks.normalize_axis(axis, xs[0].ndim)
  for n, x in zip(names, xs):
    _checks.check_simplex(n, x, axis=ax, log=log)
  dtype = _checks.compute_dtype(*xs)
  xs = [x.astype(dtype) for x in xs]
  vocab_mask, batch_mask = _checks.split_where(where, xs[0].shape, ax)
  keep = vocab_mask
  if batch_mask is not None:
    bmx = jnp.expand_dims(batch_mask, ax)
    keep = bmx if keep is None else keep & bmx
  return xs, ax, keep


def _drop(log_x, keep):
  """Removed entries (masked, or whole masked positions) become -inf (0 mass, zero gradient)."""
  return log_x if keep is None else jnp.where(keep, log_x, _NEG_INF)


_PROB_WHERE = """``where``: a boolean mask broadcastable to the input; a vocabulary mask (varies
  along ``axis``) restricts the sum to the kept entries (no renormalisation); a position mask
  (size 1 along ``axis``, or the batch shape) gives value 0 and gradient 0 at masked positions."""


def kl_from_log(*, log_p: Array, log_q: Array, axis: int = -1,
                where: Array | None = None) -> Array:
  r"""KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) from log-probabilities (keyword-only).

  0·log 0 = 0; +inf if q_k = 0 < p_k. Inputs are not renormalised; concrete inputs must be
  log-probability vectors. NaN propagates.
  """
  (lp, lq), ax, keep = _prob_inputs(("log_p", "log_q"), (log_p, log_q), axis, where, log=True)
  return _logspace.plogratio(_drop(lp, keep), _drop(lq, keep), ax)


def kl(*, p: Array, q: Array, axis: int = -1, where: Array | None = None) -> Array:
  r"""KL(p ‖ q) = Σ_k p_k log(p_k / q_k) on probability vectors (keyword-only).

  0·log 0 = 0; +inf where q_k = 0 < p_k (a support violation). Concrete inputs must be
  probability vectors (non-negative, summing to 1): otherwise ``ValueError``.
  """
  (pp, qq), ax, keep = _prob_inputs(("p", "q"), (p, q), axis, where, log=False)
  return _logspace.plogratio(_drop(_logspace.safe_log(pp), keep),
                             _drop(_logspace.safe_log(qq), keep), ax)


def generalized_jsd_from_log(*, log_p: Array, log_q: Array, beta: Any = 0.5, axis: int = -1,
                             where: Array | None = None) -> Array:
  r"""β·KL(p ‖ M) + (1 − β)·KL(q ‖ M), M = β·p + (1 − β)·q, from log-probabilities.

  Keyword-only. The raw formula (0 at β ∈ {0, 1}); see :func:`generalized_jsd` for the
  endpoint convention. β ∈ [0, 1], a scalar or one value per position.
  """
  _checks.check_unit_interval("beta", beta)
  (lp, lq), ax, keep = _prob_inputs(("log_p", "log_q"), (log_p, log_q), axis, where, log=True)
  b = _checks.per_position("beta", beta, lp.shape[:ax] + lp.shape[ax + 1:], ax, lp.dtype)
  return _jsd_raw(_drop(lp, keep), _drop(lq, keep), b, ax)


def total_variation_from_probs(*, p: Array, q: Array, axis: int = -1,
                               where: Array | None = None) -> Array:
  """½ Σ_k ``|p_k − q_k|`` on probability vectors (keyword-only; concrete inputs checked)."""
  (pp, qq), ax, keep = _prob_inputs(("p", "q"), (p, q), axis, where, log=False)
  d = jnp.abs(pp - qq)
  if keep is not None:
    d = jnp.where(keep, d, 0.0)
  return 0.5 * jnp.sum(d, axis=ax)


def entropy_from_log(log_p: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Shannon entropy −Σ_k p_k log p_k (nats) from log-probabilities, with 0·log 0 = 0."""
  (lp,), ax, keep = _prob_inputs(("log_p",), (log_p,), axis, where, log=True)
  lp = _drop(lp, keep)
  pos = lp != _NEG_INF
  safe = jnp.where(pos, lp, 0.0)
  return -jnp.sum(jnp.where(pos, jnp.exp(safe) * safe, 0.0), axis=ax)


for _f in (kl_from_log, kl, generalized_jsd_from_log, total_variation_from_probs,
           entropy_from_log):
  _f.__doc__ += "\n  " + _PROB_WHERE + "\n"
del _f
