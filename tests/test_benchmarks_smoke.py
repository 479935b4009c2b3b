"""Smoke test of the device benchmarks: they run at a tiny shape and print their tables.

No timing is asserted. ``pallas`` is skipped (its kernel runs in interpret mode on CPU), and the
whole lm_distill train step is not compiled here (~30 s per program on a 2-core CPU): only the
script's random table teacher (log-probs; not its sampler) and its loss-alone program are
exercised.
"""

import importlib.util
import io
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCH / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # flax.struct dataclasses look their module up here
  spec.loader.exec_module(mod)
  return mod


def test_benchmark_scripts_run_at_a_tiny_shape():
  fld = _load("fused_linear_device")
  out = io.StringIO()
  rows = fld.main(["--small", "--n=32", "--h=16", "--v=128", "--reps=2", "--warmup=1",
                   "--losses=jsd_ce", "--implementations=plain,streaming", "--isolate=no"],
                  out=out)
  text = out.getvalue()
  assert "| 4-GEMM floor | floor |" in text and "Liger" in text
  for impl in ("plain", "streaming"):
    assert f"| JSD(beta=0.5) + 0.5 CE | {impl} |" in text
  assert "n/a:" not in text
  vals = [r["value"] for r in rows if r["loss"] == "jsd_ce"]
  np.testing.assert_allclose(vals, vals[0], rtol=2e-3)   # plain JAX == fused streaming

  lm = _load("lm_student_step")
  t = lm.TableTeacher.random(vocab=63, rows=8)
  tok = jax.random.randint(jax.random.key(0), (16, 32), 0, 64)
  t_lp = t.log_probs(tok)
  np.testing.assert_allclose(jnp.exp(t_lp).sum(-1), 1.0, rtol=1e-5)
  config = lm.load_config(63, "streaming")
  compiled, mem = lm.loss_program(63, "streaming", config)
  h = jax.random.normal(jax.random.key(1), (16, 32, config.student.d_model))
  loss, _ = compiled(h, jnp.zeros((64, config.student.d_model)), jnp.zeros((64,)), tok,
                     jnp.ones((16, 32), bool), t_lp)
  assert mem["temp"] > 0 and np.isfinite(float(loss))
