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
  """A (sum, count) pair — a pytree, so it can be carried by scan, psum'ed and added."""

  sum: Array
  count: Array

  def __add__(self, other: "SumAndCount") -> "SumAndCount":  # type: ignore[override]
    if not isinstance(other, SumAndCount):
      return NotImplemented
    return SumAndCount(self.sum + other.sum, self.count + other.count)

  def mean(self) -> Array:
    return finalize_mean(self)


def zeros(dtype=jnp.float32) -> SumAndCount:
  return SumAndCount(jnp.zeros((), dtype), jnp.zeros((), dtype))


def masked_sum_and_count(values: Array, *, where: Array | None = None,
                         weights: Array | None = None) -> SumAndCount:
  """Sum of ``values`` over the entries kept by ``where``, and how many (or how much weight).

  Args:
    values: per-position values (any shape).
    where: optional boolean mask broadcastable to ``values``; masked entries contribute nothing,
      not even a NaN they might hold.
    weights: optional non-negative per-entry weights; the count is then the sum of weights
      over the kept entries (a weighted mean results).
  """
  v = _checks.check_array("values", values, min_rank=0)
  dtype = _checks.compute_dtype(v)
  v = v.astype(dtype)
  keep = jnp.ones(v.shape, bool) if where is None else jnp.broadcast_to(
      jnp.asarray(where, bool), v.shape)
  w = jnp.ones(v.shape, dtype) if weights is None else jnp.broadcast_to(
      jnp.asarray(weights, dtype), v.shape)
  total = jnp.sum(jnp.where(keep, w * jnp.where(keep, v, 0.0), 0.0))
  count = jnp.sum(jnp.where(keep, w, 0.0))
  return SumAndCount(total, count)


def finalize_mean(acc: SumAndCount) -> Array:
  """sum / count, and 0 (with zero gradient) when nothing was counted."""
  s, c = acc
  nonzero = c > 0
  return jnp.where(nonzero, s / jnp.where(nonzero, c, 1.0), 0.0)


def masked_mean(values: Array, *, where: Array | None = None,
                weights: Array | None = None) -> Array:
  """Convenience: ``finalize_mean(masked_sum_and_count(values, where=..., weights=...))``."""
  return finalize_mean(masked_sum_and_count(values, where=where, weights=weights))


def psum(acc: SumAndCount, axis_name) -> SumAndCount:
  """Adds (sum, count) pairs across a named mesh axis (inside ``shard_map``)."""
  return SumAndCount(jax.lax.psum(acc.sum, axis_name), jax.lax.psum(acc.count, axis_name))
