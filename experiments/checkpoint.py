"""Orbax checkpoints in the workdir, and resume.

:class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` saving a composite of the
train state (``StandardSave``) and a small JSON record (``JsonSave``). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save (even by SIGKILL)
leaves only complete checkpoints; :meth:`Checkpointer.restore_or` resumes from the newest one.
Saving is synchronous: a step number on disk means the state is there.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "ensure_writable_dir"]


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
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON-able ``meta`` at ``step``."""
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {}, step=int(step)))))
    self._mngr.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure, shapes, dtypes and shardings of ``target`` (a state).

    Returns ``(state, meta)`` of ``step`` (default: the latest).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {str(self.directory)!r}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"] or {})

  def restore_or(self, target: Any) -> tuple[Any, bool]:
    """The latest checkpoint restored into ``target``'s layout, or ``target`` itself if none.

    Returns ``(state, resumed)``.
    """
    if self.latest_step() is None:
      return target, False
    return self.restore(target)[0], True

  def close(self) -> None:
    self._mngr.close()
