"""kdjax.losses.onpolicy against float64 NumPy references, masks, jit == eager, bad inputs.

The unbiasedness claims themselves are proved by exact enumeration in theory/onpolicy.py
(``python -m theory --only onpolicy``); here each function is pinned to its formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences
from kdjax.losses import onpolicy as op

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _lp(shape, seed):
  return -np.abs(np.random.default_rng(seed).normal(size=shape))


# ----------------------------------------------------------------------------- k1/k2/k3


@pytest.mark.parametrize("kind", op.KL_ESTIMATORS)
def test_kl_estimate_formulas_and_jit(kind):
  lp, lr = _lp((3, 5), 1), _lp((3, 5), 2)
  d = lp - lr
  want = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}[kind]
  got = op.kl_estimate(lp, lr, kind=kind)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(jax.jit(lambda a, b: op.kl_estimate(a, b, kind=kind))(lp, lr), got,
                             rtol=1e-14)
  # Gradient in logp: dk1 = 1, dk2 = l, dk3 = 1 - e^{-l}.
  g = jax.grad(lambda a: op.kl_estimate(a, lr, kind=kind).sum())(jnp.asarray(lp))
  want_g = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}[kind]
  np.testing.assert_allclose(g, want_g, rtol=1e-12, atol=1e-14)


def test_k3_is_nonnegative_and_unbiased_per_position():
  z_pi, z_r = RNG.normal(size=(50, 7)), RNG.normal(size=(50, 7)) * 2
  lpi, lr = jax.nn.log_softmax(z_pi), jax.nn.log_softmax(z_r)
  pi = np.exp(lpi)
  for kind in ("k1", "k3"):
    k = op.kl_estimate(lpi, lr, kind=kind)      # every token of the vocabulary, as if sampled
    if kind == "k3":
      assert np.all(np.asarray(k) >= -1e-15)
    np.testing.assert_allclose(np.sum(pi * k, -1), divergences.kl_from_log(log_p=lpi, log_q=lr),
                               rtol=1e-10)


def test_kl_estimate_masks_and_minus_inf():
  lp, lr = _lp((2, 4), 3), _lp((2, 4), 4)
  lr[0, 1] = -np.inf
  m = np.array([[True, True, True, False], [True, True, True, True]])
  out = op.kl_estimate(lp, lr, kind="k3", where=m)
  assert out[0, 1] == 0 and out[0, 3] == 0 and np.all(np.isfinite(out))
  g = jax.grad(lambda a: op.kl_estimate(a, lr, kind="k3", where=m).sum())(jnp.asarray(lp))
  assert g[0, 1] == 0 and g[0, 3] == 0 and np.all(np.isfinite(g))
  lp[1, 2] = np.nan
  assert np.isnan(op.kl_estimate(lp, lr, kind="k1")[1, 2])


def test_kl_estimate_bad_input():
  with pytest.raises(ValueError, match="kind"):
    op.kl_estimate(np.zeros(3), np.zeros(3), kind="k0")
  with pytest.raises(ValueError, match="logp_ref"):
    op.kl_estimate(np.zeros(3), np.zeros(4))
  with pytest.raises(TypeError, match="where"):
    op.kl_estimate(np.zeros(3), np.zeros(3), where=np.ones(3))
  with pytest.raises(ValueError, match="logp"):
    op.kl_estimate(np.array([0.0, np.inf]), np.zeros(2))


def test_kl_estimate_bf16_in_float32_out():
  out = op.kl_estimate(jnp.zeros(3, jnp.bfloat16) - 1, jnp.zeros(3, jnp.bfloat16), kind="k3")
  assert out.dtype == jnp.float32


# ----------------------------------------------------------------------------- returns


def _returns_loop(x, gamma, mask):
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if mask[b, t]:
        out[b, t] = sum(gamma[b]**(s - t) * x[b, s] * mask[b, s] for s in range(t, x.shape[1]))
  return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, "per-seq"])
def test_discounted_returns_matches_loop(gamma):
  x = RNG.normal(size=(3, 6))
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 1]], bool)
  g = np.array([0.0, 0.3, 0.9]) if gamma == "per-seq" else np.full(3, gamma)
  gam = g if gamma == "per-seq" else gamma
  got = op.discounted_returns(x, gamma=gam, where=mask)
  np.testing.assert_allclose(got, _returns_loop(x, g, mask), rtol=1e-12, atol=1e-14)
  jitted = jax.jit(lambda a, gg: op.discounted_returns(a, gamma=gg, where=mask))(x, gam)
  np.testing.assert_allclose(jitted, got, rtol=1e-14)


def test_discounted_returns_current_token_included_and_gamma_checked():
  np.testing.assert_allclose(op.discounted_returns(np.array([1.0, 2.0, 3.0]), gamma=0.0),
                             [1.0, 2.0, 3.0])
  np.testing.assert_allclose(op.discounted_returns(np.array([1.0, 2.0, 3.0]), gamma=1.0),
                             [6.0, 5.0, 3.0])
  with pytest.raises(ValueError, match="gamma"):
    op.discounted_returns(np.zeros(3), gamma=1.5)
  with pytest.raises(ValueError, match="gamma"):
    op.discounted_returns(np.zeros((2, 3)), gamma=np.zeros(3))


# ----------------------------------------------------------------------------- importance


def test_importance_weights_token_and_prefix():
  lp, lm = _lp((2, 5), 5), _lp((2, 5), 6)
  mask = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], bool)
  rho = np.exp(lp - lm)
  np.testing.assert_allclose(op.importance_weights(lp, lm, mode="token", where=mask),
                             np.where(mask, rho, 1.0), rtol=1e-12)
  w = np.cumprod(np.where(mask, rho, 1.0), axis=-1)
  np.testing.assert_allclose(op.importance_weights(lp, lm, mode="prefix", where=mask), w,
                             rtol=1e-12)
  g = jax.grad(lambda a: op.importance_weights(a, lm, mode="prefix").sum())(jnp.asarray(lp))
  assert np.all(np.asarray(g) == 0)          # detached
  lm2 = lm.copy()
  lm2[0, 2] = -np.inf                        # a token the sampler could not have drawn
  w2 = op.importance_weights(lp, lm2, mode="prefix")
  assert np.all(np.asarray(w2[0, 2:]) == 0) and np.all(np.isfinite(w2))
  with pytest.raises(ValueError, match="mode"):
    op.importance_weights(lp, lm, mode="sequence")


def test_pg_surrogate_gradients():
  lp, adv = jnp.asarray(_lp((2, 4), 7)), jnp.asarray(RNG.normal(size=(2, 4)))
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  g_reinforce = jax.grad(lambda a: op.pg_surrogate(a, adv, where=mask).sum())(lp)
  np.testing.assert_allclose(g_reinforce, np.where(mask, -adv, 0.0), rtol=1e-14)
  # The importance-sampling form at mu = sg(pi) has the same gradient (the recipe's loss).
  g_is = jax.grad(lambda a: op.pg_surrogate(a, adv, logp_sampler=jax.lax.stop_gradient(a),
                                            where=mask).sum())(lp)
  np.testing.assert_allclose(g_is, g_reinforce, rtol=1e-14)
  # Off-policy: gradient -rho * A.
  lm = lp - 0.2
  g_off = jax.grad(lambda a: op.pg_surrogate(a, adv, logp_sampler=lm).sum())(lp)
  np.testing.assert_allclose(g_off, -np.exp(0.2) * adv, rtol=1e-12)
  # The advantage is detached.
  ga = jax.grad(lambda a: op.pg_surrogate(lp, a).sum())(adv)
  assert np.all(np.asarray(ga) == 0)
  # Clipped: inside the trust region equal to the unclipped form, outside zero gradient.
  g_clip = jax.grad(lambda a: op.pg_surrogate(a, jnp.ones_like(adv), logp_sampler=a - 0.5,
                                              clip_eps=0.2).sum())(lp)
  assert np.all(np.asarray(g_clip) == 0)     # ratio e^0.5 > 1.2 with A > 0: clipped
  with pytest.raises(ValueError, match="clip_eps"):
    op.pg_surrogate(lp, adv, clip_eps=0.2)
  with pytest.raises(ValueError, match="advantages"):
    op.pg_surrogate(lp, jnp.zeros(3))


def test_rho_k3_gradient_equals_k2_on_policy():
  lp, lr = jnp.asarray(_lp((3, 4), 8)), jnp.asarray(_lp((3, 4), 9))
  f = lambda a: op.rho_k3(a, jax.lax.stop_gradient(a), lr).sum()
  g = jax.grad(f)(lp)
  g2 = jax.grad(lambda a: op.kl_estimate(a, lr, kind="k2").sum())(lp)
  np.testing.assert_allclose(g, g2, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(op.rho_k3(lp, lp, lr), op.kl_estimate(lp, lr, kind="k3"),
                             rtol=1e-14)


def test_opd_advantages_recipe():
  lm, lr = _lp((2, 5), 10), _lp((2, 5), 11)
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  a0 = op.opd_advantages(lm, lr, coef=2.0, where=mask)
  np.testing.assert_allclose(a0, -2.0 * mask * (lm - lr), rtol=1e-12, atol=1e-15)
  a1 = op.opd_advantages(lm, lr, coef=1.0, discount=1.0, where=mask)
  x = mask * (lm - lr)
  np.testing.assert_allclose(a1, -1.0 * mask * np.flip(np.cumsum(np.flip(x, -1), -1), -1), rtol=1e-12,
                             atol=1e-15)


# ----------------------------------------------------------------------------- GKD


def test_gkd_source_frequency_and_codes():
  keys = jax.random.split(jax.random.key(0), 20000)
  for lam, seq_kd in ((0.5, False), (0.25, True), (0.0, True), (1.0, False)):
    src = np.asarray(jax.vmap(lambda k: op.gkd_source(k, lam=lam, seq_kd=seq_kd))(keys))
    frac = np.mean(src == 1)
    se = max(np.sqrt(lam * (1 - lam) / len(keys)), 1e-12)
    assert abs(frac - lam) <= 5 * se + 1e-12, (lam, frac)
    assert set(np.unique(src)) <= {1, 2 if seq_kd else 0}
  assert op.GKD_SOURCES[int(op.gkd_source(jax.random.key(1), lam=1.0))] == "student"
  with pytest.raises(ValueError, match="lam"):
    op.gkd_source(jax.random.key(0), lam=-0.1)


# ----------------------------------------------------------------------------- top-k


def test_student_top1_counterexample():
  """q = (0.6, 0.4), p = (0.9, 0.1), k = 1 (verl #7806): the truncated gradient has the opposite
  sign of the full reverse KL's; the clamp removes it; the tail form is the full KL at V = 2."""
  zq, lp = jnp.log(jnp.array([0.6, 0.4])), jnp.log(jnp.array([0.9, 0.1]))
  ids = op.student_topk(zq, k=1)
  assert ids.tolist() == [0]
  def val_grad(**kw):
    f = lambda z: op.student_topk_reverse_kl(z, lp[ids], ids, **kw)
    return float(f(zq)), np.asarray(jax.grad(f)(zq))
  v, g = val_grad(tail=False)
  np.testing.assert_allclose(v, -0.243279, atol=1e-6)
  np.testing.assert_allclose(g, [0.142688, -0.142688], atol=1e-6)
  v, g = val_grad(tail=False, clamp=True)
  assert v == 0 and np.all(g == 0)
  v, g = val_grad(tail=True)
  np.testing.assert_allclose(v, 0.311239, atol=1e-6)
  np.testing.assert_allclose(g, [-0.430022, 0.430022], atol=1e-6)
  np.testing.assert_allclose(g, jax.grad(lambda z: divergences.reverse_kl(z, lp))(zq), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_student_topk_tail_is_a_lower_bound(k):
  v = 6
  zq, zp = RNG.normal(size=(200, v)) * 2, RNG.normal(size=(200, v)) * 2
  lp = jax.nn.log_softmax(zp)
  ids = op.student_topk(zq, k=k)
  got = op.student_topk_reverse_kl(zq, jnp.take_along_axis(lp, ids, -1), ids)
  full = divergences.reverse_kl(zq, zp)
  assert np.all(np.asarray(got) >= -1e-12) and np.all(np.asarray(got) <= np.asarray(full) + 1e-12)
  if k >= v - 1:
    np.testing.assert_allclose(got, full, rtol=1e-9, atol=1e-12)
  # Reference: the coarsened KL in NumPy.
  q = np.asarray(jax.nn.softmax(zq))
  p = np.exp(np.asarray(lp))
  sel = np.asarray(ids)
  qs, ps = np.take_along_axis(q, sel, -1), np.take_along_axis(p, sel, -1)
  qt, pt = 1 - qs.sum(-1), 1 - ps.sum(-1)
  ref = (qs * np.log(qs / ps)).sum(-1) + np.where(qt > 1e-15, qt * np.log(np.maximum(qt, 1e-300)
                                                                          / np.maximum(pt, 1e-300)),
                                                  0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


def test_topk_renormalized_kl_zero_tail_gradient_and_value():
  zq, zp = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
  lp = jax.nn.log_softmax(zp)
  ids = jnp.argsort(-zp, axis=-1)[:, :3]
  f = lambda z: op.topk_renormalized_kl(z, ids, jnp.take_along_axis(lp, ids, -1)).sum()
  g = np.asarray(jax.grad(f)(jnp.asarray(zq)))
  tail = np.ones((4, 6), bool)
  np.put_along_axis(tail, np.asarray(ids), False, -1)
  assert np.all(g[tail] == 0) and np.any(g[~tail] != 0)
  ps = np.take_along_axis(np.asarray(jax.nn.softmax(zp)), np.asarray(ids), -1)
  qs = np.take_along_axis(np.asarray(jax.nn.softmax(zq)), np.asarray(ids), -1)
  ps, qs = ps / ps.sum(-1, keepdims=True), qs / qs.sum(-1, keepdims=True)
  np.testing.assert_allclose(op.topk_renormalized_kl(zq, ids, jnp.take_along_axis(lp, ids, -1)),
                             (ps * np.log(ps / qs)).sum(-1), rtol=1e-10)
  # A padded row (all -inf) is empty: 0 with zero gradient.
  pad = jnp.full((1, 3), -jnp.inf)
  f2 = lambda z: op.topk_renormalized_kl(z, ids[:1], pad).sum()
  assert float(f2(zq[:1])) == 0 and np.all(np.asarray(jax.grad(f2)(jnp.asarray(zq[:1]))) == 0)


# ----------------------------------------------------------------------------- DistiLLM-2


def test_distillm2_terms_spec_values():
  p, q = jnp.log(jnp.array([0.9, 0.1])), jnp.log(jnp.array([0.5, 0.5]))
  rej = lambda z: op.distillm2_rejected_kl(z, p, alpha=0.1)
  np.testing.assert_allclose(rej(q), 0.365321, atol=1e-6)
  np.testing.assert_allclose(jax.grad(rej)(q), [-0.453822, 0.453822], atol=1e-6)
  skew = lambda z: divergences.skew_reverse_kl(z, p, skew=0.1)      # not detached
  np.testing.assert_allclose(jax.grad(skew)(q), [-0.379072, 0.379072], atol=1e-6)
  cho = lambda z: op.distillm2_chosen_kl(z, p, alpha=0.1)
  np.testing.assert_allclose(cho(q), 0.307137, atol=1e-6)
  np.testing.assert_allclose(jax.grad(cho)(q), [-0.326087, 0.326087], atol=1e-6)


def test_distillm2_rejected_gradient_formula():
  zq, zp = RNG.normal(size=(5, 4)), RNG.normal(size=(5, 4))
  a2 = 0.3
  g = jax.grad(lambda z: op.distillm2_rejected_kl(z, zp, alpha=a2).sum())(jnp.asarray(zq))
  q, p = np.asarray(jax.nn.softmax(zq)), np.asarray(jax.nn.softmax(zp))
  a = np.log(q / ((1 - a2) * p + a2 * q))
  want = q * (a - (q * a).sum(-1, keepdims=True))
  np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-13)


def test_distillm2_loss_reference_and_schedules():
  b, t, v = 2, 4, 5
  sc, tc = RNG.normal(size=(b, t, v)), RNG.normal(size=(b, t, v))
  sr, tr = RNG.normal(size=(b, 3, v)), RNG.normal(size=(b, 3, v))
  mc = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  mr = np.array([[1, 1, 1], [1, 0, 0]], bool)
  beta = np.array([1.0, 1.5])
  alpha_c = np.array([0.1, 0.05])
  got = op.distillm2_loss(sc, tc, sr, tr, alpha_chosen=alpha_c, alpha_rejected=0.2, beta=beta,
                          where_chosen=mc, where_rejected=mr)
  q, p = np.asarray(jax.nn.softmax(sc)), np.asarray(jax.nn.softmax(tc))
  a = alpha_c[:, None, None]
  chosen = (p * np.log(p / (a * p + (1 - a) * q))).sum(-1)
  q2, p2 = np.asarray(jax.nn.softmax(sr)), np.asarray(jax.nn.softmax(tr))
  rejected = (q2 * np.log(q2 / (0.8 * p2 + 0.2 * q2))).sum(-1)
  want = ((2 - beta) * (chosen * mc).sum(-1) / mc.sum(-1)
          + beta * (rejected * mr).sum(-1) / mr.sum(-1))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  np.testing.assert_allclose(
      jax.jit(lambda *a: op.distillm2_loss(*a, alpha_chosen=alpha_c, alpha_rejected=0.2, beta=beta,
                                           where_chosen=mc, where_rejected=mr))(sc, tc, sr, tr),
      got, rtol=1e-13)
  np.testing.assert_allclose(op.distillm2_beta(np.array([0, 25, 50, 100]), 100, gradual=True),
                             [1.0, 1.25, 1.5, 1.5])
  np.testing.assert_allclose(op.distillm2_beta(np.array([0, 50]), 100), [1.0, 1.0])
  np.testing.assert_allclose(op.distillm2_alpha(np.array([0.3, 0.2, 0.15, 0.05, -0.1]), 0.2),
                             [0.1, 0.1, 0.01, 0.01, 0.1], atol=1e-12)
  with pytest.raises(ValueError, match="beta"):
    op.distillm2_loss(sc, tc, sr, tr, beta=3.0)
  with pytest.raises(ValueError, match="batch shape"):
    op.distillm2_loss(sc, tc, sr[:1], tr[:1])


def test_distillm2_gap():
  a, b = _lp((2, 3), 12), _lp((2, 3), 13)
  m = np.array([[1, 1, 0], [1, 1, 1]], bool)
  want = (np.exp((a * m).sum(-1) / m.sum(-1)) - np.exp((b * m).sum(-1) / m.sum(-1)))
  np.testing.assert_allclose(op.distillm2_gap(a, b, where=m), want, rtol=1e-12)
