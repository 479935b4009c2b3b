r"""Sum-and-count reductions: take a mean once per optimizer step, across micro-batches and devices.

kdjax losses return per-position values. Averaging them inside each micro-batch and then
averaging the micro-batch means weights a token of a short micro-batch more than one of a long
micro-batch — the normalisation bug reported in TRL (#4719, #2617) and Liger (PR #974). The fix
is to carry (sum, count) pairs and divide once:

.. code-block:: python

  acc = kdjax.reductions.zeros()
  for micro in micro_batches:
    acc = acc + kdjax.reductions.masked_sum_and_count(loss_fn(micro), where=micro_mask)
  loss = acc.mean()                        # or kdjax.reductions.finalize_mean(acc)

Inside ``shard_map`` use :func:`psum` to add the pairs over a mesh axis before the division.
Under ``jax.jit`` with sharded inputs a plain sum over the global batch already is global.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import _checks

Array = jax.Array

__all__ = ["SumAndCount", "zeros", "masked_sum_and_count", "finalize_mean", "psum",
           "masked_mean"]


class SumAndCount(NamedTuple):
  """A (sum, count) pair — a pytree, so it can be carried by scan, psum'ed and added.

  ``acc + acc`` adds both fields, and ``sum([acc1, acc2, ...])`` works (``0 + acc`` is ``acc``).
  The count is exact: an **int32** number of entries for unweighted reductions (float32 would
  stop counting at 2**24 ≈ 16.7 M tokens, where 2**24 + 1 == 2**24), and a float32 total weight
  for weighted ones (float64 with ``jax_enable_x64`` and float64 values). Adding an unweighted
  and a weighted pair promotes the count to float.
  """

  sum: Array
  count: Array

  def __add__(self, other: "SumAndCount") -> "SumAndCount":  # type: ignore[override]
    if not isinstance(other, SumAndCount):
      return NotImplemented
    return SumAndCount(self.sum + other.sum, self.count + other.count)

  def __radd__(self, other) -> "SumAndCount":
    # `sum()` starts from the int 0.
    if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
      return self
    return NotImplemented

  def mean(self) -> Array:
    return finalize_mean(self)


def zeros(dtype=jnp.float32) -> SumAndCount:
  """The empty accumulator: ``SumAndCount(sum=0 (of dtype), count=0 (int32))``.

  Start a micro-batch loop with it (``acc = zeros(); acc = acc + masked_sum_and_count(...)``);
  its mean is 0. ``dtype`` is the dtype of the sum (float32, or float64 under x64).
  """
  return SumAndCount(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))


def masked_sum_and_count(values: Array, *, where: Array | None = None,
                         weights: Array | None = None) -> SumAndCount:
  """Sum of ``values`` over the entries kept by ``where``, and how many (or how much weight).

  Args:
    values: per-position values (any shape); bfloat16 is summed in float32.
    where: optional **boolean** mask broadcastable to ``values`` (a non-boolean mask is a
      ``TypeError``); masked entries contribute nothing, not even a NaN they might hold. A NaN in
      a kept entry propagates to the sum.
    weights: optional non-negative per-entry weights broadcastable to ``values`` (concrete
      negative or non-finite weights are a ``ValueError``; traced weights are unchecked); the
      count is then the sum of weights over the kept entries (a weighted mean results). An
      entry of weight 0 contributes nothing, not even a NaN/inf it holds.

  Returns:
    ``SumAndCount(sum, count)``: the count is int32 without weights, float with weights.
  """
  v = _checks.check_array("values", values, min_rank=0)
  dtype = _checks.compute_dtype(v)
  v = v.astype(dtype)
  keep = _checks.check_where(where, v.shape)
  if weights is None:
    kept = v if keep is None else jnp.where(keep, v, 0.0)
    count = (jnp.asarray(v.size, jnp.int32) if keep is None
             else jnp.sum(keep, dtype=jnp.int32))
    return SumAndCount(jnp.sum(kept), count)
  _checks.check_nonneg("weights", weights)
  w = _checks.check_array("weights", weights, min_rank=0)
  try:
    out_shape = jnp.broadcast_shapes(w.shape, v.shape)
  except ValueError:
    out_shape = None
  if out_shape != v.shape:
    raise ValueError(f"`weights` must be broadcastable to the shape of `values` {v.shape}, "
                     f"got shape {w.shape}.")
  w = jnp.broadcast_to(w.astype(dtype), v.shape)
  keep = jnp.ones(v.shape, bool) if keep is None else keep
  # A zero weight drops a non-finite value (0·NaN would be NaN); finite values keep d/dw = v.
  use_v = keep & ((w != 0) | jnp.isfinite(v))
  total = jnp.sum(jnp.where(keep, w * jnp.where(use_v, v, 0.0), 0.0))
  count = jnp.sum(jnp.where(keep, w, 0.0))
  return SumAndCount(total, count)


def finalize_mean(acc: SumAndCount) -> Array:
  """sum / count, and 0 (with zero gradient) when nothing was counted.

  Takes a :class:`SumAndCount` (for an array of values call :func:`masked_mean`).
  """
  if not isinstance(acc, SumAndCount):
    raise TypeError(f"`acc` must be a kdjax.reductions.SumAndCount, got {type(acc).__name__}; "
                    "for an array of per-position values call `masked_mean(values, where=...)`.")
  s = jnp.asarray(acc.sum)
  s = s.astype(_checks.compute_dtype(s))
  c = jnp.asarray(acc.count).astype(s.dtype)
  nonzero = c > 0
  return jnp.where(nonzero, s / jnp.where(nonzero, c, 1.0), 0.0)


def masked_mean(values: Array, *, where: Array | None = None,
                weights: Array | None = None) -> Array:
  """Convenience: ``finalize_mean(masked_sum_and_count(values, where=..., weights=...))``.

  Takes an array of values (for an accumulated :class:`SumAndCount` call :func:`finalize_mean`
  or ``acc.mean()``).
  """
  if isinstance(values, SumAndCount):
    raise TypeError("`values` is a SumAndCount; call `finalize_mean(acc)` (or `acc.mean()`) "
                    "to divide an accumulated (sum, count) pair, `masked_mean` takes an array.")
  return finalize_mean(masked_sum_and_count(values, where=where, weights=weights))


def psum(acc: SumAndCount, axis_name) -> SumAndCount:
  """Adds (sum, count) pairs across a named mesh axis (inside ``shard_map``)."""
  return SumAndCount(jax.lax.psum(acc.sum, axis_name), jax.lax.psum(acc.count, axis_name))
