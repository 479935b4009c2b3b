"""The loss-zoo experiment: config parsing and a seconds-long smoke run of the task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint, data, models, train
from experiments.configs import loss_zoo as cfg_lib
from experiments.tasks import loss_zoo
from kdjax import losses as L


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
    if isinstance(loss_fn, train.StatefulLoss):  # TAID: sees the step, carries its TaidState
      aux = loss_fn.init_aux()
      f = lambda z, b, fn=loss_fn, aux=aux: fn(z, b, step=jnp.int32(0), aux=aux)[0].mean()
    else:
      f = lambda z, b, fn=loss_fn: fn(z, b).mean()
    val, g = jax.jit(jax.value_and_grad(f))(logits, batch)
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


def _taid_phase(c, num_steps):
  """The zoo's TAID student phase on a toy batch source: (tx, graphdef, state, step_fn, get_batch)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
  arrays = {"x": x, "y": rng.integers(0, 10, size=64).astype(np.int32),
            "teacher_logits": (3 * rng.normal(size=(64, 10))).astype(np.float32)}
  loss_fn = loss_zoo.make_zoo_loss("taid", c)
  model = models.build_model({"kind": "mlp", "hidden": [16]}, input_shape=(8, 8, 1),
                             num_classes=10, seed=1)
  tx = train.make_optimizer({"name": "adam", "learning_rate": 1e-2}, num_steps)
  g, st = train.create_train_state(model, tx, aux=train.initial_aux(loss_fn))
  step_fn = train.make_train_step(g, tx, loss_fn, donate=False)
  return st, step_fn, (lambda idx: {k: v[idx] for k, v in arrays.items()})


def test_taid_adaptive_t_resumes_exactly(tmp_path):
  """E2: TAID's t is a pure function of the train state, so a resumed phase continues it.

  Before the fix t lived in a Python object advanced by the batch reader: a resumed phase
  restarted at t_start (0.406 instead of 0.706 at step 50).
  """
  c = cfg_lib.get_config("smoke")
  n = 12
  c.student_steps = n
  c.taid_t_start = 0.4
  sampler = data.BatchSampler(64, 16, seed=0)

  def record(step_fn, ts):
    def wrapped(st, b):
      st, m = step_fn(st, b)
      ts.append(float(st.aux.t))
      return st, m
    return wrapped

  st, step_fn, get_batch = _taid_phase(c, n)
  assert isinstance(st.aux, L.TaidState) and float(st.aux.t) == pytest.approx(0.4)
  ref = []
  train.train_loop(st, record(step_fn, ref), sampler=sampler, get_batch=get_batch, num_steps=n,
                   log_every=0, progress=False)
  # The adaptive schedule ran: t grows from t_start and reaches 1 at the last step (the ramp).
  assert ref[0] == pytest.approx(0.4) and all(b >= a for a, b in zip(ref, ref[1:]))
  assert ref[-1] == pytest.approx(1.0) and 0.4 < ref[n // 2] < 1.0
  # Interrupted at step 5 (checkpoint), restored into a fresh state, resumed to the end.
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  st, step_fn, get_batch = _taid_phase(c, n)
  part = []
  train.train_loop(st, record(step_fn, part), sampler=sampler, get_batch=get_batch, num_steps=5,
                   checkpointer=ck, log_every=0, progress=False)
  fresh, step_fn2, get_batch = _taid_phase(c, n)
  restored, meta = ck.restore(fresh)
  ck.close()
  assert meta["step"] == 5 and float(restored.aux.t) == part[-1]
  train.train_loop(restored, record(step_fn2, part), sampler=sampler, get_batch=get_batch,
                   num_steps=n, log_every=0, progress=False)
  np.testing.assert_array_equal(np.array(part), np.array(ref))
