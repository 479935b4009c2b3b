"""The absl launcher end to end: digits_kd smoke run, SIGKILL + resume equality, 2-process
(multi-host) run, bad input.

Subprocesses get their own environment (one CPU device unless stated, no fake-device flags from
conftest, a shared prepared data dir) and timeouts. The smoke run is the reference that the resumed
run and the 2-process run are compared with.
"""

import json
import os
import shutil
import struct
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import data, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/digits_kd.py"
TIMEOUT = 240


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  data.prepare("digits", d)  # once, so the subprocesses only read
  return d


def _env(data_dir, **extra):
  env = dict(os.environ)
  for k in ("XLA_FLAGS", "NPROC"):  # single device: the fake-device setup is for in-process tests
    env.pop(k, None)
  env.update(KDJAX_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  return env


def _cmd(workdir, arg="smoke", *overrides):
  return [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:{arg}",
          f"--workdir={workdir}", "--config.progress=False", *overrides]


def _eval_rows(workdir):
  """metrics.jsonl without wall-clock fields: what must match between runs."""
  rows = metrics.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
  return [{k: v for k, v in r.items() if k not in ("time", "train/steps_per_sec")} for r in rows]


def _tb_rows(workdir):
  """{(phase, step, tag)} of every scalar in the TensorBoard event files (read without TF)."""
  from tensorboardX.proto import event_pb2
  out = []
  for f in sorted(pathlib.Path(workdir, "tb").glob("*/events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      if i + 12 + n + 4 > len(data):
        break  # a torn last record
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      out += [(f.parent.name, ev.step, v.tag) for v in ev.summary.value]
  return out


def _jsonl_rows(workdir):
  return [(r["phase"], r["step"], k) for r in metrics.read_metrics(pathlib.Path(workdir) /
                                                                   "metrics.jsonl")
          for k, v in r.items() if k not in ("phase", "step", "time") and v == v]


@pytest.fixture(scope="module")
def smoke_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  proc = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(data_dir), capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_smoke_run_writes_table_metrics_tb_png(smoke_run):
  workdir, proc = smoke_run
  assert "digits_kd results" in proc.stdout and "baseline (labels only)" in proc.stdout
  for needle in ("process 0 of 1", "workdir:", "config:", "devices"):
    assert needle in proc.stderr
  res = json.loads((workdir / "results.json").read_text())
  names = [r["model"] for r in res["rows"]]
  assert names[0] == "teacher" and names[1].startswith("baseline") and "KD" in names[2]
  teacher, base, student = res["rows"]
  assert teacher["test_acc"] > 0.85 and base["test_acc"] > 0.5 and student["test_acc"] > 0.5
  assert teacher["agreement"] == 1.0 and teacher["kl_T1"] == pytest.approx(0.0, abs=1e-6)
  assert 0 < student["kl_T1"] < 5 and base["params"] == student["params"] < teacher["params"]
  phases = {r["phase"] for r in metrics.read_metrics(workdir / "metrics.jsonl")}
  assert phases == {"teacher", "baseline", "student"}
  assert (workdir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
  for ph in phases:
    assert list((workdir / "tb" / ph).glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / ph / "300" if ph != "teacher"
            else workdir / "checkpoints" / ph / "200").is_dir()


def test_sigkill_and_resume_matches_uninterrupted_run(smoke_run, data_dir, tmp_path):
  ref_dir, _ = smoke_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(data_dir),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = workdir / "checkpoints" / "baseline" / "100"
  deadline = time.time() + TIMEOUT
  try:
    while not marker.exists():
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline, "no baseline checkpoint appeared in time"
      time.sleep(0.02)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: teacher done, baseline part-way
  finally:
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / "results.json").exists()
  # TensorBoard is written synchronously with every metrics row: after the kill it holds every
  # row up to the last checkpoint (the finished teacher, the baseline to step 100 at least).
  killed_tb = set(_tb_rows(workdir))
  kept = {r for r in _jsonl_rows(workdir) if r[0] == "teacher" or r[1] <= 100}
  assert kept and kept <= killed_tb, sorted(kept - killed_tb)[:5]
  resumed = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(data_dir), capture_output=True,
                           text=True, timeout=TIMEOUT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[teacher] resuming from step 200" in resumed.stderr
  assert "[baseline] resuming from step" in resumed.stderr
  ref = json.loads((ref_dir / "results.json").read_text())
  got = json.loads((workdir / "results.json").read_text())
  assert got == ref  # same seed, same batches, same state: bit-identical final metrics
  assert _eval_rows(workdir) == _eval_rows(ref_dir)  # and the same learning curves
  # ... in TensorBoard too: every step once, none lost to the kill, none duplicated by the resume.
  assert sorted(_tb_rows(workdir)) == sorted(_tb_rows(ref_dir)) == sorted(_jsonl_rows(workdir))


def _parse(*argv):
  fv = flags.FlagValues()
  argv = ["prog", f"--config={REPO / CONFIG}:smoke", *argv]
  # Override flags are registered from the command line at definition time (as in main.py).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_overrides_and_parse_time_errors():
  cfg = _parse("--config.loss.temperature=2.5", "--config.student_train_size=0")
  assert cfg.loss.temperature == 2.5 and cfg.student_train_size == 0 and cfg.task == "digits_kd"
  # Raised while the flags are parsed, before any task code runs.
  with pytest.raises((AttributeError, KeyError, flags.Error), match="no_such_key"):
    _parse("--config.no_such_key=1")
  with pytest.raises((TypeError, ValueError, flags.Error)):
    _parse("--config.seed=abc")
  with pytest.raises(ValueError, match="unknown argument"):
    from experiments.configs import digits_kd
    digits_kd.get_config("smoke,bogus=1")


def test_unknown_key_and_unwritable_workdir_fail_fast(data_dir, tmp_path):
  bad = subprocess.run(_cmd(tmp_path / "w", "smoke", "--config.studnet_steps=3"), cwd=REPO,
                       env=_env(data_dir), capture_output=True, text=True, timeout=TIMEOUT)
  assert bad.returncode != 0 and "studnet_steps" in bad.stderr
  assert not (tmp_path / "w").exists()
  blocker = tmp_path / "file"
  blocker.write_text("x")
  from experiments.configs import digits_kd
  from experiments.tasks import digits_kd as task
  with pytest.raises(ValueError, match="workdir.*cannot be created or written"):
    task.run(digits_kd.get_config("smoke"), str(blocker / "sub"))


def test_nan_loss_run_stops_with_step(data_dir, tmp_path):
  """The task itself (in-process, 1 device) stops on a diverging teacher, saving nothing bad."""
  from experiments import train
  from experiments.configs import digits_kd
  from experiments.tasks import digits_kd as task
  cfg = digits_kd.get_config("smoke")
  cfg.data_dir, cfg.num_devices, cfg.progress = str(data_dir), 1, False
  cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.schedule = "sgd", 1e30, "constant"
  with pytest.raises(train.NonFiniteLossError, match=r"\[teacher\] non-finite loss .* at step \d+"):
    task.run(cfg, str(tmp_path))
  assert not list((tmp_path / "checkpoints" / "teacher").glob("[0-9]*"))  # nothing saved


def test_teacher_restored_from_its_own_workdir_on_eight_devices(smoke_run, data_dir, tmp_path):
  """In-process run (8 fake devices from conftest) reusing the smoke run's finished teacher."""
  from experiments.configs import digits_kd
  from experiments.tasks import digits_kd as task
  ref_dir, _ = smoke_run
  cfg = digits_kd.get_config("smoke")
  cfg.data_dir = str(data_dir)
  cfg.teacher_workdir = str(ref_dir)
  cfg.student_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 20, 10, 0, 0
  cfg.progress = False
  res = task.run(cfg, str(tmp_path / "w"))
  ref = json.loads((ref_dir / "results.json").read_text())
  assert res["rows"][0]["test_acc"] == ref["rows"][0]["test_acc"]
  assert res["rows"][0]["test_ce"] == pytest.approx(ref["rows"][0]["test_ce"], rel=1e-5)
  assert not (tmp_path / "w" / "checkpoints" / "teacher").exists()
  assert (tmp_path / "w" / "checkpoints" / "student" / "20").is_dir()
  cfg.teacher_workdir = str(tmp_path / "empty")
  with pytest.raises(ValueError, match="teacher_workdir"):
    task.run(cfg, str(tmp_path / "w2"))


def test_two_process_run_agrees_with_single_process(smoke_run, data_dir, tmp_path):
  """Multi-host path: 2 processes on loopback (gloo, 2 fake CPU devices each) == 1 process.

  Each process runs the real launcher with ``--config.distributed=True``; together they form one
  4-device JAX runtime, each process feeds its half of every batch, process 0 writes the outputs.
  The final metrics must agree with the single-process, single-device smoke run (same seed).
  """
  single, _ = smoke_run
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  multi = tmp_path / "multi"
  # NPROC >= 2 x devices avoids the 2-core all-reduce deadlock (see tests/conftest.py).
  env = _env(data_dir, XLA_FLAGS="--xla_force_host_platform_device_count=2", NPROC="4")
  procs = [subprocess.Popen(
      _cmd(multi, "smoke", "--config.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
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


def _one_error_line(stderr):
  lines = [ln for ln in stderr.splitlines() if ln.startswith("experiments.main: error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


def test_finished_workdir_rerun_with_another_config_stops_naming_the_keys(smoke_run, data_dir):
  ref_dir, _ = smoke_run
  before = {f: (ref_dir / f).read_bytes() for f in ("results.json", "metrics.jsonl", "config.json")}
  t0 = time.time()
  proc = subprocess.run(_cmd(ref_dir, "smoke", "--config.loss.temperature=1.0",
                             "--config.student_train_size=0"), cwd=REPO, env=_env(data_dir),
                        capture_output=True, text=True, timeout=TIMEOUT)
  seconds = time.time() - t0
  assert proc.returncode == 2
  line = _one_error_line(proc.stderr)
  for needle in ("loss.temperature: 4.0 -> 1.0", "student_train_size: 100 -> 0", "--workdir",
                 "--config.resume=allow_changes"):
    assert needle in line, line
  assert "[teacher]" not in proc.stderr and proc.stdout == ""   # nothing ran
  assert {f: (ref_dir / f).read_bytes() for f in before} == before   # nothing was relabelled
  print(f"config mismatch reported after {seconds:.1f} s (process start included)")


def test_identical_config_resumes_a_finished_workdir(smoke_run, data_dir, tmp_path):
  ref_dir, _ = smoke_run
  workdir = tmp_path / "again"
  shutil.copytree(ref_dir, workdir)
  proc = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(data_dir), capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[student] resuming from step 300" in proc.stderr
  assert json.loads((workdir / "results.json").read_text()) == json.loads(
      (ref_dir / "results.json").read_text())
  assert _eval_rows(workdir) == _eval_rows(ref_dir)          # no duplicated metrics rows
  assert sorted(_tb_rows(workdir)) == sorted(_tb_rows(ref_dir))


def test_second_run_on_a_locked_workdir_is_refused(smoke_run, data_dir, tmp_path):
  ref_dir, _ = smoke_run
  workdir = tmp_path / "locked"
  shutil.copytree(ref_dir, workdir)
  (workdir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "time": "now"}))   # a live run (this process)
  rows = (workdir / "metrics.jsonl").read_bytes()
  proc = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(data_dir), capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 2
  line = _one_error_line(proc.stderr)
  assert f"another run (pid {os.getpid()} on {socket.gethostname()}" in line, line
  assert (workdir / "metrics.jsonl").read_bytes() == rows     # no rows appended or truncated


def test_negative_temperature_fails_before_any_work(data_dir, tmp_path):
  workdir = tmp_path / "neg"
  t0 = time.time()
  proc = subprocess.run(_cmd(workdir, "smoke", "--config.loss.temperature=-1"), cwd=REPO,
                        env=_env(data_dir), capture_output=True, text=True, timeout=TIMEOUT)
  seconds = time.time() - t0
  assert proc.returncode == 2
  line = _one_error_line(proc.stderr)
  assert "config.loss.temperature=-1.0" in line and "> 0" in line, line
  assert not workdir.exists()                 # validated before the workdir was even created
  print(f"bad temperature reported after {seconds:.1f} s (process start included)")
