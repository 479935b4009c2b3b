"""Multi-host path: 2 processes on loopback (gloo, 2 fake CPU devices each) == 1 process.

Each process runs the real launcher with ``--config.distributed=True``; together they form one
4-device JAX runtime, the batch is split across processes, and process 0 writes the outputs. The
final metrics must agree with a single-process, single-device run of the same config and seed.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from experiments import data, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/digits_kd.py:smoke"
TIMEOUT = 300


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(data_dir, fake_devices=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.pop("NPROC", None)
  if fake_devices:  # NPROC >= 2 x devices avoids the 2-core all-reduce deadlock (ENVIRONMENT.md)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={fake_devices}"
    env["NPROC"] = str(2 * fake_devices)
  env.update(KDJAX_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
          "--config.progress=False", *extra]


def test_two_process_run_agrees_with_single_process(tmp_path):
  data_dir = tmp_path / "tfds"
  data.prepare("digits", data_dir)  # prepared once: the processes only read it
  port = _free_port()
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(
      _cmd(multi, "--config.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(data_dir, fake_devices=2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  single = tmp_path / "single"
  ref = subprocess.run(_cmd(single), cwd=REPO, env=_env(data_dir), capture_output=True,
                       text=True, timeout=TIMEOUT)
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert ref.returncode == 0, ref.stderr[-3000:]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
    assert f"process {i} of 2; 2 local / 4 global devices" in err
  assert "digits_kd results" in outs[0][0] and "digits_kd results" not in outs[1][0]

  a = json.loads((single / "results.json").read_text())
  b = json.loads((multi / "results.json").read_text())
  for ra, rb in zip(a["rows"], b["rows"]):
    assert ra["model"] == rb["model"] and ra["params"] == rb["params"]
    # Same predictions on all 450 test images (a flip would move accuracy by 1/450) ...
    assert ra["test_acc"] == rb["test_acc"] and ra["agreement"] == rb["agreement"]
    # ... and the same losses up to float32 reduction order (4 devices vs 1).
    assert rb["kl_T1"] == pytest.approx(ra["kl_T1"], rel=1e-4, abs=1e-7)
    assert rb["test_ce"] == pytest.approx(ra["test_ce"], rel=1e-4)
  curve = lambda d: [(r["phase"], r["step"], r["train/loss"])
                     for r in metrics.read_metrics(d / "metrics.jsonl") if "train/loss" in r]
  ca, cb = curve(single), curve(multi)
  assert [c[:2] for c in ca] == [c[:2] for c in cb] and len(ca) > 10
  for (_, _, la), (_, _, lb) in zip(ca, cb):
    assert lb == pytest.approx(la, rel=1e-4)
