"""Fused linear-head distillation losses on whatever accelerator JAX finds: time and memory.

For ``jit(value_and_grad)`` w.r.t. the student's hidden states ``x_S [N, H]`` and head weight
``W_S [V, H]`` (teacher ``x_T [N, H]``, ``W_T [V, H]``, no gradient), two losses:

* ``jsd_ce``: generalized JSD (β = 0.5) + 0.5 · cross-entropy on random labels
  (``divergence="generalized_jsd", beta=0.5, labels=..., ce_weight=0.5``);
* ``forward_kl``: forward KL, no CE.

Implementations (one row each): ``plain`` — plain JAX under ``jit``: both logits materialised
(``x @ W.T``, bf16 inputs, float32 accumulation and result) and the loss from
``kdjax.divergences`` + ``optax.softmax_cross_entropy_with_integer_labels``; and
``kdjax.losses.fused_linear.fused_linear_distillation(..., implementation=...)`` with
``reference``, ``chunked``, ``streaming`` and ``pallas``. Any exception in a row (a missing
kernel, an out-of-memory, a lowering error) prints that row as ``n/a: <reason>``; the table is
always printed.

Also measured in the same run: the **4-GEMM floor**, the four bf16 matmuls of one fused step and
nothing else (x_S W_S^T, x_T W_T^T, dz W_S, dz^T x_S; float32 accumulation), timed exactly like
the rows; every row prints its ratio to ``plain`` and to the floor.

Time: median (and min) wall time over ``--reps`` calls after ``--warmup`` calls, each
``block_until_ready``. Memory, two columns:

* ``peak GB``: ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` at the end of the row
  (GPU/TPU). The peak cannot be reset, so with ``--isolate=auto`` (the default on a device that
  has ``memory_stats``) every row runs in a **fresh subprocess** of this script: the number is
  the whole process's peak for that one row — inputs (~2.3 GB at the full bf16 shape), outputs
  and temporaries, like Liger-Kernel's ``torch.cuda.max_memory_allocated``. ``+GB`` is the
  increase of that peak over the bytes in use just before the row's first call (the live
  inputs). In one process (``--isolate=no``) the peak column is left empty. On CPU
  ``memory_stats()`` is None: the column says ``n/a (CPU)``.
* ``XLA temp+args GB``: the compile-time ``compiled.memory_analysis()`` temp + argument bytes of
  the row's program (every backend; on CPU this is the only memory number).

Rows run in a shuffled interleaved order in one process (``--isolate=no``, the default on CPU,
where the cores are shared and noisy), or one after another, one subprocess each.

  python benchmarks/fused_linear_device.py                      # N=8192 H=4096 V=128256 bf16, GPU
  python benchmarks/fused_linear_device.py --small              # N=512 H=256 V=8192, 5 reps: CPU
  python benchmarks/fused_linear_device.py --implementations=plain,streaming --losses=forward_kl
  python benchmarks/fused_linear_device.py --json=/tmp/device.json

At the full shape on one GPU: 11 rows (5 implementations x 2 losses + the floor), 20 reps, one
subprocess each (start-up, compile, 2 warm-ups and the reps: an estimate of 10-25 s per row, not
yet measured on a GPU); ``--row_timeout`` (120 s) bounds one row and rows not started within
``--budget_s`` (280 s) print ``n/a: skipped (time budget)``, so the command ends in about 5
minutes whatever happens. A plain-JAX row needs ~20+ GB and prints ``n/a: OOM`` where it does
not fit. The parent process does not preallocate GPU memory (``XLA_PYTHON_CLIENT_PREALLOCATE=
false`` for itself only); each row's subprocess gets the caller's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import divergences
from kdjax.losses import fused_linear as fl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_linear_speed import floor_step, make_inputs  # pylint: disable=wrong-import-position

GB = 1e9
IMPLEMENTATIONS = ("plain", "reference", "chunked", "streaming", "pallas")
LOSSES = {
    "jsd_ce": dict(divergence="generalized_jsd", beta=0.5, ce_weight=0.5, labels=True,
                   title="JSD(beta=0.5) + 0.5 CE"),
    "forward_kl": dict(divergence="forward_kl", beta=0.5, ce_weight=0.0, labels=False,
                       title="forward KL"),
}
SMALL = dict(n=512, h=256, v=8192, reps=5, warmup=1)
FULL = dict(n=8192, h=4096, v=128256, reps=20, warmup=2)
ROW_TAG = "@@ROW "
CHILD_ENV = dict(os.environ)   # the environment the per-row subprocesses get

# Liger-Kernel's own benchmark data (one GPU, N=8192, H=4096, V=128256, bf16, fwd+bwd).
LIGER_REFERENCE = (
    ("Liger chunked JSD + CE", "H100", 60.7, 11.1),
    ("Liger fused-linear JSD", "H100", 182.6, 8.7),
    ("Liger FusedLinearKLDivLoss", "A100", 129.2, 2.0),
    ("4-GEMM compute floor (estimate)", "H100/H200", 35.0, None),
)


# ----------------------------------------------------------------------------- programs


def plain_loss(loss_name: str, temperature: float):
  """Plain JAX: materialised float32 logits, kdjax.divergences + optax CE, mean over tokens."""
  spec = LOSSES[loss_name]

  def loss(x_s, w_s, x_t, w_t, labels):
    zs = jnp.einsum("nh,vh->nv", x_s, w_s, preferred_element_type=jnp.float32)
    zt = jax.lax.stop_gradient(
        jnp.einsum("nh,vh->nv", x_t, w_t, preferred_element_type=jnp.float32))
    if spec["divergence"] == "generalized_jsd":
      per = divergences.generalized_jsd(zs, zt, beta=spec["beta"], temperature=temperature)
    else:
      per = divergences.forward_kl(zs, zt, temperature=temperature)
    if spec["labels"]:
      per = per + spec["ce_weight"] * optax.softmax_cross_entropy_with_integer_labels(zs, labels)
    return jnp.mean(per)

  return loss


def fused_loss(loss_name: str, implementation: str, temperature: float, chunk_size: int,
               tile_size: int):
  spec = LOSSES[loss_name]

  def loss(x_s, w_s, x_t, w_t, labels):
    return fl.fused_linear_distillation(
        x_s, w_s, x_t, w_t, divergence=spec["divergence"], beta=spec["beta"],
        labels=labels if spec["labels"] else None, ce_weight=spec["ce_weight"],
        temperature=temperature, implementation=implementation, chunk_size=chunk_size,
        tile_size=tile_size).mean()

  return loss


def _inputs(a):
  # Under jit the RNG and the cast fuse: no float32 [V, H] temporary inflates the process's peak
  # before the row runs (the peak cannot be reset; the worker records it as peak_before).
  x_s, w_s, x_t, w_t = jax.jit(make_inputs, static_argnums=(0, 1, 2, 3))(
      a.n, a.h, a.v, jnp.dtype(a.dtype))
  labels = jax.random.randint(jax.random.key(7), (a.n,), 0, a.v, jnp.int32)
  return x_s, w_s, x_t, w_t, labels


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    return dict(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                output=int(m.output_size_in_bytes))
  except Exception:  # pylint: disable=broad-except  (some backends return None)
    return {}


def build_row(key, a, args):
  """(callable args -> outputs, compile-time memory dict) of one row; compiles once."""
  loss_name, impl = key
  if impl == "floor":  # fused_linear_speed.floor_step: the four matmuls, a bf16 [N, V] dz
    four = floor_step(a.n, a.v, jnp.dtype(a.dtype))
    return (lambda xs: four(xs[:4])), {}
  if impl == "plain":
    loss = plain_loss(loss_name, a.temperature)
  else:
    loss = fused_loss(loss_name, impl, a.temperature, a.chunk_size, a.tile_size)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  return (lambda xs: compiled(*xs)), _memory(compiled)


def _reason(e: BaseException) -> str:
  msg = f"{type(e).__name__}: {e}"
  if any(s in msg for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")):
    return "OOM"
  msg = re.sub(r" \(/[^)]*\)", "", " ".join(msg.split()))  # drop file paths
  return msg if len(msg) <= 90 else msg[:87] + "..."


def _mem_stats():
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


# ----------------------------------------------------------------------------- running


def run_isolated_row(key, a, args) -> dict:
  """One row, start to end, in this process: compile, warm up, time; peak memory."""
  row = dict(loss=key[0], implementation=key[1])
  try:
    stats0 = _mem_stats()
    f, mem = build_row(key, a, args)
    row.update(mem)
    in_use0 = stats0.get("bytes_in_use") if stats0 else None
    if stats0 and "peak_bytes_in_use" in stats0:
      row["peak_before"] = int(stats0["peak_bytes_in_use"])
    for _ in range(a.warmup):
      out = jax.block_until_ready(f(args))
    if key[1] != "floor":
      row["value"] = float(out[0])
    del out
    times = []
    for _ in range(a.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(args))
      times.append(time.perf_counter() - t0)
    row["times_s"] = times
    stats = _mem_stats()
    if stats and "peak_bytes_in_use" in stats:
      row["peak"] = int(stats["peak_bytes_in_use"])
      if in_use0 is not None:
        row["peak_increase"] = int(stats["peak_bytes_in_use"]) - int(in_use0)
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = _reason(e)
    if a.verbose:
      traceback.print_exc()
  return row


def run_interleaved(keys, a, args) -> list[dict]:
  """All rows in this process: compile + warm up each, then shuffled interleaved rounds."""
  rows, fns = {}, {}
  for key in keys:
    row = rows[key] = dict(loss=key[0], implementation=key[1], times_s=[])
    try:
      f, mem = build_row(key, a, args)
      row.update(mem)
      for _ in range(a.warmup):
        out = jax.block_until_ready(f(args))
      if key[1] != "floor":
        row["value"] = float(out[0])
      del out
      fns[key] = f
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = _reason(e)
      if a.verbose:
        traceback.print_exc()
    print(f"# ready: {key[0]} / {key[1]}: {row.get('error', 'ok')}", file=sys.stderr, flush=True)
  rng = random.Random(0)
  for _ in range(a.reps):
    order = list(fns)
    rng.shuffle(order)
    for key in order:
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[key](args))
        rows[key]["times_s"].append(time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except
        rows[key]["error"] = _reason(e)
        del fns[key]
  return [rows[k] for k in keys]


def run_subprocess_row(key, a, argv) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--_row={key[0]}:{key[1]}"]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.row_timeout, check=False,
                       env=CHILD_ENV)
  except subprocess.TimeoutExpired:
    return dict(loss=key[0], implementation=key[1], error=f"timeout ({a.row_timeout} s)")
  for line in p.stdout.splitlines():
    if line.startswith(ROW_TAG):
      return json.loads(line[len(ROW_TAG):])
  tail = " ".join((p.stderr or "").strip().splitlines()[-1:])
  err = "OOM" if "RESOURCE_EXHAUSTED" in (p.stderr or "") else f"worker rc={p.returncode} {tail}"
  return dict(loss=key[0], implementation=key[1], error=_reason(RuntimeError(err)))


# ----------------------------------------------------------------------------- table


def _fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def print_table(rows, a, backend_has_stats, isolated, command, out=sys.stdout):
  dev = jax.devices()[0]
  p = lambda *s: print(*s, file=out)
  p(f"# command: {command}")
  p(f"# device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); "
    f"jax {jax.__version__}")
  p(f"# jit(value_and_grad) w.r.t. (x_S, W_S); N={a.n} H={a.h} V={a.v} {a.dtype}, "
    f"T={a.temperature}, chunk={a.chunk_size}, tile={a.tile_size}; median of {a.reps} reps "
    f"after {a.warmup} warm-up(s); "
    + ("one subprocess per row" if isolated else "one process, shuffled interleaved rounds"))
  if not backend_has_stats:
    p("# memory: memory_stats() is None on this backend -> no runtime peak; "
      "'XLA temp+args GB' is the compile-time memory_analysis() (temp + argument bytes)")
  elif not isolated:
    p("# memory: one process, so the runtime peak is not per row (column left empty)")
  else:
    p("# memory: peak GB = memory_stats()['peak_bytes_in_use'] of the row's own process "
      "(inputs included); +GB = peak - bytes_in_use before the row's first call")
  if "pallas" in a.implementations.split(",") and dev.platform == "cpu":
    p("# pallas on CPU runs in Pallas interpret mode: its CPU time is meaningless")
  med = {}
  for r in rows:
    if r.get("times_s") and "error" not in r:
      med[(r["loss"], r["implementation"])] = float(np.median(r["times_s"]))
  floor = med.get(("-", "floor"))
  p(f"# 4-GEMM floor (x_S W_S^T, x_T W_T^T, dz W_S, dz^T x_S): "
    f"{_fmt(None if floor is None else 1e3 * floor)} ms\n")
  p("| loss | implementation | median ms | min ms | / plain JAX | / 4-GEMM floor | peak GB "
    "| +GB | XLA temp+args GB | loss value |")
  p("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    k = (r["loss"], r["implementation"])
    name = "4-GEMM floor" if r["implementation"] == "floor" else LOSSES[r["loss"]]["title"]
    if "error" in r:
      p(f"| {name} | {r['implementation']} | n/a: {r['error'].replace('|', '/')} "
        f"| | | | | | | |")
      continue
    m = med.get(k)
    plain = med.get((r["loss"], "plain"))
    if backend_has_stats and isolated:
      peak, inc = _fmt(r.get("peak", 0) / GB, ".2f"), _fmt(r.get("peak_increase", 0) / GB, ".2f")
    elif backend_has_stats:
      peak, inc = "-", "-"
    else:
      peak, inc = "n/a (CPU)", "-"
    xla = (_fmt((r["temp"] + r["argument"]) / GB, ".3f") if "temp" in r else "-")
    p(f"| {name} | {r['implementation']} | {_fmt(1e3 * m)} | {_fmt(1e3 * min(r['times_s']))} | "
      f"{_fmt(None if plain is None or k[1] == 'floor' else m / plain, '.2f')} | "
      f"{_fmt(None if floor is None else m / floor, '.2f')} | {peak} | {inc} | {xla} | "
      f"{_fmt(r.get('value'), '.5f')} |")
  flat = [f"{r['loss']}/{r['implementation']}" for r in rows
          if "peak" in r and r["peak"] <= r.get("peak_before", -1)]
  if flat:
    p(f"# note: for {', '.join(flat)} the process peak was reached before the row ran (while "
      "creating the inputs): their peak GB is an upper bound")
  p("\nFor comparison, Liger-Kernel's own benchmark data (one GPU, N=8192, H=4096, V=128256, "
    "bf16, forward + backward):\n")
  p("| kernel | GPU | ms | peak GB |")
  p("|---|---|---|---|")
  for name, gpu, ms, gb in LIGER_REFERENCE:
    p(f"| {name} | {gpu} | {ms:.1f} | {_fmt(gb)} |")


# ----------------------------------------------------------------------------- main


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--small", action="store_true",
                 help=f"CPU-sized defaults {SMALL} (explicit --n/--h/--v/--reps still win)")
  p.add_argument("--n", type=int, default=None, help=f"tokens (default {FULL['n']})")
  p.add_argument("--h", type=int, default=None, help=f"hidden size (default {FULL['h']})")
  p.add_argument("--v", type=int, default=None, help=f"vocabulary (default {FULL['v']})")
  p.add_argument("--reps", type=int, default=None, help=f"timed calls (default {FULL['reps']})")
  p.add_argument("--warmup", type=int, default=None,
                 help=f"untimed calls after compiling (default {FULL['warmup']})")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--chunk_size", type=int, default=512, help="'chunked' token chunk")
  p.add_argument("--tile_size", type=int, default=4096, help="'streaming' vocabulary tile")
  p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  p.add_argument("--losses", default=",".join(LOSSES))
  p.add_argument("--no_floor", action="store_true", help="skip the 4-GEMM floor")
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="one subprocess per row (auto: where memory_stats() exists)")
  p.add_argument("--row_timeout", type=float, default=120.0, help="seconds per subprocess row")
  p.add_argument("--budget_s", type=float, default=280.0,
                 help="subprocess rows not started after this many seconds print "
                 "'n/a: skipped (time budget)'")
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
  p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  base = SMALL if a.small else FULL
  for k, v in base.items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  for impl in a.implementations.split(","):
    if impl not in IMPLEMENTATIONS:
      p.error(f"--implementations: {impl!r} not in {IMPLEMENTATIONS}")
  for loss in a.losses.split(","):
    if loss not in LOSSES:
      p.error(f"--losses: {loss!r} not in {tuple(LOSSES)}")
  return a


def main(argv=None, out=sys.stdout) -> list[dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  a = parse(argv)
  args = None
  if a._row is not None:  # pylint: disable=protected-access  (worker: one row, JSON out)
    loss, impl = a._row.split(":")  # pylint: disable=protected-access
    args = _inputs(a)
    row = run_isolated_row((loss, impl), a, args)
    print(ROW_TAG + json.dumps(row), flush=True)
    return [row]

  keys = [] if a.no_floor else [("-", "floor")]
  keys += [(loss, impl) for loss in a.losses.split(",") for impl in a.implementations.split(",")]
  has_stats = _mem_stats() is not None
  isolated = a.isolate == "yes" or (a.isolate == "auto" and has_stats)
  command = "python benchmarks/fused_linear_device.py " + " ".join(shlex.quote(x) for x in argv)
  t0 = time.perf_counter()
  if isolated:
    rows = []
    for key in keys:
      if time.perf_counter() - t0 > a.budget_s:
        rows.append(dict(loss=key[0], implementation=key[1],
                         error=f"skipped (time budget {a.budget_s:.0f} s)"))
        continue
      rows.append(run_subprocess_row(key, a, argv))
      print(f"# done: {key[0]} / {key[1]}: {rows[-1].get('error', 'ok')} "
            f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  else:
    args = _inputs(a)
    rows = run_interleaved(keys, a, args)
  print_table(rows, a, has_stats, isolated, command, out=out)
  print(f"\n# total wall time {time.perf_counter() - t0:.0f} s", file=out)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(command=command, n=a.n, h=a.h, v=a.v, dtype=a.dtype,
                     temperature=a.temperature, reps=a.reps, warmup=a.warmup,
                     device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                     jax=jax.__version__, isolated=isolated, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  # The parent of the per-row subprocesses must not preallocate most of the GPU's memory (JAX's
  # default, at its first device query) or the rows would run in what is left; the rows get the
  # caller's environment unchanged (CHILD_ENV). Nothing above has initialised a backend yet.
  if not any(x.startswith("--_row") for x in sys.argv[1:]):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  main()
