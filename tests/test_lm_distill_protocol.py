"""The lm_distill protocol: KV-cache decoding, resume after an interruption, the 8-device data
mesh, the data regime of every mode, and the golden metrics in closed form.

Cost: XLA compilation dominates (the student step of ``task.run`` alone is 15-40 s on a loaded
2-core CPU), so one module fixture runs the task three times on one shared compiled step:

* run A: uninterrupted, arms ``offline:forward_kl``, ``online:forward_kl``,
  ``onpolicy:k1_reward`` (teacher = oracle, 4 steps of 8 sentences, checkpoints every 2 steps);
* run B: the same config in a fresh workdir, interrupted (an exception raised right after the
  ``onpolicy`` phase wrote its step-3 metrics row, one step after its step-2 checkpoint: the
  rows of step 3 are on disk and must be dropped), then resumed in the same workdir.

``task.make_step`` is memoised during the fixture, so the three calls of ``task.run`` (separate
calls, separate train states, one restored from disk) execute the same compiled step program;
it is a pure function of identical configs, so this shares only the compilation. While the
runs execute, the samplers the step calls (``experiments.decoding.sample`` for the student,
``NGramTeacher.sample`` for the fresh source data) and the offline batches are recorded
(``jax.debug.callback``): that is how the tests see the data inside the jitted step. The runs
also share one oracle object (``ngram.ngram_oracle`` memoised): ``NGramTeacher`` keeps it as
static pytree metadata compared by identity, so a fresh one per run would recompile the step,
the evaluator and the samplers of every run.

Measured: ``pytest -q tests/test_lm_distill_protocol.py`` 205-230 s wall, 74 s CPU (user) on
the 2-core machine at load average ~10 (other jobs); the fixture (4 programs: step, two
evaluators, oracle sampler) is half of it, the 8-device step program a quarter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import flax
import pytest
from flax import struct

from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import decoding, main, metrics, ngram, train
from experiments import mesh as mesh_lib
from experiments import teachers as T
from experiments import workdir as W
from experiments.configs import lm_distill as lm_config
from experiments.tasks import lm_distill as task

VOCAB = 511
BOS = VOCAB + 1
L = 12          # tokens per sentence
B = 8           # sentences per step (a multiple of the 8 devices)
STEPS = 4
ARMS = ("offline:forward_kl", "online:forward_kl", "onpolicy:k1_reward")
KILL_AT = ("student_onpolicy_k1_reward", 3)   # (phase, step) whose metrics row is the last


def _phase(arm):
  return "student_" + arm.replace(":", "_")


def _config(**kw):
  c = lm_config.get_config("smoke")
  c.progress = False
  c.teacher = "oracle"          # no teacher stage
  c.arms = ARMS
  c.seq_len, c.batch_size, c.student_steps = L, B, STEPS
  c.log_every, c.checkpoint_every, c.eval_every = 1, 2, STEPS
  c.offline_size = 16              # 2 steps per epoch: 2 epochs in 4 steps
  # != B (the recorders below keep B-row samples only); = offline_size: one sampler program
  c.eval_size = c.eval_batch = 16
  c.num_devices = 1
  for k, v in kw.items():
    c[k] = v
  return c


class _Interrupted(Exception):
  pass


class _Recorder:
  """Host-side log of the arrays the jitted step produced (None: not recording)."""

  def __init__(self):
    self.log = None

  def add(self, tag, *arrays):
    if self.log is not None:
      self.log.append((tag,) + tuple(np.array(a) for a in arrays))

  def take(self, tag):
    return [r[1:] for r in self.log if r[0] == tag]


def _key_data(k):
  k = jnp.asarray(k) if not hasattr(k, "dtype") else k
  return jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k


def _run(cfg, wd):
  main.validate(cfg)
  with W.open_workdir(wd, cfg) as d:
    return task.run(cfg, str(d))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  rec = _Recorder()
  steps_cache = {}
  kill = {"at": None}
  mp = pytest.MonkeyPatch()
  orig_dec, orig_ng = decoding.sample, T.NGramTeacher.sample
  orig_loop, orig_make, orig_write = train.train_loop, task.make_step, metrics.MetricWriter.write

  def dec_sample(model, prompt, *, max_new_tokens, key=None, **kw):
    toks, lps = orig_dec(model, prompt, max_new_tokens=max_new_tokens, key=key, **kw)
    if prompt.shape[0] == B:   # the on-policy batch (evaluation samples have eval_size rows)
      jax.debug.callback(functools.partial(rec.add, "student"), _key_data(key), toks, lps)
    return toks, lps

  def ng_sample(self, key, num, max_len):
    tok, m = orig_ng(self, key, num, max_len)
    if int(num) == B:          # the online batch (held-out / offline sets have other sizes)
      jax.debug.callback(functools.partial(rec.add, "source"), _key_data(key), tok, m)
    return tok, m

  def loop(state, step_fn, *, get_batch, phase, **kw):
    def gb(idx):
      b = get_batch(idx)
      if phase == _phase(ARMS[0]):
        rec.add("batch", b["tokens"], b["mask"])
      return b
    return orig_loop(state, step_fn, get_batch=gb, phase=phase, **kw)

  def make_step(graphdef, tx, *, config, modes, objectives, **kw):
    k = (tuple(modes), tuple(objectives), int(config.num_devices))
    if k not in steps_cache:
      steps_cache[k] = orig_make(graphdef, tx, config=config, modes=modes,
                                 objectives=objectives, **kw)
    return steps_cache[k]

  def write(self, phase, step, scalars):
    orig_write(self, phase, step, scalars)
    if kill["at"] == (phase, step):
      raise _Interrupted(f"{phase} {step}")

  oracle = ngram.ngram_oracle(VOCAB)
  # One oracle object for every run: NGramTeacher holds it as static pytree metadata (compared
  # by identity), so a new object per run would retrace and recompile every program using it.
  mp.setattr(ngram, "ngram_oracle", lambda vocab_size, *a, **k: oracle)
  mp.setattr(decoding, "sample", dec_sample)
  mp.setattr(T.NGramTeacher, "sample", ng_sample)
  mp.setattr(train, "train_loop", loop)
  mp.setattr(task, "make_step", make_step)
  mp.setattr(metrics.MetricWriter, "write", write)
  root = tmp_path_factory.mktemp("lm_protocol")
  out = {"cfg": _config(), "a": root / "a", "b": root / "b", "steps": steps_cache,
         "oracle": oracle}
  try:
    for name, kill_at in (("a", None), ("b1", KILL_AT), ("b2", None)):
      rec.log, kill["at"] = [], kill_at
      wd = out["a"] if name == "a" else out["b"]
      if kill_at is None:
        out["res_" + name] = _run(_config(), wd)
      else:
        with pytest.raises(_Interrupted):
          _run(_config(), wd)
        out["rows_b1"] = _rows(wd)
        out["results_b1"] = (wd / "results.json").exists()
      jax.effects_barrier()
      out["rec_" + name] = _Recorder()
      out["rec_" + name].log, rec.log = rec.log, None
  finally:
    mp.undo()
  return out


def _rows(wd):
  return metrics.read_metrics(pathlib.Path(wd) / "metrics.jsonl")


def _student(graphdef, params):
  """A TransformerTeacher with committed single-device params (one jit signature for all)."""
  return T.TransformerTeacher(params=jax.device_put(params, jax.devices()[0]), graphdef=graphdef,
                              bos_id=BOS)


def _restore(cfg, wd, arm, step):
  """The student train state of ``arm`` at ``step`` from the workdir's checkpoints."""
  model = T.build_lm(cfg.student, vocab_size=VOCAB, seq_len=L, seed=cfg.seed + 1)
  graphdef, state = train.create_train_state(model, train.make_optimizer(cfg.optimizer,
                                                                          cfg.student_steps))
  ck = ckpt_lib.Checkpointer(pathlib.Path(wd) / "checkpoints" / _phase(arm))
  try:
    state, _ = ck.restore(state, step)
  finally:
    ck.close()
  return graphdef, state


def _initial(cfg, mesh=None):
  model = T.build_lm(cfg.student, vocab_size=VOCAB, seq_len=L, seed=cfg.seed + 1)
  tx = train.make_optimizer(cfg.optimizer, cfg.student_steps)
  graphdef, state = train.create_train_state(model, tx)
  if mesh is None:
    return graphdef, tx, state, None
  sh = mesh_lib.state_shardings(state, mesh, fsdp=False)
  return graphdef, tx, mesh_lib.place(state, sh), sh


def _leaves(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


_LOG_PROBS = jax.jit(lambda t, x: t.log_probs(x))


def _check_sentences(raw, tok, mask):
  """Generated rows: ids of the V'+1 outputs (never <s>), the mask True up to and including the
  first </s> (or all L positions), padding </s> after it."""
  raw, tok, mask = np.asarray(raw), np.asarray(tok), np.asarray(mask)
  assert raw.shape == (B, L) and raw.min() >= 0 and raw.max() <= VOCAB   # <s> = V'+1 never
  for r, t, m in zip(raw, tok, mask):
    eos = np.flatnonzero(r == 0)
    n = eos[0] + 1 if len(eos) else L
    np.testing.assert_array_equal(m, np.arange(L) < n)
    np.testing.assert_array_equal(t[:n], r[:n])
    assert (t[n:] == 0).all()


# ----------------------------------------------------------------------------- 1. KV cache


def test_kv_cache_sampling_log_probs_equal_the_full_forward_pass(runs):
  """The per-step log-probs of the KV-cache sampler equal log_softmax of the full-sequence
  forward pass at the sampled tokens, at every kept position: for a random Transformer sampled
  eagerly, and for the student's own on-policy samples inside the jitted training step (drawn
  at the step's current parameters: the initial ones at step 0, the step-2 checkpoint's at
  step 2)."""
  cfg = runs["cfg"]
  t = _student(*flax.nnx.split(T.build_lm(cfg.student, vocab_size=VOCAB, seq_len=L, seed=7)))
  raw, lps = decoding.sample(t.model(), jnp.full((B, 1), BOS, jnp.int32), max_new_tokens=L,
                             key=jax.random.PRNGKey(5))
  cases = [(t, np.asarray(raw), np.asarray(lps))]
  student = runs["rec_a"].take("student")
  assert len(student) == STEPS                     # one on-policy batch per step, nothing else
  g0, _, s0, _ = _initial(cfg)
  g2, s2 = _restore(cfg, runs["a"], ARMS[2], 2)
  for (key, raw_s, lps_s), (g, st) in zip([student[0], student[2]], [(g0, s0), (g2, s2)]):
    cases.append((_student(g, st.params), raw_s, lps_s))
  for teacher, raw, lps in cases:
    tok, mask = (np.asarray(x) for x in T.sentence_mask(raw))
    _check_sentences(raw, tok, mask)
    full = np.asarray(_LOG_PROBS(teacher, raw))   # input [<s>, raw[:, :-1]]
    np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(full, -1)), 0.0, atol=1e-5)
    want = np.take_along_axis(full, raw[..., None], -1)[..., 0]
    np.testing.assert_allclose(lps[mask], want[mask], atol=1e-5, rtol=1e-5)
  # Different parameters (random init vs the run's student) give different distributions.
  assert not np.allclose(cases[0][2], cases[1][2])


def test_ngram_samples_are_oracle_sentences(runs):
  """The fresh online data (NGramTeacher.sample inside the step) are oracle sentences: every
  kept token has positive probability under NGramTeacher.log_probs, and the sentence structure
  (after <s>, cut at </s> or L, </s> padding) holds."""
  oracle_t = T.NGramTeacher.from_oracle(runs["oracle"])
  for _, tok, mask in runs["rec_a"].take("source"):
    _check_sentences(np.where(mask, tok, 0), tok, mask)
    lp = np.asarray(_LOG_PROBS(oracle_t, tok))
    got = np.take_along_axis(lp, tok[..., None], -1)[..., 0][mask]
    assert np.isfinite(got).all() and got.max() <= 0 and got.min() > -40


# ----------------------------------------------------------------------------- 2. resume


def test_interrupted_student_phase_resumes_to_the_uninterrupted_run(runs):
  cfg, a, b = runs["cfg"], runs["a"], runs["b"]
  ra, rb = runs["res_a"], runs["res_b2"]
  timing = ("wall_s", "tokens_per_s")
  assert len(ra["rows"]) == len(rb["rows"]) == 1 + len(ARMS)
  for x, y in zip(ra["rows"], rb["rows"]):
    assert x["model"] == y["model"]
    for k in x:
      if k not in timing and k != "model":
        assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-6), (x["model"], k)
  saved = json.loads((b / "results.json").read_text())
  for x, y in zip(saved["rows"], ra["rows"]):
    assert {k: v for k, v in x.items() if k not in timing} == \
        {k: v for k, v in y.items() if k not in timing}
  # The final student parameters (and optimizer state) of every arm.
  for arm in ARMS:
    _, sa = _restore(cfg, a, arm, STEPS)
    _, sb = _restore(cfg, b, arm, STEPS)
    for x, y in zip(_leaves(sa), _leaves(sb)):
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=arm)
  # metrics.jsonl: every (phase, step, kind) once; the same per-step losses as run A.
  key = lambda r: (r["phase"], r["step"], "eval" if any(k.startswith("eval/") for k in r)
                   else "train")
  rows_a, rows_b = _rows(a), _rows(b)
  kb = [key(r) for r in rows_b]
  assert len(kb) == len(set(kb)) and sorted(kb) == sorted(key(r) for r in rows_a)
  want = {(_phase(arm), s, "train") for arm in ARMS for s in range(1, STEPS + 1)}
  assert want <= set(kb)
  la = {key(r): r for r in rows_a}
  for r in rows_b:
    for k, v in r.items():
      if k.startswith(("train/loss", "train/accuracy", "train/grad_norm", "eval/golden",
                       "eval/proxy", "eval/ppl", "eval/oracle_nll")):
        assert v == pytest.approx(la[key(r)][k], rel=1e-6, abs=1e-7), (key(r), k)
  # The interrupted run stopped mid phase: its step-3 row was on disk (dropped on resume).
  assert not runs["results_b1"]
  k1 = [key(r) for r in runs["rows_b1"]]
  assert (KILL_AT + ("train",)) in k1 and (KILL_AT[0], STEPS, "train") not in k1
  b1 = runs["rec_b1"].take("student")
  b2 = runs["rec_b2"].take("student")
  assert len(b1) == 3 and len(b2) == STEPS - 2
  # The resumed steps drew the same keys and on-policy sentences as the uninterrupted run.
  for x, y in zip(runs["rec_a"].take("student")[2:], b2):
    np.testing.assert_array_equal(x[0], y[0])
    np.testing.assert_array_equal(x[1], y[1])


# ----------------------------------------------------------------------------- 3. 8 devices


def test_eight_device_steps_equal_one_device_steps(runs):
  """Two steps of every arm of the run's compiled 1-device step and of the same step built on
  the 8-device data mesh: equal losses, metrics and updated parameters (rtol 1e-5); the
  1-device steps also reproduce run A's logged losses."""
  cfg = runs["cfg"]
  modes, objectives = task.arm_spec(ARMS)
  step1 = runs["steps"][(modes, objectives, 1)]
  cfg8 = _config(num_devices=8)
  mesh8 = mesh_lib.make_mesh(8)
  mesh1 = mesh_lib.make_mesh(1)
  g8, tx8, _, sh8 = _initial(cfg8, mesh8)
  step8 = task.make_step(g8, tx8, config=cfg8, bos_id=BOS, modes=modes, objectives=objectives,
                         state_sharding=sh8)
  with np.load(runs["a"] / f"offline_{_phase(ARMS[0])}.npz") as z:
    data = {"tokens": z["tokens"], "mask": z["mask"]}
  logged = {(r["phase"], r["step"]): r["train/loss"] for r in _rows(runs["a"])
            if "train/loss" in r}
  oracle = T.NGramTeacher.from_oracle(runs["oracle"])
  sampler = data_lib.BatchSampler(cfg.offline_size, B, cfg.seed + 1)
  for arm in ARMS:
    mode, obj = task.parse_arm(arm)
    arm_in = task.arm_inputs(mode, obj, objectives, task._phase_key(cfg.seed + 1, _phase(arm)))  # pylint: disable=protected-access
    outs = []
    for mesh, step in ((mesh1, step1), (mesh8, step8)):
      _, _, state, _ = _initial(cfg, mesh)
      rep = mesh_lib.replicated(mesh)
      o = mesh_lib.place(oracle, jax.tree.map(lambda _: rep, oracle))
      losses = []
      for s in range(2):
        if mode == "offline":
          idx = sampler.indices(s)
          batch = {k: v[idx] for k, v in data.items()}
        else:
          batch = {"tokens": np.zeros((B, L), np.int32), "mask": np.zeros((B, L), bool)}
        state, m = step(state, mesh_lib.shard_batch(batch, mesh), o, o, arm_in)
        losses.append({k: float(v) for k, v in jax.device_get(m).items()})
      outs.append((losses, _leaves(state.params)))
    (l1, p1), (l8, p8) = outs
    p0 = _leaves(_initial(cfg)[2].params)
    for s, (x, y) in enumerate(zip(l1, l8)):
      assert x["loss"] == pytest.approx(logged[(_phase(arm), s + 1)], rel=1e-6), (arm, s)
      for k in x:
        assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (arm, s, k)
    # Updated parameters: the update of the 8-device run equals the 1-device one (relative
    # 1e-3 in norm). Per entry within 1e-4 (7 % of the step-1 learning rate 1.5e-3): the
    # attention key bias has a zero true gradient, and Adam turns its rounding noise (which
    # depends on the reduction order) into steps of up to ~lr.
    d1 = np.concatenate([(x - z).ravel() for x, z in zip(p1, p0)])
    d8 = np.concatenate([(y - z).ravel() for y, z in zip(p8, p0)])
    assert np.linalg.norm(d1) > 1e-3, arm   # the params moved
    assert np.linalg.norm(d8 - d1) <= 1e-3 * np.linalg.norm(d1), arm
    for x, y in zip(p1, p8):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-4, err_msg=arm)


# ----------------------------------------------------------------------------- 4. data regimes


def _hashes(tok, mask):
  return [hashlib.sha1(np.where(m, t, -1).astype(np.int32).tobytes()).hexdigest()
          for t, m in zip(tok, mask)]


def test_data_regimes(runs):
  cfg = runs["cfg"]
  rec = runs["rec_a"]
  # offline: the dataset in the workdir, each of its rows seen exactly once per epoch.
  with np.load(runs["a"] / f"offline_{_phase(ARMS[0])}.npz") as z:
    tok, mask = z["tokens"], z["mask"]
    assert str(z["source"]) == "teacher"
  assert tok.shape == (cfg.offline_size, L) and mask[:, 0].all()
  rows = sorted(_hashes(tok, mask))
  batches = rec.take("batch")
  per_epoch = cfg.offline_size // B
  assert len(batches) == STEPS
  for e in range(STEPS // per_epoch):
    seen = [h for t, m in batches[e * per_epoch:(e + 1) * per_epoch] for h in _hashes(t, m)]
    assert sorted(seen) == rows, e
  # online: fresh source sentences every step (new keys, new sentences).
  online = rec.take("source")
  assert len(online) == STEPS
  keys = {k.tobytes() for k, _, _ in online}
  assert len(keys) == STEPS
  hs = [set(_hashes(t, m)) for _, t, m in online]
  for i in range(STEPS):
    for j in range(i):
      assert len(hs[i] & hs[j]) <= 1, (i, j)   # short sentences may coincide by chance
  assert len(set().union(*hs)) >= STEPS * B - 3
  # on-policy: samples of the *current* parameters. The step-2 batch is what the step-2
  # checkpoint's parameters sample with the step's key; the initial and the final parameters
  # give other sentences for that key; the same parameters and key give the same sentences.
  student = rec.take("student")
  key2, raw2, _ = student[2]
  g2, s2 = _restore(cfg, runs["a"], ARMS[2], 2)
  g4, s4 = _restore(cfg, runs["a"], ARMS[2], STEPS)
  g0, _, s0, _ = _initial(cfg)
  smp = lambda g, st: np.asarray(_student(g, st.params).sample(key2, B, L)[0])
  want = np.asarray(T.sentence_mask(raw2)[0])
  np.testing.assert_array_equal(smp(g2, s2), want)
  np.testing.assert_array_equal(smp(g2, s2), want)
  assert (smp(g0, s0) != want).any() and (smp(g4, s4) != want).any()
  assert len({k.tobytes() for k, _, _ in student}) == STEPS


# ----------------------------------------------------------------------------- 5. closed form


@struct.dataclass
class _Unigram:
  """A student with the same next-token distribution ``exp(logq)`` at every position."""

  logq: jax.Array

  @property
  def num_outputs(self):
    return int(self.logq.shape[-1])

  def log_probs(self, tokens, where=None):
    del where
    tokens = jnp.asarray(tokens)
    return jnp.broadcast_to(self.logq, tokens.shape + self.logq.shape)

  def sample(self, key, num, max_len):
    return T.sentence_mask(jax.random.categorical(key, self.logq, shape=(num, max_len)))


def test_golden_metrics_of_a_unigram_student_in_closed_form(runs):
  oracle_t = T.NGramTeacher.from_oracle(runs["oracle"])
  rng = np.random.default_rng(0)
  logq64 = rng.normal(size=VOCAB + 1) * 2.0
  logq64 -= np.log(np.sum(np.exp(logq64)))
  uni = _Unigram(logq=jnp.asarray(logq64, jnp.float32))
  logq64 = np.asarray(uni.logq, np.float64)
  logq64 -= np.log(np.sum(np.exp(logq64)))
  _, tok, mask = runs["rec_a"].take("source")[0]    # 8 oracle sentences
  key = jax.random.key(11)
  sums = jax.jit(task.eval_sums, static_argnames=("num_samples", "seq_len"))(
      uni, oracle_t, oracle_t, tok, mask, tok, mask, key, num_samples=B, seq_len=L)
  ev = task.finalize_eval(dict(jax.device_get(sums), num_samples=float(B)))

  def kl_rows(lp_p, lp_q):   # KL(p || q) per position, float64, 0 log 0 = 0
    p = np.exp(lp_p)
    return np.sum(np.where(p > 0, p * (lp_p - lp_q), 0.0), -1)

  o_lp = np.asarray(_LOG_PROBS(oracle_t, tok), np.float64)
  fkl = kl_rows(o_lp, logq64)[mask].mean()
  assert ev["golden_fkl"] == pytest.approx(fkl, rel=1e-6)
  assert ev["proxy_fkl"] == pytest.approx(fkl, rel=1e-6)      # the teacher is the oracle
  nll = -logq64[tok][mask].mean()
  assert ev["ppl"] == pytest.approx(np.exp(nll), rel=1e-6)
  ys, ym = (np.asarray(x) for x in uni.sample(key, B, L))       # the metric's own samples
  o_lp_s = np.asarray(_LOG_PROBS(oracle_t, ys), np.float64)
  rkl = kl_rows(np.broadcast_to(logq64, o_lp_s.shape), o_lp_s)[ym].mean()
  assert ev["golden_rkl"] == pytest.approx(rkl, rel=1e-6)
  onll = -np.take_along_axis(o_lp_s, ys[..., None], -1)[..., 0][ym].mean()
  assert ev["oracle_nll"] == pytest.approx(onll, rel=1e-6)
  assert fkl > 0.5   # far from the oracle: a real comparison
