"""Compile-time memory of value-and-grad for the fused linear-head distillation losses.

Nothing is allocated or executed: the inputs are ``jax.ShapeDtypeStruct``s and XLA's
``compiled.memory_analysis()`` reports the temporary, argument and output buffer sizes of the
value-and-grad program (w.r.t. the student's hidden states and head weight), a deterministic
static upper bound usable as a memory-regression check (anchors §4.5). It runs on whatever
backend JAX picks, so the same command gives the table on a GPU/TPU host.

  python benchmarks/fused_linear_memory.py                      # Liger's shape, f32 and bf16
  python benchmarks/fused_linear_memory.py --n=2048 --v=32000 --h=512 --divergences=forward_kl
  python benchmarks/fused_linear_memory.py --json=/tmp/mem.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from tqdm import tqdm

from kdjax.losses import fused_linear as fl

GB = 1e9


def naive_loss(divergence, temperature=2.0):
  """Plain JAX (jax.nn.log_softmax on materialised logits): the baseline of anchors §4.5."""
  def loss(x_s, w_s, x_t, w_t):
    ls = jax.nn.log_softmax(jnp.einsum("nh,vh->nv", x_s, w_s).astype(jnp.float32) / temperature)
    lt = jax.lax.stop_gradient(jax.nn.log_softmax(
        jnp.einsum("nh,vh->nv", x_t, w_t).astype(jnp.float32) / temperature))
    if divergence == "forward_kl":
      per = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    elif divergence == "reverse_kl":
      per = jnp.sum(jnp.exp(ls) * (ls - lt), -1)
    elif divergence == "generalized_jsd":  # beta = 0.5
      lm = jnp.logaddexp(lt, ls) - jnp.log(2.0)
      per = 0.5 * jnp.sum(jnp.exp(lt) * (lt - lm) + jnp.exp(ls) * (ls - lm), -1)
    else:  # skew 0.1
      lm = jnp.logaddexp(jnp.log(0.1) + lt, jnp.log(0.9) + ls)
      per = jnp.sum(jnp.exp(lt) * (lt - lm), -1)
    return jnp.mean(per)
  return loss


def analyse(n, h, v, dtype, divergence, implementation, size):
  """Memory analysis (bytes) of jit(value_and_grad) for one variant."""
  kw = dict(divergence=divergence, temperature=2.0, implementation=implementation)
  if implementation == "naive":
    loss = naive_loss(divergence)
  elif implementation == "chunked":
    kw["chunk_size"] = size
  elif implementation == "streaming":
    kw["tile_size"] = size

  if implementation != "naive":
    def loss(x_s, w_s, x_t, w_t):
      return fl.fused_linear_distillation(x_s, w_s, x_t, w_t, **kw).mean()

  args = [jax.ShapeDtypeStruct(s, dtype) for s in ((n, h), (v, h), (n, h), (v, h))]
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  m = compiled.memory_analysis()
  return dict(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
              output=int(m.output_size_in_bytes))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--h", type=int, default=4096)
  p.add_argument("--v", type=int, default=128256)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--divergences", default="forward_kl,generalized_jsd")
  p.add_argument("--chunks", default="256,512,1024", help="chunk sizes for 'chunked'")
  p.add_argument("--tiles", default="1024,4096,16384", help="tile sizes for 'streaming'")
  p.add_argument("--json", default=None, help="also write the rows here")
  a = p.parse_args(argv)

  variants = [("naive", None), ("reference", None)]
  variants += [("chunked", int(c)) for c in a.chunks.split(",")]
  variants += [("streaming", int(t)) for t in a.tiles.split(",")]
  jobs = [(d, div, impl, size) for d in a.dtypes.split(",") for div in a.divergences.split(",")
          for impl, size in variants]
  rows = []
  for dname, div, impl, size in tqdm(jobs, desc="compiling", file=sys.stderr):
    r = analyse(a.n, a.h, a.v, jnp.dtype(dname), div, impl, size)
    rows.append(dict(dtype=dname, divergence=div, implementation=impl, size=size, **r))

  floor = a.v * a.h * 4  # the float32 head-weight gradient (accumulator)
  print(f"# jit(value_and_grad) memory_analysis, N={a.n} H={a.h} V={a.v}, teacher H_T={a.h}, "
        f"T=2; backend={jax.default_backend()}, jax {jax.__version__}")
  print(f"# floor = one float32 V x H head-weight gradient = {floor / GB:.2f} GB\n")
  print("| params | divergence | implementation | chunk/tile | temp GB | temp / reference "
        "| temp / naive | temp / floor | arguments GB | outputs GB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    def base(name):
      return next(x for x in rows if x["dtype"] == r["dtype"] and
                  x["divergence"] == r["divergence"] and x["implementation"] == name)["temp"]
    print(f"| {r['dtype']} | {r['divergence']} | {r['implementation']} | {r['size'] or '-'} | "
          f"{r['temp'] / GB:.3f} | {100 * r['temp'] / base('reference'):.1f}% | "
          f"{100 * r['temp'] / base('naive'):.1f}% | "
          f"{r['temp'] / floor:.2f} | {r['argument'] / GB:.2f} | {r['output'] / GB:.2f} |")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(n=a.n, h=a.h, v=a.v, backend=jax.default_backend(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
