"""experiments.teachers and the lm_distill task: teacher shapes, exactness against the oracle,
the objectives, golden metrics, validation, and end-to-end runs of every mode.

The end-to-end run is dominated by XLA compilation (~10-25 s per program on a 2-core CPU), so it
uses a one-device mesh (``num_devices=1``); on the suite's 8 fake devices it takes about twice as
long. The 8-device data mesh runs the same code (checked by hand with the smoke config:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16 python -m experiments.main
--config=experiments/configs/lm_distill.py:smoke ...``).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import main, ngram, teachers as T
from experiments import workdir as W
from experiments.configs import lm_distill as lm_config
from experiments.tasks import lm_distill as task
from kdjax import divergences

VOCAB = 511
TINY = {"kind": "transformer", "d_model": 16, "num_heads": 2, "num_layers": 1, "mlp_dim": 32}


@pytest.fixture(scope="module")
def oracle():
  return ngram.ngram_oracle(VOCAB)


@pytest.fixture(scope="module")
def sentences(oracle):
  s = oracle.sample(jax.random.key(3), 6, 12)
  return np.asarray(s.tokens), np.asarray(s.mask)


def test_ngram_teacher_equals_the_oracle_at_every_position(oracle, sentences):
  tok, _ = sentences
  t = T.NGramTeacher.from_oracle(oracle)
  assert isinstance(t, T.Teacher) and t.num_outputs == VOCAB + 1
  lp = np.asarray(t.log_probs(tok))
  assert lp.shape == (6, 12, VOCAB + 1) and lp.dtype == np.float32
  bos = oracle.bos_id
  padded = np.concatenate([np.full((6, 2), bos), tok], axis=1)
  for pos in range(12):   # position t: context (tokens[t-2], tokens[t-1]), <s> before the start
    want = np.asarray(oracle.log_probs(padded[:, pos], padded[:, pos + 1]))
    np.testing.assert_array_equal(lp[:, pos], want)
  jitted = jax.jit(lambda te, x: te.log_probs(x))(t, tok)   # a pytree: tables are traced inputs
  np.testing.assert_array_equal(np.asarray(jitted), lp)
  masked = np.asarray(t.log_probs(tok, where=np.arange(12)[None] < 3))
  np.testing.assert_array_equal(masked[:, :3], lp[:, :3])
  np.testing.assert_allclose(masked[:, 3:], -np.log(VOCAB + 1), rtol=1e-6)
  toks, mask = jax.jit(lambda te, k: te.sample(k, 5, 9))(t, jax.random.key(0))
  assert toks.shape == mask.shape == (5, 9) and mask[:, 0].all()


def test_transformer_teacher_shapes_hidden_head_and_sampling(sentences):
  tok, _ = sentences
  model = T.build_lm(TINY, vocab_size=VOCAB, seq_len=12, seed=0)
  t = T.TransformerTeacher.from_model(model, VOCAB + 1)
  assert isinstance(t, T.Teacher) and t.num_outputs == VOCAB + 1
  lp = np.asarray(t.log_probs(tok))
  assert lp.shape == (6, 12, VOCAB + 1)
  np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(lp, -1)), 0.0, atol=1e-5)
  h = t.hidden(tok)
  assert h.shape == (6, 12, 16) and t.head_weight.shape == (VOCAB + 1, 16)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(h @ t.head_weight.T + t.head_bias)),
                             lp, atol=1e-5)
  # Position 0 is the sentence-start distribution: the model's output after <s> alone.
  first = model(jnp.full((1, 1), VOCAB + 1))[0, 0]
  np.testing.assert_allclose(lp[0, 0], np.asarray(jax.nn.log_softmax(first)), atol=1e-5)
  toks, mask = t.sample(jax.random.key(1), 4, 12)
  assert toks.shape == (4, 12) and int(toks.max()) <= VOCAB   # <s> is never generated
  tk, mk = T.sentence_mask(jnp.array([[5, 0, 7, 0], [1, 2, 3, 4]]))
  np.testing.assert_array_equal(np.asarray(mk), [[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(tk), [[5, 0, 0, 0], [1, 2, 3, 4]])


def test_golden_metrics_are_zero_for_a_student_that_is_the_oracle(oracle, sentences):
  tok, mask = sentences
  t = T.NGramTeacher.from_oracle(oracle)
  sums = task.eval_sums(t, t, t, tok, mask, tok, mask, jax.random.key(0), num_samples=6,
                        seq_len=12)
  ev = task.finalize_eval(dict(jax.device_get(sums), num_samples=6.0))
  for k in ("golden_fkl", "golden_rkl", "proxy_fkl", "proxy_rkl"):
    assert abs(ev[k]) < 1e-5, (k, ev[k])
  lp = np.asarray(t.log_probs(tok))
  nll = -np.take_along_axis(lp, tok[..., None], -1)[..., 0]
  np.testing.assert_allclose(ev["ppl"], np.exp(nll[mask].mean()), rtol=1e-5)
  # A student that is not the oracle: golden_fkl is the exact mean KL(O_t || S_t).
  s = T.TransformerTeacher.from_model(T.build_lm(TINY, vocab_size=VOCAB, seq_len=12, seed=0),
                                      VOCAB + 1)
  sums = task.eval_sums(s, t, t, tok, mask, tok, mask, jax.random.key(0), num_samples=6,
                        seq_len=12)
  ev = task.finalize_eval(dict(jax.device_get(sums), num_samples=6.0))
  kl = np.asarray(divergences.forward_kl(s.log_probs(tok), lp))
  np.testing.assert_allclose(ev["golden_fkl"], kl[mask].mean(), rtol=1e-4)
  assert ev["golden_fkl"] > 0.5 and ev["golden_rkl"] > 0


def test_every_objective_and_the_fused_losses_match_the_materialised_divergences(oracle,
                                                                                 sentences):
  tok, mask = sentences
  model = T.build_lm(TINY, vocab_size=VOCAB, seq_len=12, seed=0)
  t_lp = T.NGramTeacher.from_oracle(oracle).log_probs(tok)
  logits = model(T.shift_right(tok, VOCAB + 1))
  m = mask.astype(np.float32)
  mean = lambda v: float(np.sum(np.asarray(v) * m) / m.sum())
  refs = {"forward_kl": divergences.forward_kl(logits, t_lp),
          "reverse_kl": divergences.reverse_kl(logits, t_lp),
          "jsd": divergences.generalized_jsd(logits, t_lp, beta=0.5),
          "tv": divergences.total_variation(logits, t_lp)}
  for obj in task.OBJECTIVES:
    loss, h = task.arm_loss(model, tok, mask, t_lp, objective=obj, bos_id=VOCAB + 1,
                            tile_size=128)
    assert np.isfinite(float(loss)) and h.shape == (6, 12, 16), obj
    if obj in refs:
      np.testing.assert_allclose(float(loss), mean(refs[obj]), rtol=2e-4, err_msg=obj)
  lp_s = np.asarray(jax.nn.log_softmax(logits))
  l_s = np.take_along_axis(lp_s, tok[..., None], -1)[..., 0]
  l_t = np.take_along_axis(np.asarray(t_lp), tok[..., None], -1)[..., 0]
  d = l_s - l_t
  k3 = float(task.arm_loss(model, tok, mask, t_lp, objective="k3_loss", bos_id=VOCAB + 1)[0])
  np.testing.assert_allclose(k3, np.sum((np.expm1(-d) + d) * m) / d.size, rtol=1e-4)


@pytest.mark.parametrize("key,value", [
    ("arms", ("offline:k1_reward",)), ("arms", ("sideways:forward_kl",)), ("vocab", 0),
    ("teacher", "gpt"), ("data", "web"), ("beta", 1.5), ("gamma", -0.1),
    ("student.num_heads", 3), ("teacher_model.d_model", 0), ("offline_size", 4),
    ("batch_size", 12), ("optimizer.learning_rate", -1.0), ("seq_len", 1)])
def test_validate_rejects_bad_values_naming_the_key(key, value):
  cfg = lm_config.get_config("smoke")
  *head, last = key.split(".")
  node = cfg
  for h in head:
    node = node[h]
  node[last] = value
  with pytest.raises(main.LaunchError) as e:
    main.validate(cfg)
  assert f"config.{key}" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_config_variants():
  c = lm_config.get_config("mode=onpolicy+gkd,objective=reverse_kl,teacher=oracle,vocab=1023")
  assert tuple(c.arms) == ("onpolicy:reverse_kl", "gkd:reverse_kl") and c.vocab == 1023
  assert tuple(lm_config.get_config("mode=seqkd").arms) == ("seqkd:ce",)
  assert {a.split(":")[0] for a in lm_config.get_config("smoke").arms} == set(task.MODES)
  for arg in (None, "smoke", "mode=onpolicy,objective=k1_reward"):
    main.validate(lm_config.get_config(arg))
  with pytest.raises(ValueError, match="unknown argument"):
    lm_config.get_config("modes=offline")


def _tiny_config(**kw):
  c = lm_config.get_config("smoke")
  c.progress = False
  c.teacher_steps, c.student_steps = 3, 3
  c.eval_every, c.log_every, c.checkpoint_every = 3, 3, 3
  c.eval_size = c.eval_batch = 8
  c.offline_size = 8
  c.num_devices = 1   # the 8-device mesh doubles the compile time; see the module docstring
  for k, v in kw.items():
    c[k] = v
  return c


def _run(cfg, wd):
  main.validate(cfg)
  with W.open_workdir(wd, cfg) as d:
    return task.run(cfg, str(d))


def test_every_mode_runs_end_to_end_and_the_teacher_restores(tmp_path, capsys):
  """One run trains a Transformer teacher and every arm of the smoke config (all modes, all
  objectives; one compiled student step shared by the arms); the teacher restored with
  TransformerTeacher.restore (what ``teacher_workdir`` uses) has the same golden metrics."""
  a = tmp_path / "a"
  cfg = _tiny_config()
  assert {task.parse_arm(x)[0] for x in cfg.arms} == set(task.MODES)
  res = _run(cfg, a)
  for f in ("config.json", "results.json", "metrics.jsonl", "offline_student_offline_forward_kl.npz"):
    assert (a / f).is_file(), f
  assert (a / "tb").is_dir() and (a / "checkpoints" / "teacher").is_dir()
  saved = json.loads((a / "results.json").read_text())
  assert saved["smoke"] is True and saved["config"]["arms"] == list(cfg.arms)
  rows = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
  phases = {r["phase"] for r in rows}
  assert phases == {"teacher"} | {"student_" + x.replace(":", "_") for x in cfg.arms}
  ev = [r for r in rows if "eval/golden_fkl" in r]
  assert ev and all(np.isfinite(r["eval/golden_fkl"]) and r["eval/tokens_per_s"] > 0 for r in ev)
  assert [r["model"] for r in res["rows"][1:]] == [f"student {x}" for x in cfg.arms]
  for row in res["rows"]:
    for k in ("golden_fkl", "golden_rkl", "proxy_fkl", "proxy_rkl", "ppl", "oracle_nll"):
      assert np.isfinite(row[k]), (row["model"], k)
  src = {r["phase"]: r["train/from_student"] for r in rows if "train/from_student" in r}
  assert src["student_onpolicy_k1_reward"] == 1.0 and src["student_offline_forward_kl"] == 0.0
  out = capsys.readouterr().out
  assert "lm_distill results" in out and "SMOKE RUN" in out


  teacher = T.TransformerTeacher.restore(
      a / "checkpoints" / "teacher", model_cfg=cfg.teacher_model, opt_cfg=cfg.optimizer,
      vocab_size=cfg.vocab, seq_len=cfg.seq_len, num_steps=cfg.teacher_steps)
  oracle_t = T.NGramTeacher.from_oracle(ngram.ngram_oracle(cfg.vocab))
  held = task._sample_np(oracle_t, task._phase_key(cfg.seed, "held_out_oracle"), cfg.eval_size,
                         cfg.seq_len)
  ev = task._Evaluator(cfg, oracle_t, oracle_t, held, held)(
      teacher, jax.random.fold_in(task._phase_key(cfg.seed + 17, "eval"), cfg.teacher_steps))
  assert ev["golden_fkl"] == pytest.approx(res["rows"][0]["golden_fkl"], rel=1e-5)
  with pytest.raises(ValueError, match="no finished teacher checkpoint"):
    T.TransformerTeacher.restore(
        a / "checkpoints" / "teacher", model_cfg=cfg.teacher_model, opt_cfg=cfg.optimizer,
        vocab_size=cfg.vocab, seq_len=cfg.seq_len, num_steps=cfg.teacher_steps + 1)
