"""One process of the 2-process loopback check in tests/test_multihost.py (not a pytest file).

Usage: python tests/multihost_worker.py <port> <process_id>. Exits 0 when every check passed.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("NPROC", "4")  # >= 2 x devices: avoids the 2-core all-reduce deadlock

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
PORT, PID = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=2,
                           process_id=PID)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from experiments import data, mesh as mesh_lib, models, train  # noqa: E402


def check(cond, what):
  if not cond:
    raise AssertionError(f"process {PID}: {what}")


def main():
  assert jax.process_count() == 2 and jax.device_count() == 4
  by_proc = {p: [d for d in jax.devices() if d.process_index == p] for p in (0, 1)}
  # Interleaved (non-process-major) device order, as a TPU ring order can be.
  order = [by_proc[0][0], by_proc[1][0], by_proc[0][1], by_proc[1][1]]
  mesh = Mesh(np.array(order).reshape(4, 1), ("data", "model"))

  # E3: global row i holds host row i, whatever the device order.
  x = np.arange(8)
  g = mesh_lib.shard_batch({"x": x}, mesh)["x"]
  for s in g.addressable_shards:
    check(np.array_equal(np.asarray(s.data), x[s.index[0]]),
          f"shard at {s.index[0]} holds {np.asarray(s.data)}")
  # Host-local input: this process reads only the rows its devices hold.
  rows = mesh_lib.host_rows(mesh, 8)
  check(list(rows) == ([0, 1, 4, 5] if PID == 0 else [2, 3, 6, 7]), f"host_rows {rows}")
  g2 = mesh_lib.shard_batch({"x": x[rows] * 10}, mesh, rows=rows, global_size=8)["x"]
  for s in g2.addressable_shards:
    check(np.array_equal(np.asarray(s.data), 10 * x[s.index[0]]), "shard_batch(rows=)")
  check(np.array_equal(mesh_lib.to_host(g2), 10 * x), "to_host of the assembled batch")

  # KD targets align with their inputs: the teacher's logits of row i are those of x[i].
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(20, 6)).astype(np.float32)
  ys = rng.integers(0, 4, size=20).astype(np.int32)
  teacher = models.build_model({"kind": "mlp", "hidden": [8]}, input_shape=(6,), num_classes=4,
                               seed=0)
  g_t, st_t = train.create_train_state(teacher, train.make_optimizer({}, 1))
  ref = np.asarray(jax.jit(lambda p, a: __import__("flax").nnx.merge(g_t, p)(a))(
      st_t.params, xs))
  placed = mesh_lib.place(st_t.params, mesh_lib.state_shardings(st_t.params, mesh))
  full = train.predict_logits(g_t, placed, xs, mesh=mesh, batch_size=8)
  check(np.allclose(full, ref, atol=1e-5), "predict_logits rows permuted")
  idx, local = train.predict_logits(g_t, placed, xs, mesh=mesh, batch_size=8, host_local=True)
  check(len(idx) < len(xs) and len(set(idx)) == len(idx), f"host-local indices {idx}")
  check(np.allclose(local, ref[idx], atol=1e-5), "host-local logits do not match their rows")

  # Distillation on the interleaved mesh == the same run on one local device.
  arrays = {"x": xs[:16], "y": ys[:16], "teacher_logits": ref[:16]}
  loss = train.make_distill_loss("forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5)
  student = lambda: models.build_model({"kind": "mlp", "hidden": [8]}, input_shape=(6,),
                                       num_classes=4, seed=1)
  tx = train.make_optimizer({"name": "adam", "learning_rate": 1e-2}, 6)
  sampler = data.BatchSampler(16, 8, seed=0)
  seen = []

  def get_batch(i):
    seen.append(len(i))
    return {k: v[i] for k, v in arrays.items()}

  g_s, st = train.create_train_state(student(), tx)
  sh = mesh_lib.state_shardings(st, mesh)
  st = train.train_loop(mesh_lib.place(st, sh),
                        train.make_train_step(g_s, tx, loss, state_sharding=sh),
                        sampler=sampler, get_batch=get_batch, num_steps=6, mesh=mesh,
                        log_every=0, progress=False)
  check(set(seen) == {4}, f"each process reads only its 4 of 8 rows, read {seen}")
  _, st1 = train.create_train_state(student(), tx)
  step1 = train.make_train_step(g_s, tx, loss, donate=False)
  for _, i in sampler.iterate(0, 6):
    st1, _ = step1(st1, {k: jnp.asarray(v[i]) for k, v in arrays.items()})
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st.params)):
    check(np.allclose(mesh_lib.to_host(b), np.asarray(a), rtol=1e-5, atol=1e-6),
          "4-device interleaved training differs from 1 device")

  # E12: fewer devices than exist keeps one per process; an uneven count is rejected.
  m2 = mesh_lib.make_mesh(2)
  check({d.process_index for d in m2.devices.flat} == {0, 1}, "make_mesh(2) left a process out")
  try:
    mesh_lib.make_mesh(3)
    check(False, "make_mesh(3) accepted")
  except ValueError as e:
    check("processes" in str(e), str(e))
  print(f"process {PID}: all multi-host checks passed", flush=True)


if __name__ == "__main__":
  main()
