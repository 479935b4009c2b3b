r"""PACED headline on CPU: synthetic reasoning distillation with real student rollouts.

Problems with verifiable answers and graded difficulty: n-digit addition (n ∈ {1..4}, operands
written least-significant digit first, answer = 5 reversed digits) — the distilled family; and a
*copy* family (answer = first operand), which the student already solves, to measure forgetting.

Pipeline (one teacher; per seed a student, a problem pool and all arms):

1. teacher Transformer (``experiments.models.Transformer``, config ``teacher``) trained on ground-truth answers to high
   accuracy; its greedy (KV-cache) responses are the reference responses;
2. smaller student pre-trained briefly (copy + mostly easy additions + hinted sequences that teach
   it to read a privileged hint): partial competence, pass rates spread over (0, 1);
3. K = 8 student rollouts per pool problem, sampled with the KV-cache decoder
   (``experiments.decoding.sample``) at temperature 1 and verified, give p̂, refreshed every ``refresh_every`` steps (and at the two-stage switch);
4. cross-model arms (teacher-forced forward KL on the teacher's reference responses, per-token
   masked mean within the answer): ``uniform``, ``paced`` (p(1−p), mean-one over the batch),
   ``akl`` (kdjax.losses.adaptive_kl), ``two_stage`` (PACED forward KL then PACED reverse KL);
   self-distillation arms (on-policy reverse KL on the student's own rollouts against the frozen
   pre-trained student conditioned on the reference answer as a privileged hint):
   ``self_uniform``, ``self_paced``;
5. metrics at equal steps: held-out greedy accuracy (all n and per n), forgetting = accuracy drop
   on held-out copy problems; accuracy-vs-step curves; the measured cross-problem gradient SNR per
   p̂ bin from per-problem gradients of the forward-KL loss.
"""

from __future__ import annotations

import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments import decoding as dec
from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics as metrics_lib
from experiments import models
from experiments.metrics import smoke_banner
from experiments.stats import format_mean_ci, mean_ci
from kdjax import divergences as D
from kdjax import pacing as P
from kdjax.losses import adaptive_kl

PLUS, COPY, EQ, BOS, HINT = 10, 11, 12, 13, 14
VOCAB = 15
NDIG = 4
ANS = NDIG + 1
PROMPT = 2 + 2 * NDIG + 1          # BOS op a(4) b(4) EQ
SEQ = PROMPT + ANS                 # 16
HINTED = 1 + ANS + SEQ             # HINT r(5) + sequence = 22
ARMS = ("uniform", "paced", "akl", "two_stage", "self_uniform", "self_paced")


# ----------------------------------------------------------------------------- problems


def _digits(x, n):
  return np.stack([(x // 10**i) % 10 for i in range(n)], -1)


def make_problems(rng: np.random.Generator, n: int, *, op: str = "add", ndig=None,
                  ndig_probs=None):
  """``n`` problems: dict(prompt [n, 11], answer [n, 5], ndig [n]). Difficulty = digit count."""
  if ndig is None:
    ndig = rng.choice(np.arange(1, NDIG + 1), size=n, p=ndig_probs)
  ndig = np.broadcast_to(np.asarray(ndig), (n,))
  hi = 10**ndig
  a = rng.integers(0, hi)
  b = rng.integers(0, hi)
  ans = a + b if op == "add" else a
  prompt = np.concatenate([np.full((n, 1), BOS), np.full((n, 1), PLUS if op == "add" else COPY),
                           _digits(a, NDIG), _digits(b, NDIG), np.full((n, 1), EQ)], 1)
  return {"prompt": prompt.astype(np.int32), "answer": _digits(ans, ANS).astype(np.int32),
          "ndig": ndig.astype(np.int32)}


def full_seq(prompt, answer):
  return jnp.concatenate([prompt, answer], -1)


def hinted_seq(prompt, answer, hint):
  return jnp.concatenate([jnp.full((prompt.shape[0], 1), HINT, prompt.dtype), hint, prompt,
                          answer], -1)


def init_model(model_cfg, key):
  """(graphdef, params) of a Transformer over the task's vocabulary (room for a hinted sequence).

  The tasks train the parameters functionally: ``graphdef`` is static (hashable, it keys the jit
  caches) and ``params`` is a pytree that can be stacked over arms and differentiated.
  """
  model = models.Transformer(VOCAB, max_len=HINTED + 2, **dict(model_cfg),
                             rngs=nnx.Rngs(params=key))
  return nnx.split(model)


def answer_logits(graphdef, params, seq, offset=0):
  """Logits predicting the 5 answer tokens (positions offset+PROMPT-1 .. offset+SEQ-2)."""
  lg = nnx.merge(graphdef, params)(seq)
  return lg[:, offset + PROMPT - 1: offset + SEQ - 1]


def generate(graphdef, params, key, prompt, *, greedy=False, temperature=1.0):
  """``ANS`` tokens after ``prompt`` (KV-cache sampling, or greedy)."""
  tokens, _ = dec.sample(nnx.merge(graphdef, params), prompt, max_new_tokens=ANS,
                         temperature=0.0 if greedy else temperature, key=key)
  return tokens


def correct(out, answer):
  return jnp.all(out == answer, -1)


# ----------------------------------------------------------------------------- supervised training


_CE_CACHE = {}


def _ce_step(graphdef, steps, lr):
  """Jitted CE step for (model, steps, lr), cached so teacher and student can share a compile."""
  key = (graphdef, steps, lr)
  if key not in _CE_CACHE:
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps),
                     weight_decay=1e-4)

    @jax.jit
    def step_fn(params, state, seq, ans, hseq, hans):
      def loss(p):
        l1 = optax.softmax_cross_entropy_with_integer_labels(answer_logits(graphdef, p, seq), ans)
        l2 = optax.softmax_cross_entropy_with_integer_labels(
            answer_logits(graphdef, p, hseq, offset=1 + ANS), hans)
        return (l1.sum() + l2.sum()) / (l1.size + l2.size)
      g = jax.grad(loss)(params)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    _CE_CACHE[key] = (tx, step_fn)
  return _CE_CACHE[key]


def train_ce(graphdef, params, batches_fn, steps, lr, *, desc, progress=True):
  """Cross-entropy on the answer tokens of ``batches_fn(step) -> (seq, ans, hinted seq, ans)``."""
  tx, step_fn = _ce_step(graphdef, steps, lr)
  state = tx.init(params)
  for s in tqdm(range(steps), desc=desc, leave=False, mininterval=5, disable=not progress):
    seq, ans, hseq, hans = batches_fn(s)
    params, state = step_fn(params, state, seq, ans, hseq, hans)
  return params


def _mixed_batch(rng, batch, mix, *, hinted_frac):
  """A ground-truth batch: 'mix' = list of (op, ndig_probs, fraction)."""
  parts = []
  for op, probs, frac in mix:
    parts.append(make_problems(rng, max(1, int(batch * frac)), op=op, ndig_probs=probs))
  pr = np.concatenate([p["prompt"] for p in parts])
  an = np.concatenate([p["answer"] for p in parts])
  nh = max(1, int(batch * hinted_frac))
  h = make_problems(rng, nh, op="add", ndig_probs=[0.25] * 4)
  hseq = np.asarray(hinted_seq(jnp.asarray(h["prompt"]), jnp.asarray(h["answer"]),
                               jnp.asarray(h["answer"])))
  return (jnp.asarray(np.concatenate([pr, an], 1)), jnp.asarray(an), jnp.asarray(hseq),
          jnp.asarray(h["answer"]))


def greedy_accuracy(graphdef, params, probs):
  out = _jit_generate(graphdef, True)(params, jax.random.PRNGKey(0), jnp.asarray(probs["prompt"]))
  return np.asarray(correct(out, jnp.asarray(probs["answer"])))


_GEN_CACHE = {}


def _jit_generate(graphdef, greedy):
  k = (graphdef, greedy)
  if k not in _GEN_CACHE:
    _GEN_CACHE[k] = jax.jit(lambda p, key, pr: generate(graphdef, p, key, pr, greedy=greedy))
  return _GEN_CACHE[k]


# ----------------------------------------------------------------------------- distillation


def make_distill_fns(cfg, s_gd):
  """Jitted, arm-vmapped pieces: pass-rate refresh and a chunk of training steps."""
  k = cfg.k
  tx = optax.adam(cfg.lr)
  arm_ids = jnp.arange(len(ARMS))
  switch = cfg.steps // 2

  def pass_rates(params, key, prompt, answer):
    n = prompt.shape[0]
    rep = jnp.repeat(prompt, k, axis=0)
    out = generate(s_gd, params, key, rep)
    r = correct(out, jnp.repeat(answer, k, axis=0)).reshape(n, k).astype(jnp.float32)
    return P.pass_rate(r)

  refresh = jax.jit(jax.vmap(pass_rates, in_axes=(0, 0, None, None)))

  def loss_fn(params, arm, step, batch, w, key, sd_teacher):
    prompt, ref, t_logits = batch["prompt"], batch["ref"], batch["t_logits"]
    s_log = answer_logits(s_gd, params, full_seq(prompt, ref))
    fkl = D.forward_kl(s_log, t_logits)                           # [B, 5]
    rkl = D.reverse_kl(s_log, t_logits)
    akl = adaptive_kl(s_log, t_logits)
    cross = jnp.select([arm <= 1, arm == 2], [fkl, akl],
                       P.two_stage_loss(fkl, rkl, step, switch_step=switch))
    # Self-distillation: on-policy rollouts, frozen self-teacher with the reference as hint.
    roll = jax.lax.stop_gradient(generate(s_gd, params, key, prompt))
    s_on = answer_logits(s_gd, params, full_seq(prompt, roll))
    t_on = jax.lax.stop_gradient(answer_logits(s_gd, sd_teacher, hinted_seq(prompt, roll, ref),
                                               offset=1 + ANS))
    self_rkl = D.reverse_kl(s_on, t_on)
    per_tok = jnp.where(arm >= 4, self_rkl, cross)
    return P.weighted_sum_and_count(per_tok, w).mean()

  def chunk(params, opt, key, step0, p_hat, arm, pool, sd_teacher, idx):
    weighted = (arm == 1) | (arm == 3) | (arm == 5)

    def body(carry, i):
      params, opt, key = carry
      key, k1 = jax.random.split(key)
      b = jax.tree.map(lambda x: x[idx[i]], pool)
      w = jnp.where(weighted, P.paced_weights(p_hat[idx[i]]), jnp.ones(idx.shape[1]))
      g = jax.grad(loss_fn)(params, arm, step0 + i, b, w, k1, sd_teacher)
      u, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, u), opt, key), None

    (params, opt, key), _ = jax.lax.scan(body, (params, opt, key), jnp.arange(idx.shape[0]))
    return params, opt, key

  train_chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, 0, 0, None, None, None)))
  return refresh, train_chunk, tx, arm_ids


def per_problem_grads(graphdef, params, pool, n):
  """Per-problem gradients (flattened) of the teacher-forced forward-KL loss, first n problems."""
  def one(prompt, ref, tl):
    def f(p):
      s_log = answer_logits(graphdef, p, full_seq(prompt[None], ref[None]))
      return D.forward_kl(s_log, tl[None]).mean()
    g = jax.grad(f)(params)
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
  return jax.jit(jax.vmap(one))(pool["prompt"][:n], pool["ref"][:n], pool["t_logits"][:n])


def run_seed(seed, cfg, teacher, log=print):
  """One seed: student pre-training, teacher references, every arm; ``teacher`` = (graphdef,
  params)."""
  t_gd, teacher = teacher
  progress = cfg.get("progress", True)
  rng = np.random.default_rng(1000 + seed)
  key = jax.random.PRNGKey(seed)
  # Student pre-training: copy (all sizes), additions mostly easy, hinted sequences.
  mix = [("copy", [0.25] * 4, 0.3), ("add", list(cfg.student_ndig_probs), 0.7)]
  s_gd, student0 = init_model(cfg.student, jax.random.fold_in(key, 1))
  student0 = train_ce(s_gd, student0,
                      lambda s: _mixed_batch(rng, cfg.batch, mix, hinted_frac=0.5),
                      cfg.student_pretrain_steps, cfg.pretrain_lr, desc=f"student seed {seed}",
                      progress=progress)
  pool_np = make_problems(rng, cfg.pool, ndig_probs=[0.25] * 4)
  test = make_problems(rng, cfg.test, ndig_probs=[0.25] * 4)
  copy_test = make_problems(rng, cfg.test, op="copy", ndig_probs=[0.25] * 4)
  prompt = jnp.asarray(pool_np["prompt"])
  ref = _jit_generate(t_gd, True)(teacher, key, prompt)              # teacher references
  t_logits = jax.jit(lambda p, s: answer_logits(t_gd, p, s))(teacher, full_seq(prompt, ref))
  pool = {"prompt": prompt, "ref": ref, "t_logits": t_logits}
  ref_ok = float(np.mean(np.asarray(correct(ref, jnp.asarray(pool_np["answer"])))))

  refresh, train_chunk, tx, arm_ids = make_distill_fns(cfg, s_gd)
  na = len(ARMS)
  stack = lambda x: jax.tree.map(lambda a: jnp.broadcast_to(a, (na,) + a.shape), x)  # noqa
  params = stack(student0)
  opt = jax.vmap(tx.init)(params)
  keys = jax.random.split(jax.random.fold_in(key, 2), na)
  switch = cfg.steps // 2
  pre_acc = greedy_accuracy(s_gd, student0, test).mean()
  pre_copy = greedy_accuracy(s_gd, student0, copy_test).mean()
  curves = {a: [(0, float(pre_acc))] for a in ARMS}
  p_hat = None
  p_hat0 = None
  step = 0
  bar = tqdm(total=cfg.steps, desc=f"distill seed {seed} ({len(ARMS)} arms)", leave=False,
             mininterval=5, disable=not progress)
  while step < cfg.steps:
    if bool(P.refresh_due(step, every=cfg.refresh_every, switch_step=switch)):
      rk = jax.random.split(jax.random.fold_in(key, 10_000 + step), na)
      p_hat = refresh(params, rk, pool["prompt"], jnp.asarray(pool_np["answer"]))
      if p_hat0 is None:
        p_hat0 = np.asarray(p_hat[0])
    n = min(cfg.refresh_every - step % cfg.refresh_every, cfg.steps - step)
    if step < switch < step + n:
      n = switch - step
    idx = jnp.asarray(rng.integers(0, cfg.pool, size=(n, cfg.batch)))
    params, opt, keys = train_chunk(params, opt, keys, step, p_hat, arm_ids, pool, student0, idx)
    step += n
    bar.update(n)
    for i, a in enumerate(ARMS):
      pi = jax.tree.map(lambda x: x[i], params)  # pylint: disable=cell-var-from-loop
      curves[a].append((step, float(greedy_accuracy(s_gd, pi, test).mean())))
  bar.close()
  res = {"pre_acc": float(pre_acc), "pre_copy": float(pre_copy), "ref_acc": ref_ok,
         "p_hat0": p_hat0.tolist(), "curves": curves, "arms": {}}
  nd = test["ndig"]
  for i, a in enumerate(ARMS):
    pi = jax.tree.map(lambda x: x[i], params)  # pylint: disable=cell-var-from-loop
    acc = greedy_accuracy(s_gd, pi, test)
    res["arms"][a] = {"acc": float(acc.mean()),
                      "acc_by_ndig": [float(acc[nd == d].mean()) for d in range(1, NDIG + 1)],
                      "forgetting": float(pre_copy - greedy_accuracy(s_gd, pi, copy_test).mean())}
  # Measured cross-problem SNR vs p̂ at the start of distillation.
  g = per_problem_grads(s_gd, student0, pool, cfg.snr_problems)
  edges = (jnp.arange(cfg.k + 2) - 0.5) / cfg.k
  snr = P.gradient_snr_by_bin(g, jnp.asarray(p_hat0[:cfg.snr_problems]), bins=edges)
  res["snr"] = np.asarray(snr.snr).tolist()
  res["snr_counts"] = np.asarray(snr.counts).tolist()
  log(f"seed {seed}: teacher ref acc {ref_ok:.3f}, student pre acc {pre_acc:.3f}, "
      f"copy {pre_copy:.3f}; p_hat0 mean {np.mean(p_hat0):.3f}")
  return res


def train_teacher(cfg):
  """(graphdef, params) of the teacher trained on ground truth."""
  rng = np.random.default_rng(cfg.seed + 7)
  t_gd, teacher = init_model(cfg.teacher, jax.random.PRNGKey(cfg.seed + 7))
  mix = [("copy", [0.25] * 4, 0.2), ("add", [0.25] * 4, 0.8)]
  return t_gd, train_ce(t_gd, teacher, lambda s: _mixed_batch(rng, cfg.batch, mix,
                                                               hinted_frac=0.05),
                        cfg.teacher_steps, cfg.teacher_lr, desc="teacher",
                        progress=cfg.get("progress", True))


def summarize(results):
  rows = []
  for a in ARMS:
    acc = mean_ci([r["arms"][a]["acc"] for r in results])
    forg = mean_ci([r["arms"][a]["forgetting"] for r in results])
    byd = np.mean([r["arms"][a]["acc_by_ndig"] for r in results], 0)
    rows.append({"arm": a, "acc": float(acc[0]), "acc_ci95": float(acc[1]),
                 "forgetting": float(forg[0]), "forg_ci95": float(forg[1]),
                 "acc_by_ndig": byd.tolist()})
  return rows


def format_rows(rows, results):
  pre = np.mean([r["pre_acc"] for r in results])
  head = (f"{'arm':14s} {'held-out acc (95% CI)':>22s} {'acc n=1..4':>26s} "
          f"{'forgetting copy (95% CI)':>26s}")
  lines = [f"student before distillation: acc {pre:.4f}; teacher reference acc "
           f"{np.mean([r['ref_acc'] for r in results]):.4f}", head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['arm']:14s} {format_mean_ci(r['acc'], r['acc_ci95'], '.4f'):>22s} "
                 f"{' '.join(f'{v:.3f}' for v in r['acc_by_ndig']):>26s} "
                 f"{format_mean_ci(r['forgetting'], r['forg_ci95'], '+.4f'):>26s}")
  return "\n".join(lines)


def plot(results, cfg, path):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11, 4))          # no pyplot: leaves the caller's backend alone
  ax = fig.subplots(1, 2)
  for a in ARMS:
    c = np.asarray([r["curves"][a] for r in results])      # [seeds, points, 2]
    ax[0].plot(c[0, :, 0], c[:, :, 1].mean(0), marker=".", label=a)
  ax[0].set(xlabel="step", ylabel="held-out accuracy (addition)", title="accuracy vs step")
  ax[0].legend(fontsize=7)
  snr = np.asarray([r["snr"] for r in results], np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    ax[1].errorbar(np.arange(cfg.k + 1) / cfg.k, np.nanmean(snr, 0), yerr=np.nanstd(snr, 0),
                   marker="o")
  ax[1].set(xlabel="student pass rate p̂ (K rollouts)", ylabel="cross-problem gradient SNR",
            title="measured SNR vs pass rate")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  for key in ("teacher", "student"):
    for k in ("d_model", "num_heads", "num_layers", "mlp_dim"):
      C.check_number(config, f"{key}.{k}", low=1, integer=True)
    if C.get(config, f"{key}.d_model") % C.get(config, f"{key}.num_heads"):
      C.fail(f"{key}.d_model", config[key].d_model,
             f"a multiple of {key}.num_heads = {config[key].num_heads}")
  for k in ("num_seeds", "batch", "teacher_steps", "student_pretrain_steps", "pool", "test", "k",
            "steps", "refresh_every", "snr_problems"):
    C.check_number(config, k, low=1, integer=True)
  for k in ("teacher_lr", "pretrain_lr", "lr"):
    C.check_number(config, k, low=0, low_open=True)
  probs = C.check_numbers(config, "student_ndig_probs", low=0, high=1)
  if len(probs) != NDIG or abs(sum(probs) - 1) > 1e-6:
    C.fail("student_ndig_probs", probs, f"{NDIG} probabilities of 1..{NDIG}-digit problems "
           f"summing to 1")
  C.check_bool(config, "progress")
  if not isinstance(C.get(config, "teacher_cache"), str):
    C.fail("teacher_cache", config.teacher_cache, "'' or a checkpoint directory (a path)")


def run(config, workdir):
  validate(config)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  smoke = bool(config.get("smoke", False))
  if smoke:
    print(smoke_banner("paced_reasoning"))
  start = time.time()
  tag = "_".join(str(config.teacher[k]) for k in sorted(config.teacher)) + \
      f"_{config.teacher_steps}_{config.seed}"
  # The teacher is an Orbax checkpoint (digest-verified), reused by any run with the same spec.
  cache = pathlib.Path(config.get("teacher_cache", "") or
                       workdir / "checkpoints" / f"teacher_{tag}").expanduser().absolute()
  t_gd, template = init_model(config.teacher, jax.random.PRNGKey(config.seed + 7))
  ckpt = ckpt_lib.Checkpointer(cache, max_to_keep=1)
  try:
    restored, step = ckpt.restore_latest(nnx.to_pure_dict(template))
    if step is not None:                   # reuse a teacher trained by an earlier run
      teacher = (t_gd, nnx.replace_by_pure_dict(template, restored))
      print(f"teacher restored from {cache} (step {step})")
    else:
      teacher = train_teacher(config)
      ckpt.save(int(config.teacher_steps), nnx.to_pure_dict(teacher[1]),
                meta={"spec": dict(config.teacher), "seed": int(config.seed)})
  finally:
    ckpt.close()
  results = [run_seed(config.seed + s, config, teacher)
             for s in range(config.num_seeds)]
  rows = summarize(results)
  table = format_rows(rows, results)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    snr = np.nanmean(np.asarray([r["snr"] for r in results], np.float64), 0)
  seconds = time.time() - start
  if smoke:
    print(f"paced_reasoning pipeline ran: {config.num_seeds} seed(s), {config.steps} steps, arms "
          f"{', '.join(ARMS)} ({seconds:.0f} s); table.txt and results.json written")
  else:
    print(f"PACED reasoning: {config.num_seeds} seeds, {config.steps} steps/arm, K={config.k}, "
          f"pool {config.pool} ({seconds:.0f} s)")
    print(table)
    print("measured SNR per p̂ bin (0..1 step 1/K):", np.array2string(snr, precision=4))
  out = {"rows": rows, "snr_by_bin": snr.tolist(), "seeds": results, "seconds": seconds,
         "smoke": smoke}
  metrics_lib.write_results(workdir, out, config, smoke=smoke)
  # metrics.jsonl + TensorBoard: one phase per arm, held-out accuracy (mean over seeds) per step.
  writer = metrics_lib.MetricWriter(workdir)
  writer.truncate_all()
  for a in ARMS:
    per_step = {}
    for r in results:
      for step, acc in r["curves"][a]:
        per_step.setdefault(int(step), []).append(acc)
    for step in sorted(per_step):
      writer.write(a, step, {"heldout/accuracy": float(np.mean(per_step[step]))})
  writer.close()
  header = smoke_banner("paced_reasoning") + "\n" if smoke else ""
  (workdir / "table.txt").write_text(header + table + "\n")
  plot(results, config, workdir / "paced_reasoning.png")
  if smoke:
    print(smoke_banner("paced_reasoning", end=True))
  return {"rows": rows, "snr_by_bin": snr.tolist(), "table": table}
