"""The meta_distillation experiment: smoke run through ``run(config, workdir)``, config errors."""

import json
import math

import pytest

from experiments.configs import meta_distillation as cfg_mod
from experiments.tasks import meta_distillation as task


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  cfg = cfg_mod.get_config("smoke")
  cfg.num_devices = 1     # in-process: one of conftest's fake devices, no all-reduce
  cfg.progress = False
  workdir = tmp_path_factory.mktemp("meta_distillation")
  return cfg, workdir, task.run(cfg, str(workdir))


def test_smoke_run_writes_table_plot_and_finite_numbers(smoke):
  cfg, workdir, res = smoke
  assert (workdir / "meta_distillation.png").stat().st_size > 0
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["starts"] == json.loads(json.dumps(res["starts"]))
  assert list(res["starts"]) == ["uniform", "teacher"]
  uni, tea = res["starts"]["uniform"]["chains"], res["starts"]["teacher"]["chains"]
  assert [c["alpha"] for c in uni] == [0.0, 0.1, 0.3, 1.0]
  # q0 = uniform: KL(p0 || u) at t=0; q0 = teacher: zero at t=0, accuracy = the teacher's.
  assert uni[0]["per_generation"][0]["test_acc"] < 0.2
  assert tea[0]["per_generation"][0]["kl_test"] == pytest.approx(0.0, abs=1e-6)
  assert tea[0]["per_generation"][0]["test_acc"] == pytest.approx(res["teacher_test_acc"])
  # alpha = 0 from the uniform start: the target stays uniform, so no generation gets closer
  # to p0 than the start by more than fitting noise.
  assert min(m["kl_test"] for m in uni[0]["per_generation"]) > 0.5 * uni[0][
      "per_generation"][0]["kl_test"]
  for chain in uni + tea:
    gens = chain["per_generation"]
    assert len(gens) == cfg.generations + 1
    for m in gens:
      assert all(math.isfinite(v) for v in m.values())
      assert m["kl_test"] >= 0 and 0 <= m["test_acc"] <= 1
    # Generation 0 is the shared q0: identical for every alpha.
  # Generation 0 is shared by the chains of one start.
  assert all(c["per_generation"][0] == uni[0]["per_generation"][0] for c in uni)
  # alpha = 1 targets p0 itself at every generation: the fit error is KL(p0 || q_t) on train.
  one = uni[-1]["per_generation"][1]
  assert one["fit_kl"] == pytest.approx(one["kl_train"], rel=1e-5)
  table = task.format_tables(res)
  assert "q0=uniform: test KL(p0 || q_t)" in table and "q0=teacher: test accuracy" in table
  assert "t=2" in table


def test_table_is_printed():
  res = {"generations": 1, "starts": {"uniform": {"q0": "uniform", "floor_kl": 0.1, "chains": [
      {"alpha": 0.5, "rate_first3": 0.5, "bound_rate": 0.5, "drift": 0.0,
       "per_generation": [{"kl_test": 0.5, "test_acc": 0.4},
                          {"kl_test": 0.25, "test_acc": 0.6}]}]}}}
  out = task.format_tables(res)
  assert "0.2500" in out and "0.6000" in out


def test_config_arguments_and_errors(tmp_path):
  c = cfg_mod.get_config("kind=geometric,q0=labels,generations=7")
  assert (c.kind, c.q0, c.generations, c.task) == ("geometric", "labels", 7, "meta_distillation")
  assert cfg_mod.get_config().generations >= 6
  with pytest.raises(ValueError, match="unknown argument"):
    cfg_mod.get_config("smoke,bogus=1")
  bad = cfg_mod.get_config("smoke")
  bad.q0 = "nope"
  with pytest.raises(ValueError, match="q0"):
    task.run(bad, str(tmp_path))
  bad = cfg_mod.get_config("smoke")
  bad.alphas = [0.5, 1.5]
  with pytest.raises(ValueError, match="alphas"):
    task.run(bad, str(tmp_path))
