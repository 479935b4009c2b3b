"""Workdir safety, early validation and the README's command lines (in-process, seconds).

The subprocess end-to-end versions (a finished workdir rerun with another config, a held lock, a
bad value on the command line, a kill/resume with TensorBoard) are in
tests/test_experiments_launcher.py.
"""

import importlib
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import checkpoint as ckpt_lib
from experiments import config_args, main, workdir as W

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CONFIGS = sorted(p.stem for p in (REPO / "experiments" / "configs").glob("*.py")
                 if not p.stem.startswith("_"))


def _config(name, arg=None):
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


# ----------------------------------------------------------------------------- config.json


def test_config_json_written_and_identical_config_resumes(tmp_path):
  cfg = _config("digits_kd", "smoke")
  with W.open_workdir(tmp_path / "w", cfg) as wd:
    saved = json.loads((wd / "config.json").read_text())
  assert saved["loss"]["temperature"] == 4.0 and saved["student"]["hidden"] == [32]
  assert (wd / "config.json").read_text().startswith("{\n  ")  # human-readable
  assert W.check_config(wd, _config("digits_kd", "smoke")) == {}     # same config: resumes
  cfg2 = _config("digits_kd", "smoke")
  cfg2.progress = False                                              # not a result-changing key
  assert W.check_config(wd, cfg2) == {}


def test_changed_config_names_every_key_and_allow_changes_records(tmp_path):
  wd = tmp_path / "w"
  with W.open_workdir(wd, _config("digits_kd", "smoke")):
    pass
  before = (wd / "config.json").read_text()
  cfg = _config("digits_kd", "smoke")
  cfg.loss.temperature, cfg.student_train_size, cfg.student.hidden = 1.0, 0, (64, 64)
  with pytest.raises(W.ConfigMismatchError) as e:
    with W.open_workdir(wd, cfg):
      pass
  msg = str(e.value)
  for needle in ("loss.temperature: 4.0 -> 1.0", "student_train_size: 100 -> 0",
                 "student.hidden: [32] -> [64, 64]", "--workdir", "--config.resume=allow_changes"):
    assert needle in msg, msg
  assert (wd / "config.json").read_text() == before      # a refused run changes nothing
  assert not (wd / ".lock").exists()                      # and releases the lock
  cfg.resume = "allow_changes"
  with W.open_workdir(wd, cfg):
    pass
  assert json.loads((wd / "config.json").read_text())["loss"]["temperature"] == 1.0
  rec = [json.loads(l) for l in (wd / "config_changes.jsonl").read_text().splitlines()]
  assert rec[-1]["changes"]["loss.temperature"] == {"old": 4.0, "new": 1.0}
  cfg.resume = "sometimes"
  with pytest.raises(ValueError, match=r"config.resume.*strict.*allow_changes"):
    W.check_config(wd, cfg)


def test_lock_refuses_a_live_run_and_replaces_a_dead_runs(tmp_path):
  wd = tmp_path / "w"
  wd.mkdir()
  first = W.WorkdirLock(wd)
  first.acquire()
  with pytest.raises(W.WorkdirLockedError, match=rf"pid {os.getpid()} .*holds this workdir"):
    W.WorkdirLock(wd).acquire()
  with pytest.raises(W.WorkdirLockedError):
    with W.open_workdir(wd, _config("digits_kd", "smoke")):
      pass
  first.release()
  assert not (wd / ".lock").exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "time": "then"}
  (wd / ".lock").write_text(json.dumps(lock))  # left by a killed run
  with W.open_workdir(wd, _config("digits_kd", "smoke")):
    assert json.loads((wd / ".lock").read_text())["pid"] == os.getpid()
  assert not (wd / ".lock").exists()


# ----------------------------------------------------------------------------- checkpoints


def _flip_bit(path: pathlib.Path, rng) -> None:
  b = bytearray(path.read_bytes())
  i = int(rng.integers(len(b)))
  b[i] ^= 1 << int(rng.integers(8))
  path.write_bytes(bytes(b))


def test_corrupt_newest_checkpoint_falls_back_and_every_bit_flip_is_caught(tmp_path):
  """Single-bit flips in the newest step's array files: each restore either gives exactly the
  saved arrays or falls back (with a warning) to the older verified step; never other values."""
  state = {"w": jax.numpy.arange(64.0).reshape(8, 8), "b": jax.numpy.ones(8, jax.numpy.int32)}
  newer = jax.tree.map(lambda x: x + 1, state)
  rng = np.random.default_rng(0)
  outcomes = {"fallback": 0, "intact": 0}
  for trial in range(8):
    d = tmp_path / f"c{trial}"
    ck = ckpt_lib.Checkpointer(d, max_to_keep=3, async_save=False)
    ck.save(1, state)
    ck.save(2, newer)
    ck.wait()
    files = [p for p in (d / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size]
    _flip_bit(sorted(files)[int(rng.integers(len(files)))], rng)
    ck.close()
    ck = ckpt_lib.Checkpointer(d, max_to_keep=3, async_save=False)
    got, step = ck.restore_latest(jax.tree.map(jax.numpy.zeros_like, state))
    expect = newer if step == 2 else state
    assert step in (1, 2)
    for k in state:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(expect[k]))
    outcomes["intact" if step == 2 else "fallback"] += 1
    if step == 1:
      assert list((tmp_path / f"c{trial}.corrupt").iterdir())  # the bad step was moved aside
      assert ck.all_steps() == [1]
    ck.close()
  assert outcomes["fallback"] >= 1, outcomes


def test_digest_detects_a_flip_in_the_array_data(tmp_path):
  state = {"w": jax.numpy.linspace(0.0, 1.0, 256)}
  ck = ckpt_lib.Checkpointer(tmp_path / "c", async_save=False)
  ck.save(5, state)
  ck.wait()
  digest = ckpt_lib.state_digest(state)
  flipped = np.asarray(state["w"]).copy()
  flipped.view(np.uint8)[17] ^= 4
  assert ckpt_lib.state_digest({"w": flipped}) != digest
  got, meta = ck.restore(state)
  assert meta["digest"] == digest and meta["step"] == 5
  ck.close()


# ----------------------------------------------------------------------------- validate first

# One bad value per task (the README's "--config.loss.temperature=-1" among them): the launcher's
# validate() must reject it, naming the key, before any data or training.
BAD_VALUES = {
    "digits_kd": [("loss.temperature", -1.0), ("loss.name", "kl"), ("student.hidden", (0,)),
                  ("optimizer.learning_rate", 0.0), ("loss.ce_weight", 1.5)],
    "loss_zoo": [("temperature", -1.0), ("losses", "hinton+nope"), ("topk", 10)],
    "meta_distillation": [("alphas", (0.0, 1.5)), ("kind", "harmonic"), ("q0", "teachr")],
    "kernel_toy": [("lam", -0.2), ("steps", 0)],
    "kernel_sweep": [("clip", "1,0"), ("val_fraction", 1.0), ("lam_per_n", 0.0)],
    "selfdistill_nn": [("steps", 1), ("clip", "zero,one"), ("model.hidden", ())],
    "adpo_bandits": [("tau", -1.0), ("scale_scenario", "nope"), ("num_items", 1)],
    "adpo_offline": [("temperature", -1.0), ("num_candidates", 1), ("ema_decay", 1.0)],
    "paced_tabular": [("arms", ("uniform_fkl", "nope")), ("k", 0), ("lr", -0.01)],
    "paced_reasoning": [("student.num_heads", 0), ("student_ndig_probs", (0.5, 0.5, 0.5, 0.5)),
                        ("teacher_lr", 0.0)],
    "lm_distill": [("arms", ("offline:k1_reward",)), ("vocab", 0), ("teacher", "gpt"),
                   ("beta", 1.5), ("student.num_heads", 0)],
}


def test_every_task_has_a_validate_and_every_config_passes_it():
  assert sorted(BAD_VALUES) == sorted(main.task_names()) == CONFIGS
  for name in CONFIGS:
    task = importlib.import_module(f"experiments.tasks.{name}")
    assert callable(getattr(task, "validate", None)), name
    for arg in (None, "smoke"):
      main.validate(_config(name, arg))


def _set(cfg, key, value):
  *head, last = key.split(".")
  node = cfg
  for h in head:
    node = node[h]
  node[last] = value


@pytest.mark.parametrize("name,key,value",
                         [(n, k, v) for n, kv in sorted(BAD_VALUES.items()) for k, v in kv])
def test_bad_value_fails_in_validate_naming_the_key(name, key, value):
  cfg = _config(name, "smoke")
  _set(cfg, key, value)
  with pytest.raises(main.LaunchError) as e:
    main.validate(cfg)
  msg = str(e.value)
  assert f"config.{key}" in msg and "\n" not in msg, msg


def test_run_validates_too_before_touching_the_workdir(tmp_path):
  """Called directly (a notebook, a user's script), run() also fails before any work."""
  for name in CONFIGS:
    cfg = _config(name, "smoke")
    key, value = BAD_VALUES[name][0]
    _set(cfg, key, value)
    task = importlib.import_module(f"experiments.tasks.{name}")
    with pytest.raises(config_args.ConfigError, match=re.escape(f"config.{key}")):
      task.run(cfg, str(tmp_path / name))
    assert not (tmp_path / name).exists(), name


# ----------------------------------------------------------------------------- the README


def _readme_commands() -> list[list[str]]:
  text = README.replace("\\\n", " ")
  cmds = []
  for line in text.splitlines():
    if "python -m experiments.main" not in line:
      continue
    line = line.split("python -m experiments.main", 1)[1].split("#")[0].split("`")[0]
    # the loop variables of the README's sweeps: width, seed, mode
    line = line.replace("$w", "64").replace("$s", "1").replace("$m", "offline")
    cmds.append(shlex.split(line))
  return cmds


def _parse(argv):
  fv = flags.FlagValues()
  spec = next(a for a in argv if a.startswith("--config="))[len("--config="):]
  path, _, arg = spec.partition(":")
  argv = ["prog", f"--config={REPO / path}{':' + arg if arg else ''}",
          *[a for a in argv if a.startswith("--config.")]]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_every_readme_command_line_parses_and_validates(tmp_path):
  cmds = _readme_commands()
  assert len(cmds) >= 10
  seen_overrides = set()
  for argv in cmds:
    # A teacher workdir is an earlier run's output on the user's machine: stand in a directory.
    argv = [f"--config.teacher_workdir={tmp_path}" if a.startswith("--config.teacher_workdir=")
            else a for a in argv]
    if any("=S" in a or "..." in a for a in argv if a.startswith("--config=")):
      argv = [a.replace(":seed=S", ":seed=1") for a in argv]
    cfg = _parse(argv)   # unknown keys and wrong types fail here
    main.validate(cfg)   # bad values here
    seen_overrides |= {a[len("--config."):].partition("=")[0] for a in argv
                       if a.startswith("--config.")}
  assert "student.hidden" in seen_overrides   # the width sweep the README shows


def test_student_width_sweep_forms():
  """Layer widths are tuples on the command line: '(64,)', '(64, 32)', and a bare 64."""
  for value, want in (("(64,)", (64,)), ("(64, 32)", (64, 32)), ("64", (64,))):
    cfg = _parse(["--config=experiments/configs/digits_kd.py:smoke",
                  f"--config.student.hidden={value}"])
    assert tuple(cfg.student.hidden) == want
    main.validate(cfg)


def test_readme_numbers_match_the_config_defaults():
  """The README's prose about each experiment states the configs' defaults."""
  d = _config("digits_kd")
  assert d.student_train_size == 100 and "MLP-32, 100\nlabelled examples" in README
  assert tuple(d.student.hidden) == (32,) and tuple(d.teacher.hidden) == (256, 256)
  assert d.loss.temperature == 4.0 and "T = 4" in README
  assert d.loss.ce_weight == 0.1 and "CE weight\n0.1" in README
  assert 1347 - d.val_size == 1077 and "With all 1077 labels" in README
  z = _config("loss_zoo")
  assert z.student_train_size == 200 and "200 labelled images" in README
  assert z.num_seeds == 3 and "mean ± std over 3 seeds" in README and z.ce_weight == 0.1
  m = _config("meta_distillation")
  assert m.generations == 8 and tuple(m.student.hidden) == (8,) and m.student_train_size == 300
  assert "8 generations, an 8-unit student on 300 inputs" in README
