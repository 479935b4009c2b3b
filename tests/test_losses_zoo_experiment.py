"""The loss-zoo experiment: config parsing and a seconds-long smoke run of the task."""

import pytest

from experiments.configs import loss_zoo as cfg_lib
from experiments.tasks import loss_zoo


def test_config_arguments():
  c = cfg_lib.get_config("seeds=4,losses=hinton+pld")
  assert c.num_seeds == 4 and c.losses == "hinton+pld" and c.task == "loss_zoo"
  assert cfg_lib.get_config().num_seeds >= 3
  with pytest.raises(ValueError, match="unknown"):
    cfg_lib.get_config("epochs=3")


def test_smoke_run(tmp_path, capsys):
  c = cfg_lib.get_config("smoke,losses=taid+random_sampling+multi_teacher+pld")
  c.teacher_steps = 40
  c.student_steps = 40
  c.num_devices = 1
  results = loss_zoo.run(c, tmp_path)
  names = [r["loss"] for r in results["table"]]
  assert len(names) == 6 and names[1].startswith("baseline")
  for row in results["per_seed"][0].values():
    assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
  assert "loss_zoo on digits" in capsys.readouterr().out
  assert (tmp_path / "results.json").exists()
  with pytest.raises(ValueError, match="losses"):
    c.losses = "hinton+nope"
    loss_zoo.run(c, tmp_path / "bad")
