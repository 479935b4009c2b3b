r"""Multi-teacher aggregation operators A_w: Δ^M → Δ (pools), on log-probabilities.

Families (Flouro & Chadwick, arXiv:2601.09165 [paper] for the axioms' names; the concrete
formulas and axiom formalisation are Design choice (kdjax) [proposed], spec §3):

* arithmetic (linear) pool   p̄ = Σ_i w_i p⁽ⁱ⁾;
* geometric (log-linear) pool G = Π_i (p⁽ⁱ⁾)^{w_i} / Z,  Z = Σ_k Π_i (p⁽ⁱ⁾_k)^{w_i} ≤ 1;
  averaging logits, softmax(Σ_i w_i z_i), is exactly the geometric pool of softmax(z_i);
* power-mean pool            P_β ∝ (Σ_i w_i (p⁽ⁱ⁾)^β)^{1/β}  (β = 1 arithmetic, β → 0 geometric,
  β < 0 towards the minimum, β > 1 towards the maximum).

Everything is computed in log space: inputs and outputs are log-probabilities, zeros (−inf) are
allowed, and no NaN is created (an all −inf row stays −inf; its gradient is 0). NaN input is
never treated as a zero: it propagates to the pooled row.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace as LS
from kdjax.operators import _common as C

Array = jax.Array

__all__ = ["aggregate", "log_normalizer", "AGGREGATION_KINDS"]

AGGREGATION_KINDS = ("arithmetic", "geometric", "power")
_SIMPLEX_ATOL = 1e-5


def _check_kind(kind: str, power: Any) -> None:
  if kind not in AGGREGATION_KINDS:
    raise ValueError(f"`kind` must be one of {AGGREGATION_KINDS}, got {kind!r}.")
  if kind == "power":
    if power is None:
      raise ValueError("`power` (the power-mean exponent beta) is required when kind='power'.")
    _checks.check_range("power", power)
    if np.ndim(power) != 0:
      raise ValueError(f"`power` must be a scalar, got shape {np.shape(power)}.")
  elif power is not None:
    raise ValueError(f"`power` is only used with kind='power', got power={power!r} for "
                     f"kind={kind!r}.")


def _prepare_weights(weights: Any, m: int, batch_shape: tuple[int, ...], dtype) -> Array:
  """Returns weights of shape [M, *batch, 1] (broadcast against [M, *batch, K])."""
  if weights is None:
    return jnp.full((m,) + (1,) * (len(batch_shape) + 1), 1.0 / m, dtype)
  if isinstance(weights, (str, bytes)):
    raise TypeError(f"`weights` must be an array of numbers, got {type(weights).__name__}.")
  w = jnp.asarray(weights)
  if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
    raise TypeError(f"`weights` must hold numbers, got dtype {w.dtype}.")
  if w.ndim == 0 or w.shape[0] != m:
    raise ValueError(f"`weights` must have shape [M] or [M, *batch] with M={m} teachers "
                     f"(batch {batch_shape}), got shape {w.shape}.")
  try:
    if np.broadcast_shapes(w.shape[1:], batch_shape) != tuple(batch_shape):
      raise ValueError
  except ValueError:
    raise ValueError(f"`weights` of shape {w.shape} does not broadcast to [M, *batch] = "
                     f"{(m,) + batch_shape}.") from None
  if w.ndim > 1 and w.ndim - 1 < len(batch_shape):
    # right-align [M, b...] against [M, *batch]: weights of shape [M, batch[-r:]].
    w = w.reshape((m,) + (1,) * (len(batch_shape) - (w.ndim - 1)) + w.shape[1:])
  elif w.ndim == 1:
    w = w.reshape((m,) + (1,) * len(batch_shape))
  if not isinstance(w, jax.core.Tracer):
    wn = np.asarray(w, dtype=np.float64)
    if np.any(np.isnan(wn)):
      raise ValueError("`weights` must be finite and non-negative (a point of the simplex), "
                       f"got NaN at teacher index {np.argwhere(np.isnan(wn))[0][0]}.")
    if not np.all(np.isfinite(wn)) or np.any(wn < 0):
      raise ValueError("`weights` must be finite and non-negative (a point of the simplex), "
                       f"got min {np.min(wn):.3g}.")
    err = np.max(np.abs(wn.sum(axis=0) - 1.0))
    if err > _SIMPLEX_ATOL:
      raise ValueError("`weights` must sum to 1 over the teacher axis (a point of the "
                       f"simplex); the sum is off by {err:.3g}.")
  return w.astype(dtype)[..., None]


def _geometric_unnormalized(lp: Array, w: Array) -> Array:
  """Σ_i w_i log p_i with 0·(−inf) = 0 and w_i > 0, p_i = 0 ⇒ −inf (NaN propagates)."""
  present = LS.valid_entries(lp)
  used = w > 0
  terms = jnp.where(present & used, w * jnp.where(present, lp, 0.0), 0.0)
  killed = jnp.any(used & ~present, axis=0)
  return jnp.where(killed, -jnp.inf, jnp.sum(terms, axis=0))


def _arithmetic_unnormalized(lp: Array, w: Array) -> Array:
  present = LS.valid_entries(lp)
  terms = jnp.where(present, LS.safe_log(w) + jnp.where(present, lp, 0.0), -jnp.inf)
  return LS.masked_logsumexp(terms, axis=0)


# |β (log p_i − Σ_j w_j log p_j)| below which the cumulant series is used, and above which the
# direct log-sum-exp is used; in between, log1p(Σ w expm1(β d)) / β. The three forms are the same
# function (switching between them is continuous up to rounding); each is used where it is
# accurate in float32.
_SERIES_MAX = 1e-2
_EXPM1_MAX = 1.0


def _power_unnormalized(lp: Array, w: Array, beta: Any) -> Array:
  """(1/β) log Σ_i w_i p_i^β; β may be traced (β = 0 gives the geometric limit).

  Written around the geometric mean ḡ = Σ w_i log p_i with d_i = log p_i − ḡ:
  (1/β) log Σ w e^{β d} + ḡ. For small |β d| the naive form cancels in float32 (at β = 1e-8 it
  returns the uniform distribution); there the cumulant series
  ḡ + m1 + β m2/2 + β² (m3 − 3 m1 m2)/6 (m_k = Σ w d^k, m1 ≈ 0) is used, which is continuous
  as β → 0 and has a finite d/dβ.
  """
  b = jnp.asarray(beta, lp.dtype)
  safe_b = jnp.where(b == 0, 1.0, b)
  present = LS.valid_entries(lp)
  used = w > 0
  lps = jnp.where(present & used, lp, 0.0)
  # Direct form (exact for zeros; stable for large |β d|).
  terms = jnp.where(present & used, LS.safe_log(w) + safe_b * lps, -jnp.inf)
  lse = LS.masked_logsumexp(terms, axis=0)
  # β < 0: a zero of any used teacher makes p^β infinite, so the power mean is 0 there.
  killed = (b < 0) & jnp.any(used & ~present, axis=0)
  direct = jnp.where(killed | (lse == -jnp.inf), -jnp.inf,
                     jnp.where(lse == -jnp.inf, 0.0, lse) / safe_b)  # NaN stays NaN
  # Centred forms, where every used teacher has the class (no zero).
  all_present = jnp.all(present | ~used, axis=0)
  wu = jnp.where(used, w, 0.0)
  g = jnp.sum(wu * lps, axis=0)
  d = jnp.where(used, lps - g[None], 0.0)
  r = jnp.max(jnp.abs(b * d), axis=0)
  series_ok = all_present & (r <= _SERIES_MAX)
  expm1_ok = all_present & (r <= _EXPM1_MAX)
  ds = jnp.where(series_ok[None], d, 0.0)
  m1 = jnp.sum(wu * ds, axis=0)
  m2 = jnp.sum(wu * ds * ds, axis=0)
  m3 = jnp.sum(wu * ds * ds * ds, axis=0)
  series = g + m1 + b * (m2 - m1 * m1) / 2 + b * b * (m3 - 3 * m1 * m2 + 2 * m1 ** 3) / 6
  bd = jnp.where(expm1_ok[None], b * d, 0.0)
  s = jnp.sum(wu * jnp.expm1(bd), axis=0)
  s = jnp.where(expm1_ok, s, 0.0)
  centred = g + jnp.log1p(s) / safe_b
  power = jnp.where(series_ok, series, jnp.where(expm1_ok, centred, direct))
  return jnp.where(b == 0, _geometric_unnormalized(lp, w), power)


def _prepare(log_probs, weights, kind, power, teacher_axis, axis):
  """Validates (on concrete values, outside jit) and moves axes to [M, *batch, K]."""
  lp = C.as_log_probs("log_probs", log_probs, min_rank=2)
  t_ax = _checks.normalize_axis(teacher_axis, lp.ndim, "teacher_axis")
  c_ax = _checks.normalize_axis(axis, lp.ndim, "axis")
  if t_ax == c_ax:
    raise ValueError(f"`teacher_axis` ({teacher_axis}) and `axis` ({axis}) must differ.")
  _check_kind(kind, power)
  C.check_log_simplex("log_probs", log_probs, axis=c_ax)
  moved = jnp.moveaxis(lp, (t_ax, c_ax), (0, lp.ndim - 1))
  w = _prepare_weights(weights, moved.shape[0], moved.shape[1:-1], moved.dtype)
  if kind == "power":
    b = _checks.concrete_scalar(power)
    if b == 1.0:
      kind = "arithmetic"
    elif b == 0.0:
      kind = "geometric"
  beta = jnp.asarray(power if kind == "power" else 0.0, moved.dtype)
  out_axis = c_ax - (1 if t_ax < c_ax else 0)
  return moved, w, beta, kind, out_axis


@functools.partial(jax.jit, static_argnames=("kind", "output"))
def _pool(moved, w, beta, *, kind, output):
  # One compiled computation per (shapes, kind, output) instead of one per primitive in eager
  # mode: most of the cost of small eager calls is compiling their primitives.
  if kind == "arithmetic":
    un = _arithmetic_unnormalized(moved, w)
  elif kind == "geometric":
    un = _geometric_unnormalized(moved, w)
  else:
    un = _power_unnormalized(moved, w, beta)
  if output == "log_z":
    return LS.masked_logsumexp(un, axis=-1)
  if output == "normalized" and kind != "arithmetic":
    return LS.log_normalize(un, axis=-1)
  return un  # the arithmetic pool is already normalised when the inputs are


def aggregate(log_probs: Array, *, weights: Any = None, kind: str = "arithmetic",
              power: Any = None, teacher_axis: int = 0, axis: int = -1) -> Array:
  r"""Pools M teacher distributions into one: A_w(p⁽¹⁾, …, p⁽ᴹ⁾), in log space.

  .. math::
     \text{arithmetic: } \textstyle\sum_i w_i p^{(i)},\qquad
     \text{geometric: } \prod_i (p^{(i)})^{w_i}/Z,\qquad
     \text{power}(\beta): (\sum_i w_i (p^{(i)})^\beta)^{1/\beta}/Z_\beta .

  Axioms and families: arXiv:2601.09165 [paper] (names); formulas Design choice (kdjax)
  [proposed] (spec §3). The geometric pool of softmax(z_i) equals softmax(Σ_i w_i z_i).

  Args:
    log_probs: log-probabilities with a teacher axis and a class axis, e.g. ``[M, *batch, K]``;
      concrete input must be normalised along ``axis`` (ValueError otherwise) and free of
      +inf. NaN propagates to the pooled row (it is never read as a zero).
      Zeros (−inf) are allowed: the arithmetic pool keeps a class if any weighted teacher has
      it; the geometric pool (and power β ≤ 0) drops it if any teacher with w_i > 0 lacks it.
    weights: ``None`` (uniform 1/M), shape ``[M]``, or per-example ``[M, *batch]`` (confidence
      weighting; broadcasting over leading batch axes is allowed). Concrete weights must be
      non-negative and sum to 1 over the teacher axis (atol 1e-5), else ValueError.
    kind: ``"arithmetic"``, ``"geometric"`` or ``"power"``.
    power: β for ``kind="power"`` (any finite real; β ∈ {0, 1} are dispatched to the exact
      geometric/arithmetic pools; a traced β is accepted). The pool is continuous as β → 0:
      for small ``|β (log p_i − ḡ)|`` (ḡ the geometric mean) a cumulant series
      ḡ + β Var_w/2 + β² κ₃/6 replaces the log-sum-exp, which cancels in float32.
    teacher_axis: the axis of ``log_probs`` indexing teachers.
    axis: the class axis of ``log_probs``.

  Returns:
    Log-probabilities of shape ``log_probs.shape`` without ``teacher_axis``, float32 (float64
    if the input is float64). Computed in float32 for bf16/f16 input.
  """
  moved, w, beta, kind, out_axis = _prepare(log_probs, weights, kind, power, teacher_axis, axis)
  out = _pool(moved, w, beta, kind=kind, output="normalized")
  return jnp.moveaxis(out, -1, out_axis)


def log_normalizer(log_probs: Array, *, weights: Any = None, kind: str = "geometric",
                   power: Any = None, teacher_axis: int = 0, axis: int = -1) -> Array:
  r"""log Z of a pool: log Σ_k of the unnormalised pooled mass (0 for the arithmetic pool).

  For the geometric pool, log Z ≤ 0 (weighted AM–GM) and, for any reference r,
  KL(r‖G) = Σ_i w_i KL(r‖p⁽ⁱ⁾) + log Z  [proposed, derived; spec §3]. For two distributions
  with weights (α, 1−α), log Z = −(1−α) D_α(p‖q) (Rényi divergence of order α).
  Arguments as in :func:`aggregate`; returns shape ``[*batch]``.
  """
  moved, w, beta, kind, _ = _prepare(log_probs, weights, kind, power, teacher_axis, axis)
  return _pool(moved, w, beta, kind=kind, output="log_z")
