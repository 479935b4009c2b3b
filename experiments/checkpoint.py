"""Orbax checkpoints in the workdir, and resume.

:class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` saving a composite of the
train state (``StandardSave``) and a small JSON record (``JsonSave``). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save (even by SIGKILL)
leaves only complete checkpoints; :meth:`Checkpointer.restore_or` resumes from the newest one.
Saving is synchronous: a step number on disk means the state is there.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

__all__ = ["Checkpointer", "CheckpointCorruptError", "ensure_writable_dir", "state_digest"]


class CheckpointCorruptError(ValueError):
  """A checkpoint's arrays do not match the digest stored with them (or cannot be read)."""


def _host_array(leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.is_fully_addressable:
      return np.asarray(leaf)
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def state_digest(state: Any) -> str:
  """sha256 (hex) of a pytree of arrays: every leaf's key path, dtype, shape and bytes.

  Multi-host: every process must call it (a leaf sharded over processes is gathered).
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(_host_array(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def ensure_writable_dir(path: str | os.PathLike, *, name: str = "workdir") -> pathlib.Path:
  """Creates ``path`` if needed and checks that files can be written there.

  Raises:
    ValueError: naming the argument, if the directory cannot be created or written.
  """
  if not str(path):
    raise ValueError(f"`{name}` must be a directory path, got an empty string.")
  p = pathlib.Path(path).expanduser().absolute()
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f".write_probe_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"`{name}` {str(p)!r} cannot be created or written: {e}") from e
  return p


class Checkpointer:
  """Save / restore a train state under ``directory`` (one subdirectory per step).

  Args:
    directory: where the steps go (e.g. ``workdir/checkpoints/student``).
    max_to_keep: how many recent steps to keep.
    async_save: write in the background (:meth:`wait` / :meth:`close` wait for it).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=bool(async_save),
        cleanup_tmp_directories=True)
    self._mngr = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete step on disk (waits for a save in flight)."""
    self.wait()
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    self.wait()
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON-able ``meta`` at ``step``.

    ``meta`` gets ``step`` and ``digest`` (:func:`state_digest`). Returns before the files are
    written (see :meth:`wait`).
    """
    record = dict(meta or {}, step=int(step), digest=state_digest(state))
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)))

  def wait(self) -> None:
    """Blocks until every save in flight is on disk."""
    self._mngr.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure, shapes, dtypes and shardings of ``target`` (a state).

    Returns ``(state, meta)`` of ``step`` (default: the latest).

    Raises:
      FileNotFoundError: no checkpoint (or not that step).
      CheckpointCorruptError: the files cannot be read or the arrays differ from the digest
        saved with them (the message names the step).
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {str(self.directory)!r}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} under {str(self.directory)!r}; "
                              f"steps on disk: {self.all_steps()}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax/TensorStore raise many types for torn or flipped files
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointCorruptError(
          f"checkpoint step {step} under {str(self.directory)!r} cannot be read: "
          f"{type(e).__name__}: {msg}") from e
    state, meta = out["state"], dict(out["meta"] or {})
    if "digest" not in meta:
      logging.warning("checkpoint step %d under %s has no digest (saved by an older version); "
                      "restored unverified.", step, self.directory)
    elif state_digest(state) != meta["digest"]:
      raise CheckpointCorruptError(
          f"checkpoint step {step} under {str(self.directory)!r} is corrupt: its arrays do not "
          f"match the sha256 digest saved with them.")
    return state, meta

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the manager's directory (so the rerun can save that step again)."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst_root = self.directory.with_name(self.directory.name + ".corrupt")
      dst_root.mkdir(parents=True, exist_ok=True)
      dst = dst_root / f"{step}-{int(time.time())}"
      if src.exists():
        os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"kdjax_quarantine_{self.directory}_{step}")
    self._mngr.close()
    self._mngr = self._open()

  def restore_latest(self, target: Any) -> tuple[Any, int | None]:
    """The newest step that restores and verifies, restored into ``target``'s layout.

    A corrupt or unreadable newer step is skipped with a warning naming it (and moved to
    ``<directory>.corrupt/``). Returns ``(state, step)``, or ``(target, None)`` if no step is
    usable.
    """
    for step in reversed(self.all_steps()):
      try:
        state, _ = self.restore(target, step)
        return state, step
      except CheckpointCorruptError as e:
        logging.warning("%s Falling back to an older checkpoint (step %d moved to %s.corrupt/).",
                        e, step, self.directory.name)
        self._quarantine(step)
    return target, None

  def restore_or(self, target: Any) -> tuple[Any, bool]:
    """The newest verified checkpoint restored into ``target``'s layout, or ``target`` itself.

    Returns ``(state, resumed)``.
    """
    state, step = self.restore_latest(target)
    return state, step is not None

  def close(self) -> None:
    """Waits for the saves in flight, then releases the manager."""
    self.wait()
    self._mngr.close()
