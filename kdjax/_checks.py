"""Argument validation shared by every kdjax function (the one copy of each check).

Rules (the library contract):

* Checks run on **concrete** values (Python numbers, NumPy arrays, non-traced jax arrays) and
  cost nothing inside ``jax.jit``: a traced hyper-parameter (a schedule value computed inside
  the step) cannot be checked and is accepted as is — documented as unchecked.
* Array-valued hyper-parameters are checked **elementwise** (a per-example temperature with one
  negative entry is rejected just like a negative scalar).
* Hyper-parameters are real numbers: ``bool`` and ``str`` are rejected; ``numbers.Integral`` /
  ``numbers.Real`` and NumPy scalars are accepted.
* ``where`` is one thing everywhere: a **boolean** mask broadcastable to the shape it masks.
* Errors are ``ValueError``/``TypeError`` that name the argument and what was allowed.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
  """True for a value without a concrete value at trace time (inside jit/grad/vmap)."""
  return isinstance(value, jax.core.Tracer)


def concrete_array(value: Any) -> np.ndarray | None:
  """`value` as a NumPy array when it is concrete, else None (traced or a callable)."""
  if is_traced(value) or callable(value) and not isinstance(value, (np.ndarray, jax.Array)):
    return None
  if isinstance(value, jax.Array):
    try:
      return np.asarray(value)
    except Exception:  # pylint: disable=broad-except  (e.g. a non-addressable global array)
      return None
  try:
    return np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None


def concrete_scalar(value: Any) -> float | None:
  """Returns `value` as a Python float when it is a concrete scalar, else None."""
  if is_traced(value):
    return None
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  arr = concrete_array(value)
  if arr is not None and arr.ndim == 0 and jnp.issubdtype(arr.dtype, jnp.number):
    return float(arr)
  return None


def check_real(name: str, value: Any) -> np.ndarray | None:
  """Type check of a real-valued hyper-parameter (scalar or array).

  Returns the concrete value as a float64 NumPy array (None when traced). Rejects ``bool``,
  ``str``, ``None`` and non-numeric dtypes with a ``TypeError`` naming `name`.
  """
  if is_traced(value):
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
      raise TypeError(f"`{name}` must be a real number or array, got dtype {value.dtype}.")
    return None
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    raise TypeError(f"`{name}` must be a real number or array of numbers, got {value!r}.")
  arr = concrete_array(value)
  # jnp.issubdtype also knows bfloat16 (an ml_dtypes type NumPy does not call floating).
  if arr is None or arr.dtype == bool or not (
      jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(f"`{name}` must be a real number or array of numbers, got {value!r}.")
  return arr.astype(np.float64)


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False,
                allow_inf: bool = False) -> None:
  """Elementwise range check of a concrete real hyper-parameter (scalar or array).

  NaN is always rejected; ±inf only with ``allow_inf``. Traced values are not checked.
  """
  arr = check_real(name, value)
  if arr is None or arr.size == 0:
    return
  bad = np.isnan(arr)
  if not allow_inf:
    bad |= np.isinf(arr)
  if low is not None:
    bad |= (arr <= low) if low_open else (arr < low)
  if high is not None:
    bad |= (arr >= high) if high_open else (arr > high)
  if np.any(bad):
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    if low is not None and high is not None:
      allowed = f"in {lo}, {hi}"
    elif low is not None:
      allowed = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
      allowed = f"{'<' if high_open else '<='} {high:g}"
    else:
      allowed = "finite"
    shown = value if arr.ndim == 0 else f"an array with entries {arr[bad].ravel()[:4].tolist()}"
    raise ValueError(f"`{name}` must be a {'finite ' if not allow_inf else ''}number {allowed}, "
                     f"got {shown!r}." if arr.ndim == 0 else
                     f"`{name}` must hold {'finite ' if not allow_inf else ''}numbers {allowed}, "
                     f"got {shown}.")


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless every concrete entry of `value` is a finite number > 0."""
  check_range(name, value, low=0.0, low_open=True)


def check_nonneg(name: str, value: Any) -> None:
  """Raises ValueError unless every concrete entry of `value` is a finite number >= 0."""
  check_range(name, value, low=0.0)


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ValueError unless every concrete entry of `value` lies in [0, 1]."""
  check_range(name, value, low=0.0, high=1.0)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
  """A static integer argument (`numbers.Integral`, not bool) within [low, high]."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  v = int(value)
  if (low is not None and v < low) or (high is not None and v > high):
    rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"`{name}` must be an int in {rng}, got {v}.")
  return v


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


def check_no_posinf(name: str, x: Any) -> None:
  """A concrete logits/log-prob array must not contain +inf (outside the domain: a traced +inf
  gives NaN, which propagates)."""
  arr = concrete_array(x)
  if arr is not None and arr.dtype != object and np.issubdtype(arr.dtype, np.floating) \
      and np.any(np.isposinf(arr)):
    raise ValueError(f"`{name}` contains +inf; logits must be finite or -inf (a removed entry).")


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32 for low-precision or integer inputs, float64 when an input already is."""
  dtypes = [a.dtype for a in arrays]
  if any(d == jnp.float64 for d in dtypes):
    return jnp.float64
  return jnp.float32


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"`{name}`={axis} is out of range for arrays of rank {ndim}.")
  return int(axis) % ndim


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape, got {a.shape} and {b.shape}.")


def check_where(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
  """The one `where` rule: a boolean mask broadcastable to `shape`; returns it broadcast.

  Non-boolean masks are a ``TypeError`` (a float 0.2 is not silently read as True).
  """
  if where is None:
    return None
  w = jnp.asarray(where)
  if w.dtype != jnp.bool_:
    raise TypeError(f"`{name}` must be a boolean mask (dtype bool), got dtype {w.dtype}; "
                    f"use `mask.astype(bool)` or `mask > 0` explicitly.")
  try:
    shape_out = jnp.broadcast_shapes(w.shape, tuple(shape))
  except ValueError:
    shape_out = None
  if shape_out != tuple(shape):
    raise ValueError(f"`{name}` must be broadcastable to {tuple(shape)}, got shape {w.shape}.")
  return jnp.broadcast_to(w, shape)


def split_where(where: Any, shape: tuple[int, ...], axis: int
                ) -> tuple[jax.Array | None, jax.Array | None]:
  """Splits a logits `where` mask into (vocabulary mask, batch mask).

  `where` is a boolean mask broadcastable to the logits shape. If its size along `axis` is 1
  (or it has lower rank, i.e. it is a position mask broadcast over the vocabulary) it is a
  *position* mask: masked positions give value 0 and gradient 0. Otherwise it is a *vocabulary*
  mask: False entries are removed from both distributions, renormalised over the rest. For
  convenience a mask of exactly the batch shape (logits shape without `axis`) is a position mask.
  """
  if where is None:
    return None, None
  w = jnp.asarray(where)
  if w.dtype != jnp.bool_:
    raise TypeError(f"`where` must be a boolean mask (dtype bool), got dtype {w.dtype}; "
                    f"use `mask.astype(bool)` or `mask > 0` explicitly.")
  shape = tuple(shape)
  batch_shape = shape[:axis] + shape[axis + 1:]
  if w.shape == batch_shape and w.shape != shape:
    return None, w
  full = check_where(w, shape)
  # Rank-padded view of the user's mask, to see whether it varies along `axis`.
  padded = (1,) * (len(shape) - w.ndim) + w.shape
  if padded[axis] == 1 and shape[axis] != 1:
    return None, jnp.take(full, 0, axis=axis)
  return full, None


def check_labels(name: str, labels: Any, num_classes: int, *,
                 ignore_index: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Integer class labels / token ids in [0, num_classes).

  Concrete out-of-range values (other than `ignore_index`) raise ``ValueError``; traced ones
  cannot be checked and are reported through the returned validity mask (callers drop those
  positions: value 0, gradient 0). Returns (labels clipped to a safe index, valid mask).
  """
  lab = jnp.asarray(labels)
  if not jnp.issubdtype(lab.dtype, jnp.integer) or lab.dtype == jnp.bool_:
    raise TypeError(f"`{name}` must hold integers, got dtype {lab.dtype}.")
  arr = concrete_array(labels)
  if arr is not None:
    bad = (arr < 0) | (arr >= num_classes)
    if ignore_index is not None:
      bad &= arr != ignore_index
    if np.any(bad):
      extra = f" (or ignore_index={ignore_index})" if ignore_index is not None else ""
      raise ValueError(f"`{name}` must lie in [0, {num_classes}){extra}, got values "
                       f"{np.unique(arr[bad])[:5].tolist()}.")
  valid = (lab >= 0) & (lab < num_classes)
  return jnp.where(valid, lab, 0), valid


def simplex_atol(dtype: Any, atol: float = 1e-2) -> float:
  """Tolerance on the mass of a stored distribution: `atol`, widened for low-precision dtypes
  (a bfloat16 log-softmax row sums to 1 only within a few of its 2^-8 rounding steps). The
  default 1e-2 also accepts float32 copies of bfloat16-stored distributions; it still catches
  logits or probabilities passed where log-probabilities are expected."""
  try:
    eps = float(jnp.finfo(dtype).eps)
  except ValueError:
    return atol
  return max(atol, 8.0 * eps)


def check_simplex(name: str, p: Any, *, axis: int = -1, atol: float = 1e-2,
                  log: bool = False) -> None:
  """Concrete (log-)probability vectors: non-negative (log-probs <= 0) and summing to 1."""
  arr = concrete_array(p)
  if arr is None or arr.size == 0:
    return
  atol = simplex_atol(arr.dtype, atol)
  arr = arr.astype(np.float64)
  if np.any(np.isnan(arr)):
    return  # NaN input propagates; it is the caller's guard that fires.
  if log:
    if np.any(arr > atol):
      raise ValueError(f"`{name}` must be log-probabilities (<= 0), got a maximum of "
                       f"{arr.max():.4g}.")
    mass = np.sum(np.exp(arr), axis=axis)
  else:
    if np.any(arr < 0):
      raise ValueError(f"`{name}` must be non-negative (a probability vector), got a minimum "
                       f"of {arr.min():.4g}.")
    mass = np.sum(arr, axis=axis)
  if np.any(np.abs(mass - 1.0) > atol):
    raise ValueError(f"`{name}` must sum to 1 along axis {axis} (a "
                     f"{'log-' if log else ''}probability vector), got sums "
                     f"{np.unique(np.round(mass, 4)).ravel()[:4].tolist()}.")


def per_position(name: str, value: Any, batch_shape: tuple[int, ...], axis: int,
                 dtype) -> jax.Array:
  """A per-position hyper-parameter (scalar or broadcastable to `batch_shape`), returned with a
  singleton at `axis` so it broadcasts against the full logits shape."""
  v = jnp.asarray(value, dtype)
  try:
    b = jnp.broadcast_shapes(v.shape, tuple(batch_shape))
  except ValueError:
    b = None
  if b != tuple(batch_shape):
    raise ValueError(f"`{name}` must be a scalar or broadcastable to the batch shape "
                     f"{tuple(batch_shape)} (the logits shape without the class axis), got "
                     f"shape {v.shape}.")
  v = jnp.broadcast_to(v, batch_shape)
  return jnp.expand_dims(v, axis)


def check_logits_pair(student_logits: Any, teacher_logits: Any, axis: int
                      ) -> tuple[jax.Array, jax.Array, int, Any]:
  """A (student, teacher) logits pair: arrays of one shape without concrete +inf; returns
  (student, teacher, normalised class axis, compute dtype)."""
  s = check_array("student_logits", student_logits)
  t = check_array("teacher_logits", teacher_logits)
  check_same_shape("student_logits", s, "teacher_logits", t)
  check_no_posinf("student_logits", student_logits)
  check_no_posinf("teacher_logits", teacher_logits)
  return s, t, normalize_axis(axis, s.ndim), compute_dtype(s, t)
