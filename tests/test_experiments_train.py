"""experiments.models / train / mesh / checkpoint / metrics: in-process unit tests.

The 8-fake-device test uses the 8 CPU devices set up by tests/conftest.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import checkpoint, data, mesh as mesh_lib, metrics, models, train
from kdjax import divergences
from kdjax import losses as L


def _toy(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  t = rng.normal(size=(n, 10)).astype(np.float32) * 3
  return {"x": x, "y": y, "teacher_logits": t}


def test_models_shapes_and_errors():
  x = jnp.ones((3, 8, 8, 1))
  mlp = models.build_model({"kind": "mlp", "hidden": [16, 8]}, input_shape=(8, 8, 1),
                           num_classes=10)
  cnn = models.build_model({"kind": "cnn", "features": [4, 8], "dense": 16},
                           input_shape=(8, 8, 1), num_classes=10)
  assert mlp(x).shape == (3, 10) and cnn(x).shape == (3, 10)
  assert models.count_params(mlp) == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
  tf = models.build_model({"kind": "transformer", "d_model": 16, "num_heads": 2,
                           "num_layers": 1, "mlp_dim": 32, "max_len": 12}, num_classes=20)
  tok = jnp.arange(20).reshape(2, 10) % 20
  fwd = nnx.jit(lambda m, t: m(t))  # one compilation instead of many eager attention ops
  out = fwd(tf, tok)
  assert out.shape == (2, 10, 20)
  # Causal: changing a later token does not change earlier positions' logits.
  out2 = fwd(tf, tok.at[:, 7].set(3))
  np.testing.assert_allclose(out[:, :7], out2[:, :7], atol=1e-5)
  assert not np.allclose(out[:, 7:], out2[:, 7:])
  with pytest.raises(ValueError, match="kind"):
    models.build_model({"kind": "rnn"}, input_shape=(4,), num_classes=2)
  with pytest.raises(ValueError, match="max_len"):
    tf(jnp.zeros((1, 13), jnp.int32))
  with pytest.raises(ValueError, match="activation"):
    models.build_model({"kind": "mlp", "activation": "nope"}, input_shape=(4,), num_classes=2)


def test_distill_loss_formula_and_errors():
  b = _toy(16)
  s = jnp.asarray(np.random.default_rng(1).normal(size=(16, 10)), jnp.float32)
  t_ = 4.0
  ps_log = jax.nn.log_softmax(s / t_)
  pt = jax.nn.softmax(b["teacher_logits"] / t_)
  kl = jnp.sum(pt * (jnp.log(pt) - ps_log), -1)
  ce = -jax.nn.log_softmax(s)[jnp.arange(16), b["y"]]
  # The one library convention: ce_weight·CE + kd_weight·(T² if scale_by_t2)·D.
  loss = train.make_distill_loss("forward_kl", temperature=t_, ce_weight=0.3, kd_weight=2.0)(s, b)
  np.testing.assert_allclose(loss, 0.3 * ce + 2.0 * kl, rtol=1e-5)
  # The experiments' old ce_weight=c (c·CE + (1 − c)·T²·D) keeps its numbers.
  old = train.make_distill_loss("forward_kl", temperature=t_, ce_weight=0.3, kd_weight=0.7,
                                scale_by_t2=True)(s, b)
  np.testing.assert_allclose(old, 0.3 * ce + 0.7 * t_ ** 2 * kl, rtol=1e-5)
  # It IS the library mixture (A2: one implementation), eagerly and under jit.
  ref = L.ce_kd_mixture(s, b["teacher_logits"], b["y"], kd_weight=0.7, ce_weight=0.3,
                        scale_by_t2=True, temperature=t_, divergence="forward_kl")
  fn = train.make_distill_loss("forward_kl", temperature=t_, ce_weight=0.3, kd_weight=0.7,
                               scale_by_t2=True)
  np.testing.assert_allclose(fn(s, b), ref, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(s, b), ref, rtol=1e-6)
  # Defaults: CE + D, no T².
  np.testing.assert_allclose(train.make_distill_loss("forward_kl", temperature=t_)(s, b),
                             ce + kl, rtol=1e-5)
  rkl = train.make_distill_loss("reverse_kl", temperature=2.0, ce_weight=0.0)(s, b)
  np.testing.assert_allclose(rkl, divergences.reverse_kl(s, b["teacher_logits"],
                                                         temperature=2.0), rtol=1e-6)
  jsd = train.make_distill_loss("generalized_jsd", beta=0.3)(s, b)
  assert jsd.shape == (16,) and np.all(np.asarray(jsd) >= 0)
  # A masked (padding) row gives 0.
  masked = train.make_distill_loss("forward_kl")(s, dict(b, mask=np.arange(16) < 10))
  assert np.all(np.asarray(masked)[10:] == 0) and np.all(np.asarray(masked)[:10] > 0)
  # The teacher gets no gradient through the loss.
  g = jax.grad(lambda t: train.make_distill_loss("forward_kl")(s, dict(b, teacher_logits=t))
               .sum())(b["teacher_logits"])
  assert np.all(np.asarray(g) == 0)
  # Bad hyper-parameters fail when the loss is built (before any training), naming the argument.
  with pytest.raises(ValueError, match="forward_kl"):
    train.make_distill_loss("kl_forward")
  with pytest.raises(ValueError, match="temperature"):
    train.make_distill_loss("forward_kl", temperature=0.0)
  with pytest.raises(ValueError, match="kd_weight"):
    train.make_distill_loss("forward_kl", kd_weight=-0.5)
  with pytest.raises(ValueError, match="ce_weight"):
    train.make_distill_loss("forward_kl", ce_weight=-1.5)
  with pytest.raises(TypeError, match="scale_by_t2"):
    train.make_distill_loss("forward_kl", scale_by_t2=1)


def test_optimizer_and_schedule_from_config():
  sched = train.make_schedule({"learning_rate": 0.1, "schedule": "warmup_cosine",
                               "warmup_steps": 10}, 100)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 0.1) < 1e-7
  assert float(sched(100)) < 1e-6
  for name in ("adam", "adamw", "sgd", "momentum"):
    tx = train.make_optimizer({"name": name, "grad_clip": 1.0}, 10)
    assert isinstance(tx, optax.GradientTransformation)
  with pytest.raises(ValueError, match="optimizer"):
    train.make_optimizer({"name": "lion"}, 10)
  with pytest.raises(ValueError, match="schedule"):
    train.make_schedule({"schedule": "step"}, 10)
  with pytest.raises(ValueError, match="learning_rate"):
    train.make_schedule({"learning_rate": -1.0}, 10)


def _setup(fsdp=False, mesh=None, hidden=(64,)):
  model = models.build_model({"kind": "mlp", "hidden": list(hidden)}, input_shape=(8, 8, 1),
                             num_classes=10, seed=3)
  tx = train.make_optimizer({"name": "adam", "learning_rate": 1e-2}, 10)
  g, st = train.create_train_state(model, tx)
  loss = train.make_distill_loss("forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5,
                                scale_by_t2=True)
  if mesh is None:
    return g, st, train.make_train_step(g, tx, loss, donate=False)
  sh = mesh_lib.state_shardings(st, mesh, fsdp=fsdp, min_size=256)
  st = mesh_lib.place(st, sh)
  return g, st, train.make_train_step(g, tx, loss, state_sharding=sh, donate=False)


@pytest.mark.parametrize("fsdp", [False, True])
def test_eight_device_step_equals_single_device_step(fsdp):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  batches = [_toy(64, seed=k) for k in range(3)]
  _, st1, step1 = _setup()
  mesh = mesh_lib.make_mesh(8)
  _, st8, step8 = _setup(fsdp=fsdp, mesh=mesh)
  if fsdp:  # the big kernel really is split over the 8 devices
    kernel = st8.params["layers"][0]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert kernel.addressable_shards[0].data.shape == (8, 64)
  for b in batches:
    st1, m1 = step1(st1, {k: jnp.asarray(v) for k, v in b.items()})
    sb = mesh_lib.shard_batch(b, mesh)
    assert sb["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    st8, m8 = step8(st8, sb)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st8.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  assert int(st8.step) == 3


def test_evaluate_handles_padding_and_sharding():
  g, st, _ = _setup()
  b = _toy(45, seed=5)  # 45 is not a multiple of 8: padded and masked
  ev_fn = train.make_eval_fn(g)
  one = train.evaluate(ev_fn, st.params, b)
  eight = train.evaluate(ev_fn, st.params, b, mesh=mesh_lib.make_mesh(8), batch_size=16)
  logits = np.asarray(nnx.merge(g, st.params)(b["x"]))
  assert one["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == b["y"]))
  assert one["agreement"] == pytest.approx(np.mean(logits.argmax(-1) ==
                                                   b["teacher_logits"].argmax(-1)))
  kl = np.asarray(divergences.forward_kl(jnp.asarray(logits), b["teacher_logits"]))
  assert one["kl"] == pytest.approx(kl.mean(), rel=1e-5)
  for k in one:
    assert eight[k] == pytest.approx(one[k], rel=1e-5)
  pred = train.predict_logits(g, st.params, b["x"], mesh=mesh_lib.make_mesh(8), batch_size=16)
  np.testing.assert_allclose(pred, logits, rtol=1e-5, atol=1e-5)


def test_nan_loss_stops_with_step_and_leaves_finite_checkpoints(tmp_path):
  g, st, _ = _setup()
  tx = train.make_optimizer({"name": "adam", "learning_rate": 1e-2}, 10)

  def poisoned_ce(logits, batch):
    return train.ce_loss(logits, batch) + batch["poison"]

  step = train.make_train_step(g, tx, poisoned_ce)
  b = _toy(64)
  sampler = data.BatchSampler(64, 16, seed=0)
  calls = []

  def get_batch(idx):  # the 8th batch (step 7) carries a NaN
    calls.append(1)
    poison = np.full(len(idx), np.nan if len(calls) == 8 else 0.0, np.float32)
    return {"x": b["x"][idx], "y": b["y"][idx], "poison": poison}

  ck = checkpoint.Checkpointer(tmp_path / "ckpt")
  writer = metrics.MetricWriter(tmp_path, tensorboard=False)
  with pytest.raises(train.NonFiniteLossError, match="at step 7"):
    train.train_loop(st, step, sampler=sampler, get_batch=get_batch, num_steps=20,
                     checkpointer=ck, checkpoint_every=5, log_every=10, writer=writer,
                     progress=False)
  assert ck.latest_step() == 5  # saved before the NaN; nothing after it
  restored, meta = ck.restore(st)
  assert meta["step"] == 5 and int(restored.step) == 5
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))
  ck.close()


def test_checkpoint_roundtrip_and_unwritable_workdir(tmp_path):
  g, st, step = _setup()
  st, _ = step(st, {k: jnp.asarray(v) for k, v in _toy(16).items()})
  ck = checkpoint.Checkpointer(tmp_path / "c")
  fresh = _setup()[1]
  assert ck.restore_or(fresh) == (fresh, False)
  ck.save(1, st, {"note": "x"})
  back, resumed = ck.restore_or(fresh)
  assert resumed
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck.close()
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="workdir"):
    checkpoint.ensure_writable_dir(blocker / "sub")


def test_metrics_writer_truncate_and_plot(tmp_path):
  w = metrics.MetricWriter(tmp_path)
  for s in (10, 20, 30):
    w.write("a", s, {"train/loss": 1.0 / s, "eval/accuracy": s / 100})
  w.write("b", 10, {"train/loss": 0.5})
  w.truncate("a", 20)
  w.close()
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["phase"], r["step"]) for r in rows] == [("a", 10), ("a", 20), ("b", 10)]
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"phase": "a", "st')  # a torn last line (killed mid-write) is skipped
  assert len(metrics.read_metrics(tmp_path / "metrics.jsonl")) == 3
  png = metrics.plot_learning_curves(rows, tmp_path / "c.png")
  assert png.read_bytes()[:4] == b"\x89PNG"
  assert list((tmp_path / "tb" / "a").glob("events.out.tfevents.*"))
  table = metrics.format_table([{"m": "x", "v": 0.5}], ["m", "v"])
  assert "0.5000" in table
  json.dumps(rows)
