"""PACED experiments: the KV-cache decoder, the problem generators, and smoke runs of both configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import decoding as dec
from experiments.configs import paced_reasoning as reasoning_config
from experiments.configs import paced_tabular as tabular_config
from experiments.tasks import paced_reasoning, paced_tabular


def test_kv_cache_matches_full_forward():
  spec = dec.Spec(vocab=11, d_model=16, num_heads=2, num_layers=2, mlp_dim=32, max_len=12)
  params = dec.init_params(jax.random.PRNGKey(0), spec)
  toks = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 0, 11)
  full = dec.apply(params, toks, spec)

  def run_cache(params, toks):
    def body(cache, i):
      lg, cache = dec.decode_step(params, cache, toks[:, i], i, spec)
      return cache, lg
    return jax.lax.scan(body, dec.init_cache(3, spec), jnp.arange(10))[1].transpose(1, 0, 2)

  np.testing.assert_allclose(jax.jit(run_cache)(params, toks), full, atol=2e-5)
  # Greedy KV-cache sampling = argmax of the full forward pass, token by token.
  out = jax.jit(lambda p, k, pr: dec.sample(p, k, pr, 5, spec, greedy=True))(
      params, jax.random.PRNGKey(2), toks[:, :4])
  seq = toks[:, :4]
  fwd = jax.jit(lambda p, s: dec.apply(p, s, spec))
  for _ in range(5):
    seq = jnp.concatenate([seq, jnp.argmax(fwd(params, seq)[:, -1], -1)[:, None]], 1)
  np.testing.assert_array_equal(out, seq[:, 4:])
  with pytest.raises(ValueError, match="max_len"):
    dec.sample(params, jax.random.PRNGKey(0), toks, 5, spec)
  with pytest.raises(ValueError, match="num_heads"):
    dec.init_params(jax.random.PRNGKey(0), spec._replace(num_heads=3))


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


def test_tabular_smoke(tmp_path):
  cfg = tabular_config.get_config("smoke")
  out = paced_tabular.run(cfg, tmp_path)
  names = [r["variant"] for r in out["rows"]]
  assert set(paced_tabular.ARMS) <= set(names)
  for r in out["rows"]:
    assert 0 <= r["heldout_acc"] <= 1 and np.isfinite(r["forgetting"])
  assert (tmp_path / "paced_tabular.png").exists()
  assert json.loads((tmp_path / "paced_tabular.json").read_text())["rows"]


def test_reasoning_smoke(tmp_path, capsys):
  cfg = reasoning_config.get_config("smoke")
  out = paced_reasoning.run(cfg, tmp_path)
  assert [r["arm"] for r in out["rows"]] == list(paced_reasoning.ARMS)
  for r in out["rows"]:
    assert 0 <= r["acc"] <= 1 and np.isfinite(r["forgetting"])
  assert "self_paced" in capsys.readouterr().out
  assert (tmp_path / "paced_reasoning.png").exists()
  saved = json.loads((tmp_path / "paced_reasoning.json").read_text())
  # K rollouts per problem: pass rates are multiples of 1/K.
  ph = np.asarray(saved["seeds"][0]["p_hat0"]) * cfg.k
  np.testing.assert_allclose(ph, np.round(ph), atol=1e-5)
