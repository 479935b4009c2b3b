"""Shared front end of the loss zoo (private to :mod:`kdjax.losses`).

Built only on the library's private primitives :mod:`kdjax._logspace` and :mod:`kdjax._checks`
(no private names from other public modules).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax import _logspace

Array = jax.Array


def temperature_array(temperature: Any, shape: tuple[int, ...], axis: int, dtype,
                      name: str = "temperature") -> Array:
  """A scalar or per-position (``[*batch]``) temperature, checked elementwise (> 0) and returned
  with a singleton at ``axis`` so that it divides the logits row by row."""
  _checks.check_positive(name, temperature)
  batch = tuple(shape[:axis]) + tuple(shape[axis + 1:])
  return _checks.per_position(name, temperature, batch, axis, dtype)


def log_probs(name: str, logits: Any, temperature: Any, axis: int, where=None,
              dtype=None) -> tuple[Array, int, Array]:
  """(log softmax(z / T) over the valid entries, normalised axis, T with a singleton at axis)."""
  z = _checks.check_array(name, logits)
  _checks.check_no_posinf(name, logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  dtype = _checks.compute_dtype(z) if dtype is None else dtype
  temp = temperature_array(temperature, z.shape, ax, dtype)
  z = z.astype(dtype)
  # Double where: (-inf)/T never enters the graph, so d/dT stays finite with -inf entries.
  present = _logspace.valid_entries(z)
  z = jnp.where(present, jnp.where(present, z, 0.0) / temp, -jnp.inf)
  lp = _logspace.masked_log_softmax(z, axis=ax, where=where)
  return lp, ax, temp


def prepare(student_logits, teacher_logits, temperature, axis, where):
  """Validates a (student, teacher) logits pair; returns (log p_S, log p_T, axis, batch mask,
  temperature with a singleton at axis)."""
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  ax = _checks.normalize_axis(axis, s.ndim)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  dtype = _checks.compute_dtype(s, t)
  log_ps, _, temp = log_probs("student_logits", s, temperature, ax, vocab_mask, dtype)
  log_pt, _, _ = log_probs("teacher_logits", t, temperature, ax, vocab_mask, dtype)
  return log_ps, log_pt, ax, batch_mask, temp


def finish(values: Array, log_ps: Array, log_pt: Array, axis: int, batch_mask) -> Array:
  """Zeroes empty rows (no entry left on one side, decided from the masks) and masked positions.

  NaN is never an empty row: a NaN value propagates.
  """
  keep = _logspace.row_nonempty(log_ps, axis) & _logspace.row_nonempty(log_pt, axis)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)


def position_mask(where: Any, batch_shape: tuple[int, ...]) -> Array | None:
  """A boolean position mask broadcastable to the batch shape (the one ``where`` rule)."""
  return _checks.check_where(where, tuple(batch_shape))


def t2_factor(value: Array, temp: Array, axis: int, scale_by_t2: Any) -> Array:
  """value · T² (T per position allowed) when ``scale_by_t2``; a bool switch."""
  if not isinstance(scale_by_t2, bool):
    raise TypeError(f"`scale_by_t2` must be a bool, got {scale_by_t2!r}.")
  if not scale_by_t2:
    return value
  t = jnp.squeeze(jnp.asarray(temp), axis).astype(value.dtype)
  return value * t * t
