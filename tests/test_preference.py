"""Unit tests of kdjax.preference (ADPO). The mathematical identities are theory checks
(theory/adpo.py, run by tests/test_theory.py); here: masks, numerics, dtypes, errors, oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import preference as P
from kdjax import reductions


def _rand(seed, *shape, scale=2.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_adpo_loss_matches_numpy_oracle(x64):
  lp, lr = _rand(0, 3, 4, 5), _rand(1, 3, 4, 5)
  q = _softmax(_rand(2, 3, 4, 5))
  tau = 0.7
  expect = -(q * np.log(_softmax((lp - lr) / tau))).sum(-1)
  np.testing.assert_allclose(P.adpo_loss(lp, lr, q, tau=tau), expect, rtol=1e-12)
  h = -(q * np.log(q)).sum(-1)
  np.testing.assert_allclose(P.adpo_kl(lp, lr, q, tau=tau), expect - h, rtol=1e-10, atol=1e-12)
  assert P.adpo_loss(lp, lr, q, tau=tau).shape == (3, 4)  # no hidden reduction


def test_per_group_tau(x64):
  lp, lr = _rand(0, 4, 3), _rand(1, 4, 3)
  q = _softmax(_rand(2, 4, 3))
  taus = np.array([0.5, 1.0, 2.0, 3.0])
  batched = P.adpo_loss(lp, lr, q, tau=taus)
  single = [P.adpo_loss(lp[i], lr[i], q[i], tau=t) for i, t in enumerate(taus)]
  np.testing.assert_allclose(batched, single, rtol=1e-12)


def test_candidate_mask_equals_dropping_candidates(x64):
  lp, lr = _rand(0, 6), _rand(1, 6)
  q = _softmax(_rand(2, 6))
  keep = np.array([True, False, True, True, False, True])
  got = P.adpo_loss(lp, lr, q, tau=0.8, where=keep)
  sub = P.adpo_loss(lp[keep], lr[keep], q[keep] / q[keep].sum(), tau=0.8)
  np.testing.assert_allclose(got, sub, rtol=1e-12)
  g = jax.grad(lambda x: P.adpo_loss(x, lr, q, tau=0.8, where=keep))(lp)
  assert np.all(np.asarray(g)[~keep] == 0)


def test_all_masked_and_batch_masked_rows_are_zero_without_nan():
  lp, lr = _rand(0, 3, 4), _rand(1, 3, 4)
  q = _softmax(_rand(2, 3, 4))
  cand = np.ones((3, 4), bool)
  cand[1] = False
  fns = [lambda x, w: P.adpo_loss(x, lr, q, tau=1.0, where=w),
         lambda x, w: P.adpo_plackett_luce_loss(x, q, where=w, top_k=2, poly_eps=1.0,
                                                label_smoothing=0.1),
         lambda x, w: P.adpo_pairwise_loss(x, q, where=w),
         lambda x, w: P.adpo_soft_pairwise_loss(x, P.pair_labels(q, beta_r=0.5), where=w),
         lambda x, w: P.adpo_top1_loss(x, q, where=w),
         lambda x, w: P.adpo_direct_loss(x, q, where=w)]
  @jax.jit
  def all_values_and_grads(x, w_cand, w_batch):
    return [(f(x, w), jax.grad(lambda y: f(y, w).sum())(x))
            for f in fns for w in (w_cand, w_batch)]

  for v, g in all_values_and_grads(lp, cand, np.array([True, False, True])):
    assert float(v[1]) == 0.0
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[1] == 0)


def test_extreme_logits_and_minus_inf_are_finite():
  lp = jnp.array([[1e4, -1e4, 0.0, 5.0]])
  lr = jnp.zeros((1, 4))
  q = jnp.array([[0.1, 0.4, 0.5, 0.0]])
  v, g = jax.value_and_grad(lambda x: P.adpo_loss(x, lr, q, tau=0.5).sum())(lp)
  assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
  # a -inf student log-prob on a candidate with q = 0 is harmless
  lp2 = jnp.array([[0.0, -jnp.inf, 1.0]])
  v2, g2 = jax.value_and_grad(lambda x: P.adpo_loss(
      x, jnp.zeros((1, 3)), jnp.array([[0.5, 0.0, 0.5]])).sum())(lp2)
  assert np.isfinite(float(v2)) and not np.any(np.isnan(np.asarray(g2)))


def test_bf16_inputs_computed_in_float32():
  lp, lr = _rand(0, 2, 5), _rand(1, 2, 5)
  q = _softmax(_rand(2, 2, 5))
  out = P.adpo_loss(jnp.asarray(lp, jnp.bfloat16), jnp.asarray(lr, jnp.bfloat16),
                    jnp.asarray(q, jnp.bfloat16))
  assert out.dtype == jnp.float32


def test_targets(x64):
  r = np.array([[1.0, 2.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
  a = np.asarray(P.group_zscore(r))
  np.testing.assert_allclose(a[0], (r[0] - r[0].mean()) / r[0].std(ddof=1), rtol=1e-12)
  np.testing.assert_allclose(a[1], 0.0)   # std < eps -> std = 1
  assert float(P.group_zscore(np.array([[4.0]]))[0, 0]) == 0.0  # singleton
  q = np.asarray(P.target_from_rewards(r, beta_r=0.3))
  np.testing.assert_allclose(q[0], _softmax(a[0] / 0.3), rtol=1e-12)
  np.testing.assert_allclose(q.sum(-1), 1.0)
  np.testing.assert_allclose(P.one_hot_winner(np.array([0.1, 0.9, 0.3])), [0, 1, 0])
  np.testing.assert_allclose(P.teacher_target(np.array([1.0, 2.0]), temperature=2.0),
                             _softmax(np.array([0.5, 1.0])), rtol=1e-12)
  pl = np.asarray(P.pair_labels(np.array([1.0, 1.0, 0.0])))
  np.testing.assert_allclose(pl, [[0.5, 0.5, 1], [0.5, 0.5, 1], [0, 0, 0.5]])
  np.testing.assert_array_equal(P.positive_reward_groups(np.array([[-1.0, 0.0], [0.0, 0.1]])),
                                [False, True])
  assert int(P.ordered_pair_count(np.array([1.0, 1.0, 0.0]))) == 2


def test_author_batch_normaliser_for_pairwise(x64):
  u, a = _rand(0, 3, 5), np.random.default_rng(1).integers(0, 3, size=(3, 5)).astype(float)
  per_group = P.adpo_pairwise_loss(u, a)
  n = P.ordered_pair_count(a)
  total = sum(np.logaddexp(0, -(u[b, i] - u[b, j])) for b in range(3) for i in range(5)
              for j in range(5) if a[b, i] > a[b, j])
  np.testing.assert_allclose(reductions.masked_mean(per_group, weights=n), total / n.sum(),
                             rtol=1e-12)


def test_plackett_luce_extras(x64):
  u, a = _rand(0, 6), _rand(1, 6)
  base = P.adpo_plackett_luce_loss(u, a, top_k=3)
  order = np.argsort(-a)
  us = u[order]
  lk = np.array([np.log(np.exp(us[k:]).sum()) - us[k] for k in range(3)])
  np.testing.assert_allclose(base, lk.mean(), rtol=1e-12)
  poly = P.adpo_plackett_luce_loss(u, a, top_k=3, poly_eps=1.0)
  np.testing.assert_allclose(poly, (lk + 1 - np.exp(-lk)).mean(), rtol=1e-12)
  ls = P.adpo_plackett_luce_loss(u, a, top_k=3, label_smoothing=0.1)
  smooth = np.array([np.log(np.exp(us[k:]).sum()) - us[k:].mean() for k in range(3)])
  np.testing.assert_allclose(ls, (0.9 * lk + 0.1 * smooth).mean(), rtol=1e-12)
  t = P.adpo_plackett_luce_loss(u, a, temperature=2.0)
  np.testing.assert_allclose(t, P.adpo_plackett_luce_loss(u / 2, a), rtol=1e-12)


def test_sequences(x64):
  tok = _rand(0, 2, 3, 5)
  mask = np.ones((2, 3, 5), bool)
  mask[..., 3:] = False
  s = P.sequence_log_prob(tok, mask)
  np.testing.assert_allclose(s, tok[..., :3].mean(-1), rtol=1e-12)
  np.testing.assert_allclose(P.sequence_log_prob(tok, mask, length_normalize=False),
                             tok[..., :3].sum(-1), rtol=1e-12)
  u = P.anchored_scores(s * 10, np.zeros_like(s), tau=0.1, clip_ratio=P.AUTHOR_CLIP_RATIO,
                        clip_u=P.AUTHOR_CLIP_U)
  assert float(jnp.max(jnp.abs(u))) <= 10.0
  np.testing.assert_allclose(P.anchored_scores(s, s / 2, tau=2.0), s / 4, rtol=1e-12)
  np.testing.assert_allclose(P.mean_abs_logratio(s, 0 * s), np.abs(s).mean(-1), rtol=1e-12)
  k3 = P.k3_kl_penalty(tok, tok + 0.1, mask)
  np.testing.assert_allclose(k3, np.exp(0.1) - 0.1 - 1, rtol=1e-10)
  assert float(P.z_loss(np.zeros((4, 3)))) == pytest.approx(np.log(3) ** 2)


def test_anchor_updates_are_pure_pytree_maps():
  ref = {"a": jnp.zeros(3), "b": [jnp.ones(2)]}
  cur = {"a": jnp.ones(3), "b": [jnp.zeros(2)]}
  assert P.fixed_anchor(ref, cur) is ref
  np.testing.assert_array_equal(P.on_policy_anchor(ref, cur)["a"], cur["a"])
  e = P.ema_anchor(ref, cur, decay=0.9)
  np.testing.assert_allclose(e["a"], 0.1)
  np.testing.assert_allclose(e["b"][0], 0.9)
  c = P.periodic_anchor(ref, cur, jnp.asarray(6), every=3)
  np.testing.assert_array_equal(c["a"], 1.0)
  c = P.periodic_anchor(ref, cur, jnp.asarray(7), every=3)
  np.testing.assert_array_equal(c["a"], 0.0)
  g = jax.grad(lambda p: P.ema_anchor(ref, p, decay=0.5)["a"].sum())(cur)
  assert float(jnp.abs(g["a"]).sum()) == 0.0   # anchors never carry gradient


def test_smooth_hybrid_regimes():
  kw = dict(tau_base=0.8, a=0.5, b=0.5, tau_min=0.05, tau_max=5.0)
  master = float(P.tau_smooth_hybrid(0.0, 1.0, **kw))
  confused = float(P.tau_smooth_hybrid(1.0, 0.0, **kw))
  assert master == pytest.approx(0.8) and confused > master
  np.testing.assert_allclose(P.minmax_normalize(np.array([2.0, 2.0])), [0.5, 0.5])
  hn = P.normalized_entropy(np.zeros((2, 8)))
  np.testing.assert_allclose(hn, 1.0, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(4), np.ones(3) / 3), "same shape"),
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(3), np.ones(3) / 3, tau=0.0), "tau"),
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(3), np.ones(3) / 3, where=np.ones(2, bool)),
     "where"),
    (lambda: P.target_from_rewards(np.zeros(3), beta_r=-1.0), "beta_r"),
    (lambda: P.adpo_plackett_luce_loss(np.zeros(3), np.zeros(3), top_k=0), "top_k"),
    (lambda: P.adpo_plackett_luce_loss(np.zeros(3), np.zeros(4)), "order_scores"),
    (lambda: P.adpo_soft_pairwise_loss(np.zeros(3), np.zeros((3, 2))), "q_pairs"),
    (lambda: P.adpo_soft_pairwise_loss(np.zeros(3), np.zeros((3, 3)), reduce_pairs="max"),
     "reduce_pairs"),
    (lambda: P.ema_anchor({"a": 1.0}, {"a": 1.0}, decay=1.5), "decay"),
    (lambda: P.kl_window_init(0), "size"),
    (lambda: P.soft_dpo_loss(0.0, 0.0, 0.0, 0.0, 1.5, beta=1.0), "q_w"),
    (lambda: P.dpo_loss(0.0, 0.0, 0.0, 0.0, beta=0.0), "beta"),
    (lambda: P.anchored_scores(np.zeros(2), np.zeros(2), clip_u=-1.0), "clip_u"),
    (lambda: P.tau_smooth_hybrid(0.5, 0.5, tau_min=2.0, tau_max=1.0), "tau_min"),
    (lambda: P.periodic_anchor({}, {}, 0, every=0), "every"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_type_errors():
  with pytest.raises(TypeError, match="logp"):
    P.adpo_loss("x", np.zeros(3), np.ones(3) / 3)
  with pytest.raises(TypeError, match="where"):
    P.adpo_loss(np.zeros(3), np.zeros(3), np.ones(3) / 3, where=np.ones(3) * 0.5)


def test_jit_with_traced_hyper_parameters():
  lp, lr = _rand(0, 4, 5), _rand(1, 4, 5)
  q = _softmax(_rand(2, 4, 5))
  f = jax.jit(lambda t: P.adpo_loss(lp, lr, q, tau=t))
  np.testing.assert_allclose(f(0.5), P.adpo_loss(lp, lr, q, tau=0.5), rtol=1e-5)
