"""Log-space helpers shared by the operator modules (not public API)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks

Array = jax.Array
NEG_INF = -jnp.inf


def safe_log(x: Array) -> Array:
  """log x with log 0 = -inf and a zero (not NaN/inf) gradient at 0."""
  pos = x > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), NEG_INF)


def log_normalize(log_x: Array, axis: int = -1) -> Array:
  """Normalises unnormalised log-masses along `axis`; all -inf rows stay -inf, no NaN."""
  valid = log_x > NEG_INF
  safe = jnp.where(valid, log_x, 0.0)
  m = jnp.max(jnp.where(valid, safe, NEG_INF), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, safe - m, 0.0)), 0.0), axis=axis,
              keepdims=True)
  nonempty = s > 0
  log_s = jnp.log(jnp.where(nonempty, s, 1.0)) + m
  return jnp.where(valid & nonempty, safe - log_s, NEG_INF)


def logsumexp(log_x: Array, axis: int, keepdims: bool = False) -> Array:
  """log Σ exp over `axis`; -inf entries allowed, an all -inf slice gives -inf, no NaN."""
  valid = log_x > NEG_INF
  safe = jnp.where(valid, log_x, 0.0)
  m = jnp.max(jnp.where(valid, safe, NEG_INF), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, safe - m, 0.0)), 0.0), axis=axis,
              keepdims=True)
  out = jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + m, NEG_INF)
  return out if keepdims else jnp.squeeze(out, axis=axis)


def as_log_probs(name: str, x: Any, *, min_rank: int = 1) -> Array:
  """Validates a log-probability array and returns it in the compute dtype (f32 / f64)."""
  arr = _checks.check_array(name, x, min_rank=min_rank)
  return arr.astype(_checks.compute_dtype(arr))


def check_alpha(name: str, alpha: Any) -> None:
  """alpha must lie in [0, 1] (checked when concrete, elementwise for a schedule)."""
  if isinstance(alpha, jax.core.Tracer) or callable(alpha):
    return
  a = np.asarray(alpha)
  if not np.issubdtype(a.dtype, np.number):
    raise TypeError(f"`{name}` must be a number or an array of numbers, got {alpha!r}.")
  if a.size and not (np.all(np.isfinite(a)) and np.all(a >= 0) and np.all(a <= 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got {alpha!r}.")
