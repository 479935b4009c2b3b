"""kdjax.policy: MiniLLM terms, TRRD, G-OPD rewards, AlignDistil teacher (API, masks, grads).
(Identities on many instances: theory checks zoo.minillm_*, zoo.gopd_*, zoo.trrd_*,
zoo.aligndistil_*.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from kdjax import divergences as D
from kdjax import policy as P


def _vg(f):
  """Jitted value-and-grad: one compilation instead of op-by-op dispatch (test speed)."""
  return jax.jit(jax.value_and_grad(f))


def _pair(seed=0, shape=(4, 7)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape) * 2, rng.normal(size=shape) * 2


def test_minillm_terms(x64):
  zs, zt = _pair()
  np.testing.assert_allclose(P.minillm_token_reverse_kl(zs, zt), D.reverse_kl(zs, zt))
  w = np.array([0.5, 1.0, 0.0, 2.0])
  g = jax.grad(lambda s: P.minillm_token_reverse_kl(s, zt, sampling_weights=w).sum())(zs)
  q, lq, lp = (scipy.special.softmax(zs, -1), scipy.special.log_softmax(zs, -1),
               scipy.special.log_softmax(zt, -1))
  kl = (q * (lq - lp)).sum(-1, keepdims=True)
  np.testing.assert_allclose(g, w[:, None] * q * (lq - lp - kl), atol=1e-12)
  check_grads(jax.jit(lambda s: P.minillm_token_reverse_kl(s, zt, temperature=1.5)), (zs,),
              order=1, modes=["rev"])
  tok = np.array([0, 3, 6, 2])
  iw = np.asarray(P.teacher_mixed_importance_weights(zs, zt, tok, alpha=0.2))
  mix = 0.2 * np.exp(lp) + 0.8 * q
  np.testing.assert_allclose(iw, q[np.arange(4), tok] / mix[np.arange(4), tok], rtol=1e-12)
  # long-term reward: normalised suffix sums of log p - log q, masked
  lq_t, lp_t = np.log([[0.5, 0.2, 0.1]]), np.log([[0.4, 0.4, 0.2]])
  r = np.asarray(P.minillm_long_term_rewards(lq_t, lp_t, where=np.array([[True, True, False]])))
  d = lp_t - lq_t
  np.testing.assert_allclose(r, [[(d[0, 0] + d[0, 1]) / 2, d[0, 1], 0.0]], rtol=1e-12)


def test_trrd_clip_behaviour(x64):
  lp_old = np.log(np.array([0.5, 0.5, 0.5, 0.5]))
  lp_new = np.log(np.array([0.9, 0.9, 0.2, 0.2]))  # ratios 1.8, 1.8, 0.4, 0.4
  adv = np.array([1.0, -1.0, 1.0, -1.0])
  mix = P.trrd_mix_log_probs(lp_old, lp_old, lam=0.3)  # teacher = old: mixture = old
  np.testing.assert_allclose(mix, lp_old, atol=1e-12)
  g = np.asarray(jax.grad(lambda x: P.trrd_loss(x, mix, adv).sum())(lp_new))
  # A>0, ratio above 1+eps: clipped, no gradient; A<0, ratio above: unclipped branch active.
  assert g[0] == 0 and g[1] != 0
  # A<0, ratio below 1-eps: clipped, no gradient; A>0, ratio below: active.
  assert g[3] == 0 and g[2] != 0
  np.testing.assert_allclose(g[1], 1.8, rtol=1e-12)  # d/dlogp of -(ratio * -1) = ratio
  adv_g = np.asarray(P.group_relative_advantages(np.array([[1.0, 2.0, 3.0, 6.0]])))
  np.testing.assert_allclose(adv_g.mean(), 0, atol=1e-12)
  out = P.trrd_loss(lp_new, mix, adv, where=np.array([True, False, True, True]))
  assert float(out[1]) == 0


def test_gopd_rewards_and_aligndistil(x64):
  rng = np.random.default_rng(1)
  ls, lt, lr = np.log(rng.uniform(0.05, 1, size=(3, 5)))
  r1 = np.asarray(P.gopd_token_rewards(ls, lt, lr, lam=1.0))
  np.testing.assert_allclose(r1, lt - ls, atol=1e-12)  # lambda=1: the OPD reward
  r2 = np.asarray(P.gopd_token_rewards(ls, lt, lr, lam=2.0))
  np.testing.assert_allclose(r2, 2 * (lt - lr) - (ls - lr), atol=1e-12)
  g = jax.grad(lambda x: P.gopd_token_rewards(x, lt, lr).sum())(ls)
  assert np.all(np.asarray(g) == 0)  # the reward is detached
  zs, zt = _pair(2)
  zr = np.random.default_rng(3).normal(size=zs.shape)
  check_grads(jax.jit(lambda s: P.gopd_objective(s, zt, zr, lam=1.5)), (zs,), order=1,
              modes=["rev"])
  rev = np.random.default_rng(4).normal(size=zs.shape)
  c = np.asarray(P.aligndistil_teacher_logits(zt, zr, alpha=0.7, reverse_dpo_logits=rev))
  lsm = lambda z: scipy.special.log_softmax(z, -1)
  np.testing.assert_allclose(c, lsm(lsm(zr) + 0.7 * (lsm(zt) - lsm(rev))), atol=1e-12)


def test_extremes_and_errors():
  zs = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [-jnp.inf] * 4])
  zt = jnp.array([[-1e4, 1e4, 3.0, -jnp.inf], [-jnp.inf] * 4])
  val, g = _vg(lambda s: P.minillm_token_reverse_kl(s, zt).sum())(zs)
  assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
  iw = P.teacher_mixed_importance_weights(zs, zt, jnp.array([0, 0]))
  assert np.all(np.isfinite(np.asarray(iw)))
  z = np.zeros((2, 3))
  with pytest.raises(ValueError, match="alpha"):
    P.teacher_mixed_log_probs(z, z, alpha=1.5)
  with pytest.raises(ValueError, match="tokens"):
    P.token_log_probs(z, np.zeros(3, int))
  with pytest.raises(ValueError, match="lam"):
    P.trrd_mix_log_probs(z, z, lam=-0.1)
  with pytest.raises(ValueError, match="clip_eps"):
    P.trrd_loss(z[0], z[0], 1.0, clip_eps=0.0)
  with pytest.raises(ValueError, match="same shape"):
    P.gopd_objective(z, z, np.zeros((2, 4)))


# ----------------------------------------------------------------------------- regressions


def test_token_ids_checked_or_dropped():  # N10
  s = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  for bad in ([0, 5], [0, -1]):
    with pytest.raises(ValueError, match="tokens"):
      P.token_log_probs(s, jnp.array(bad))
    with pytest.raises(ValueError, match="tokens"):
      P.teacher_mixed_importance_weights(s, s, jnp.array(bad))
  out = jax.jit(P.token_log_probs)(s, jnp.array([0, 5]))
  assert float(out[1]) == 0.0 and np.isfinite(float(out[0]))
  g = jax.jit(jax.grad(lambda z: P.token_log_probs(z, jnp.array([0, -1])).sum()))(s)
  assert np.all(np.asarray(g)[1] == 0)
  w = jax.jit(P.teacher_mixed_importance_weights)(s, s, jnp.array([1, 7]))
  assert float(w[1]) == 0.0


def test_trrd_finite_for_large_log_ratio():  # N20
  v, g = _vg(lambda x: P.trrd_loss(x, jnp.array([-100.0]), jnp.array([-1.0])).sum())(
      jnp.array([0.0]))
  assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


def test_gopd_minus_inf_and_nan():  # N19, N1
  ls = jnp.array([-1.0, -jnp.inf, -2.0])
  lt = jnp.array([-1.5, -jnp.inf, -jnp.nan])
  r = np.asarray(P.gopd_token_rewards(ls, lt, jnp.array([-1.0, -jnp.inf, -1.0])))
  assert r[1] == 0.0 and np.isfinite(r[0]) and np.isnan(r[2])
  mix = np.asarray(P.trrd_mix_log_probs(jnp.array([jnp.nan, -1.0]), jnp.array([-1.0, -1.0])))
  assert np.isnan(mix[0])


def test_hyper_parameters_checked_elementwise():  # N3
  z = np.zeros((2, 3))
  with pytest.raises(ValueError, match="temperature"):
    P.teacher_mixed_log_probs(z, z, temperature=0.0)
  with pytest.raises(ValueError, match="alpha"):
    P.teacher_mixed_log_probs(z, z, alpha=np.array([0.2, 1.5]))
  with pytest.raises(ValueError, match="lam"):
    P.trrd_mix_log_probs(z, z, lam=np.array([0.5, -0.1, 0.5]))
  with pytest.raises(ValueError, match="ddof"):
    P.group_relative_advantages(z, ddof=-1)
  with pytest.raises(ValueError, match="alpha"):
    P.aligndistil_teacher_logits(z, z, alpha=np.ones(3))   # N24: wrong shape names alpha
  with pytest.raises(ValueError, match="sampling_weights"):
    P.minillm_token_reverse_kl(z, z, sampling_weights=np.ones(3))


def test_group_relative_advantages_contract():  # A6, N25
  r = jnp.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
  a = np.asarray(P.group_relative_advantages(r, eps=0.0))
  np.testing.assert_allclose(a[0], (np.arange(1, 5) - 2.5) / np.std(np.arange(1.0, 5)), rtol=1e-6)
  assert np.all(a[1] == 0)   # eps = 0, constant group: 0, not NaN
  g = jax.grad(lambda x: P.group_relative_advantages(x, eps=0.0).sum())(r)
  assert np.all(np.isfinite(np.asarray(g)))
  b = P.group_relative_advantages(r, where=jnp.array([True, False]))
  assert np.all(np.asarray(b)[1] == 0)
  np.testing.assert_allclose(b, P.group_relative_advantages(r, where=jnp.array([[True], [False]])))
  assert np.isnan(np.asarray(P.group_relative_advantages(r.at[0, 0].set(jnp.nan)))[0]).all()


def test_minillm_rewards_bfloat16_computed_in_float32():
  lq = -jnp.abs(jnp.asarray(np.random.default_rng(0).normal(size=(2, 5)), jnp.bfloat16))
  lp = -jnp.abs(jnp.asarray(np.random.default_rng(1).normal(size=(2, 5)), jnp.bfloat16))
  out = P.minillm_long_term_rewards(lq, lp)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, P.minillm_long_term_rewards(lq.astype(jnp.float32),
                                                              lp.astype(jnp.float32)), rtol=1e-6)
