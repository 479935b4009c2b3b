"""Train-step throughput and compile-time memory of the lm_distill student: reference vs streaming.

The step is the experiment's own: ``experiments.tasks.lm_distill.make_step`` built as
``_train_arm`` builds it (default ``experiments/configs/lm_distill.py`` config: student
Transformer d=64, 2 layers, 2 heads, MLP 256; batch 16 sentences x 32 tokens; AdamW with
warm-up cosine and clipping; one arm, ``online:forward_kl``: fresh teacher samples every step,
forward KL over the full vocabulary through ``fused_linear_distillation(teacher_logits=...)``).
Only ``config.vocab`` (V'; the head has V'+1 outputs) and ``config.loss_implementation`` change
between rows. ``config.teacher = "oracle"``: teacher and data source are the exact n-gram oracle
(``NGramTeacher.from_oracle(ngram.ngram_oracle(V'))``) where it can be built, or

* ``table``: a random dense teacher, ``log p(. | h1) = table[h1 mod K]`` with a fixed random
  ``[K, V'+1]`` log-prob table (K = 256 rows; sampling by inverse CDF, like the oracle). The
  n-gram oracle cannot be built for V' >= 46,340 (its int32 context keys (V'+2)^2 overflow:
  ``ValueError: vocab_size too large for int32 context keys``), so 65,536 outputs use it.

Either way the teacher's log-probs ``[B, L, V'+1]`` (float32) are computed inside the step and
are an input of the loss, and the step computes its progress-bar accuracy from one argmax over
materialised student logits ``[B, L, V'+1]`` (no gradient): the memory the fused loss can save
is only the student side of the loss.

Two tables:

1. the whole train step (one ``jax.jit``, state donated): median wall time over ``--reps``
   steps after ``--warmup`` (tokens/s = batch * seq_len / time), and the compiled step's
   ``memory_analysis()`` (temp, argument, output bytes); rows of one vocabulary size run in
   shuffled interleaved rounds;
2. the loss alone: ``jit(value_and_grad(loss_from_hidden))`` w.r.t. the student's hidden states,
   head weight and bias, teacher log-probs an argument: ``memory_analysis()`` only.

  python benchmarks/lm_student_step.py                              # 8,192 and 65,536 outputs
  python benchmarks/lm_student_step.py --outputs=8192 --reps=5 --implementations=reference,streaming
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from experiments import mesh as mesh_lib  # pylint: disable=wrong-import-position
from experiments import teachers as T  # pylint: disable=wrong-import-position
from experiments import train  # pylint: disable=wrong-import-position
from experiments.tasks import lm_distill  # pylint: disable=wrong-import-position

MB = 2**20
ARM = ("online", "forward_kl")
_ORACLE_MAX_VOCAB = 46_339   # (V'+2)^2 < 2^31 for experiments.ngram.build_tables


@struct.dataclass
class TableTeacher:
  """A random dense next-token teacher: ``log p(. | prefix) = table[h1 mod K]`` (h1 = the token
  before the position, ``<s>`` at the start). Same interface as ``experiments.teachers``;
  sampling by inverse CDF (one uniform and one binary search per token, as the oracle does)."""

  table: jax.Array                                # [K, V'+1] log-probs
  cdf: jax.Array                                  # [K, V'+1] row-wise cumulative probabilities
  bos_id: int = struct.field(pytree_node=False)

  @classmethod
  def random(cls, vocab: int, rows: int = 256, seed: int = 0) -> "TableTeacher":
    z = 2.0 * jax.random.normal(jax.random.key(seed), (rows, vocab + 1), jnp.float32)
    lp = jax.nn.log_softmax(z, axis=-1)
    return cls(table=lp, cdf=jnp.cumsum(jnp.exp(lp), axis=-1), bos_id=vocab + 1)

  @property
  def num_outputs(self) -> int:
    return int(self.table.shape[1])

  def log_probs(self, tokens, where=None):
    h1 = T.shift_right(tokens, self.bos_id)
    lp = self.table[h1 % self.table.shape[0]]
    if where is None:
      return lp
    return jnp.where(jnp.asarray(where, bool)[..., None], lp, -jnp.log(lp.shape[-1] * 1.0))

  def sample(self, key, num: int, max_len: int):
    last = self.table.shape[1] - 1

    def body(prev, k):
      c = self.cdf[prev % self.cdf.shape[0]]                      # [num, V'+1]
      u = jax.random.uniform(k, (c.shape[0],)) * c[:, -1]
      tok = jnp.minimum(jax.vmap(jnp.searchsorted)(c, u), last).astype(jnp.int32)
      return tok, tok
    _, toks = jax.lax.scan(body, jnp.full((int(num),), self.bos_id, jnp.int32),
                           jax.random.split(key, int(max_len)))
    return T.sentence_mask(toks.T)


def load_config(vocab: int, implementation: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments",
                      "configs", "lm_distill.py")
  spec = importlib.util.spec_from_file_location("lm_distill_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.vocab = int(vocab)
  c.teacher = "oracle"
  c.arms = (f"{ARM[0]}:{ARM[1]}",)
  c.loss_implementation = implementation
  c.progress = False
  lm_distill.validate(c)
  return c


def make_teacher(kind: str, vocab: int):
  if kind == "oracle":
    from experiments import ngram  # pylint: disable=import-outside-toplevel
    return T.NGramTeacher.from_oracle(ngram.ngram_oracle(int(vocab)))
  return TableTeacher.random(int(vocab))


def _mem(compiled) -> dict:
  m = compiled.memory_analysis()
  return dict(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
              output=int(m.output_size_in_bytes))


def build_step(vocab: int, implementation: str, teacher, steps: int):
  """The experiment's student step for one arm, compiled; returns (run, state, memory)."""
  config = load_config(vocab, implementation)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  bos = config.vocab + 1
  seed = config.seed + 1                                     # _train_arm: the students' seed
  model = T.build_lm(config.student, vocab_size=config.vocab, seq_len=config.seq_len, seed=seed)
  tx = train.make_optimizer(config.optimizer, steps)
  graphdef, state = train.create_train_state(model, tx)
  shardings = mesh_lib.state_shardings(state, mesh, fsdp=bool(config.fsdp))
  state = mesh_lib.place(state, shardings)
  spec = lm_distill.arm_spec(config.arms)
  step_jit = lm_distill.make_step(graphdef, tx, config=config, bos_id=bos, modes=spec[0],
                                  objectives=spec[1], state_sharding=shardings)
  phase_key = lm_distill._phase_key(seed, f"student_{ARM[0]}_{ARM[1]}")  # pylint: disable=protected-access
  arm = lm_distill.arm_inputs(ARM[0], ARM[1], spec[1], phase_key)
  batch = {"tokens": np.zeros((config.batch_size, config.seq_len), np.int32),
           "mask": np.zeros((config.batch_size, config.seq_len), bool)}
  compiled = step_jit.lower(state, batch, teacher, teacher, arm).compile()
  run = lambda st: compiled(st, batch, teacher, teacher, arm)
  return run, state, _mem(compiled), config


def loss_program(vocab: int, implementation: str, config):
  """jit(value_and_grad(loss_from_hidden)) w.r.t. (h, head_w, head_b), compiled; and its
  memory_analysis."""
  b, length, d, v = config.batch_size, config.seq_len, config.student.d_model, vocab + 1
  args = (jax.ShapeDtypeStruct((b, length, d), jnp.float32),
          jax.ShapeDtypeStruct((v, d), jnp.float32), jax.ShapeDtypeStruct((v,), jnp.float32),
          jax.ShapeDtypeStruct((b, length), jnp.int32), jax.ShapeDtypeStruct((b, length), bool),
          jax.ShapeDtypeStruct((b, length, v), jnp.float32))

  def f(h, w, bias, tok, mask, t_lp):
    return lm_distill.loss_from_hidden(h, w, bias, tok, mask, t_lp, objective=ARM[1],
                                       beta=config.beta, tile_size=config.tile_size,
                                       implementation=implementation)

  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled, _mem(compiled)


def loss_memory(vocab: int, implementation: str, config) -> dict:
  """memory_analysis of :func:`loss_program`."""
  return loss_program(vocab, implementation, config)[1]


def loss_inputs(vocab: int, teacher, config):
  """A batch of the step's data: teacher samples, their log-probs; random student h, W, b."""
  k = jax.random.split(jax.random.key(3), 4)
  tok, mask = jax.jit(lambda t, key: t.sample(key, config.batch_size, config.seq_len))(
      teacher, k[0])
  t_lp = jax.jit(lambda t, x: t.log_probs(x))(teacher, tok)
  d = config.student.d_model
  h = jax.random.normal(k[1], (config.batch_size, config.seq_len, d), jnp.float32)
  w = 0.1 * jax.random.normal(k[2], (vocab + 1, d), jnp.float32)
  return h, w, jnp.zeros((vocab + 1,), jnp.float32), tok, mask, t_lp


def main(argv=None, out=sys.stdout) -> list[dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--outputs", default="8192,65536", help="V'+1 values (comma separated)")
  p.add_argument("--implementations", default="reference,streaming,chunked")
  p.add_argument("--teachers", default="auto",
                 help="auto (the n-gram oracle where it can be built, else table), oracle, table")
  p.add_argument("--reps", type=int, default=10, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per row after compiling")
  p.add_argument("--loss_reps", type=int, default=5, help="timed calls of the loss alone")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  command = "python benchmarks/lm_student_step.py " + " ".join(shlex.quote(x) for x in argv)
  impls = a.implementations.split(",")
  rows, loss_rows = [], []
  t_start = time.perf_counter()
  for outputs in (int(x) for x in a.outputs.split(",")):
    vocab = outputs - 1
    kinds = []
    for k in a.teachers.split(","):
      k = ("oracle" if vocab <= _ORACLE_MAX_VOCAB else "table") if k == "auto" else k
      if k not in kinds:
        kinds.append(k)
    progs = {}
    for kind in kinds:
      t0 = time.perf_counter()
      teacher = make_teacher(kind, vocab)
      print(f"# teacher {kind} V'={vocab}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
            flush=True)
      for impl in impls:
        t0 = time.perf_counter()
        run, state, mem, config = build_step(vocab, impl, teacher, a.reps + a.warmup)
        compile_s = time.perf_counter() - t0
        for _ in range(a.warmup):
          state, metrics = run(state)
        jax.block_until_ready(state)
        progs[(kind, impl)] = dict(run=run, state=state, times=[], compile_s=compile_s, mem=mem,
                                   loss=float(metrics["loss"]), config=config)
        print(f"# built {outputs} / {kind} / {impl}: compile {compile_s:.1f} s", file=sys.stderr,
              flush=True)
    rng = random.Random(0)
    for _ in range(a.reps):
      order = list(progs)
      rng.shuffle(order)
      for k in order:
        pr = progs[k]
        t0 = time.perf_counter()
        pr["state"], m = pr["run"](pr["state"])
        jax.block_until_ready((pr["state"], m))
        pr["times"].append(time.perf_counter() - t0)
    for (kind, impl), pr in progs.items():
      c = pr["config"]
      med = float(np.median(pr["times"]))
      rows.append(dict(outputs=outputs, teacher=kind, implementation=impl, median_s=med,
                       min_s=float(min(pr["times"])), times_s=pr["times"],
                       tokens_per_s=c.batch_size * c.seq_len / med, compile_s=pr["compile_s"],
                       first_loss=pr["loss"], **pr["mem"]))
    cfg = next(iter(progs.values()))["config"]
    del progs
    largs = loss_inputs(vocab, teacher, cfg)   # the last teacher kind of this size
    lprogs = {}
    for impl in impls:
      compiled, mem = loss_program(vocab, impl, cfg)
      for _ in range(a.warmup):
        jax.block_until_ready(compiled(*largs))
      lprogs[impl] = (compiled, [])
      loss_rows.append(dict(outputs=outputs, implementation=impl, teacher=kinds[-1], **mem))
    for _ in range(a.loss_reps):
      order = list(lprogs)
      rng.shuffle(order)
      for impl in order:
        t0 = time.perf_counter()
        jax.block_until_ready(lprogs[impl][0](*largs))
        lprogs[impl][1].append(time.perf_counter() - t0)
    for r in loss_rows:
      if r["outputs"] == outputs:
        r["times_s"] = lprogs[r["implementation"]][1]
        r["median_s"] = float(np.median(r["times_s"]))
    del lprogs, largs

  c = load_config(int(a.outputs.split(",")[0]) - 1, "streaming")
  pr = lambda *s: print(*s, file=out)
  dev = jax.devices()[0]
  pr(f"# command: {command}")
  pr(f"# device: {dev.platform} ({dev.device_kind}); jax {jax.__version__}; "
     f"lm_distill default config, arm {ARM[0]}:{ARM[1]}, student d={c.student.d_model} "
     f"x {c.student.num_layers} layers, batch {c.batch_size} x {c.seq_len} tokens, "
     f"tile_size={c.tile_size}, chunk_size=512 (the fused default); median of {a.reps} "
     f"interleaved steps after {a.warmup} warm-up step(s)")
  pr("# teacher: oracle = NGramTeacher.from_oracle(ngram.ngram_oracle(V')); table = random "
     "dense [256, V'+1] log-prob table indexed by the previous token\n")
  pr("Whole train step (jit, state donated; memory = compiled.memory_analysis()):\n")
  pr("| V'+1 | teacher | implementation | median ms | min ms | tokens/s | time / reference "
     "| temp MiB | temp / reference | argument MiB | output MiB | compile s |")
  pr("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ref = next(x for x in rows if x["outputs"] == r["outputs"] and x["teacher"] == r["teacher"]
               and x["implementation"] == "reference") if "reference" in impls else None
    pr(f"| {r['outputs']:,} | {r['teacher']} | {r['implementation']} | {1e3 * r['median_s']:.1f} "
       f"| {1e3 * r['min_s']:.1f} | {r['tokens_per_s']:,.0f} | "
       f"{(r['median_s'] / ref['median_s']) if ref else float('nan'):.2f} | "
       f"{r['temp'] / MB:.1f} | {(r['temp'] / ref['temp']) if ref else float('nan'):.3f} | "
       f"{r['argument'] / MB:.1f} | {r['output'] / MB:.1f} | {r['compile_s']:.1f} |")
  pr(f"\nLoss alone: jit(value_and_grad(loss_from_hidden)) w.r.t. (h, head_w, head_b), "
     f"teacher log-probs [B, L, V'+1] an argument (one batch of teacher samples, random "
     f"student h/W); median of {a.loss_reps} interleaved calls:\n")
  pr("| V'+1 | implementation | median ms | time / reference | temp MiB | temp / reference "
     "| argument MiB | output MiB |")
  pr("|---|---|---|---|---|---|---|---|")
  for r in loss_rows:
    ref = next((x for x in loss_rows if x["outputs"] == r["outputs"]
                and x["implementation"] == "reference"), None)
    pr(f"| {r['outputs']:,} | {r['implementation']} | {1e3 * r['median_s']:.1f} | "
       f"{(r['median_s'] / ref['median_s']) if ref else float('nan'):.2f} | "
       f"{r['temp'] / MB:.1f} | "
       f"{(r['temp'] / ref['temp']) if ref else float('nan'):.3f} | {r['argument'] / MB:.1f} | "
       f"{r['output'] / MB:.1f} |")
  pr(f"\n# total wall time {time.perf_counter() - t_start:.0f} s")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(command=command, rows=rows, loss_rows=loss_rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
