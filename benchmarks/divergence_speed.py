"""Wall time and memory of value-and-grad of `kdjax.divergences.forward_kl` against plain JAX.

The baseline is the textbook forward KL written with ``jax.nn.log_softmax`` (no masks, no -inf
handling, no NaN rules): ``sum(exp(lpt) * (lpt - lps), -1)``. Both are ``jit(value_and_grad)`` of
the mean over positions w.r.t. the student logits, measured in the same run, without and with a
``[B, T]`` token (position) mask. Repetitions are interleaved (a shuffled round per repetition)
and medians reported, so a noisy, shared machine slows both alike. Memory is XLA's compile-time
``memory_analysis()`` temp bytes (deterministic). The same command runs on GPU/TPU.

  python benchmarks/divergence_speed.py                       # [4, 256, 8192] float32, T = 2
  python benchmarks/divergence_speed.py --reps=41 --shape=4,256,8192
"""

from __future__ import annotations

import argparse
import json
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as D


def plain_forward_kl(s, t, temperature):
  lps = jax.nn.log_softmax(s / temperature, axis=-1)
  lpt = jax.nn.log_softmax(t / temperature, axis=-1)
  return jnp.sum(jnp.exp(lpt) * (lpt - lps), axis=-1)


def make_steps(temperature):
  def plain(s, t):
    return jnp.mean(plain_forward_kl(s, t, temperature))

  def plain_masked(s, t, m):
    v = jnp.where(m, plain_forward_kl(s, t, temperature), 0.0)
    return jnp.sum(v) / jnp.maximum(jnp.sum(m), 1)

  def kdjax(s, t):
    return jnp.mean(D.forward_kl(s, t, temperature=temperature))

  def kdjax_masked(s, t, m):
    v = D.forward_kl(s, t, temperature=temperature, where=m)
    return jnp.sum(v) / jnp.maximum(jnp.sum(m), 1)

  vg = lambda f: jax.jit(jax.value_and_grad(f))
  return {"plain": vg(plain), "kdjax": vg(kdjax), "plain+mask": vg(plain_masked),
          "kdjax+mask": vg(kdjax_masked)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="4,256,8192")
  ap.add_argument("--reps", type=int, default=21)
  ap.add_argument("--temperature", type=float, default=2.0)
  ap.add_argument("--json", action="store_true", help="print one JSON object instead")
  args = ap.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  s = jax.random.normal(k1, shape, jnp.float32) * 3
  t = jax.random.normal(k2, shape, jnp.float32) * 3
  m = jax.random.uniform(k3, shape[:-1]) < 0.8
  steps = make_steps(args.temperature)
  inputs = {name: (s, t, m) if "mask" in name else (s, t) for name in steps}

  temp_bytes, times = {}, {name: [] for name in steps}
  for name, f in steps.items():
    compiled = f.lower(*inputs[name]).compile()
    temp_bytes[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    jax.block_until_ready(f(*inputs[name]))          # warm-up
  # Same value and gradient (a sanity check, not a timing).
  for a, b in (("plain", "kdjax"), ("plain+mask", "kdjax+mask")):
    (va, ga), (vb, gb) = steps[a](*inputs[a]), steps[b](*inputs[b])
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-9)
  order = list(steps)
  for _ in range(args.reps):
    random.shuffle(order)
    for name in order:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name](*inputs[name]))
      times[name].append(time.perf_counter() - t0)
  med = {name: float(np.median(v)) for name, v in times.items()}
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "shape": list(shape), "reps": args.reps,
      "median_s": med, "temp_bytes": temp_bytes,
      "time_ratio": {"no mask": med["kdjax"] / med["plain"],
                     "token mask": med["kdjax+mask"] / med["plain+mask"]},
      "temp_ratio": {"no mask": temp_bytes["kdjax"] / temp_bytes["plain"],
                     "token mask": temp_bytes["kdjax+mask"] / temp_bytes["plain+mask"]},
  }
  if args.json:
    print(json.dumps(result))
    return
  print(f"value_and_grad of forward KL, shape {shape} float32, T={args.temperature}, "
        f"{args.reps} interleaved reps, backend {result['backend']} ({result['device']})")
  print(f"{'variant':12s} {'median ms':>10s} {'temp MiB':>10s}")
  for name in steps:
    print(f"{name:12s} {1e3 * med[name]:10.2f} {temp_bytes[name] / 2**20:10.1f}")
  for k in ("no mask", "token mask"):
    print(f"kdjax / plain ({k}): time {result['time_ratio'][k]:.3f}x, "
          f"temp bytes {result['temp_ratio'][k]:.3f}x")


if __name__ == "__main__":
  main()
