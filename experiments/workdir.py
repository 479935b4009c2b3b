r"""Workdir safety: the resolved config on disk, a config check on resume, and a lock.

:func:`open_workdir` is what :mod:`experiments.main` calls before a task runs:

* ``<workdir>/config.json`` holds the resolved config (sorted keys, indented). A rerun with the
  same workdir compares its config with that file. A difference stops the run at once, before any
  data preparation, with one :class:`ConfigMismatchError` naming every differing key
  (``old -> new``) and the two ways out: a new ``--workdir`` (start fresh) or
  ``--config.resume=allow_changes`` (go on with the new config on purpose; the change is appended
  to ``<workdir>/config_changes.jsonl`` and ``config.json`` is replaced).
* ``<workdir>/.lock`` is created with ``O_CREAT | O_EXCL`` and holds the owner's pid and host. A
  second run on the same workdir fails with :class:`WorkdirLockedError` ("another run (pid N on
  HOST) holds this workdir"). A lock left by a killed run (its pid is dead on this host) is stale:
  it is replaced, with a warning.

Keys that do not change results are not compared: ``resume`` and ``progress``.
Only process 0 writes (``config.json``, the lock); every process checks the config.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
from typing import Any, Iterator, Mapping

from absl import logging

__all__ = ["ConfigMismatchError", "WorkdirLockedError", "RESUME_POLICIES", "IGNORED_KEYS",
           "config_to_dict", "flatten", "config_diff", "write_config", "check_config",
           "WorkdirLock", "open_workdir"]

RESUME_POLICIES = ("strict", "allow_changes")
IGNORED_KEYS = frozenset({"resume", "progress"})
CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = ".lock"


class ConfigMismatchError(ValueError):
  """The workdir was made with another config (the message names the keys)."""


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _jsonable(v: Any) -> Any:
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  if hasattr(v, "item"):  # numpy scalars
    return v.item()
  return repr(v)


def config_to_dict(config: Any) -> dict:
  """The config as plain JSON types (tuples become lists)."""
  return _jsonable(config)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` for every key that differs (missing: ``"<absent>"``)."""
  a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
  diff = {}
  for k in sorted(set(a) | set(b)):
    if k.split(".")[0] in IGNORED_KEYS:
      continue
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if va != vb:
      diff[k] = (va, vb)
  return diff


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_config(workdir: str | os.PathLike, config: Any) -> pathlib.Path:
  """Writes ``<workdir>/config.json`` (sorted keys, indented; atomic replace)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  _atomic_write(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
  return path


def _fmt(v: Any) -> str:
  return json.dumps(v) if not isinstance(v, str) or v == "<absent>" else repr(v)


def check_config(workdir: str | os.PathLike, config: Any, *, write: bool = True
                 ) -> dict[str, tuple[Any, Any]]:
  """Compares ``config`` with ``<workdir>/config.json`` and (re)writes the file.

  Returns the differences (empty for a new workdir or an identical config).

  Raises:
    ConfigMismatchError: the configs differ and ``config.resume`` is ``"strict"`` (default).
    ValueError: ``config.resume`` is not one of :data:`RESUME_POLICIES`.
  """
  policy = config.get("resume", "strict") if hasattr(config, "get") else "strict"
  if policy not in RESUME_POLICIES:
    raise ValueError(f"config.resume: must be one of {list(RESUME_POLICIES)}, got {policy!r}.")
  workdir = pathlib.Path(workdir)
  path = workdir / CONFIG_FILE
  diff: dict[str, tuple[Any, Any]] = {}
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigMismatchError(
          f"{path} is unreadable ({e}); start fresh with a new --workdir, or remove the file to "
          f"adopt this workdir.") from e
    diff = config_diff(old, config)
    if diff and policy == "strict":
      shown = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in diff.items())
      raise ConfigMismatchError(
          f"the config differs from the one this workdir was made with ({path}): {shown}. "
          f"Start fresh with a new --workdir, or pass --config.resume=allow_changes to continue "
          f"this workdir with the new config on purpose (the change is recorded).")
  elif any(workdir.glob("checkpoints/*")):
    logging.warning("workdir %s has checkpoints but no %s (made by an older version); "
                    "adopting it with this config.", workdir, CONFIG_FILE)
  if write:
    if diff:
      logging.warning("config.resume=allow_changes: continuing %s with changed keys %s",
                      workdir, ", ".join(diff))
      rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "changes": {k: {"old": a, "new": b} for k, (a, b) in diff.items()}}
      with (workdir / CHANGES_FILE).open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    write_config(workdir, config)
  return diff


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An ``O_EXCL`` lock file ``<workdir>/.lock`` holding ``{"pid", "host", "time"}``."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.held = False

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
    return True

  def owner(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, json.JSONDecodeError):
      return {}

  def acquire(self) -> "WorkdirLock":
    """Takes the lock; replaces a stale one (dead pid on this host).

    Raises:
      WorkdirLockedError: another live run holds it (or a run on another host).
    """
    for _ in range(3):
      if self._try_create():
        self.held = True
        return self
      info = self.owner()
      pid, host = info.get("pid"), info.get("host")
      if not info:  # being written right now, or torn by a kill during the write
        try:
          age = datetime.datetime.now().timestamp() - self.path.stat().st_mtime
        except FileNotFoundError:
          continue
        if age < 5:
          raise WorkdirLockedError(f"another run is starting in this workdir ({self.path}).")
      elif host != socket.gethostname() or (isinstance(pid, int) and _pid_alive(pid)):
        raise WorkdirLockedError(
            f"another run (pid {pid} on {host}, since {info.get('time')}) holds this workdir "
            f"{str(self.path.parent)!r}; wait for it to finish or use another --workdir (if that "
            f"run is dead, remove {str(self.path)!r}).")
      logging.warning("removing the stale lock of a dead run (pid %s on %s) in %s", pid, host,
                      self.path.parent)
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    raise WorkdirLockedError(f"could not take the lock {self.path}")

  def release(self) -> None:
    if self.held:
      info = self.owner()
      if info.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def open_workdir(workdir: str | os.PathLike, config: Any, *, process_index: int = 0
                 ) -> Iterator[pathlib.Path]:
  """Checks and locks ``workdir`` for one run of ``config`` (see the module docstring).

  Creates the directory, checks that it is writable, takes the lock (process 0), compares the
  config with ``config.json`` and writes it (process 0), then yields the absolute path; the lock
  is released on exit (a killed run leaves a stale lock the next run replaces).

  Raises:
    ValueError: the workdir cannot be created or written (names it).
    WorkdirLockedError, ConfigMismatchError: see above.
  """
  from experiments import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  path = ckpt_lib.ensure_writable_dir(workdir)
  lock = WorkdirLock(path)
  if process_index == 0:
    lock.acquire()
  try:
    check_config(path, config, write=process_index == 0)
    yield path
  finally:
    lock.release()
