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


def test_every_zoo_loss_trains():
  """Each row's loss gives finite per-example values and gradients on a toy batch."""
  import jax
  import numpy as np
  c = cfg_lib.get_config("smoke")
  rng = np.random.default_rng(0)
  base = {"y": rng.integers(0, 10, size=8), "teacher_logits": rng.normal(size=(8, 10)),
          "teachers_logits": rng.normal(size=(8, 2, 10))}
  logits = rng.normal(size=(8, 10)).astype(np.float32)
  for name in loss_zoo.LOSSES:
    batch = dict(base)
    extra = loss_zoo._extra_columns(name, c, base, base["teacher_logits"], 0)  # pylint: disable=protected-access
    batch.update({k: v[np.arange(8)] for k, v in extra.items()})
    loss_fn = loss_zoo.make_zoo_loss(name, c)
    val, g = jax.jit(jax.value_and_grad(lambda z, b: loss_fn(z, b).mean()))(logits, batch)
    assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g))), name


def test_smoke_run(tmp_path, capsys):
  c = cfg_lib.get_config("smoke,losses=taid+multi_teacher")
  c.teacher_steps = 40
  c.student_steps = 40
  c.num_devices = 1
  results = loss_zoo.run(c, tmp_path)
  names = [r["loss"] for r in results["table"]]
  assert len(names) == 4 and names[1].startswith("baseline")
  for row in results["per_seed"][0].values():
    assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
  assert "loss_zoo on digits" in capsys.readouterr().out
  assert (tmp_path / "results.json").exists()
  with pytest.raises(ValueError, match="losses"):
    c.losses = "hinton+nope"
    loss_zoo.run(c, tmp_path / "bad")
