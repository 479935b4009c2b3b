"""Device mesh helpers: data parallelism by default, FSDP-style parameter sharding as an option.

The modern form of ``pmap``: ``jax.jit`` over a ``jax.sharding.Mesh``. The batch is sharded over
the ``data`` axis; parameters are replicated (data parallel) or split along their largest
divisible dimension over the same axis (``fsdp=True``, for models that do not fit one device). The
compiler inserts the all-reduce of the gradients (or the all-gather / reduce-scatter for FSDP).
The same code runs on one CPU, on 8 fake CPU devices, on a GPU/TPU host and across hosts: with
several processes (``jax.distributed``) every process computes the same global batch indices and
contributes its own rows (:func:`shard_batch`).

The axis type is ``Auto``: ``jax.make_mesh`` defaults to Explicit axes, which break a Flax
embedding lookup on batch-sharded ids (see ENVIRONMENT.md).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "batch_sharding", "replicated", "shard_batch", "state_shardings",
           "place", "to_host"]


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D ``("data",)`` mesh over the first ``num_devices`` devices (default: all, all hosts)."""
  devices = jax.devices()
  n = len(devices) if not num_devices else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"`num_devices` must be in [1, {len(devices)}] (the devices JAX sees), "
                     f"got {num_devices}.")
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the other axes whole."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Places a *global* host batch (same on every process) as arrays sharded over ``data``.

  The batch size must be a multiple of the mesh size. With several processes each one passes
  only its own contiguous block of rows to ``jax.make_array_from_process_local_data``.
  """
  sharding = batch_sharding(mesh)
  nproc, pid = jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % mesh.size:
      raise ValueError(f"batch entry {k!r}: batch size {v.shape[0]} is not a multiple of the "
                       f"{mesh.size} devices of the mesh.")
    if nproc == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      rows = v.shape[0] // nproc
      out[k] = jax.make_array_from_process_local_data(
          sharding, v[pid * rows:(pid + 1) * rows], v.shape)
  return out


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> P:
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension divisible by the mesh size carries the split.
  for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[ax] % n == 0:
      spec = [None] * len(shape)
      spec[ax] = "data"
      return P(*spec)
  return P()


def state_shardings(tree: Any, mesh: jax.sharding.Mesh, *, fsdp: bool = False,
                    min_size: int = 1024) -> Any:
  """Shardings for a parameter/optimizer pytree: replicated, or FSDP-split when ``fsdp``.

  With ``fsdp=True`` every array of at least ``min_size`` elements is split along its largest
  dimension divisible by the mesh size; smaller arrays (biases, scalars) stay replicated.
  """
  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, _fsdp_spec(shape, mesh.size, min_size) if fsdp and shape else P())
  return jax.tree.map(one, tree)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree (the same values on every process) onto the given global shardings."""
  def one(x, s):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process, sharded) array as a full numpy array on this host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
