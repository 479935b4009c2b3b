r"""Anchored meta-teacher operators M_α(p0, q) (arXiv:2601.13100).

[paper] Multi-generation distillation is a sequence of operators on distributions, each anchored
to the base teacher p0 (Flouro & Chadwick, arXiv:2601.13100, C1–C2). The families, the weight
convention (α = anchor weight, c = 1 − α on the previous generation) and the axioms M1–M7 are
Design choice (kdjax) [proposed] (spec §4):

==================  ==========================================  ===============================
kind                formula                                     status
==================  ==========================================  ===============================
arithmetic          α p0 + c q                                  M1–M6 (pairwise contraction)
geometric           p0^α q^c / Z  = softmax(α log p0 + c log q)  M1–M5, not M6; d_H contracts
power (β ∈ [0,1])   (α p0^β + c q^β)^{1/β} / Z                   M1–M5 (β ∉ [0,1]: M4 fails)
softened_anchor     α F_τ(p0) + c q                             valid for anchor F_τ(p0)
softened_mixture    F_τ(α p0 + c q)                             M2 fails for τ ≠ 1 (failure F3)
==================  ==========================================  ===============================

Multiple base teachers: pass ``log_p0 = aggregate(teachers, weights=w, kind=...)``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax.operators import _common as C
from kdjax.operators.aggregation import aggregate
from kdjax.operators.softening import soften

Array = jax.Array

__all__ = ["meta_teacher", "make_operator", "META_KINDS"]

META_KINDS = ("arithmetic", "geometric", "power", "softened_anchor", "softened_mixture")

# An operator (log_p0, log_q, alpha) -> log_m: what `recurse` and the axiom checkers consume.
Operator = Callable[[Array, Array, Any], Array]


def meta_teacher(log_p0: Array, log_q: Array, *, alpha: Any, kind: str = "arithmetic",
                 power: Any = None, temperature: Any = None, axis: int = -1) -> Array:
  r"""The anchored target M_α(p0, q) built from base teacher p0 and previous student q.

  .. math:: M^{\rm ar}_\alpha = \alpha p_0 + (1-\alpha) q,\quad
            M^{\rm geo}_\alpha \propto p_0^\alpha q^{1-\alpha},\quad
            M^{(\beta)}_\alpha \propto (\alpha p_0^\beta + (1-\alpha) q^\beta)^{1/\beta}.

  Reference: arXiv:2601.13100 [paper] (framework); families Design choice (kdjax) [proposed].
  Forward-KL contraction KL(p0 ‖ M_α(p0, q)) ≤ (1 − α) KL(p0 ‖ q) holds for arithmetic,
  geometric and power β ∈ [0, 1] (see theory/recursive_meta_distillation.md).

  Concrete inputs must be log-probabilities (normalised along ``axis``, atol 1e-3), else
  ValueError; NaN propagates. The geometric (and power β ≤ 0) target of p0 and q with disjoint
  supports is empty: its row is all −inf (use the arithmetic kind there).

  Args:
    log_p0: base-teacher log-probabilities ``[..., K]``.
    log_q: previous-generation log-probabilities, same shape.
    alpha: anchor weight in [0, 1] (the weight of p0); a scalar, per-example ``[*batch]``
      array (checked elementwise when concrete), or traced (unchecked).
    kind: one of ``META_KINDS``.
    power: the power-mean exponent β for ``kind="power"`` (as in :func:`aggregate`).
    temperature: τ for ``softened_anchor`` / ``softened_mixture`` (power softening).
    axis: class axis.

  Returns:
    log M_α(p0, q), same shape.
  """
  lp0 = C.as_log_probs("log_p0", log_p0)
  lq = C.as_log_probs("log_q", log_q)
  _checks.check_same_shape("log_p0", lp0, "log_q", lq)
  ax = _checks.normalize_axis(axis, lp0.ndim)
  C.check_log_simplex("log_p0", log_p0, axis=ax)
  C.check_log_simplex("log_q", log_q, axis=ax)
  C.check_alpha("alpha", alpha)
  if kind not in META_KINDS:
    raise ValueError(f"`kind` must be one of {META_KINDS}, got {kind!r}.")
  if kind in ("softened_anchor", "softened_mixture"):
    if temperature is None:
      raise ValueError(f"`temperature` is required for kind={kind!r}.")
  elif temperature is not None:
    raise ValueError(f"`temperature` is only used by the softened kinds, got kind={kind!r}.")
  dtype = _checks.compute_dtype(lp0, lq)
  lp0, lq = lp0.astype(dtype), lq.astype(dtype)
  if kind in ("softened_anchor", "softened_mixture"):
    _checks.check_positive("temperature", temperature)
  if kind == "power":
    if power is None:
      raise ValueError("`power` (the power-mean exponent beta) is required when kind='power'.")
    _checks.check_range("power", power)
  elif power is not None:
    raise ValueError(f"`power` is only used with kind='power', got power={power!r} for "
                     f"kind={kind!r}.")
  b = _checks.concrete_scalar(power) if power is not None else None
  if power is not None and b is None:  # traced β: no static dispatch to the exact β ∈ {0, 1}
    return _meta_eager(lp0, lq, alpha, temperature, kind=kind, power=power, ax=ax)
  t = jnp.asarray(1.0 if temperature is None else temperature, dtype)
  return _meta_jit(lp0, lq, jnp.asarray(alpha, dtype), t, kind=kind, power=b, ax=ax)


def _meta_eager(lp0, lq, alpha, temperature, *, kind, power, ax):
  a = jnp.asarray(alpha, lp0.dtype)
  batch_shape = lp0.shape[:ax] + lp0.shape[ax + 1:]
  if a.ndim:  # per-example anchor weights
    a = jnp.broadcast_to(a, batch_shape)
  weights = jnp.stack([a, 1.0 - a])
  if kind == "softened_anchor":
    lp0 = soften(lp0, temperature=temperature, axis=ax)
    kind = "arithmetic"
  stacked = jnp.stack([lp0, lq])
  if kind == "softened_mixture":
    mixed = aggregate(stacked, weights=weights, kind="arithmetic", axis=ax + 1)
    return soften(mixed, temperature=temperature, axis=ax)
  return aggregate(stacked, weights=weights, kind=kind,
                   power=power if kind == "power" else None, axis=ax + 1)


# Compiled once per (shapes, kind, β, axis): eager calls otherwise compile every primitive.
# α and the temperature are traced (validated above on concrete values).
_meta_jit = jax.jit(_meta_eager, static_argnames=("kind", "power", "ax"))


def make_operator(kind: str = "arithmetic", *, power: Any = None, temperature: Any = None,
                  axis: int = -1) -> Operator:
  """Returns ``op(log_p0, log_q, alpha) -> log_m`` for :func:`recurse` and the checkers."""
  if kind not in META_KINDS:
    raise ValueError(f"`kind` must be one of {META_KINDS}, got {kind!r}.")

  def op(log_p0, log_q, alpha):
    return meta_teacher(log_p0, log_q, alpha=alpha, kind=kind, power=power,
                        temperature=temperature, axis=axis)

  op.__name__ = f"meta_teacher_{kind}"
  return op
