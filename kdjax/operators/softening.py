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
from kdjax import _logspace as LS
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

  NaN in ``log_p`` propagates to its row (it is never treated as a removed entry).

  Args:
    log_p: log-probabilities ``[..., K]`` (−inf allowed; +inf rejected when concrete).
    temperature: T > 0 (``"power"``) or T ≥ 1 (``"mixing"``): a scalar or a per-row array of
      the batch shape (``log_p.shape`` without ``axis``, or with a singleton there). Concrete
      values are checked
      elementwise; a traced T is not checked.
    kind: ``"power"`` or ``"mixing"``.
    axis: class axis.
  """
  lp = C.as_log_probs("log_p", log_p)
  ax = _checks.normalize_axis(axis, lp.ndim)
  if kind not in SOFTENING_KINDS:
    raise ValueError(f"`kind` must be one of {SOFTENING_KINDS}, got {kind!r}.")
  if kind == "mixing":
    # Elementwise: a per-row temperature with one entry below 1 is rejected too.
    _checks.check_range("temperature", temperature, low=1.0)
  else:
    _checks.check_positive("temperature", temperature)
  batch_shape = lp.shape[:ax] + lp.shape[ax + 1:]
  t = jnp.asarray(temperature, lp.dtype)
  if t.ndim == lp.ndim and t.shape[ax] == 1:  # already carries the singleton class axis
    t = _checks.per_position("temperature", jnp.squeeze(t, ax), batch_shape, ax, lp.dtype)
  else:
    t = _checks.per_position("temperature", t, batch_shape, ax, lp.dtype)
  if kind == "power":
    valid = LS.valid_entries(lp)
    # Double where: (-inf)/T never enters the graph, so d/dT stays finite.
    scaled = jnp.where(valid, jnp.where(valid, lp, 0.0) / t, -jnp.inf)
    return LS.masked_log_softmax(scaled, axis=ax)
  k = lp.shape[ax]
  log_u = jnp.full_like(lp, -jnp.log(jnp.asarray(k, lp.dtype)))
  return LS.log_mixture(1.0 / t, lp, log_u)
