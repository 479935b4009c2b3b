r"""Language-model distillation end to end, with golden metrics exact against a known oracle.

Stage 1, the teacher (``config.teacher``): ``"transformer"`` trains a Transformer
(``config.teacher_model``) with cross-entropy on fresh oracle samples (the shared trainer in
``seqkd`` mode with the oracle as the data source), checkpointed under
``workdir/checkpoints/teacher`` and restored from there (or from ``config.teacher_workdir``) as
a :class:`experiments.teachers.TransformerTeacher`; ``"oracle"`` uses the oracle itself
(:class:`experiments.teachers.NGramTeacher`), so proxy and golden metrics coincide.

Stage 2, the students: one run of the shared trainer per arm ``"mode:objective"`` of
``config.arms``; every arm starts from the same student initialisation and runs
``student_steps`` optimiser steps of ``batch_size`` sentences (phase ``student_<mode>_<obj>``,
its own checkpoints, resumable). The arm is a runtime input of one jitted step
(:func:`make_step`, ``lax.switch`` over the data source and the loss), so all the arms of a run
share one XLA compilation. Sentences are ``seq_len`` tokens after ``<s>``; positions after the
first ``</s>`` are masked.

Data by mode (all generated inside the jitted step from ``(seed, phase, step)``, so a resumed run
is the uninterrupted one; "source" = the teacher, or the oracle with ``config.data="oracle"``):

* ``offline``: ``offline_size`` source sentences drawn once (``workdir/offline_<phase>.npz``)
  and reused every epoch (:class:`experiments.data.BatchSampler`);
* ``online``: ``batch_size`` fresh source sentences every step;
* ``seqkd``: fresh source sentences, cross-entropy on their tokens (sequence-level KD);
* ``onpolicy``: the student's own sentences (KV-cache sampling,
  :func:`experiments.decoding.sample`, at the current parameters, no gradient), scored by the
  teacher;
* ``gkd``: per step :func:`kdjax.losses.onpolicy.gkd_source` (λ = ``lam``) picks student samples
  or a batch of the offline dataset (TRL's GKD with ``seq_kd=False``).

Objectives (per token, averaged over the kept tokens of the batch):

* ``forward_kl`` KL(p_T‖p_S), ``reverse_kl`` KL(p_S‖p_T), ``jsd`` generalized JSD_β: full
  vocabulary through :func:`kdjax.losses.fused_linear.fused_linear_distillation`
  (``implementation="streaming"``) from the student's final hidden states, its head weight and
  bias, with the teacher's log-probs as ``teacher_logits`` (the student logits are never
  materialised for the loss);
* ``tv``: :func:`kdjax.divergences.total_variation` on *materialised* student logits (the fused
  loss has no TV);
* ``ce``: cross-entropy of the student on the sentence's tokens (materialised logits);
* ``k1_reward`` (on-policy): k1 = log π(y_t) − log r(y_t) as a detached reward,
  ``A = −discounted_returns(k1, γ)``, REINFORCE ``pg_surrogate`` (γ = 0: g_0, the per-token
  reverse-KL gradient; γ = 1: the sequence-level ∇KL(π‖r));
* ``k3_loss`` (on-policy): Σ k3 in the loss (its gradient estimates the *forward* KL on student
  prefixes, see :mod:`kdjax.losses.onpolicy`). Both are summed over tokens and divided by the
  constant ``batch_size · seq_len`` (unbiased; no ratio estimator).

Golden metrics (exact per position, since the oracle O is known; every ``eval_every`` steps and
at the end, ``eval/*`` in ``metrics.jsonl`` and TensorBoard), per token:

* ``golden_fkl`` = KL(O_t‖S_t) on ``eval_size`` held-out oracle sentences (the sequence-level
  KL(O‖S) per token by the chain rule) and ``ppl`` = the student's perplexity on them;
* ``golden_rkl`` = KL(S_t‖O_t) and ``oracle_nll`` = −log O(y_t) on ``eval_size`` student samples
  (a fixed seed per evaluation);
* ``proxy_fkl`` = KL(T_t‖S_t) on fixed teacher samples, ``proxy_rkl`` = KL(S_t‖T_t) on the
  student samples; ``tokens_per_s`` = training positions per second since the last evaluation.

The teacher row reports the same metrics with the teacher in the student's place (its golden
KL(O‖T) is the teacher's imperfection). Outputs: ``metrics.jsonl``, ``tb/<phase>/``,
``results.json`` (rows + config) and the printed table. Mesh: the batch is sharded over the
``data`` axis of :func:`experiments.mesh.make_mesh` (``batch_size`` a multiple of it), the
parameters and the oracle tables replicated.
"""

from __future__ import annotations

import functools
import pathlib
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from kdjax import divergences, policy
from kdjax.losses import fused_linear, onpolicy
from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import data, metrics, train
from experiments import mesh as mesh_lib
from experiments import teachers as T

__all__ = ["run", "validate", "MODES", "OBJECTIVES", "parse_arm", "arm_spec", "arm_inputs",
           "loss_from_hidden", "arm_loss", "make_step", "eval_sums", "finalize_eval"]

MODES = ("offline", "online", "seqkd", "onpolicy", "gkd")
OBJECTIVES = ("forward_kl", "reverse_kl", "jsd", "tv", "ce", "k1_reward", "k3_loss")
_FULL = ("forward_kl", "reverse_kl", "jsd", "tv")
ALLOWED = {"offline": _FULL, "online": _FULL, "gkd": _FULL, "seqkd": ("ce",),
           "onpolicy": _FULL + ("k1_reward", "k3_loss")}
_FUSED = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl", "jsd": "generalized_jsd"}
# The oracle keys a trigram context (h2, h1) as one int32 h2·(V'+2) + h1 (jax's default integer
# width), so (V'+2)² <= 2³¹: V' <= 46,338. The fused losses themselves have no such limit.
_MAX_VOCAB = 46_338


def parse_arm(arm: str) -> tuple[str, str]:
  """``"mode:objective"`` -> ``(mode, objective)``; ValueError naming what is allowed."""
  if not isinstance(arm, str) or arm.count(":") != 1:
    raise ValueError(f"arm {arm!r} must be 'mode:objective'")
  mode, obj = arm.split(":")
  if mode not in MODES:
    raise ValueError(f"arm {arm!r}: mode must be one of {', '.join(MODES)}")
  if obj not in ALLOWED[mode]:
    raise ValueError(f"arm {arm!r}: mode {mode!r} takes the objectives "
                     f"{', '.join(ALLOWED[mode])}")
  return mode, obj


def _check_lm(config, key: str) -> None:
  C.check_choice(config, f"{key}.kind", ("transformer",))
  for k in ("d_model", "num_heads", "num_layers", "mlp_dim"):
    C.check_number(config, f"{key}.{k}", low=1, integer=True)
  node = C.get(config, key)
  if node.d_model % node.num_heads:
    C.fail(f"{key}.num_heads", node.num_heads, f"a divisor of {key}.d_model={node.d_model}")


def validate(config) -> None:
  """Checks the whole config before any work (the launcher calls it first; so does :func:`run`).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  arms = C.get(config, "arms")
  if not isinstance(arms, (tuple, list)) or not arms:
    C.fail("arms", arms, "a non-empty tuple of 'mode:objective' strings")
  for arm in arms:
    try:
      parse_arm(arm)
    except ValueError as e:
      C.fail("arms", tuple(arms), f"'mode:objective' strings ({e})")
  if len(set(arms)) != len(arms):
    C.fail("arms", tuple(arms), "without repeated arms")
  C.check_common(config)
  C.check_number(config, "vocab", low=1, high=_MAX_VOCAB, integer=True)
  C.check_number(config, "seq_len", low=2, integer=True)
  C.check_choice(config, "teacher", ("transformer", "oracle"))
  C.check_choice(config, "data", ("teacher", "oracle"))
  C.check_bool(config, "fsdp")
  C.check_bool(config, "progress")
  _check_lm(config, "student")
  if config.teacher == "transformer":
    _check_lm(config, "teacher_model")
  C.check_optimizer(config, "optimizer", total_steps=max(config.student_steps,
                                                         config.teacher_steps))
  for k in ("beta", "gamma", "lam"):
    C.check_number(config, k, low=0, high=1)
  C.check_choice(config, "loss_implementation", ("streaming", "reference", "chunked"))
  for k in ("offline_size", "eval_size", "eval_batch", "tile_size"):
    C.check_number(config, k, low=1, integer=True)
  if config.offline_size < config.batch_size:
    C.fail("offline_size", config.offline_size, f">= batch_size ({config.batch_size})")
  n_dev = config.num_devices or jax.device_count()
  if config.num_devices > jax.device_count():
    C.fail("num_devices", config.num_devices, f"at most the {jax.device_count()} devices")
  if config.batch_size % n_dev:
    C.fail("batch_size", config.batch_size, f"a multiple of the {n_dev} devices of the mesh")


# ----------------------------------------------------------------------------- losses


def _token_lp(lp: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]


def loss_from_hidden(h, head_w, head_b, tokens, mask, teacher_lp, *, objective: str,
                     beta: float = 0.5, gamma: float = 0.0, tile_size: int = 512,
                     implementation: str = "streaming"):
  """The student's scalar loss for ``objective`` from its final hidden states ``h [B, L, H]``
  and head (``head_w [V'+1, H]``, ``head_b [V'+1]``) on ``tokens [B, L]`` (kept positions
  ``mask``); ``teacher_lp [B, L, V'+1]`` the teacher's next-token log-probs (a constant; unused
  for ``ce``)."""
  mask = jnp.asarray(mask, bool)
  if objective in _FUSED:
    acc = fused_linear.fused_linear_distillation(
        h, head_w, student_bias=head_b, teacher_logits=jax.lax.stop_gradient(teacher_lp),
        divergence=_FUSED[objective], beta=beta, where=mask, implementation=implementation,
        tile_size=tile_size)
    return acc.mean()
  logits = (h @ head_w.T + head_b).astype(jnp.float32)
  m = mask.astype(jnp.float32)
  if objective == "tv":
    tv = divergences.total_variation(logits, jax.lax.stop_gradient(teacher_lp))
    return jnp.sum(tv * m) / jnp.maximum(jnp.sum(m), 1.0)
  if objective == "ce":
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
  lp_s = policy.token_log_probs(logits, tokens)
  lp_t = jax.lax.stop_gradient(_token_lp(teacher_lp, tokens))
  norm = float(np.prod(tokens.shape))
  if objective == "k1_reward":
    k1 = onpolicy.kl_estimate(jax.lax.stop_gradient(lp_s), lp_t, kind="k1", where=mask)
    adv = -onpolicy.discounted_returns(k1, gamma=gamma, where=mask)
    return jnp.sum(onpolicy.pg_surrogate(lp_s, adv, where=mask)) / norm
  if objective == "k3_loss":
    return jnp.sum(onpolicy.kl_estimate(lp_s, lp_t, kind="k3", where=mask)) / norm
  raise ValueError(f"unknown objective {objective!r}")


def _head(model):
  return model.head.kernel[...].T, model.head.bias[...]


def arm_loss(model: nnx.Module, tokens, mask, teacher_lp, *, objective: str, bos_id: int,
             **kwargs):
  """:func:`loss_from_hidden` of a :class:`experiments.models.Transformer` student on
  ``tokens`` (input ``[<s>, tokens[:, :-1]]``); returns ``(loss, hidden)``."""
  h = model.hidden(T.shift_right(tokens, bos_id))
  return loss_from_hidden(h, *_head(model), tokens, mask, teacher_lp, objective=objective,
                          **kwargs), h


def _phase_key(seed: int, phase: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(phase.encode()) & 0x7FFFFFFF)


# Where each mode's sentences come from: the fixed dataset, fresh source samples, the student.
_SOURCES = {"offline": ("data",), "online": ("source",), "seqkd": ("source",),
            "onpolicy": ("student",), "gkd": ("data", "student")}


def arm_spec(arms) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The modes and objectives a step program must cover for ``arms`` (sorted, unique)."""
  parsed = [parse_arm(a) for a in arms]
  return tuple(sorted({m for m, _ in parsed})), tuple(sorted({o for _, o in parsed}))


def arm_inputs(mode: str, objective: str, objectives, key) -> dict:
  """The runtime arm selector of :func:`make_step`: mode and objective ids and the data key."""
  return {"mode": np.int32(MODES.index(mode)), "objective": np.int32(objectives.index(objective)),
          "key": np.asarray(jax.random.key_data(key) if jnp.issubdtype(
              getattr(key, "dtype", np.uint32), jax.dtypes.prng_key) else key, np.uint32)}


def make_step(graphdef, tx, *, config, bos_id: int, modes, objectives, state_sharding=None):
  """One jitted step ``(state, batch, teacher, source, arm) -> (state, metrics)`` for every arm
  whose mode is in ``modes`` and objective in ``objectives``.

  The arm is a *runtime* input (:func:`arm_inputs`): ``lax.switch`` picks the data branch and
  the loss branch, so all the arms of a run share one compilation (XLA compile time, ~10 s per
  program on a 2-core CPU, dominates short runs). ``teacher`` scores, ``source`` generates the
  online/seqkd data (both :class:`experiments.teachers.Teacher` pytrees); ``batch`` holds
  ``tokens``/``mask`` rows of the offline dataset (zeros for the fresh-data modes). A
  non-finite loss or gradient keeps the previous state and records ``bad_step``, as
  :func:`experiments.train.make_train_step` does.
  """
  b, length = int(config.batch_size), int(config.seq_len)
  objectives = tuple(objectives)
  srcs = tuple(sorted({s for m in modes for s in _SOURCES[m]}))
  src_of_mode = np.array([srcs.index(_SOURCES[m][0]) if _SOURCES[m][0] in srcs else 0
                          for m in MODES], np.int32)
  kw = dict(beta=config.beta, gamma=config.gamma, tile_size=config.tile_size,
            implementation=config.get("loss_implementation", "streaming"))

  def step(state, batch, teacher, source, arm):
    key = jax.random.fold_in(arm["key"], state.step)
    k_data, k_src = jax.random.split(key)
    src = jnp.asarray(src_of_mode)[arm["mode"]]
    if "gkd" in modes:
      pick = onpolicy.gkd_source(k_src, lam=config.lam) == 1
      gkd_src = jnp.where(pick, srcs.index("student"), srcs.index("data"))
      src = jnp.where(arm["mode"] == MODES.index("gkd"), gkd_src, src)
    student = T.TransformerTeacher(params=jax.lax.stop_gradient(state.params),
                                   graphdef=graphdef, bos_id=bos_id)
    fns = {"data": lambda: (batch["tokens"].astype(jnp.int32), batch["mask"].astype(bool)),
           "source": lambda: source.sample(k_data, b, length),
           "student": lambda: student.sample(k_data, b, length)}
    branches = [lambda f=fns[s]: tuple(jnp.asarray(x) for x in f()) for s in srcs]
    tok, m = branches[0]() if len(srcs) == 1 else jax.lax.switch(src, branches)
    tok, m = tok.astype(jnp.int32), m.astype(bool)
    t_lp = (jnp.zeros(tok.shape + (bos_id,), jnp.float32) if objectives == ("ce",)
            else jax.lax.stop_gradient(teacher.log_probs(tok)))

    def objective_fn(params):
      model = nnx.merge(graphdef, params)
      h = model.hidden(T.shift_right(tok, bos_id))
      args = (h, *_head(model), tok, m, t_lp)
      losses = [lambda *a, o=o: loss_from_hidden(*a, objective=o, **kw) for o in objectives]
      loss = losses[0](*args) if len(losses) == 1 else jax.lax.switch(arm["objective"], losses,
                                                                        *args)
      return loss, h

    (loss, h), grads = jax.value_and_grad(objective_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: optax.tree.where(ok, new, old)
    new_state = train.TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
        aux=state.aux)
    # Next-token accuracy for the progress bar (one argmax over materialised logits).
    w, bias = _head(nnx.merge(graphdef, state.params))
    pred = jnp.argmax(jax.lax.stop_gradient(h) @ w.T + bias, -1)
    mf = m.astype(jnp.float32)
    n_tok = jnp.sum(mf)
    from_student = (src == srcs.index("student")) if "student" in srcs else jnp.zeros((), bool)
    out = {"loss": loss, "accuracy": jnp.sum((pred == tok) * mf) / jnp.maximum(n_tok, 1.0),
           "grad_norm": gnorm, "finite": ok.astype(jnp.float32), "tokens": n_tok,
           "from_student": from_student.astype(jnp.float32)}
    return new_state, out

  kwargs = {"donate_argnums": (0,)}
  if state_sharding is not None:
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(step, **kwargs)


# ----------------------------------------------------------------------------- metrics


def _kl(log_p, log_q):
  """KL(p‖q) per position over the last axis (0·log 0 = 0)."""
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def eval_sums(model, teacher, oracle, oracle_tokens, oracle_mask, teacher_tokens, teacher_mask,
              key, *, num_samples: int, seq_len: int) -> dict:
  """Sums (over kept positions) of the golden and proxy metrics of ``model`` (a
  :class:`experiments.teachers.Teacher` with ``sample``), exact against ``oracle``.

  ``oracle_tokens``/``oracle_mask``: held-out oracle sentences; ``teacher_tokens``/``mask``:
  teacher sentences; ``num_samples`` model sentences are drawn with ``key``. Divide each
  ``*_sum`` by its ``*_count`` (:func:`finalize_eval`). Traceable.
  """
  mo = jnp.asarray(oracle_mask, jnp.float32)
  s_lp, o_lp = model.log_probs(oracle_tokens), oracle.log_probs(oracle_tokens)
  out = {"golden_fkl_sum": jnp.sum(_kl(o_lp, s_lp) * mo),
         "nll_sum": -jnp.sum(_token_lp(s_lp, oracle_tokens) * mo), "oracle_count": jnp.sum(mo)}
  mt = jnp.asarray(teacher_mask, jnp.float32)
  s_lp, t_lp = model.log_probs(teacher_tokens), teacher.log_probs(teacher_tokens)
  out.update(proxy_fkl_sum=jnp.sum(_kl(t_lp, s_lp) * mt), teacher_count=jnp.sum(mt))
  ys, ym = model.sample(key, num_samples, seq_len)
  ms = ym.astype(jnp.float32)
  s_lp, o_lp, t_lp = model.log_probs(ys), oracle.log_probs(ys), teacher.log_probs(ys)
  out.update(golden_rkl_sum=jnp.sum(_kl(s_lp, o_lp) * ms),
             proxy_rkl_sum=jnp.sum(_kl(s_lp, t_lp) * ms),
             oracle_nll_sum=-jnp.sum(_token_lp(o_lp, ys) * ms), sample_count=jnp.sum(ms))
  return out


def finalize_eval(tot: dict) -> dict[str, float]:
  """Per-token means of :func:`eval_sums` totals (host floats)."""
  oc, tc, sc = (max(float(tot[k]), 1.0) for k in ("oracle_count", "teacher_count",
                                                    "sample_count"))
  return {"golden_fkl": tot["golden_fkl_sum"] / oc, "golden_rkl": tot["golden_rkl_sum"] / sc,
          "proxy_fkl": tot["proxy_fkl_sum"] / tc, "proxy_rkl": tot["proxy_rkl_sum"] / sc,
          "ppl": float(np.exp(tot["nll_sum"] / oc)), "oracle_nll": tot["oracle_nll_sum"] / sc,
          "sample_len": sc / (tot["num_samples"])}


_EVAL_SUMS = jax.jit(eval_sums, static_argnames=("num_samples", "seq_len"))


class _Evaluator:
  """Golden/proxy metrics on fixed held-out sets, in chunks of ``eval_batch`` sentences."""

  def __init__(self, config, oracle_t, teacher, held_o, held_t):
    self.oracle, self.teacher = oracle_t, teacher
    self.held_o, self.held_t = held_o, held_t
    self.chunk = min(int(config.eval_batch), int(config.eval_size))
    self.seq_len = int(config.seq_len)
    self.fn = _EVAL_SUMS

  def __call__(self, model, key) -> dict[str, float]:
    tot: dict[str, float] = {}
    n = len(self.held_o[0])
    for i, start in enumerate(range(0, n, self.chunk)):
      sl = slice(start, start + self.chunk)
      k = int(min(self.chunk, n - start))
      sums = self.fn(model, self.teacher, self.oracle, self.held_o[0][sl], self.held_o[1][sl],
                     self.held_t[0][sl], self.held_t[1][sl], jax.random.fold_in(key, i),
                     num_samples=k, seq_len=self.seq_len)
      for name, v in jax.device_get(sums).items():
        tot[name] = tot.get(name, 0.0) + float(v)
    tot["num_samples"] = float(n)
    return finalize_eval(tot)


# ----------------------------------------------------------------------------- phases


def _n_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def _train_arm(phase: str, *, model_cfg, mode: str, objective: str, steps: int, seed: int,
               teacher, source, dataset, evaluator, ctx, program: str,
               spec: tuple) -> tuple[Any, Any, dict]:
  """Trains (or resumes, or restores a finished) arm; returns ``(graphdef, params, info)``.

  ``program`` names the compiled step shared by the arms of ``spec = (modes, objectives)``.
  """
  config, mesh, writer = ctx["config"], ctx["mesh"], ctx["writer"]
  bos = config.vocab + 1
  model = T.build_lm(model_cfg, vocab_size=config.vocab, seq_len=config.seq_len, seed=seed)
  if program not in ctx["programs"]:
    ctx["programs"][program] = {"tx": train.make_optimizer(config.optimizer, steps)}
  prog = ctx["programs"][program]
  tx = prog["tx"]
  graphdef, state = train.create_train_state(model, tx)
  shardings = mesh_lib.state_shardings(state, mesh, fsdp=bool(config.fsdp))
  state = mesh_lib.place(state, shardings)
  ckpt = ckpt_lib.Checkpointer(ctx["ckpt_root"] / phase)
  eval_key = _phase_key(config.seed + 17, "eval")
  info = {"wall_s": 0.0, "tokens_per_s": float("nan")}
  try:
    state, latest = ckpt.restore_latest(state)
    if latest is not None:
      logging.info("[%s] resuming from step %d", phase, latest)
    writer.truncate(phase, latest or 0)
    if latest is not None and latest >= steps:
      return graphdef, state.params, info
    if "step" not in prog:
      prog["step"] = make_step(graphdef, tx, config=config, bos_id=bos, modes=spec[0],
                               objectives=spec[1], state_sharding=shardings)
    step_jit = prog["step"]
    arm = arm_inputs(mode, objective, spec[1], _phase_key(seed, phase))
    step_fn = lambda st, batch: step_jit(st, batch, teacher, source, arm)
    if dataset is not None:
      sampler = data.BatchSampler(len(dataset["tokens"]), config.batch_size, seed)
      get_batch = lambda idx: {k: v[idx] for k, v in dataset.items()}
    else:  # fresh data: the step draws it; the batch is a placeholder of the dataset's shape
      sampler = data.BatchSampler(config.batch_size, config.batch_size, seed)
      get_batch = lambda idx: {"tokens": np.zeros((len(idx), config.seq_len), np.int32),
                               "mask": np.zeros((len(idx), config.seq_len), bool)}
    clock = {"t": time.perf_counter(), "step": latest or 0}
    positions = config.batch_size * config.seq_len

    def callback(st):
      now, step = time.perf_counter(), int(jax.device_get(st.step))
      tps = (step - clock["step"]) * positions / max(now - clock["t"], 1e-9)
      ev = evaluator(T.TransformerTeacher(params=st.params, graphdef=graphdef, bos_id=bos),
                     jax.random.fold_in(eval_key, step))
      ev["tokens_per_s"] = tps
      info.update(tokens_per_s=tps, eval=dict(ev), eval_step=step)
      clock.update(t=time.perf_counter(), step=step)
      return ev

    t0 = time.perf_counter()
    state = train.train_loop(
        state, step_fn, sampler=sampler, get_batch=get_batch, num_steps=steps, mesh=mesh,
        checkpointer=ckpt, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        eval_every=config.eval_every, eval_callback=callback, writer=writer, phase=phase,
        progress=config.progress)
    info["wall_s"] = time.perf_counter() - t0
    return graphdef, state.params, info
  finally:
    ckpt.close()


@functools.lru_cache(maxsize=None)
def _sampler(num: int, seq_len: int):
  return jax.jit(lambda t, k: t.sample(k, num, seq_len))


def _sample_np(teacher, key, num, seq_len):
  tok, m = jax.device_get(_sampler(int(num), int(seq_len))(teacher, key))
  return np.asarray(tok, np.int32), np.asarray(m, bool)


def run(config, workdir) -> dict[str, Any]:
  """Stage 1 (teacher), stage 2 (one student per arm), the golden-metric table; returns it."""
  validate(config)
  smoke = bool(config.get("smoke", False))
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("lm_distill"), flush=True)
  from experiments import ngram  # pylint: disable=import-outside-toplevel
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  logging.info("lm_distill: mesh %s, workdir %s", dict(mesh.shape), workdir)
  writer = metrics.MetricWriter(workdir)
  rep = mesh_lib.replicated(mesh)
  oracle = ngram.ngram_oracle(int(config.vocab))
  oracle_t = T.NGramTeacher.from_oracle(oracle)
  oracle_t = mesh_lib.place(oracle_t, jax.tree.map(lambda _: rep, oracle_t))
  L, n_eval = int(config.seq_len), int(config.eval_size)
  held_o = _sample_np(oracle_t, _phase_key(config.seed, "held_out_oracle"), n_eval, L)
  ctx = {"config": config, "mesh": mesh, "writer": writer, "ckpt_root": workdir / "checkpoints",
         "programs": {}}
  rows: list[dict] = []

  # ---- stage 1: the teacher
  if config.teacher == "oracle":
    teacher = oracle_t
    held_t = held_o
    t_row = {"model": "teacher = oracle", "params": 0}
  else:
    t_steps = int(config.teacher_steps)
    held_t = None
    t_eval = _Evaluator(config, oracle_t, oracle_t, held_o, held_o)
    if config.teacher_workdir:
      t_dir = pathlib.Path(config.teacher_workdir).expanduser() / "checkpoints" / "teacher"
      teacher = T.TransformerTeacher.restore(
          t_dir, model_cfg=config.teacher_model, opt_cfg=config.optimizer,
          vocab_size=config.vocab, seq_len=L, num_steps=t_steps, seed=config.seed, mesh=mesh,
          fsdp=bool(config.fsdp))
      info = {"wall_s": 0.0, "tokens_per_s": float("nan")}
    else:
      g, p, info = _train_arm("teacher", model_cfg=config.teacher_model, mode="seqkd",
                              objective="ce", steps=t_steps, seed=config.seed, teacher=None,
                              source=oracle_t, dataset=None, evaluator=t_eval, ctx=ctx,
                              program="teacher", spec=(("seqkd",), ("ce",)))
      teacher = T.TransformerTeacher(params=p, graphdef=g, bos_id=config.vocab + 1)
    held_t = _sample_np(teacher, _phase_key(config.seed, "held_out_teacher"), n_eval, L)
    t_row = {"model": f"teacher (Transformer d={config.teacher_model.d_model}, CE on oracle)",
             "params": _n_params(teacher.params), "wall_s": info["wall_s"],
             "tokens_per_s": info["tokens_per_s"]}
    if info.get("eval_step") == t_steps:
      t_row.update({k: v for k, v in info["eval"].items() if k != "tokens_per_s"})
  if "golden_fkl" not in t_row:
    t_row.update(_Evaluator(config, oracle_t, oracle_t, held_o, held_o)(
        teacher, jax.random.fold_in(_phase_key(config.seed + 17, "eval"),
                                    int(config.teacher_steps))))
  rows.append(t_row)

  # ---- stage 2: the students
  source = oracle_t if config.data == "oracle" else teacher
  evaluator = _Evaluator(config, oracle_t, teacher, held_o, held_t)
  for arm in config.arms:
    mode, obj = parse_arm(arm)
    phase = f"student_{mode}_{obj}"
    dataset = None
    if mode in ("offline", "gkd"):
      tok, m = _sample_np(source, _phase_key(config.seed, "offline_data"),
                          int(config.offline_size), L)
      dataset = {"tokens": tok, "mask": m}
      if jax.process_index() == 0:
        np.savez(workdir / f"offline_{phase}.npz", tokens=tok, mask=m,
                 source=np.asarray(config.data))
    g, p, info = _train_arm(phase, model_cfg=config.student, mode=mode, objective=obj,
                            steps=int(config.student_steps), seed=config.seed + 1,
                            teacher=teacher, source=source, dataset=dataset,
                            evaluator=evaluator, ctx=ctx, program="student",
                            spec=arm_spec(config.arms))
    row = {"model": f"student {arm}", "params": _n_params(p), "wall_s": info["wall_s"],
           "tokens_per_s": info["tokens_per_s"]}
    if info.get("eval_step") == int(config.student_steps):  # the final evaluation of the loop
      row.update({k: v for k, v in info["eval"].items() if k != "tokens_per_s"})
    else:  # restored from a finished checkpoint: the same evaluation (same key) again
      row.update(evaluator(T.TransformerTeacher(params=p, graphdef=g, bos_id=config.vocab + 1),
                           jax.random.fold_in(_phase_key(config.seed + 17, "eval"),
                                              int(config.student_steps))))
    rows.append(row)

  writer.close()
  cols = ["model", "params", "golden_fkl", "golden_rkl", "proxy_fkl", "proxy_rkl", "ppl",
          "oracle_nll", "tokens_per_s", "wall_s"]
  table = metrics.format_table(rows, cols)
  results = {"seed": config.seed, "vocab": config.vocab, "seq_len": L, "eval_size": n_eval,
             "teacher": config.teacher, "arms": list(config.arms), "rows": rows}
  if jax.process_index() == 0:
    metrics.write_results(workdir, results, config, smoke=smoke)
    print(f"\nlm_distill results (seed {config.seed}; V'={config.vocab}, {L} tokens per "
          f"sentence, {config.student_steps} student steps x {config.batch_size} sentences; "
          f"per-token metrics on {n_eval} held-out oracle sentences / samples):\n{table}\n"
          f"golden_fkl = KL(oracle||model) on oracle sentences, golden_rkl = KL(model||oracle) "
          f"and oracle_nll = -log oracle(y) on model samples, proxy_* = the same against the "
          f"teacher, ppl = perplexity on oracle sentences (exact: the oracle is known).\n"
          f"workdir: {workdir}", flush=True)
    if smoke:
      print(metrics.smoke_banner("lm_distill", end=True), flush=True)
  return results
