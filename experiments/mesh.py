"""Device mesh helpers: a ``("data", "model")`` mesh, batch placement, parameter shardings.

The modern form of ``pmap``: ``jax.jit`` over a ``jax.sharding.Mesh``. The batch is sharded over
the ``data`` axis (and replicated over ``model``). Parameters are

* replicated (plain data parallelism, the default);
* split by their Flax NNX sharding annotations: a parameter created with
  ``nnx.with_partitioning(init, ("embed", "mlp"))`` carries the *logical* axis names
  ``("embed", "mlp")``, which :data:`LOGICAL_AXIS_RULES` maps to mesh axes (``"mlp"`` ->
  ``"model"``: tensor parallelism over the ``model`` axis);
* or, with ``fsdp=True``, split along their largest divisible dimension over ``data`` (for
  models that do not fit one device).

The compiler inserts the gradient all-reduce (or the all-gather / reduce-scatter for FSDP and
the model axis). The same code runs on one CPU, on 8 fake CPU devices, on a GPU/TPU host and across
hosts (``jax.distributed``).

Multi-host input: every process computes the same global batch *indices* (a pure function of
(seed, step)); :func:`host_rows` says which rows of the global batch this process's devices hold
under :func:`batch_sharding` -- whatever the device order of the mesh -- and the process reads only
those rows; :func:`shard_batch` assembles the global array from them with
``jax.make_array_from_callback``, so global row ``i`` always holds example ``indices[i]``.

The axis types are ``Auto``: ``jax.make_mesh`` defaults to Explicit axes, which break a Flax
embedding lookup on batch-sharded ids.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["LOGICAL_AXIS_RULES", "make_mesh", "batch_sharding", "replicated", "host_rows",
           "shard_batch", "logical_to_mesh_spec", "state_shardings", "place", "to_host",
           "host_local_rows"]

#: Logical axis name -> mesh axis (``None``: not split). Parameters annotated with
#: ``nnx.with_partitioning`` use these names; the default is Megatron-style tensor parallelism
#: (hidden/vocabulary/head dimensions over ``model``, the embedding dimension whole).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
)


def _devices_per_process() -> dict[int, list]:
  by_proc: dict[int, list] = collections.defaultdict(list)
  for d in jax.devices():
    by_proc[d.process_index].append(d)
  return {p: sorted(v, key=lambda d: d.id) for p, v in sorted(by_proc.items())}


def make_mesh(num_devices: int | None = None, *, model: int = 1) -> jax.sharding.Mesh:
  """A 2-D ``("data", "model")`` mesh of shape ``(num_devices // model, model)``.

  Args:
    num_devices: how many devices to use (default or 0: all devices of all processes). With fewer
      than all, the same number is taken from every process (the first of each process's
      devices), so every process keeps at least one device and can feed its rows; a count that
      cannot be spread evenly over the processes is rejected.
    model: the size of the ``model`` axis (tensor parallelism); must divide ``num_devices``.
      ``model=1`` is plain data parallelism.

  Raises:
    ValueError: ``num_devices`` outside ``[1, jax.device_count()]`` or not a multiple of the
      process count, or ``model`` not a positive divisor of it.
  """
  devices = jax.devices()
  if isinstance(num_devices, bool) or (num_devices is not None and not isinstance(
      num_devices, (int, np.integer))):
    raise TypeError(f"`num_devices` must be an int or None, got {num_devices!r}.")
  if isinstance(model, bool) or not isinstance(model, (int, np.integer)):
    raise TypeError(f"`model` must be an int, got {model!r}.")
  n = len(devices) if not num_devices else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"`num_devices` must be in [1, {len(devices)}] (the devices JAX sees), "
                     f"got {num_devices}.")
  model = int(model)
  if model < 1 or n % model:
    raise ValueError(f"`model` must be a positive divisor of the {n} devices of the mesh, got "
                     f"{model}.")
  if n == len(devices):
    selected = devices
  else:
    by_proc = _devices_per_process()
    nproc = len(by_proc)
    if n % nproc or any(len(v) < n // nproc for v in by_proc.values()):
      raise ValueError(
          f"`num_devices`={n} cannot be spread evenly over the {nproc} processes (devices per "
          f"process: {[len(v) for v in by_proc.values()]}); every process must keep the same "
          f"number of devices. Use a multiple of {nproc} or all {len(devices)} devices.")
    selected = [d for v in by_proc.values() for d in v[:n // nproc]]
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // model, model), ("data", "model"), axis_types=(auto, auto),
                       devices=selected)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the other axes whole (replicated over ``model``)."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def _data_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape["data"]) if "data" in mesh.shape else int(mesh.size)


def host_rows(mesh: jax.sharding.Mesh, global_batch: int) -> np.ndarray:
  """The sorted rows of a global batch of ``global_batch`` rows that this process's devices hold.

  Read from the sharding itself (``addressable_devices_indices_map``), so it is right for any
  device order of the mesh (TPU ring order, interleaved processes, ...). With one process it is
  ``arange(global_batch)``.
  """
  global_batch = int(global_batch)
  if global_batch % _data_size(mesh):
    raise ValueError(f"batch size {global_batch} is not a multiple of the "
                     f"{_data_size(mesh)} devices of the mesh's `data` axis.")
  rows: set[int] = set()
  for idx in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*idx[0].indices(global_batch)))
  return np.array(sorted(rows), dtype=np.int64)


def shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh, *,
                rows: np.ndarray | None = None, global_size: int | None = None
                ) -> dict[str, jax.Array]:
  """Places a host batch as global arrays sharded over ``data``.

  Args:
    batch: dict of numpy arrays with the batch on the leading axis. Either the whole *global*
      batch (``rows=None``; every process passes the same values), or only this process's rows
      of it (``rows`` given).
    mesh: the device mesh.
    rows: the global row of each row of ``batch`` (sorted, as :func:`host_rows` returns); it
      must cover every row this process's devices hold.
    global_size: the global batch size (required with ``rows``).

  Returns:
    dict of ``jax.Array`` whose global row ``i`` holds the batch row of global index ``i``, for
    any device order of the mesh (each device's block is cut out by
    ``jax.make_array_from_callback``; only this process's blocks are transferred).
  """
  sharding = batch_sharding(mesh)
  n_data = _data_size(mesh)
  if rows is not None:
    if global_size is None:
      raise ValueError("`global_size` is required with `rows`.")
    rows = np.asarray(rows, np.int64)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    size = v.shape[0] if rows is None else int(global_size)
    if size % n_data:
      raise ValueError(f"batch entry {k!r}: batch size {size} is not a multiple of the "
                       f"{n_data} devices of the mesh's `data` axis.")
    if rows is not None and len(rows) != v.shape[0]:
      raise ValueError(f"batch entry {k!r}: {v.shape[0]} host rows but {len(rows)} `rows`.")
    shape = (size,) + v.shape[1:]

    def block(idx, v=v):
      if rows is None:
        return v[idx]
      want = np.arange(*idx[0].indices(shape[0]))
      pos = np.searchsorted(rows, want)
      if np.any(pos >= len(rows)) or np.any(rows[np.minimum(pos, len(rows) - 1)] != want):
        raise ValueError(f"batch entry {k!r}: this process's devices hold global rows "
                         f"{want.min()}..{want.max()}, which `rows` does not cover.")
      return v[(pos,) + tuple(idx[1:])]

    out[k] = jax.make_array_from_callback(shape, sharding, block)
  return out


def host_local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a batch-sharded global array that live on this process, with their indices.

  Returns ``(indices, values)``: the sorted global row indices held by this process's devices and
  those rows as numpy (no cross-host transfer: use this instead of :func:`to_host` for large
  per-example outputs such as full-vocabulary logits).
  """
  n = x.shape[0]
  blocks: dict[int, np.ndarray] = {}
  for s in x.addressable_shards:
    start, stop, _ = s.index[0].indices(n) if s.index else (0, n, 1)
    if start not in blocks:
      blocks[start] = np.asarray(s.data)
  starts = sorted(blocks)
  idx = np.concatenate([np.arange(s, s + len(blocks[s])) for s in starts])
  return idx, np.concatenate([blocks[s] for s in starts])


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


def logical_to_mesh_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                         mesh: jax.sharding.Mesh,
                         rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> P:
  """Mesh ``PartitionSpec`` of an array annotated with logical axis ``names``.

  Each logical name maps through ``rules`` to a mesh axis; an unknown name, a mesh axis of size
  1, a mesh axis already used by an earlier dimension, or a dimension the axis size does not
  divide leave that dimension whole (so any annotation is safe on any mesh).
  """
  if not names:
    return P()
  table = dict(rules)
  spec, used = [], set()
  for name, dim in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if (axis is None or axis not in mesh.shape or mesh.shape[axis] == 1 or axis in used
        or dim % mesh.shape[axis]):
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def state_shardings(tree: Any, mesh: jax.sharding.Mesh, *, fsdp: bool = False,
                    min_size: int = 1024,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> Any:
  """Shardings for a train-state pytree (parameters, optimizer state, auxiliary state).

  * A Flax ``nnx.Variable`` with a sharding annotation (``out_sharding`` metadata, from
    ``nnx.with_partitioning``; optax moments inherit it) is split by its logical axis names
    through ``rules`` (see :func:`logical_to_mesh_spec`).
  * Otherwise, with ``fsdp=True`` every array of at least ``min_size`` elements is split along
    its largest dimension divisible by the ``data`` axis size; smaller arrays (biases, scalars)
    stay replicated.
  * Everything else is replicated.
  """
  n_data = _data_size(mesh)

  def one(x):
    names = None
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      value = x.get_value() if hasattr(x, "get_value") else x.value
    else:
      value = x
    shape = tuple(getattr(value, "shape", ()))
    if names:
      spec = logical_to_mesh_spec(names, shape, mesh, rules)
    elif fsdp and shape:
      spec = _fsdp_spec(shape, n_data, min_size)
    else:
      spec = P()
    s = NamedSharding(mesh, spec)
    return x.replace(s) if isinstance(x, nnx.Variable) else s

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree (the same values on every process) onto the given global shardings."""
  def one(x, s):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process, sharded) array as a full numpy array on this host.

  Across processes this all-gathers the whole array onto every host: fine for small arrays
  (metrics, 10-class logits); for large per-example outputs use :func:`host_local_rows`.
  """
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
