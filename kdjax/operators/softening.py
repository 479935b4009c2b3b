r"""Softening operators F_T: Δ → Δ on log-probabilities (arXiv:2601.03195).

[paper] Probability-domain softening rests on p^{1/T} ∝ softmax(z/T) for p = softmax(z); it acts
on probabilities directly (black-box teachers). The concrete families and the formal axioms
S1–S5 are Design choice (kdjax) [proposed] (spec §2):

* ``"power"`` (temperature): F_T(p) = softmax(log p / T), i.e. p_i^{1/T} / Σ_j p_j^{1/T}, T > 0.
* ``"mixing"`` (uniform mixing): F_T(p) = p/T + (1 − 1/T) u, defined for T ≥ 1 only (its T → 0
  boundary behaviour is undefined; documented domain).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax import divergences as D
from kdjax.operators import _common as C

Array = jax.Array

__all__ = ["soften", "SOFTENING_KINDS"]

SOFTENING_KINDS = ("power", "mixing")


def soften(log_p: Array, *, temperature: Any, kind: str = "power", axis: int = -1) -> Array:
  r"""Softening operator F_T applied to log-probabilities ``log_p`` along ``axis``.

  .. math:: F^{\rm pow}_T(p) = \mathrm{softmax}(\log p / T), \qquad
            F^{\rm mix}_T(p) = \tfrac1T p + (1-\tfrac1T)\,u .

  Both satisfy S1–S5 ([proposed], spec §2; checked by ``theory --only meta.softening``):
  ranking preserved, continuous, entropy non-decreasing in T, F_1 = id, F_T → u as T → ∞ and
  (power only) → uniform on argmax as T → 0⁺. Zeros stay zeros under the power family; the
  mixing family gives every class mass ≥ (1 − 1/T)/K.

  Args:
    log_p: log-probabilities ``[..., K]`` (−inf allowed).
    temperature: T > 0 (``"power"``) or T ≥ 1 (``"mixing"``); may be traced.
    kind: ``"power"`` or ``"mixing"``.
    axis: class axis.
  """
  lp = C.as_log_probs("log_p", log_p)
  ax = _checks.normalize_axis(axis, lp.ndim)
  _checks.check_positive("temperature", temperature)
  if kind == "power":
    t = jnp.asarray(temperature, lp.dtype)
    return D.log_softmax(jnp.where(lp > -jnp.inf, lp / t, -jnp.inf), axis=ax)
  if kind == "mixing":
    v = _checks.concrete_scalar(temperature)
    if v is not None and v < 1.0:
      raise ValueError(f"`temperature` must be >= 1 for kind='mixing' (uniform mixing with "
                       f"weight 1 - 1/T), got {temperature!r}.")
    t = jnp.asarray(temperature, lp.dtype)
    k = lp.shape[ax]
    log_u = jnp.full_like(lp, -jnp.log(jnp.asarray(k, lp.dtype)))
    return D.log_mixture(1.0 / t, lp, log_u)
  raise ValueError(f"`kind` must be one of {SOFTENING_KINDS}, got {kind!r}.")
