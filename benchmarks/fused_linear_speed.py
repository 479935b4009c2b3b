"""Wall time of value-and-grad for the fused linear-head distillation losses.

Each variant is ``jit(value_and_grad)`` w.r.t. the student's hidden states and head weight. The
baselines are measured in the same run: the ``reference`` implementation (materialised logits)
and the *four-matmul floor* — the four LM-head matmuls any implementation must do (student
logits, teacher logits, d-hidden = G W_S, d-weight = G^T x_S) with nothing else. Repetitions of
all variants are interleaved (a shuffled round per repetition) and medians are reported, so a
noisy, shared machine slows all variants alike. The same command runs on GPU/TPU.

  python benchmarks/fused_linear_speed.py                          # N=2048 H=512 V=32000
  python benchmarks/fused_linear_speed.py --reps=9 --divergences=forward_kl,generalized_jsd
  python benchmarks/fused_linear_speed.py --n=8192 --h=4096 --v=128256 --dtype=bfloat16  # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kdjax.losses import fused_linear as fl


def make_inputs(n, h, v, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x_s = jax.random.normal(k[0], (n, h), jnp.float32).astype(dtype)
  w_s = (jax.random.normal(k[1], (v, h), jnp.float32) / np.sqrt(h)).astype(dtype)
  x_t = jax.random.normal(k[2], (n, h), jnp.float32).astype(dtype)
  w_t = (jax.random.normal(k[3], (v, h), jnp.float32) / np.sqrt(h)).astype(dtype)
  return x_s, w_s, x_t, w_t


def loss_step(divergence, implementation, size):
  kw = dict(divergence=divergence, temperature=2.0, implementation=implementation)
  if implementation == "chunked":
    kw["chunk_size"] = size
  elif implementation == "streaming":
    kw["tile_size"] = size

  def loss(x_s, w_s, x_t, w_t):
    return fl.fused_linear_distillation(x_s, w_s, x_t, w_t, **kw).mean()

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda args: f(*args)


def floor_step(n, v, dtype):
  """The four matmuls of a fused head loss, and nothing else."""
  g = jax.random.normal(jax.random.key(1), (n, v), jnp.float32).astype(dtype)

  @jax.jit
  def four(x_s, w_s, x_t, w_t, g):
    mm = lambda a, b, eq: jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    return (mm(x_s, w_s, "nh,vh->nv"), mm(x_t, w_t, "nh,vh->nv"),
            mm(g, w_s, "nv,vh->nh"), mm(g, x_s, "nv,nh->vh"))

  return lambda args: four(*args, g)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", type=int, default=2048)
  p.add_argument("--h", type=int, default=512)
  p.add_argument("--v", type=int, default=32000)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--divergences", default="forward_kl")
  p.add_argument("--chunks", default="256,512,1024")
  p.add_argument("--tiles", default="2048,4096,8192")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)

  dtype = jnp.dtype(a.dtype)
  args = make_inputs(a.n, a.h, a.v, dtype)
  steps = {("floor", "-", None): floor_step(a.n, a.v, dtype)}
  for div in a.divergences.split(","):
    steps[(div, "reference", None)] = loss_step(div, "reference", None)
    for c in a.chunks.split(","):
      steps[(div, "chunked", int(c))] = loss_step(div, "chunked", int(c))
    for t in a.tiles.split(","):
      steps[(div, "streaming", int(t))] = loss_step(div, "streaming", int(t))

  for f in tqdm(steps.values(), desc="compile+warm-up", file=sys.stderr):
    jax.block_until_ready(f(args))
  times = {k: [] for k in steps}
  rng = random.Random(0)
  for _ in tqdm(range(a.reps), desc="interleaved rounds", file=sys.stderr):
    order = list(steps)
    rng.shuffle(order)
    for k in order:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[k](args))
      times[k].append(time.perf_counter() - t0)

  med = {k: float(np.median(v)) for k, v in times.items()}
  floor = med[("floor", "-", None)]
  print(f"# jit(value_and_grad) wall time, N={a.n} H={a.h} V={a.v} {a.dtype}, T=2; "
        f"median of {a.reps} interleaved rounds; backend={jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
  print(f"# four-matmul floor: {1e3 * floor:.1f} ms\n")
  print("| divergence | implementation | chunk/tile | median ms | min ms | / reference "
        "| / four-matmul floor |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for (div, impl, size), m in med.items():
    if div == "floor":
      continue
    ref = med[(div, "reference", None)]
    print(f"| {div} | {impl} | {size or '-'} | {1e3 * m:.1f} | "
          f"{1e3 * min(times[(div, impl, size)]):.1f} | {m / ref:.2f} | {m / floor:.2f} |")
    rows.append(dict(divergence=div, implementation=impl, size=size, median_s=m,
                     times_s=times[(div, impl, size)]))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(n=a.n, h=a.h, v=a.v, dtype=a.dtype, floor_s=floor,
                     floor_times_s=times[("floor", "-", None)], rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
