"""Argument validation shared by every kdjax function.

The checks run at trace time on static information (shapes, Python scalars), so they cost
nothing inside `jax.jit`. A traced hyper-parameter (a schedule value computed inside the step)
cannot be checked and is accepted as is.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(value: Any) -> float | None:
  """Returns `value` as a Python float when it is known at trace time, else None."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
    return float(arr)
  return None


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError when a concrete `value` is not a finite number > 0."""
  v = concrete_scalar(value)
  if v is not None and not (np.isfinite(v) and v > 0):
    raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ValueError when a concrete `value` lies outside [0, 1]."""
  v = concrete_scalar(value)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def check_array(name: str, x: Any, *, min_rank: int = 1) -> jax.Array:
  """Converts `x` to an array, rejecting non-numeric input and too-small rank."""
  if isinstance(x, (str, bytes)) or x is None:
    raise TypeError(f"`{name}` must be an array of numbers, got {type(x).__name__}.")
  arr = jnp.asarray(x)
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(f"`{name}` must hold numbers, got dtype {arr.dtype}.")
  if arr.ndim < min_rank:
    raise ValueError(f"`{name}` must have rank >= {min_rank}, got shape {arr.shape}.")
  return arr


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32 for low-precision or integer inputs, float64 when an input already is."""
  dtypes = [a.dtype for a in arrays]
  if any(d == jnp.float64 for d in dtypes):
    return jnp.float64
  return jnp.float32


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if not isinstance(axis, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"`{name}`={axis} is out of range for arrays of rank {ndim}.")
  return int(axis) % ndim


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape, got {a.shape} and {b.shape}.")


def split_where(where: Any, shape: tuple[int, ...], axis: int
                ) -> tuple[jax.Array | None, jax.Array | None]:
  """Splits a `where` mask into (vocabulary mask, batch mask).

  `where` may have the full logits shape (entries marked False are removed from the
  vocabulary: both distributions are renormalised over the rest) or the batch shape, i.e. the
  logits shape without `axis` (positions marked False give value 0 and gradient 0).
  """
  if where is None:
    return None, None
  w = jnp.asarray(where)
  if w.dtype != jnp.bool_:
    if not jnp.issubdtype(w.dtype, jnp.integer):
      raise TypeError(f"`where` must be a boolean mask, got dtype {w.dtype}.")
    w = w.astype(bool)
  batch_shape = shape[:axis] + shape[axis + 1:]
  if w.shape == tuple(shape):
    return w, None
  if w.shape == batch_shape:
    return None, w
  raise ValueError(
      f"`where` must have the logits shape {tuple(shape)} or the batch shape {batch_shape}, "
      f"got {w.shape}.")
