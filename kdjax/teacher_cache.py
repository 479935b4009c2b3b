r"""On-disk cache of sparse teacher outputs per token: top-k log-probs or sampled ids + weights.

Offline distillation ("precompute the teacher once") is the most requested feature in other
libraries (TRL #2255/#3055, Liger #441, unsloth #11556, MaxText PR #3990). kdjax stores, for
every token of every example, k teacher ids and one value per id:

* ``kind="topk"``: the teacher's top-k ids and their log-probabilities (normalised over the full
  vocabulary) — use with :func:`kdjax.losses.topk_tail_kl` (unbiased *divergence*, not the
  biased renormalised top-k target);
* ``kind="sampled"``: ids drawn by :func:`kdjax.losses.sample_sparse_targets` and their
  importance weights — use with :func:`kdjax.losses.random_sampling_kd` (unbiased estimate).

The stored values are *data*: no gradient flows to the teacher. The cache records the teacher
``temperature`` the values were computed at; :meth:`TeacherCache.batch` returns it, so pass it on
(``temperature=batch["temperature"]``) and the student is softened at the same T.

Layout of a cache directory (format ``kdjax.teacher_cache/1``, a design choice (kdjax)
[proposed]):

* ``manifest.json``: ``format``, ``kind``, ``k``, ``vocab_size``, ``temperature``,
  ``storage`` (``"npz"`` or ``"array_record"``), ``num_examples``, ``num_tokens``,
  ``value_dtype``, ``shards`` (file name and example count of each shard), ``metadata``. It is
  written last, atomically: a directory without it is not a (complete) cache.
* ``writer.json``: the writer's settings, written first (what :func:`recover_teacher_cache` needs
  to rebuild a manifest from the complete shards of a writer that never closed).
* ``npz`` storage: ``shard-XXXXX.npz`` with ``ids`` int32 ``[tokens, k]``, ``values``
  ``[tokens, k]`` and ``offsets`` int64 ``[examples + 1]`` (example i owns tokens
  ``offsets[i]:offsets[i+1]``) — plain NumPy, no extra dependency.
* ``array_record`` storage: ``shard-XXXXX.array_record``, one record per example holding the
  bytes of an ``.npz`` with ``ids`` and ``values`` (random access through ArrayRecord; needs the
  ``cache`` extra).

Every shard is written to a temporary name and renamed when complete. One writer per directory:
a second writer (or a directory that already holds shards) is refused (``writer.lock``, created
with ``O_EXCL``); parallel workers write one directory each.

Write with :class:`TeacherCacheWriter` (or :func:`write_teacher_cache`), read with
:class:`TeacherCache` (random access per example, padded batches with a boolean ``where``).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import warnings
import zipfile
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FORMAT", "KINDS", "STORAGES", "TeacherCacheWriter", "write_teacher_cache",
           "TeacherCache", "recover_teacher_cache"]

FORMAT = "kdjax.teacher_cache/1"
KINDS = ("topk", "sampled")
STORAGES = ("npz", "array_record")
_MANIFEST, _WRITER, _LOCK = "manifest.json", "writer.json", "writer.lock"
_INT32_MAX = np.iinfo(np.int32).max
# Tolerance on stored log-probabilities (a float16/bfloat16 teacher's log-softmax rounds).
_LOG_TOL = 1e-2


def _pad_value(kind: str) -> float:
  # Padding must be neutral for the loss: log-prob -inf (no mass) or weight 0.
  return -np.inf if kind == "topk" else 0.0


def _positive_int(name, v, high=None):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
  if high is not None and v > high:
    raise ValueError(f"`{name}` must be at most {high}, got {v!r}.")
  return int(v)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class TeacherCacheWriter:
  """Streams examples into shards. Use as a context manager; ``add`` one example at a time.

  Args:
    directory: output directory (created; must not already hold a cache, shards or a writer).
    kind: ``"topk"`` or ``"sampled"``.
    k: ids per token.
    vocab_size: the teacher's vocabulary size (ids are checked against it; at most 2³¹ − 1).
    temperature: the teacher temperature the values were computed at (recorded and returned by
      :meth:`TeacherCache.batch`).
    storage: ``"npz"`` or ``"array_record"``.
    examples_per_shard: shard size in examples.
    value_dtype: stored dtype of the values (float32 default; float16 halves the size — a value
      that does not fit is an error, not a silent inf).
    metadata: any JSON-serialisable extra information (teacher name, data set, ...), checked
      when the writer is created.

  Checked on ``add`` (``ValueError`` naming the argument): ids in range; values finite
  (``-inf`` allowed for top-k padding); top-k log-probs ≤ 0 with a total mass ≤ 1 per token and
  no repeated id among a token's non-padding entries; sampled weights ≥ 0.
  """

  def __init__(self, directory: str | os.PathLike, *, kind: str, k: int, vocab_size: int,
               temperature: float = 1.0, storage: str = "npz", examples_per_shard: int = 1024,
               value_dtype: str = "float32", metadata: Mapping | None = None):
    if kind not in KINDS:
      raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if storage not in STORAGES:
      raise ValueError(f"`storage` must be one of {STORAGES}, got {storage!r}.")
    self.k = _positive_int("k", k)
    self.vocab_size = _positive_int("vocab_size", vocab_size, high=_INT32_MAX)
    self.per_shard = _positive_int("examples_per_shard", examples_per_shard)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
        or not np.isfinite(temperature) or temperature <= 0:
      raise ValueError(f"`temperature` must be a positive finite number, got {temperature!r}.")
    try:
      vdt = np.dtype(value_dtype)
    except TypeError:
      vdt = None
    if vdt not in (np.float16, np.float32, np.float64):
      raise ValueError(f"`value_dtype` must be float16/32/64, got {value_dtype!r}.")
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(f"`metadata` must be JSON-serialisable (it goes into the manifest): "
                      f"{e}.") from None
    self.dir = pathlib.Path(directory)
    if self.dir.exists() and not self.dir.is_dir():
      raise ValueError(f"`directory` {str(self.dir)!r} is a file, not a directory.")
    if (self.dir / _MANIFEST).exists():
      raise ValueError(f"`directory` {str(self.dir)!r} already holds a teacher cache.")
    self.dir.mkdir(parents=True, exist_ok=True)
    self._lock = self.dir / _LOCK
    self._take_lock()
    if any(self.dir.glob("shard-*")):
      self._release_lock()
      raise ValueError(f"`directory` {str(self.dir)!r} already holds shards of an unfinished "
                       f"cache: use recover_teacher_cache() to finish it, or another directory.")
    self.kind, self.temperature, self.storage = kind, float(temperature), storage
    self.value_dtype, self.metadata = vdt, metadata
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._shards: list[dict] = []
    self._num_examples = self._num_tokens = 0
    self._closed = False
    settings = {"format": FORMAT, "kind": kind, "k": self.k, "vocab_size": self.vocab_size,
                "temperature": self.temperature, "storage": storage,
                "value_dtype": vdt.name, "metadata": metadata}
    (self.dir / _WRITER).write_text(json.dumps(settings, indent=1))

  # -- one writer per directory
  def _take_lock(self) -> None:
    for _ in range(2):
      try:
        fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          pid = int(json.loads(self._lock.read_text()).get("pid", -1))
        except (OSError, ValueError, AttributeError):
          pid = -1
        if pid > 0 and not _pid_alive(pid):
          self._lock.unlink(missing_ok=True)   # a dead writer's lock
          continue
        raise ValueError(f"`directory` {str(self.dir)!r} is being written by another "
                         f"TeacherCacheWriter (pid {pid}, lock {str(self._lock)!r}); use one "
                         f"directory per writer.") from None
      with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid()}, f)
      return
    raise ValueError(f"could not take the writer lock {str(self._lock)!r}.")

  def _release_lock(self) -> None:
    self._lock.unlink(missing_ok=True)

  # -- validation
  def _check(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ids.ndim != 2 or ids.shape[1] != self.k:
      raise ValueError(f"`ids` must have shape [L, k={self.k}], got {ids.shape}.")
    if values.shape != ids.shape:
      raise ValueError(f"`values` must have the shape of `ids` {ids.shape}, got {values.shape}.")
    if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
      raise TypeError(f"`ids` must hold integers, got dtype {ids.dtype}.")
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype,
                                                                          np.integer):
      raise TypeError(f"`values` must hold real numbers, got dtype {values.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"`ids` must lie in [0, {self.vocab_size}), got range "
                       f"[{ids.min()}, {ids.max()}].")
    v = values.astype(np.float64)
    if np.any(np.isnan(v)) or np.any(v == np.inf):
      raise ValueError("`values` must not hold NaN or +inf (a NaN teacher output would train "
                       "the student on garbage).")
    if self.kind == "sampled":
      if np.any(v < 0) or np.any(np.isinf(v)):
        raise ValueError("`values` of a 'sampled' cache are importance weights and must be "
                         "finite and >= 0.")
    else:
      if np.any(v > _LOG_TOL):
        raise ValueError(f"`values` of a 'topk' cache are log-probabilities and must be <= 0, "
                         f"got a maximum of {v.max():.4g}.")
      mass = np.sum(np.exp(v), axis=-1)
      if np.any(mass > 1.0 + _LOG_TOL):
        raise ValueError(f"`values` of a 'topk' cache are log-probabilities of part of the "
                         f"vocabulary: their mass per token must be <= 1, got {mass.max():.4g}.")
      real = v != -np.inf
      keyed = np.where(real, ids.astype(np.int64), -1 - np.arange(self.k))  # padding unique
      srt = np.sort(keyed, axis=-1)
      if np.any(srt[:, 1:] == srt[:, :-1]):
        raise ValueError("`ids` must not repeat an id within a token's top-k entries.")
    with np.errstate(over="ignore"):
      stored = values.astype(self.value_dtype)
    if np.any(np.isinf(stored) & ~np.isinf(v)):
      raise ValueError(f"`values` overflow value_dtype={self.value_dtype.name} (max "
                       f"{np.finfo(self.value_dtype).max:.4g}); store them as float32.")
    return ids.astype(np.int32), stored

  def add(self, ids: np.ndarray, values: np.ndarray) -> None:
    """Adds one example: ``ids`` int ``[L, k]`` and ``values`` ``[L, k]`` (L may be 0)."""
    if self._closed:
      raise ValueError("this TeacherCacheWriter is closed.")
    ids, values = self._check(np.asarray(ids), np.asarray(values))
    self._pending.append((ids, values))
    self._num_examples += 1
    self._num_tokens += ids.shape[0]
    if len(self._pending) >= self.per_shard:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    idx = len(self._shards)
    suffix = "npz" if self.storage == "npz" else "array_record"
    name = f"shard-{idx:05d}.{suffix}"
    tmp = self.dir / f".{name}.tmp"
    if self.storage == "npz":
      lengths = [i.shape[0] for i, _ in self._pending]
      offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
      with open(tmp, "wb") as f:
        np.savez(f, ids=np.concatenate([i for i, _ in self._pending]).reshape(-1, self.k),
                 values=np.concatenate([v for _, v in self._pending]).reshape(-1, self.k),
                 offsets=offsets)
    else:
      from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
      writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
      for ids, values in self._pending:
        buf = io.BytesIO()
        np.savez(buf, ids=ids, values=values)
        writer.write(buf.getvalue())
      writer.close()
    tmp.replace(self.dir / name)     # a shard file exists only when complete
    self._shards.append({"file": name, "num_examples": len(self._pending)})
    self._pending = []

  def close(self) -> None:
    """Writes the last shard and the manifest (atomically), then releases the directory."""
    if self._closed:
      return
    self._flush()
    _write_manifest(self.dir, json.loads((self.dir / _WRITER).read_text()), self._shards,
                    self._num_examples, self._num_tokens)
    self._closed = True
    self._release_lock()

  def __enter__(self) -> "TeacherCacheWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
      return
    # An error inside the block: keep what was added as complete shards, write no manifest
    # (the cache is not complete) and say how to finish it.
    self._flush()
    self._closed = True
    self._release_lock()
    warnings.warn(f"TeacherCacheWriter for {str(self.dir)!r} stopped by an error after "
                  f"{self._num_examples} examples; no manifest was written. "
                  f"recover_teacher_cache({str(self.dir)!r}) makes a cache of the complete "
                  f"shards.", RuntimeWarning, stacklevel=2)

  def __del__(self):
    if getattr(self, "_closed", True):
      return
    if self._num_examples:
      warnings.warn(f"TeacherCacheWriter for {str(self.dir)!r} was never closed: "
                    f"{len(self._pending)} pending examples are lost and there is no manifest. "
                    f"Use it as a context manager or call close(); recover_teacher_cache() "
                    f"makes a cache of the complete shards.", ResourceWarning, stacklevel=2)
    try:
      self._release_lock()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def _write_manifest(directory: pathlib.Path, settings: dict, shards: list, num_examples: int,
                    num_tokens: int) -> None:
  manifest = dict(settings, num_examples=int(num_examples), num_tokens=int(num_tokens),
                  shards=shards)
  tmp = directory / f"{_MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1))
  tmp.replace(directory / _MANIFEST)  # the manifest appears only when complete


def write_teacher_cache(directory: str | os.PathLike,
                        examples: Iterable[tuple[np.ndarray, np.ndarray]], **kwargs) -> pathlib.Path:
  """Writes ``(ids, values)`` pairs (one per example) with :class:`TeacherCacheWriter`."""
  with TeacherCacheWriter(directory, **kwargs) as w:
    for ids, values in examples:
      w.add(ids, values)
  return pathlib.Path(directory)


def _read_shard(path: pathlib.Path, storage: str):
  """Loads one shard; errors name the file and what was expected."""
  if not path.exists():
    raise FileNotFoundError(f"teacher cache shard {str(path)!r} is missing (listed in the "
                            f"manifest).")
  if storage == "npz":
    try:
      with np.load(path) as z:
        data = {key: z[key] for key in ("ids", "values", "offsets")}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
      raise ValueError(f"teacher cache shard {str(path)!r} is unreadable or truncated "
                       f"(expected an .npz with ids, values, offsets): {e}") from None
    off = data["offsets"]
    if off.ndim != 1 or off[0] != 0 or data["ids"].shape[0] != off[-1] \
        or data["values"].shape != data["ids"].shape:
      raise ValueError(f"teacher cache shard {str(path)!r} is inconsistent: offsets end at "
                       f"{off[-1]} but it holds {data['ids'].shape[0]} token rows.")
    return data
  from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
  try:
    return array_record_data_source.ArrayRecordDataSource([str(path)])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"teacher cache shard {str(path)!r} is unreadable: {e}") from None


def _shard_count(data) -> int:
  return int(data["offsets"].shape[0] - 1) if isinstance(data, dict) else len(data)


def recover_teacher_cache(directory: str | os.PathLike) -> pathlib.Path:
  """Finishes a cache whose writer never closed (killed, or stopped by an error): writes the
  manifest of the complete shards (the examples that were still pending are lost).

  Raises ``ValueError`` when the directory holds no writer settings or is already complete.
  """
  d = pathlib.Path(directory)
  if (d / _MANIFEST).exists():
    raise ValueError(f"`directory` {str(d)!r} already holds a complete teacher cache.")
  if not (d / _WRITER).exists():
    raise ValueError(f"`directory` {str(d)!r} holds no {_WRITER}: not a teacher cache.")
  lock = d / _LOCK
  if lock.exists():
    try:
      pid = int(json.loads(lock.read_text()).get("pid", -1))
    except (OSError, ValueError, AttributeError):
      pid = -1
    if pid > 0 and pid != os.getpid() and _pid_alive(pid):
      raise ValueError(f"`directory` {str(d)!r} is still being written (pid {pid}).")
  settings = json.loads((d / _WRITER).read_text())
  suffix = "npz" if settings["storage"] == "npz" else "array_record"
  shards, n_ex, n_tok = [], 0, 0
  for i in range(1_000_000):
    path = d / f"shard-{i:05d}.{suffix}"
    if not path.exists():
      break
    data = _read_shard(path, settings["storage"])
    count = _shard_count(data)
    if isinstance(data, dict):
      n_tok += int(data["offsets"][-1])
    else:
      for j in range(count):
        with np.load(io.BytesIO(data[j])) as z:
          n_tok += int(z["ids"].shape[0])
    shards.append({"file": path.name, "num_examples": count})
    n_ex += count
  _write_manifest(d, settings, shards, n_ex, n_tok)
  lock.unlink(missing_ok=True)
  return d


class TeacherCache:
  """Random-access reader of a teacher cache directory.

  ``cache[i]`` returns ``{"ids": int32 [L_i, k], "values": [L_i, k]}``; :meth:`batch` pads a
  list of examples to ``[B, L, k]`` with a boolean ``where`` ``[B, L]`` (padding: id 0 and value
  −inf for top-k log-probs, 0 for sampled weights, so padded tokens contribute nothing even
  without ``where``) and the recorded ``temperature``.

  At most ``max_open_shards`` shards are held in memory (least recently used evicted first), so
  memory stays bounded on a cache of any size.
  """

  def __init__(self, directory: str | os.PathLike, *, max_open_shards: int = 4):
    self.dir = pathlib.Path(directory)
    self.max_open_shards = _positive_int("max_open_shards", max_open_shards)
    path = self.dir / _MANIFEST
    if not path.exists():
      hint = (" (its writer never closed: recover_teacher_cache() finishes it)"
              if (self.dir / _WRITER).exists() else "")
      raise FileNotFoundError(f"no teacher cache manifest at {str(path)!r}{hint}.")
    try:
      self.manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"teacher cache manifest {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
      raise ValueError(f"teacher cache manifest {str(path)!r}: unsupported format "
                       f"{self.manifest.get('format') if isinstance(self.manifest, dict) else None!r}"
                       f"; expected {FORMAT!r}.")
    missing = [key for key in ("kind", "k", "vocab_size", "temperature", "storage",
                               "num_examples", "shards") if key not in self.manifest]
    if missing:
      raise ValueError(f"teacher cache manifest {str(path)!r} lacks {missing}.")
    self.kind, self.k = self.manifest["kind"], int(self.manifest["k"])
    self.vocab_size = int(self.manifest["vocab_size"])
    self.temperature = float(self.manifest["temperature"])
    counts = [int(s["num_examples"]) for s in self.manifest["shards"]]
    if sum(counts) != int(self.manifest["num_examples"]):
      raise ValueError(f"teacher cache manifest {str(path)!r} is inconsistent: its shards hold "
                       f"{sum(counts)} examples, num_examples says "
                       f"{self.manifest['num_examples']}.")
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._open: collections.OrderedDict[int, object] = collections.OrderedDict()

  def __len__(self) -> int:
    return int(self.manifest["num_examples"])

  def _shard(self, s: int):
    if s in self._open:
      self._open.move_to_end(s)
      return self._open[s]
    info = self.manifest["shards"][s]
    path = self.dir / info["file"]
    data = _read_shard(path, self.manifest["storage"])
    if isinstance(data, dict) and (data["ids"].ndim != 2 or data["ids"].shape[1] != self.k):
      raise ValueError(f"teacher cache shard {str(path)!r} holds ids of shape "
                       f"{data['ids'].shape}; the manifest says k = {self.k}.")
    if _shard_count(data) != int(info["num_examples"]):
      raise ValueError(f"teacher cache shard {str(path)!r} holds {_shard_count(data)} examples; "
                       f"the manifest says {info['num_examples']}.")
    self._open[s] = data
    while len(self._open) > self.max_open_shards:
      self._open.popitem(last=False)
    return data

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    n = len(self)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
      raise TypeError(f"cache index must be an int, got {i!r}.")
    if not -n <= i < n:
      raise IndexError(f"example {i} out of range for a cache of {n} examples.")
    i %= n
    s = int(np.searchsorted(self._starts, i, side="right") - 1)
    j = i - int(self._starts[s])
    shard = self._shard(s)
    if isinstance(shard, dict):
      a, b = shard["offsets"][j], shard["offsets"][j + 1]
      return {"ids": shard["ids"][a:b], "values": shard["values"][a:b]}
    try:
      with np.load(io.BytesIO(shard[j])) as z:
        out = {"ids": z["ids"], "values": z["values"]}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
      raise ValueError(f"teacher cache shard {str(self.dir / self.manifest['shards'][s]['file'])!r}"
                       f": record {j} is unreadable (expected .npz bytes with ids and values): "
                       f"{e}") from None
    if out["ids"].ndim != 2 or out["ids"].shape[1] != self.k:
      raise ValueError(f"teacher cache shard {str(self.dir / self.manifest['shards'][s]['file'])!r}"
                       f": record {j} holds ids of shape {out['ids'].shape}; the manifest says "
                       f"k = {self.k}.")
    return out

  def batch(self, indices: Sequence[int], *, length: int | None = None
            ) -> dict[str, np.ndarray | float]:
    """Pads examples ``indices`` to ``length`` tokens (default: the longest; longer examples are
    truncated). Returns ``ids [B, L, k]``, ``values [B, L, k]`` (float32), ``where [B, L]``
    (bool, True for real tokens) and ``temperature`` (the teacher's, as recorded)."""
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))
                               or length < 0):
      raise ValueError(f"`length` must be a non-negative int or None, got {length!r}.")
    items = [self[int(i)] for i in indices]
    n = length if length is not None else max([x["ids"].shape[0] for x in items] + [0])
    ids = np.zeros((len(items), n, self.k), np.int32)
    values = np.full((len(items), n, self.k), _pad_value(self.kind), np.float32)
    where = np.zeros((len(items), n), bool)
    for b, x in enumerate(items):
      m = min(n, x["ids"].shape[0])
      ids[b, :m], values[b, :m], where[b, :m] = x["ids"][:m], x["values"][:m], True
    return {"ids": ids, "values": values, "where": where, "temperature": self.temperature}
