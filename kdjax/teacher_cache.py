r"""On-disk cache of sparse teacher outputs per token: top-k log-probs or sampled ids + weights.

Offline distillation ("precompute the teacher once") is the most requested feature in other
libraries (TRL #2255/#3055, Liger #441, unsloth #11556, MaxText PR #3990). kdjax stores, for
every token of every example, k teacher ids and one value per id:

* ``kind="topk"``: the teacher's top-k ids and their log-probabilities (normalised over the full
  vocabulary) — use with :func:`kdjax.losses.topk_tail_kl` (unbiased *divergence*, not the
  biased renormalised top-k target);
* ``kind="sampled"``: ids drawn by :func:`kdjax.losses.sample_sparse_targets` and their
  importance weights — use with :func:`kdjax.losses.random_sampling_kd` (unbiased estimate).

Layout of a cache directory (format ``kdjax.teacher_cache/1``, a design choice (kdjax)
[proposed]):

* ``manifest.json``: ``format``, ``kind``, ``k``, ``vocab_size``, ``temperature``,
  ``storage`` (``"npz"`` or ``"array_record"``), ``num_examples``, ``num_tokens``,
  ``value_dtype``, ``shards`` (file name and example count of each shard), ``metadata``.
* ``npz`` storage: ``shard-XXXXX.npz`` with ``ids`` int32 ``[tokens, k]``, ``values``
  ``[tokens, k]`` and ``offsets`` int64 ``[examples + 1]`` (example i owns tokens
  ``offsets[i]:offsets[i+1]``) — plain NumPy, no extra dependency.
* ``array_record`` storage: ``shard-XXXXX.array_record``, one record per example holding the
  bytes of an ``.npz`` with ``ids`` and ``values`` (random access through ArrayRecord, the
  format TFDS prepares without TensorFlow; ``array_record`` is installed with
  tensorflow-datasets).

Write with :class:`TeacherCacheWriter` (or :func:`write_teacher_cache`), read with
:class:`TeacherCache` (random access per example, padded batches with a token mask).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FORMAT", "KINDS", "STORAGES", "TeacherCacheWriter", "write_teacher_cache",
           "TeacherCache"]

FORMAT = "kdjax.teacher_cache/1"
KINDS = ("topk", "sampled")
STORAGES = ("npz", "array_record")


def _pad_value(kind: str) -> float:
  # Padding must be neutral for the loss: log-prob -inf (no mass) or weight 0.
  return -np.inf if kind == "topk" else 0.0


class TeacherCacheWriter:
  """Streams examples into shards. Use as a context manager; ``add`` one example at a time.

  Args:
    directory: output directory (created; must not already hold a manifest).
    kind: ``"topk"`` or ``"sampled"``.
    k: ids per token.
    vocab_size: the teacher's vocabulary size (ids are checked against it).
    temperature: the teacher temperature the values were computed at (recorded).
    storage: ``"npz"`` or ``"array_record"``.
    examples_per_shard: shard size in examples.
    value_dtype: stored dtype of the values (float32 default; float16 halves the size).
    metadata: any JSON-serialisable extra information (teacher name, data set, ...).
  """

  def __init__(self, directory: str | os.PathLike, *, kind: str, k: int, vocab_size: int,
               temperature: float = 1.0, storage: str = "npz", examples_per_shard: int = 1024,
               value_dtype: str = "float32", metadata: Mapping | None = None):
    if kind not in KINDS:
      raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if storage not in STORAGES:
      raise ValueError(f"`storage` must be one of {STORAGES}, got {storage!r}.")
    for name, v in (("k", k), ("vocab_size", vocab_size),
                    ("examples_per_shard", examples_per_shard)):
      if not (isinstance(v, (int, np.integer)) and v > 0):
        raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
      raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    if np.dtype(value_dtype) not in (np.float16, np.float32, np.float64):
      raise ValueError(f"`value_dtype` must be float16/32/64, got {value_dtype!r}.")
    self.dir = pathlib.Path(directory)
    if (self.dir / "manifest.json").exists():
      raise ValueError(f"`directory` {str(self.dir)!r} already holds a teacher cache.")
    self.dir.mkdir(parents=True, exist_ok=True)
    self.kind, self.k, self.vocab_size = kind, int(k), int(vocab_size)
    self.temperature, self.storage = float(temperature), storage
    self.per_shard, self.value_dtype = int(examples_per_shard), np.dtype(value_dtype)
    self.metadata = dict(metadata or {})
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._shards: list[dict] = []
    self._num_examples = self._num_tokens = 0
    self._closed = False

  def add(self, ids: np.ndarray, values: np.ndarray) -> None:
    """Adds one example: ``ids`` int ``[L, k]`` and ``values`` ``[L, k]`` (L may be 0)."""
    ids = np.asarray(ids)
    values = np.asarray(values)
    if ids.ndim != 2 or ids.shape[1] != self.k:
      raise ValueError(f"`ids` must have shape [L, k={self.k}], got {ids.shape}.")
    if values.shape != ids.shape:
      raise ValueError(f"`values` must have the shape of `ids` {ids.shape}, got {values.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"`ids` must hold integers, got dtype {ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"`ids` must lie in [0, {self.vocab_size}), got range "
                       f"[{ids.min()}, {ids.max()}].")
    if self.kind == "sampled" and np.any(values < 0):
      raise ValueError("`values` of a 'sampled' cache are importance weights and must be >= 0.")
    self._pending.append((ids.astype(np.int32), values.astype(self.value_dtype)))
    self._num_examples += 1
    self._num_tokens += ids.shape[0]
    if len(self._pending) >= self.per_shard:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    idx = len(self._shards)
    if self.storage == "npz":
      name = f"shard-{idx:05d}.npz"
      lengths = [i.shape[0] for i, _ in self._pending]
      offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
      np.savez(self.dir / name,
               ids=np.concatenate([i for i, _ in self._pending]).reshape(-1, self.k),
               values=np.concatenate([v for _, v in self._pending]).reshape(-1, self.k),
               offsets=offsets)
    else:
      from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
      name = f"shard-{idx:05d}.array_record"
      writer = array_record_module.ArrayRecordWriter(str(self.dir / name), "group_size:1")
      for ids, values in self._pending:
        buf = io.BytesIO()
        np.savez(buf, ids=ids, values=values)
        writer.write(buf.getvalue())
      writer.close()
    self._shards.append({"file": name, "num_examples": len(self._pending)})
    self._pending = []

  def close(self) -> None:
    if self._closed:
      return
    self._flush()
    manifest = {"format": FORMAT, "kind": self.kind, "k": self.k, "vocab_size": self.vocab_size,
                "temperature": self.temperature, "storage": self.storage,
                "num_examples": self._num_examples, "num_tokens": self._num_tokens,
                "value_dtype": self.value_dtype.name, "shards": self._shards,
                "metadata": self.metadata}
    tmp = self.dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(self.dir / "manifest.json")  # the manifest appears only when complete
    self._closed = True

  def __enter__(self) -> "TeacherCacheWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()


def write_teacher_cache(directory: str | os.PathLike,
                        examples: Iterable[tuple[np.ndarray, np.ndarray]], **kwargs) -> pathlib.Path:
  """Writes ``(ids, values)`` pairs (one per example) with :class:`TeacherCacheWriter`."""
  with TeacherCacheWriter(directory, **kwargs) as w:
    for ids, values in examples:
      w.add(ids, values)
  return pathlib.Path(directory)


class TeacherCache:
  """Random-access reader of a teacher cache directory.

  ``cache[i]`` returns ``{"ids": int32 [L_i, k], "values": [L_i, k]}``; :meth:`batch` pads a
  list of examples to ``[B, L, k]`` with a ``mask`` ``[B, L]`` (padding: id 0 and value −inf for
  top-k log-probs, 0 for sampled weights, so padded tokens contribute nothing).
  """

  def __init__(self, directory: str | os.PathLike):
    self.dir = pathlib.Path(directory)
    path = self.dir / "manifest.json"
    if not path.exists():
      raise FileNotFoundError(f"no teacher cache manifest at {str(path)!r} (was the writer "
                              "closed?).")
    self.manifest = json.loads(path.read_text())
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"unsupported teacher cache format {self.manifest.get('format')!r}; "
                       f"expected {FORMAT!r}.")
    self.kind, self.k = self.manifest["kind"], self.manifest["k"]
    self.vocab_size, self.temperature = self.manifest["vocab_size"], self.manifest["temperature"]
    counts = [s["num_examples"] for s in self.manifest["shards"]]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._open: dict[int, object] = {}

  def __len__(self) -> int:
    return int(self.manifest["num_examples"])

  def _shard(self, s: int):
    if s not in self._open:
      f = self.dir / self.manifest["shards"][s]["file"]
      if self.manifest["storage"] == "npz":
        with np.load(f) as z:
          self._open[s] = {key: z[key] for key in ("ids", "values", "offsets")}
      else:
        from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
        self._open[s] = array_record_data_source.ArrayRecordDataSource([str(f)])
    return self._open[s]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"example {i} out of range for a cache of {n} examples.")
    i %= n
    s = int(np.searchsorted(self._starts, i, side="right") - 1)
    j = i - int(self._starts[s])
    shard = self._shard(s)
    if isinstance(shard, dict):
      a, b = shard["offsets"][j], shard["offsets"][j + 1]
      return {"ids": shard["ids"][a:b], "values": shard["values"][a:b]}
    with np.load(io.BytesIO(shard[j])) as z:
      return {"ids": z["ids"], "values": z["values"]}

  def batch(self, indices: Sequence[int], *, length: int | None = None
            ) -> dict[str, np.ndarray]:
    """Pads examples ``indices`` to ``length`` tokens (default: the longest; longer examples are
    truncated). Returns ``ids [B, L, k]``, ``values [B, L, k]`` (float32) and ``mask [B, L]``."""
    items = [self[int(i)] for i in indices]
    n = length if length is not None else max([x["ids"].shape[0] for x in items] + [0])
    ids = np.zeros((len(items), n, self.k), np.int32)
    values = np.full((len(items), n, self.k), _pad_value(self.kind), np.float32)
    mask = np.zeros((len(items), n), bool)
    for b, x in enumerate(items):
      m = min(n, x["ids"].shape[0])
      ids[b, :m], values[b, :m], mask[b, :m] = x["ids"][:m], x["values"][:m], True
    return {"ids": ids, "values": values, "mask": mask}
