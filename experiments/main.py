r"""The experiment launcher (absl, big_vision / flax-examples style).

  python -m experiments.main --config=experiments/configs/digits_kd.py[:smoke] --workdir=/tmp/kd

``--config`` is an ``ml_collections`` config file with ``get_config(arg=None)``; the part after
``:`` is passed as ``arg``. The config is locked: ``--config.student.hidden='(16,)'``-style
overrides of existing keys work, unknown keys and wrong types fail at parse time. The launcher
imports ``experiments.tasks.<config.task>`` and calls its ``run(config, workdir)``.

Multi-host: with ``--config.distributed=True`` (for configs that have the key) the launcher calls
``jax.distributed.initialize`` first, with ``--coordinator_address``, ``--num_processes`` and
``--process_id`` taken from the flags, else from ``$KDJAX_COORDINATOR_ADDRESS``,
``$KDJAX_NUM_PROCESSES`` and ``$KDJAX_PROCESS_ID``, else left to JAX's auto-detection (Cloud TPU,
SLURM, ...). On CPU it selects the gloo collectives so cross-process reductions work.
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 (multi-host runs; or $KDJAX_COORDINATOR_ADDRESS).")
_NPROC = flags.DEFINE_integer("num_processes", None,
                              "Number of processes (multi-host; or $KDJAX_NUM_PROCESSES).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (or $KDJAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


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


class _QuietLibraries:
  """absl log filter: drops INFO chatter from Orbax/TFDS (one line per file they write)."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
             or "/etils/" in record.pathname)
    return record.levelno >= 30 or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config.get("distributed", False):
    initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX %s; process %d of %d; %d local / %d global devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices())
  logging.info("workdir: %s", _WORKDIR.value)
  logging.info("config:\n%s", config)
  if "task" not in config:
    raise ValueError("the config has no `task` key naming experiments/tasks/<task>.py")
  task = importlib.import_module(f"experiments.tasks.{config.task}")
  task.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
