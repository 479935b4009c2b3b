"""PACED experiments: the KV-cache decoder, the problem generators, and smoke runs of both configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from experiments import decoding as dec
from experiments import models
from experiments.configs import paced_reasoning as reasoning_config
from experiments.configs import paced_tabular as tabular_config
from experiments.tasks import paced_reasoning, paced_tabular


def _tiny_lm(seed=0, vocab=11, max_len=12):
  return models.Transformer(vocab, d_model=16, num_heads=2, num_layers=2, mlp_dim=32,
                            max_len=max_len, rngs=nnx.Rngs(seed))


def _forward(model):
  """The jitted full (uncached) forward pass of ``model``: tokens [B, L] -> logits [B, L, V]."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, seq: nnx.merge(graphdef, st)(seq))
  return lambda seq: fwd(state, seq)


def _step_logits(model, prompt, tokens):
  """Full-forward (uncached) logits that predicted each generated token: [B, N, V]."""
  seq = jnp.concatenate([prompt, tokens], 1)
  p, n = prompt.shape[1], tokens.shape[1]
  return _forward(model)(seq)[:, p - 1:p + n - 1]


def test_kv_cache_matches_full_forward():
  model = _tiny_lm()
  toks = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 11)
  full = _forward(model)(toks)
  graphdef, state = nnx.split(model)

  @jax.jit
  def cached(state, toks):
    m = nnx.merge(graphdef, state)
    m.init_cache(toks.shape[0])
    return jnp.concatenate([m(toks[:, i:i + 1], decode=True) for i in range(toks.shape[1])], 1)

  np.testing.assert_allclose(cached(state, toks), full, atol=2e-5)
  assert not hasattr(model, "cache_pos")        # the cache lived in a copy
  with pytest.raises(ValueError, match="init_cache"):
    model(toks[:, :1], decode=True)


def test_greedy_sampling_is_argmax_of_the_full_forward_pass():
  model = _tiny_lm()
  prompt = jax.random.randint(jax.random.PRNGKey(1), (3, 4), 0, 11)
  out, lp = dec.sample(model, prompt, max_new_tokens=5, temperature=0)
  # Causal model: fill a fixed-length buffer one argmax at a time (one compilation).
  fwd, seq = _forward(model), jnp.zeros((3, 9), prompt.dtype).at[:, :4].set(prompt)
  for t in range(4, 9):
    seq = seq.at[:, t].set(jnp.argmax(fwd(seq)[:, t - 1], -1))
  np.testing.assert_array_equal(out, seq[:, 4:])
  # Greedy log-probs are those of the (unfiltered) temperature-1 distribution at the argmax.
  want = jnp.take_along_axis(jax.nn.log_softmax(_step_logits(model, prompt, out)),
                             out[..., None], -1)[..., 0]
  np.testing.assert_allclose(lp, want, atol=2e-5)
  # temperature -> 0 sampling converges to the greedy path.
  cold, _ = dec.sample(model, prompt, max_new_tokens=5, temperature=1e-4,
                       key=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(cold, out)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                      dict(temperature=1.3, top_p=0.6),
                                      dict(temperature=1.0, top_k=4, top_p=0.8)])
def test_sampling_support_and_log_probs(settings):
  model = _tiny_lm(seed=2)
  prompt = jnp.tile(jnp.asarray([[1, 2, 3]]), (256, 1))
  toks, lp = dec.sample(model, prompt, max_new_tokens=4, key=jax.random.PRNGKey(0), **settings)
  assert toks.shape == lp.shape == (256, 4) and lp.dtype == jnp.float32
  logits = np.asarray(_step_logits(model, prompt, toks), np.float64) / settings["temperature"]
  # Independent support: top-k by rank, nucleus by the mass of strictly more likely tokens.
  allowed = np.ones(logits.shape, bool)
  if settings.get("top_k"):
    kth = -np.sort(-logits, -1)[..., settings["top_k"] - 1:settings["top_k"]]
    allowed &= logits >= kth
  masked = np.where(allowed, logits, -np.inf)
  if settings.get("top_p"):
    probs = np.exp(masked - masked.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    before = np.array([[[probs[b, t][probs[b, t] > probs[b, t, v]].sum()
                         for v in range(probs.shape[-1])] for t in range(probs.shape[1])]
                       for b in range(probs.shape[0])])
    allowed &= before < settings["top_p"]
  chosen = np.take_along_axis(allowed, np.asarray(toks)[..., None], -1)[..., 0]
  assert chosen.all()
  if settings.get("top_k") or settings.get("top_p"):
    assert allowed.sum(-1).min() < logits.shape[-1]     # the filters did remove tokens
  # log-probs = log_softmax of the processed logits at the sampled tokens.
  proc = dec.process_logits(_step_logits(model, prompt, toks), **settings)
  want = jnp.take_along_axis(jax.nn.log_softmax(proc), toks[..., None], -1)[..., 0]
  np.testing.assert_allclose(lp, want, atol=5e-5)
  # The draws use the filtered distribution, not only its argmax.
  assert len(np.unique(np.asarray(toks[:, 0]))) > 1


def test_process_logits_reference():
  x = jnp.asarray([[2.0, 1.0, 1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(np.isfinite(dec.process_logits(x, top_k=2)), [[1, 1, 1, 0, 0]])
  p = np.exp(np.asarray(x[0])) / np.exp(np.asarray(x[0])).sum()
  keep = dec.process_logits(x, top_p=float(p[0] + 1e-3))          # just over the top-1 mass
  np.testing.assert_array_equal(np.isfinite(keep), [[1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(dec.process_logits(x, top_p=1e-6)), [[1, 0, 0, 0, 0]])
  np.testing.assert_allclose(dec.process_logits(x, temperature=2.0), x / 2)
  assert dec.process_logits(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_sample_under_jit_and_vmap_equals_eager():
  model = _tiny_lm()
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 3), 0, 11)
  key = jax.random.PRNGKey(5)
  eager = dec.sample(model, prompt, max_new_tokens=4, top_k=5, key=key)

  def f(state, k):
    return dec.sample(nnx.merge(graphdef, state), prompt, max_new_tokens=4, top_k=5, key=k)

  jitted = jax.jit(f)(state, key)
  np.testing.assert_array_equal(jitted[0], eager[0])
  np.testing.assert_allclose(jitted[1], eager[1], atol=1e-6)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), state)
  vm = jax.jit(jax.vmap(f, in_axes=(0, None)))(stacked, key)
  np.testing.assert_array_equal(vm[0][1], eager[0])


def test_sample_rejects_bad_settings():
  model = _tiny_lm()
  prompt = jnp.zeros((2, 3), jnp.int32)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="max_len"):
    dec.sample(model, prompt, max_new_tokens=10, key=key)
  with pytest.raises(ValueError, match="key"):
    dec.sample(model, prompt, max_new_tokens=2)
  for bad in (dict(temperature=-1.0), dict(temperature=True), dict(top_k=0), dict(top_k=12),
              dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
    kw = dict(max_new_tokens=2, key=key) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
      dec.sample(model, prompt, **kw)
  with pytest.raises(ValueError, match="prompt"):
    dec.sample(model, jnp.zeros((2, 3)), max_new_tokens=2, key=key)
  with pytest.raises(ValueError, match="num_heads"):
    models.Transformer(11, d_model=16, num_heads=3, rngs=nnx.Rngs(0))


def test_reasoning_problems_are_verifiable():
  rng = np.random.default_rng(0)
  pr = paced_reasoning.make_problems(rng, 200, ndig_probs=[0.25] * 4)
  p = pr["prompt"]
  num = lambda d: (d * 10**np.arange(d.shape[-1])).sum(-1)  # noqa: E731 (LSB first)
  a, b = num(p[:, 2:6]), num(p[:, 6:10])
  assert np.all(num(pr["answer"]) == a + b)
  assert np.all(a < 10**pr["ndig"]) and np.all(b < 10**pr["ndig"])
  cp = paced_reasoning.make_problems(rng, 50, op="copy", ndig_probs=[0.25] * 4)
  assert np.all(num(cp["answer"]) == num(cp["prompt"][:, 2:6]))
  assert p.shape[1] == paced_reasoning.PROMPT and pr["answer"].shape[1] == paced_reasoning.ANS


@pytest.mark.parametrize("mod", [tabular_config, reasoning_config])
def test_config_arguments(mod):
  c = mod.get_config("smoke,seeds=2")
  assert c.num_seeds == 2 and c.task in ("paced_tabular", "paced_reasoning")
  with pytest.raises(ValueError, match="unknown"):
    mod.get_config("smoke,bogus=1")


def _assert_smoke_labelled(text):
  lines = [l for l in text.strip().splitlines() if l.strip()]
  assert lines[0].startswith("SMOKE RUN") and lines[-1].startswith("SMOKE RUN")
  assert "nan" not in text and "±" not in text          # no result-looking table


def test_tabular_smoke(tmp_path, capsys):
  cfg = tabular_config.get_config("smoke")
  out = paced_tabular.run(cfg, tmp_path)
  _assert_smoke_labelled(capsys.readouterr().out)
  assert (tmp_path / "table.txt").read_text().startswith("SMOKE RUN")
  names = [r["variant"] for r in out["rows"]]
  assert set(paced_tabular.ARMS) <= set(names)
  for r in out["rows"]:
    assert 0 <= r["heldout_acc"] <= 1 and np.isfinite(r["forgetting"])
  assert (tmp_path / "paced_tabular.png").exists()
  assert json.loads((tmp_path / "results.json").read_text())["rows"]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["phase"] for r in rows} == set(cfg.arms) and len(rows) == len(cfg.arms) * cfg.steps


def test_reasoning_smoke(tmp_path, capsys):
  cfg = reasoning_config.get_config("smoke")
  out = paced_reasoning.run(cfg, tmp_path)
  assert [r["arm"] for r in out["rows"]] == list(paced_reasoning.ARMS)
  for r in out["rows"]:
    assert 0 <= r["acc"] <= 1 and np.isfinite(r["forgetting"])
  text = capsys.readouterr().out
  assert "self_paced" in text
  _assert_smoke_labelled(text)
  # One seed: no spread estimate, and the saved table says so instead of "± nan".
  assert np.isnan(out["rows"][0]["acc_ci95"]) and "(1 seed)" in out["table"]
  assert "nan" not in out["table"]
  assert (tmp_path / "paced_reasoning.png").exists()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["smoke"] and saved["config"]["task"] == "paced_reasoning"
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["phase"] for r in rows} == set(paced_reasoning.ARMS) and min(r["step"] for r in rows) == 0
  # The teacher is an Orbax checkpoint (no pickle), found again by a rerun.
  assert list((tmp_path / "checkpoints").glob(f"teacher_*/{cfg.teacher_steps}"))
  assert not list(tmp_path.glob("*.pkl"))
  # K rollouts per problem: pass rates are multiples of 1/K.
  ph = np.asarray(saved["seeds"][0]["p_hat0"]) * cfg.k
  np.testing.assert_allclose(ph, np.round(ph), atol=1e-5)
