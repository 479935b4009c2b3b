"""Validation helpers shared by the operator modules (not public API).

The log-space primitives (masked log-sum-exp, normalisation, safe log) live in
:mod:`kdjax._logspace`, the one copy every kdjax module uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks

Array = jax.Array


def as_log_probs(name: str, x: Any, *, min_rank: int = 1) -> Array:
  """Validates a log-probability array and returns it in the compute dtype (f32 / f64)."""
  arr = _checks.check_array(name, x, min_rank=min_rank)
  _checks.check_no_posinf(name, arr)
  return arr.astype(_checks.compute_dtype(arr))


def check_alpha(name: str, alpha: Any) -> None:
  """alpha must lie in [0, 1] (checked when concrete, elementwise for a schedule)."""
  if callable(alpha) and not isinstance(alpha, (np.ndarray, jax.Array)):
    return
  _checks.check_unit_interval(name, alpha)


def check_log_simplex(name: str, log_p: Any, axis: int = -1) -> None:
  """Concrete log-probabilities must be normalised along `axis` (atol 1e-2 on the mass, wider
  for bfloat16 input).

  An all −inf row (an empty distribution) is allowed: the operators keep it empty. NaN input is
  not checked (it propagates).
  """
  arr = _checks.concrete_array(log_p)
  if arr is None or arr.size == 0 or not jnp.issubdtype(arr.dtype, jnp.number):
    return
  atol = _checks.simplex_atol(arr.dtype)
  arr = arr.astype(np.float64)
  if np.any(np.isnan(arr)):
    return
  mass = np.sum(np.exp(arr), axis=axis)
  bad = (np.abs(mass - 1.0) > atol) & (mass != 0)
  if np.any(bad):
    raise ValueError(f"`{name}` must be log-probabilities normalised along axis {axis} "
                     f"(probabilities summing to 1), got sums "
                     f"{np.unique(np.round(mass[bad], 4)).ravel()[:4].tolist()}.")
