r"""The experiment launcher (absl, big_vision / flax-examples style).

  python -m experiments.main --config=experiments/configs/digits_kd.py[:smoke] --workdir=/tmp/kd

``--config`` is an ``ml_collections`` config file with ``get_config(arg=None)`` (the path is
resolved against the current directory); the part after ``:`` is passed as ``arg``. The config is
locked: overrides of existing keys work (``--config.loss.temperature=2``, layer widths as tuples
``--config.student.hidden='(64,)'``), unknown keys and wrong types fail at parse time.

Before any data preparation or training the launcher

1. imports ``experiments.tasks.<config.task>`` and calls its ``validate(config)``, which builds
   every config-derived object (losses, optimizer, models) without data;
2. opens the workdir (:func:`experiments.workdir.open_workdir`): creates it, checks it is
   writable, takes its lock (``.lock``: another live run on the same workdir is refused), and
   compares the config with ``<workdir>/config.json`` (a different config stops the run, naming
   the changed keys; ``--config.resume=allow_changes`` goes on and records the change);

then calls the task's ``run(config, workdir)``. Bad input (a typo in a key, a missing config file,
an unknown task, a bad value, a locked or mismatched workdir) ends with one line on stderr naming
the key, file or task and what is allowed, and exit status 2.

Output: one log line with the JAX backend and devices and one with the workdir and the path of the
resolved ``config.json`` (no config dump). On a non-TTY stderr the progress bar is replaced by
periodic log lines. Without an accelerator plugin installed, ``JAX_PLATFORMS`` defaults to ``cpu``
(no TPU/GPU probing warnings).

Multi-host: with ``--config.distributed=True`` (for configs that have the key) the launcher calls
``jax.distributed.initialize`` first, with ``--coordinator_address``, ``--num_processes`` and
``--process_id`` taken from the flags, else from ``$KDJAX_COORDINATOR_ADDRESS``,
``$KDJAX_NUM_PROCESSES`` and ``$KDJAX_PROCESS_ID``, else left to JAX's auto-detection (Cloud TPU,
SLURM, ...). On CPU it selects the gloo collectives so cross-process reductions work. Process 0
holds the workdir lock and writes ``config.json``; every process checks the config.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import sys


def _has_accelerator_plugin() -> bool:
  """Whether a TPU/GPU JAX plugin is installed (then JAX picks the platform itself)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  try:
    if importlib.metadata.entry_points(group="jax_plugins"):
      return True
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
  except ImportError:
    return False


if "JAX_PLATFORMS" not in os.environ and not _has_accelerator_plugin():
  os.environ["JAX_PLATFORMS"] = "cpu"  # before anything imports jax: no 'tpu' probe warning

# pylint: disable=wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path[:arg], resolved against the current directory).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 (multi-host runs; or $KDJAX_COORDINATOR_ADDRESS).")
_NPROC = flags.DEFINE_integer("num_processes", None,
                              "Number of processes (multi-host; or $KDJAX_NUM_PROCESSES).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (or $KDJAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

_TASKS_DIR = pathlib.Path(__file__).resolve().parent / "tasks"


def task_names() -> list[str]:
  """The tasks ``config.task`` may name (the modules of ``experiments/tasks``)."""
  return sorted(m.name for m in pkgutil.iter_modules([str(_TASKS_DIR)])
                if not m.name.startswith("_"))


class LaunchError(Exception):
  """Bad launcher input; printed as one line (exit status 2)."""


def _die(msg: str) -> None:
  sys.stderr.write(f"experiments.main: error: {msg}\n")
  sys.stderr.flush()
  sys.exit(2)


def one_line(e: BaseException) -> str:
  """A short message for ``e``: a KeyError's text unquoted, the ml_collections hint first."""
  msg = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
  lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
  if any(ln.startswith("Traceback") for ln in lines):  # a config file's get_config raised
    head = lines[0].split("Traceback")[0].strip()
    lines = [f"{head} {lines[-1]}".strip()]
  hint = [ln for ln in lines if ln.startswith("Did you mean")]
  rest = [ln for ln in lines if not ln.startswith("Did you mean")]
  if isinstance(e, KeyError) and rest:
    rest[0] = f"the config has no key {rest[0]}"
  return " ".join(hint + rest) or type(e).__name__


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (the ``flags_parser`` of :func:`absl.app.run`)."""
  spec = _config_arg(argv)
  if spec:
    path = spec.split(":", 1)[0]
    if not pathlib.Path(path).is_file():
      _die(f"--config: no config file {path!r} (resolved against the current directory "
           f"{os.getcwd()!r}); the configs are experiments/configs/*.py.")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _die(f"flags: {one_line(e)}")
  except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    _die(f"--config: {one_line(e)}")
  return []  # unreachable


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the flags or the environment (see module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  # CPU collectives across processes need gloo; the setting is ignored by GPU/TPU clients.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  coord = _COORD.value or os.environ.get("KDJAX_COORDINATOR_ADDRESS")
  nproc = _NPROC.value if _NPROC.value is not None else _env_int("KDJAX_NUM_PROCESSES")
  pid = _PID.value if _PID.value is not None else _env_int("KDJAX_PROCESS_ID")
  if coord:
    kwargs["coordinator_address"] = coord
  if nproc is not None:
    kwargs["num_processes"] = nproc
  if pid is not None:
    kwargs["process_id"] = pid
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


class _QuietLibraries:
  """absl log filter: drops INFO chatter from Orbax/TFDS (one line per file they write)."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
             or "/etils/" in record.pathname or "xla_bridge" in record.pathname)
    return record.levelno >= 30 or not noisy


def load_task(config):
  """The task module named by ``config.task`` (LaunchError listing the tasks otherwise)."""
  names = task_names()
  task = config.get("task") if hasattr(config, "get") else None
  if task not in names:
    raise LaunchError(f"config.task={task!r}: must be one of {', '.join(names)} "
                      f"(the modules of experiments/tasks).")
  return importlib.import_module(f"experiments.tasks.{task}")


def validate(config):
  """Imports the task and runs its ``validate(config)``; returns the task module.

  Raises:
    LaunchError: one line naming the bad key, its value and what is allowed.
  """
  task = load_task(config)
  check = getattr(task, "validate", None)
  if check is not None:
    try:
      check(config)
    except (ValueError, TypeError) as e:
      raise LaunchError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  return task


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from experiments import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  try:
    config = _CONFIG.value
  except (OSError, ValueError, KeyError, AttributeError) as e:
    _die(f"--config: {one_line(e)}")
  if "progress" in config and config.progress and not sys.stderr.isatty():
    config.progress = False  # no tqdm '\r' escapes in a log file: periodic log lines instead
  if config.get("distributed", False):
    initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  try:
    task = validate(config)
  except LaunchError as e:
    _die(str(e))
  logging.info("JAX %s (%s); process %d of %d; %d local / %d global devices: %s", jax.__version__,
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
  try:
    ctx = workdir_lib.open_workdir(_WORKDIR.value, config, process_index=jax.process_index())
    workdir = ctx.__enter__()
  except (ValueError, workdir_lib.WorkdirLockedError) as e:
    _die(f"--workdir: {one_line(e)}")
  try:
    logging.info("workdir: %s (config: %s)", workdir, workdir / workdir_lib.CONFIG_FILE)
    task.run(config, str(workdir))
  finally:
    ctx.__exit__(None, None, None)


def run_main() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_main()
