"""experiments.mesh on the 8 fake CPU devices of tests/conftest.py: the ("data", "model") mesh,
device-order-proof batch placement, logical-axis parameter shardings (tensor parallelism)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from experiments import data, mesh as mesh_lib, train


def test_make_mesh_axes_and_errors():
  m = mesh_lib.make_mesh()
  assert m.axis_names == ("data", "model") and dict(m.shape) == {"data": 8, "model": 1}
  m = mesh_lib.make_mesh(8, model=2)
  assert dict(m.shape) == {"data": 4, "model": 2}
  assert dict(mesh_lib.make_mesh(4).shape) == {"data": 4, "model": 1}
  with pytest.raises(ValueError, match="num_devices"):
    mesh_lib.make_mesh(9)
  with pytest.raises(ValueError, match="model"):
    mesh_lib.make_mesh(8, model=3)
  with pytest.raises(TypeError, match="num_devices"):
    mesh_lib.make_mesh(True)
  with pytest.raises(TypeError, match="model"):
    mesh_lib.make_mesh(8, model=2.0)


def test_shard_batch_any_device_order():
  """E3 (single-process form): global row i holds batch row i for a permuted device order."""
  devs = jax.devices()
  mesh = Mesh(np.array([devs[i] for i in (3, 0, 7, 1, 6, 2, 5, 4)]).reshape(4, 2),
              ("data", "model"))
  x = np.arange(16 * 3).reshape(16, 3)
  g = mesh_lib.shard_batch({"x": x}, mesh)["x"]
  assert g.sharding.spec == P("data")
  for s in g.addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])
  rows = mesh_lib.host_rows(mesh, 16)
  np.testing.assert_array_equal(rows, np.arange(16))
  g2 = mesh_lib.shard_batch({"x": x[rows]}, mesh, rows=rows, global_size=16)["x"]
  np.testing.assert_array_equal(np.asarray(g2), x)
  idx, vals = mesh_lib.host_local_rows(g2)
  np.testing.assert_array_equal(idx, np.arange(16))
  np.testing.assert_array_equal(vals, x)
  with pytest.raises(ValueError, match="multiple"):
    mesh_lib.shard_batch({"x": x[:6]}, mesh)
  with pytest.raises(ValueError, match="cover"):
    mesh_lib.shard_batch({"x": x[:8]}, mesh, rows=np.arange(8), global_size=16)


def test_logical_axis_rules():
  mesh = mesh_lib.make_mesh(8, model=2)
  spec = lambda names, shape: mesh_lib.logical_to_mesh_spec(names, shape, mesh)
  assert spec(("embed", "mlp"), (4, 8)) == P(None, "model")
  assert spec(("vocab", "embed"), (10, 4)) == P("model", None)
  assert spec(("embed", "mlp"), (4, 7)) == P(None, None)  # not divisible: left whole
  assert spec(("mlp", "heads"), (4, 4)) == P("model", None)  # one mesh axis per array
  assert spec(("unknown",), (4,)) == P(None)
  assert spec(None, (4,)) == P()
  one = mesh_lib.make_mesh(8)  # a model axis of size 1 splits nothing
  assert mesh_lib.logical_to_mesh_spec(("embed", "mlp"), (4, 8), one) == P(None, None)


class _TPMLP(nnx.Module):
  """A 2-layer MLP annotated for Megatron-style tensor parallelism (column- then row-split)."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.fc1 = nnx.Linear(12, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
                          rngs=rngs)
    self.fc2 = nnx.Linear(32, 6, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                          rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


def _tp_setup(mesh):
  with nnx.use_eager_sharding(False):  # annotations are metadata; placement is explicit below
    model = _TPMLP(nnx.Rngs(0))
  tx = train.make_optimizer({"name": "adam", "learning_rate": 1e-2}, 4)
  loss = train.make_distill_loss("forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5,
                                 scale_by_t2=True)
  g, st = train.create_train_state(model, tx)
  if mesh is None:
    return st, train.make_train_step(g, tx, loss, donate=False)
  sh = mesh_lib.state_shardings(st, mesh)
  return mesh_lib.place(st, sh), train.make_train_step(g, tx, loss, state_sharding=sh,
                                                       donate=False)


def test_model_axis_step_equals_single_device():
  """Parameters split over `model` by their NNX annotations; loss and params match 1 device."""
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(16, 12)).astype(np.float32),
              "y": rng.integers(0, 6, size=16).astype(np.int32),
              "teacher_logits": rng.normal(size=(16, 6)).astype(np.float32)} for _ in range(3)]
  mesh = mesh_lib.make_mesh(8, model=2)
  st1, step1 = _tp_setup(None)
  st8, step8 = _tp_setup(mesh)
  k1 = st8.params["fc1"]["kernel"][...]
  assert k1.sharding.spec == P(None, "model") and k1.addressable_shards[0].data.shape == (12, 16)
  assert st8.params["fc2"]["kernel"][...].sharding.spec == P("model", None)
  mu = st8.opt_state[0].mu["fc1"]["kernel"][...]  # optax moments inherit the annotation
  assert mu.sharding.spec == P(None, "model")
  for b in batches:
    st1, m1 = step1(st1, {k: jnp.asarray(v) for k, v in b.items()})
    st8, m8 = step8(st8, mesh_lib.shard_batch(b, mesh))
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  assert st8.params["fc1"]["kernel"][...].sharding.spec == P(None, "model")
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st8.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_train_loop_prefetch_equals_no_prefetch():
  """P5: the prefetching loop reads the same batches in the same order and ends equal."""
  rng = np.random.default_rng(1)
  arrays = {"x": rng.normal(size=(48, 12)).astype(np.float32),
            "y": rng.integers(0, 6, size=48).astype(np.int32),
            "teacher_logits": rng.normal(size=(48, 6)).astype(np.float32)}
  mesh = mesh_lib.make_mesh(8, model=2)
  sampler = data.BatchSampler(48, 16, seed=3)
  out = {}
  for prefetch in (False, True):
    st, step = _tp_setup(mesh)
    calls = []

    def get_batch(idx, calls=calls):
      calls.append(idx.copy())
      return {k: v[idx] for k, v in arrays.items()}

    st = train.train_loop(st, step, sampler=sampler, get_batch=get_batch, num_steps=5,
                          mesh=mesh, log_every=0, progress=False, prefetch=prefetch)
    out[prefetch] = (st, calls)
  (a, ca), (b, cb) = out[False], out[True]
  assert len(ca) == len(cb) == 5
  for i, j in zip(ca, cb):
    np.testing.assert_array_equal(i, j)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
