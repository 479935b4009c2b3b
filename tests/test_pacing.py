"""Tests of kdjax.pacing (PACED weights, arXiv:2603.11178). The statistical/theory claims are
registered checks in theory/paced.py (run by tests/test_theory.py); here: API, edge cases, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kdjax import divergences as D
from kdjax import pacing as P
from kdjax import reductions as R


# ----------------------------------------------------------------------------- pass rates


def test_pass_rate_raw_and_masked():
  r = jnp.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], jnp.float32)
  np.testing.assert_allclose(P.pass_rate(r), [0.75, 0, 1, 0.25])
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  # Padding rollouts are ignored; a problem without rollouts gets 0.
  np.testing.assert_allclose(P.pass_rate(r, where=mask), [0.5, 0, 1, 0])
  c, n = P.rollout_counts(r, where=mask)
  np.testing.assert_allclose(c, [1, 0, 1, 0])
  np.testing.assert_allclose(n, [2, 4, 1, 0])


def test_posterior_pass_rate():
  r = jnp.array([[1, 0, 1, 1], [0, 0, 0, 0]], jnp.float32)
  np.testing.assert_allclose(P.posterior_pass_rate(r), [4 / 6, 1 / 6], rtol=1e-6)
  np.testing.assert_allclose(P.posterior_pass_rate(r, a0=2, b0=0.5), [5 / 6.5, 2 / 6.5],
                             rtol=1e-6)
  # No rollouts: the prior mean.
  np.testing.assert_allclose(P.posterior_pass_rate(r, where=jnp.zeros((2, 4), bool), a0=1, b0=3),
                             [0.25, 0.25])


def test_pass_rate_jits():
  r = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(jax.jit(P.pass_rate)(r), [0.5, 1.0])


@pytest.mark.parametrize("bad,exc", [(jnp.ones(3), ValueError), (jnp.ones((2, 2, 2)), ValueError),
                                     (jnp.full((2, 2), 2.0), ValueError), ("x", TypeError)])
def test_pass_rate_errors(bad, exc):
  with pytest.raises(exc, match="rewards"):
    P.pass_rate(bad)


def test_pass_rate_mask_errors():
  with pytest.raises(ValueError, match="where"):
    P.pass_rate(jnp.ones((2, 3)), where=jnp.ones((2, 2), bool))
  with pytest.raises(TypeError, match="where"):
    P.pass_rate(jnp.ones((2, 3)), where=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="a0"):
    P.posterior_pass_rate(jnp.ones((2, 3)), a0=0.0)


# ----------------------------------------------------------------------------- weights


def test_beta_weight_values(x64):
  p = jnp.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(P.beta_weight(p), [0, 0.1875, 0.25, 0], rtol=1e-15)
  np.testing.assert_allclose(P.beta_weight(p, alpha=2, beta=0.5),
                             [0, 0.0625 * 0.75**0.5, 0.25 * 0.5**0.5, 0], rtol=1e-14)
  # Zero exponents drop their factor (0^0 = 1).
  np.testing.assert_allclose(P.beta_weight(p, alpha=0, beta=1), [1, 0.75, 0.5, 0])
  np.testing.assert_allclose(P.beta_weight(p, alpha=1, beta=0), [0, 0.25, 0.5, 1])
  assert P.beta_weight_mode(1, 3) == pytest.approx((0.25, 0.25 * 0.75**3))


def test_beta_weight_grad_finite_and_dtype():
  g = jax.grad(lambda p: P.beta_weight(p, alpha=0.5, beta=0.5).sum())(jnp.array([0.0, 0.3, 1.0]))
  assert np.all(np.isfinite(g)) and g[0] == 0 and g[2] == 0
  assert P.beta_weight(jnp.array([0.5], jnp.bfloat16)).dtype == jnp.float32
  # Large exponents: tiny, but no NaN.
  w = P.beta_weight(jnp.array([0.5]), alpha=200.0, beta=200.0)
  assert np.all(np.isfinite(w))


@pytest.mark.parametrize("kw", [dict(alpha=-1.0), dict(beta=float("nan")), dict(alpha=float("inf"))])
def test_beta_weight_errors(kw):
  with pytest.raises(ValueError, match="alpha|beta"):
    P.beta_weight(jnp.array([0.5]), **kw)


def test_beta_weight_rejects_out_of_range():
  with pytest.raises(ValueError, match="`p`"):
    P.beta_weight(jnp.array([0.5, 1.5]))


def test_normalize_modes_and_mask():
  w = jnp.array([1.0, 3.0, 0.0, 4.0])
  np.testing.assert_allclose(P.normalize_weights(w), w / 2, rtol=1e-6)
  np.testing.assert_allclose(P.normalize_weights(w, mode="sum"), w / 8, rtol=1e-6)
  np.testing.assert_allclose(P.normalize_weights(w, mode="none"), w)
  keep = jnp.array([True, True, True, False])
  np.testing.assert_allclose(P.normalize_weights(w, where=keep), [0.75, 2.25, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(P.normalize_weights(jnp.zeros(5)), np.zeros(5))
  with pytest.raises(ValueError, match="mode"):
    P.normalize_weights(w, mode="max")
  with pytest.raises(ValueError, match="where"):
    P.normalize_weights(w, where=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="eps"):
    P.normalize_weights(w, eps=-1e-3)
  # eps is in the units of the weights: eps = mean gives half the mean-one weights.
  np.testing.assert_allclose(P.normalize_weights(w, eps=2.0), w / 4, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=32, max_size=32),
       st.sampled_from([(1.0, 1.0), (1.0, 3.0), (2.0, 0.5)]))
def test_paced_weights_mean_one_or_zero(counts, ab):
  p = jnp.asarray(np.array(counts) / 8, jnp.float32)
  w = np.asarray(P.paced_weights(p, alpha=ab[0], beta=ab[1]))
  assert np.all(w >= 0) and np.all(np.isfinite(w))
  if np.all((np.array(counts) == 0) | (np.array(counts) == 8)):
    assert np.all(w == 0)
  else:
    assert abs(w.mean() - 1) < 1e-5


# ----------------------------------------------------------------------------- reduction


def test_weighted_sum_and_count_matches_formula(x64):
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.uniform(size=(6, 5)))
  mask = jnp.asarray(rng.uniform(size=(6, 5)) < 0.7).at[:, 0].set(True).at[3].set(False)
  w = jnp.asarray(rng.uniform(size=6))
  acc = P.weighted_sum_and_count(tok, w, where=mask)
  m = np.asarray(mask)
  per_ex = (np.asarray(tok) * m).sum(1) / np.maximum(m.sum(1), 1)
  valid = m.sum(1) > 0
  np.testing.assert_allclose(acc.sum, (np.asarray(w) * per_ex)[valid].sum(), rtol=1e-12)
  assert float(acc.count) == valid.sum() == 5


def test_paced_loss_token_level_with_kl_and_grad():
  rng = np.random.default_rng(1)
  zs = jnp.asarray(rng.normal(size=(8, 4, 6)), jnp.float32)
  zt = jnp.asarray(rng.normal(size=(8, 4, 6)), jnp.float32)
  p = jnp.array([0, 0.5, 0.25, 1, 0.75, 0.5, 0.125, 0.875], jnp.float32)
  loss = lambda z: P.paced_loss(D.forward_kl(z, zt), p)  # noqa: E731
  val, g = jax.jit(jax.value_and_grad(loss))(zs)
  assert np.isfinite(val) and val > 0
  # Problems with p in {0, 1} get weight 0: no gradient reaches their logits.
  assert float(jnp.abs(g[0]).max()) == 0 and float(jnp.abs(g[3]).max()) == 0
  assert float(jnp.abs(g[1]).max()) > 0
  # Weighting with p_b(1-p_b)/mean equals the explicit formula.
  per_ex = D.forward_kl(zs, zt).mean(1)
  w = p * (1 - p)
  np.testing.assert_allclose(val, jnp.mean(w / w.mean() * per_ex), rtol=1e-5)


def test_weighted_sum_and_count_errors():
  with pytest.raises(ValueError, match="weights"):
    P.weighted_sum_and_count(jnp.ones((4, 3)), jnp.ones(3))
  with pytest.raises(ValueError, match="where"):
    P.weighted_sum_and_count(jnp.ones((4, 3)), jnp.ones(4), where=jnp.ones(4, bool))


def test_reduction_is_sum_and_count_pytree():
  acc = P.weighted_sum_and_count(jnp.ones(4), jnp.full(4, 2.0))
  assert isinstance(acc, R.SumAndCount)
  assert float(R.finalize_mean(acc + acc)) == 2.0


# ----------------------------------------------------------------------------- schedule


def test_two_stage_mix_and_loss():
  steps = jnp.arange(10)
  np.testing.assert_array_equal(P.two_stage_mix(steps, switch_step=4), (np.arange(10) >= 4))
  np.testing.assert_allclose(P.two_stage_mix(steps, switch_step=2, transition_steps=4),
                             np.clip((np.arange(10) - 2) / 4, 0, 1))
  # The inactive direction never leaks (even an inf).
  assert float(P.two_stage_loss(1.0, jnp.inf, 3, switch_step=4)) == 1.0
  assert float(P.two_stage_loss(jnp.inf, 2.0, 4, switch_step=4)) == 2.0
  val = jax.jit(lambda s: P.two_stage_loss(1.0, 3.0, s, switch_step=2, transition_steps=2))(3)
  assert float(val) == pytest.approx(2.0)


def test_refresh_due():
  due = [bool(P.refresh_due(s, every=4, switch_step=6)) for s in range(10)]
  assert [s for s, d in enumerate(due) if d] == [0, 4, 6, 8]


@pytest.mark.parametrize("kw", [dict(switch_step=-1), dict(switch_step=2.5),
                                dict(switch_step=1, transition_steps=-2),
                                dict(switch_step=True)])
def test_schedule_errors(kw):
  with pytest.raises((ValueError, TypeError), match="step"):
    P.two_stage_mix(0, **kw)
  with pytest.raises(ValueError, match="every"):
    P.refresh_due(0, every=0)


def test_mocked_pipeline_switch_and_refresh():
  from theory.paced import mocked_two_stage_pipeline  # pylint: disable=import-outside-toplevel
  used, refreshed = mocked_two_stage_pipeline(12, switch_step=7, refresh_every=5)
  np.testing.assert_array_equal(used, np.where(np.arange(12) < 7, 1.0, 1000.0))
  assert refreshed == [0, 5, 7, 10]


# ----------------------------------------------------------------------------- diagnostics


def test_efficiency_and_gain(x64):
  mu = jnp.array([0.5, 1.0, 0.2])
  s2 = jnp.array([1.0, 0.5, 2.0])
  w_star = P.snr_optimal_weight(mu, s2)
  assert float(P.efficiency(w_star, mu, s2)) == pytest.approx(1.0, abs=1e-14)
  assert float(P.efficiency(jnp.ones(3), mu, s2)) < 1
  assert float(P.efficiency(jnp.zeros(3), mu, s2)) == 0.0
  w0 = mu**2 / (mu**2 + s2)
  np.testing.assert_allclose(P.one_step_gain(w0, mu, s2), 0.5 * mu**4 / (mu**2 + s2), rtol=1e-14)


def test_snr_model_closed_form(x64):
  mu, s2, snr = P.snr_model(jnp.array([0.5]), c=2.0, s=1.0, sigma0=0.1, k=4)
  np.testing.assert_allclose(mu, [0.5], rtol=1e-15)
  np.testing.assert_allclose(s2, [0.125 * 1.5 / 4 + 0.01], rtol=1e-15)
  np.testing.assert_allclose(snr, mu**2 / s2)
  with pytest.raises(ValueError, match="k"):
    P.snr_model(0.5, k=0)


def test_gradient_snr_by_bin_known_signal(x64):
  rng = np.random.default_rng(3)
  n, d = 4000, 16
  p = np.concatenate([np.full(n, 0.15), np.full(n, 0.55)])
  mean = np.zeros(d)
  mean[0] = 1.0
  g = np.concatenate([rng.normal(size=(n, d)) * 0.5 + 0.0 * mean,
                      rng.normal(size=(n, d)) * 0.5 + mean])
  est = P.gradient_snr_by_bin(jnp.asarray(g), jnp.asarray(p), bins=5)
  snr = np.asarray(est.snr)
  assert np.isnan(snr[[1, 3, 4]]).all()         # empty bins
  np.testing.assert_array_equal(est.counts, [n, 0, n, 0, 0])
  assert abs(snr[0]) < 5 * np.sqrt(2 / d) / n * 4   # zero signal: ~0
  np.testing.assert_allclose(snr[2], 1.0 / (0.25 * d), rtol=0.1)
  with_dir = P.gradient_snr_by_bin(jnp.asarray(g), jnp.asarray(p), bins=5, direction=mean)
  np.testing.assert_allclose(with_dir.snr[2], 1.0 / (0.25 * d), rtol=0.1)


def test_gradient_snr_by_bin_errors():
  with pytest.raises(ValueError, match="`p`"):
    P.gradient_snr_by_bin(jnp.ones((4, 2)), jnp.ones(3))
  with pytest.raises(ValueError, match="bins"):
    P.gradient_snr_by_bin(jnp.ones((4, 2)), jnp.ones(4), bins=0)
  with pytest.raises(ValueError, match="direction"):
    P.gradient_snr_by_bin(jnp.ones((4, 2)), jnp.ones(4), direction=jnp.ones(3))


def test_fast_rollout_simulator_matches_direct():
  """The cheap exact sampler of theory/paced.py has the law of the literal generator."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  from theory import paced as T  # pylint: disable=import-outside-toplevel
  for p in (0.2, 0.7):
    fast = T.simulate_rollout_gradients(p, 3000, dim=16, seed=1)
    direct = T.simulate_rollout_gradients_direct(p, 3000, dim=16, seed=2)
    for stat in (lambda g: g[:, 0], lambda g: np.sum(g**2, 1), lambda g: g[:, 5]):
      assert stats.ks_2samp(stat(fast), stat(direct)).pvalue > 1e-3
    assert np.allclose(fast.mean(0)[0], p * (1 - p), atol=0.02)


# ----------------------------------------------------------------------------- regressions

_JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(f, jit):
  return jax.jit(f) if jit else f


@_JIT
@pytest.mark.parametrize("k", [1, 12, 15, 20, 64, 200])
def test_paced_weights_mean_one_for_large_exponents(k, jit):
  """N11: linear-space normalisation gave means 0.778, 0.048, 4e-5, 0 for k = 12, 15, 20, 64."""
  p = jnp.array([.5, .4, .3, .6])
  w = _maybe_jit(lambda q: P.paced_weights(q, alpha=k, beta=k), jit)(p)
  assert abs(float(w.mean()) - 1.0) < 1e-5
  # The ratios are those of the exact weights (float64 reference).
  pe = np.array([.5, .4, .3, .6], np.float32).astype(np.float64)
  lw = k * np.log(pe) + k * np.log1p(-pe)
  ref = np.exp(lw - lw.max())
  np.testing.assert_allclose(w, ref / ref.mean(), rtol=1e-4 * max(k, 10) / 10)


def test_normalize_weights_tiny_weights_mean_one():
  """N11: eps = 1e-8 in the denominator gave [0.0099 0.0099] for weights 1e-10."""
  np.testing.assert_allclose(P.normalize_weights(jnp.array([1e-10, 1e-10])), [1.0, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(P.normalize_weights(jnp.array([1e-30, 3e-30]), mode="sum"),
                             [0.25, 0.75], rtol=1e-6)


@_JIT
def test_nan_pass_rate_propagates(jit):
  """N1: `p > 0` treated a NaN pass rate as the boundary (weight 0)."""
  p = jnp.array([jnp.nan, 0.3, 0.5, 0.0])
  w = np.asarray(_maybe_jit(P.beta_weight, jit)(p))
  assert np.isnan(w[0]) and np.all(np.isfinite(w[1:])) and w[3] == 0
  assert np.isnan(np.asarray(_maybe_jit(P.paced_weights, jit)(p))).all()
  assert np.isnan(np.asarray(_maybe_jit(P.normalize_weights, jit)(jnp.array([jnp.nan, 1.0])))).all()
  assert np.isnan(float(_maybe_jit(P.paced_loss, jit)(jnp.ones(4), p)))
  # A NaN reward reaches the pass rate of its problem only.
  pr = np.asarray(P.pass_rate(jnp.array([[jnp.nan, 1.0], [1.0, 0.0]])))
  assert np.isnan(pr[0]) and pr[1] == 0.5
  # Efficiency: NaN is not the degenerate 0.
  assert np.isnan(float(P.efficiency(jnp.array([jnp.nan, 1.0]), jnp.ones(2), jnp.ones(2))))


def test_array_hyper_parameters_checked_elementwise():
  """N3/N24: array exponents skipped the range check; errors name the argument."""
  p = jnp.array([0.2, 0.5])
  with pytest.raises(ValueError, match="alpha"):
    P.beta_weight(p, alpha=jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="beta"):
    P.paced_weights(p, beta=np.array([2.0, np.nan]))
  for bad in (True, "1"):
    with pytest.raises(TypeError, match="alpha"):
      P.beta_weight(p, alpha=bad)
  # Per-example exponents broadcast against p.
  np.testing.assert_allclose(P.beta_weight(p, alpha=jnp.array([1.0, 2.0]), beta=1.0),
                             [0.2 * 0.8, 0.25 * 0.5], rtol=1e-6)
  with pytest.raises(ValueError, match="a0"):
    P.posterior_pass_rate(jnp.ones((2, 3)), a0=jnp.array([1.0, 0.0]))
  with pytest.raises(ValueError, match="sigma2"):
    P.efficiency(jnp.ones(2), jnp.ones(2), jnp.array([1.0, 0.0]))
  with pytest.raises(ValueError, match="sigma2"):
    P.snr_optimal_weight(jnp.ones(2), -jnp.ones(2))
  # numpy integers accepted for integer arguments, bool rejected.
  assert float(P.two_stage_mix(5, switch_step=np.int64(3))) == 1.0
  assert bool(P.refresh_due(8, every=np.int32(4)))
  with pytest.raises(TypeError, match="every"):
    P.refresh_due(0, every=True)
  with pytest.raises(TypeError, match="k"):
    P.snr_model(0.5, k=2.0)
  with pytest.raises(TypeError, match="bins"):
    P.gradient_snr_by_bin(jnp.ones((4, 2)), jnp.ones(4) / 2, bins=True)


def test_negative_weights_rejected():
  """N8: negative weights were accepted by normalize_weights / weighted_sum_and_count."""
  with pytest.raises(ValueError, match="weights"):
    P.normalize_weights(jnp.array([-1.0, 2.0]))
  with pytest.raises(ValueError, match="weights"):
    P.weighted_sum_and_count(jnp.ones(2), jnp.array([1.0, -0.5]))
  with pytest.raises(ValueError, match="weights"):
    P.weighted_sum_and_count(jnp.ones(2), jnp.array([1.0, jnp.inf]))
  with pytest.raises(TypeError, match="where"):
    P.weighted_sum_and_count(jnp.ones((2, 3)), jnp.ones(2), where=jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="where"):
    P.normalize_weights(jnp.ones(2), where=jnp.array([1.0, 0.0]))


@_JIT
def test_where_broadcastable(jit):
  """A1: `where` is a boolean mask broadcastable to the input (was: exact shape only)."""
  rng = np.random.default_rng(5)
  tok = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)
  w = jnp.array([1.0, 2.0, 0.5, 1.0])
  ex = jnp.array([True, False, True, True])
  f = _maybe_jit(lambda m: P.weighted_sum_and_count(tok, w, where=m), jit)
  a, b = f(ex[:, None]), f(jnp.broadcast_to(ex[:, None], (4, 3)))
  np.testing.assert_allclose(a.sum, b.sum, rtol=1e-6)
  assert int(a.count) == int(b.count) == 3 and a.count.dtype == jnp.int32
  # A scalar mask broadcasts too.
  np.testing.assert_allclose(P.normalize_weights(w, where=jnp.array(True)), P.normalize_weights(w))
  r = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  np.testing.assert_allclose(P.pass_rate(r, where=jnp.array([True, True, False])), [0.5, 1.0])
  np.testing.assert_allclose(P.paced_loss(tok, w / 4, where=ex[:, None]),
                             P.paced_loss(tok, w / 4, where=jnp.broadcast_to(ex[:, None], (4, 3))),
                             rtol=1e-6)


def test_bfloat16_in_float32_out():
  """N7: every function computes and returns float32 for bfloat16 input."""
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  p = bf([0.25, 0.5, 0.75])
  outs = [P.beta_weight(p), P.paced_weights(p), P.normalize_weights(bf([1.0, 2.0])),
          P.weighted_sum_and_count(bf([1.0, 2.0]), bf([1.0, 1.0])).sum,
          *P.snr_model(p), P.snr_optimal_weight(p, p), P.efficiency(p, p, p),
          P.one_step_gain(p, p, p), P.pass_rate(bf([[1.0, 0.0]])),
          P.two_stage_loss(bf(1.0), bf(2.0), 3, switch_step=2)]
  assert all(o.dtype == jnp.float32 for o in outs), [o.dtype for o in outs]
