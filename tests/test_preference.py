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
  np.testing.assert_allclose(P.adpo_loss(lp, lr, q, temperature=tau), expect, rtol=1e-12)
  h = -(q * np.log(q)).sum(-1)
  np.testing.assert_allclose(P.adpo_kl(lp, lr, q, temperature=tau), expect - h, rtol=1e-10, atol=1e-12)
  assert P.adpo_loss(lp, lr, q, temperature=tau).shape == (3, 4)  # no hidden reduction


def test_per_group_tau(x64):
  lp, lr = _rand(0, 4, 3), _rand(1, 4, 3)
  q = _softmax(_rand(2, 4, 3))
  taus = np.array([0.5, 1.0, 2.0, 3.0])
  batched = P.adpo_loss(lp, lr, q, temperature=taus)
  single = [P.adpo_loss(lp[i], lr[i], q[i], temperature=t) for i, t in enumerate(taus)]
  np.testing.assert_allclose(batched, single, rtol=1e-12)


def test_candidate_mask_equals_dropping_candidates(x64):
  lp, lr = _rand(0, 6), _rand(1, 6)
  q = _softmax(_rand(2, 6))
  keep = np.array([True, False, True, True, False, True])
  got = P.adpo_loss(lp, lr, q, temperature=0.8, where=keep)
  sub = P.adpo_loss(lp[keep], lr[keep], q[keep] / q[keep].sum(), temperature=0.8)
  np.testing.assert_allclose(got, sub, rtol=1e-12)
  g = jax.grad(lambda x: P.adpo_loss(x, lr, q, temperature=0.8, where=keep))(lp)
  assert np.all(np.asarray(g)[~keep] == 0)


def test_all_masked_and_batch_masked_rows_are_zero_without_nan():
  lp, lr = _rand(0, 3, 4), _rand(1, 3, 4)
  q = _softmax(_rand(2, 3, 4))
  cand = np.ones((3, 4), bool)
  cand[1] = False
  fns = [lambda x, w: P.adpo_loss(x, lr, q, temperature=1.0, where=w),
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
  v, g = jax.value_and_grad(lambda x: P.adpo_loss(x, lr, q, temperature=0.5).sum())(lp)
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
  np.testing.assert_allclose(a[0], (r[0] - r[0].mean()) / (r[0].std(ddof=1) + 1e-8),
                             rtol=1e-12)
  np.testing.assert_allclose(a[1], 0.0)   # constant group -> 0
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
  s = P.sequence_log_prob(tok, where=mask)
  np.testing.assert_allclose(s, tok[..., :3].mean(-1), rtol=1e-12)
  np.testing.assert_allclose(P.sequence_log_prob(tok, where=mask, length_normalize=False),
                             tok[..., :3].sum(-1), rtol=1e-12)
  u = P.anchored_scores(s * 10, np.zeros_like(s), temperature=0.1, clip_ratio=P.AUTHOR_CLIP_RATIO,
                        clip_u=P.AUTHOR_CLIP_U)
  assert float(jnp.max(jnp.abs(u))) <= 10.0
  np.testing.assert_allclose(P.anchored_scores(s, s / 2, temperature=2.0), s / 4, rtol=1e-12)
  np.testing.assert_allclose(P.mean_abs_logratio(s, 0 * s), np.abs(s).mean(-1), rtol=1e-12)
  k3 = P.k3_kl_penalty(tok, tok + 0.1, where=mask)
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
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(3), np.ones(3) / 3, temperature=0.0), "temperature"),
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
  f = jax.jit(lambda t: P.adpo_loss(lp, lr, q, temperature=t))
  np.testing.assert_allclose(f(0.5), P.adpo_loss(lp, lr, q, temperature=0.5), rtol=1e-5)


# ----------------------------------------------------------------------------- regressions
# (each fails on 7229df3; ids from the defect review)

_U = jnp.array([[0.0, -jnp.inf, -1.0]])
_SC = jnp.array([[3.0, 2.0, 1.0]])


def _variants():
  q = _SC / _SC.sum()
  return {
      "top1": lambda u: P.adpo_top1_loss(u, _SC),
      "direct": lambda u: P.adpo_direct_loss(u, q),
      "soft_pairwise": lambda u: P.adpo_soft_pairwise_loss(u, P.pair_labels(_SC)),
      "pairwise": lambda u: P.adpo_pairwise_loss(u, _SC),
      "plackett_luce": lambda u: P.adpo_plackett_luce_loss(u, _SC, poly_eps=1.0,
                                                           label_smoothing=0.1),
      "anchored_ce": lambda u: P.anchored_ce(u, q),
      "z_loss": lambda u: P.z_loss(u),
  }


@pytest.mark.parametrize("name", sorted(_variants()))
@pytest.mark.parametrize("jit", [False, True])
def test_minus_inf_candidate_drops_out_in_every_variant(name, jit):  # N19
  f = _variants()[name]
  vg = jax.value_and_grad(lambda u: f(u).sum())
  vg = jax.jit(vg) if jit else vg
  v, g = vg(_U)
  assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
  assert float(g[0, 1]) == 0.0
  # the -inf candidate behaves exactly like a masked one
  keep = jnp.array([[True, False, True]])
  if name != "z_loss":
    ref = _variants()[name]
    masked = {"top1": lambda: P.adpo_top1_loss(_U.at[0, 1].set(5.0), _SC, where=keep),
              "pairwise": lambda: P.adpo_pairwise_loss(_U.at[0, 1].set(5.0), _SC, where=keep)}
    if name in masked:
      np.testing.assert_allclose(v, masked[name]().sum(), rtol=1e-6)
    del ref


def test_minus_inf_anchor_and_dpo_are_finite():  # N19
  q = _SC / _SC.sum()
  lr = jnp.zeros((1, 3)).at[0, 0].set(-jnp.inf)
  for jit in (False, True):
    vg = jax.value_and_grad(lambda r: P.adpo_loss(jnp.zeros((1, 3)), r, q).sum())
    v, g = (jax.jit(vg) if jit else vg)(lr)
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
    # equals the loss on the two remaining candidates with q renormalised
    np.testing.assert_allclose(v, P.adpo_loss(jnp.zeros(2), jnp.zeros(2), q[0, 1:] / q[0, 1:].sum()),
                               rtol=1e-6)
    dv = jax.value_and_grad(lambda w: P.dpo_loss(w, -jnp.inf, 0.0, 0.0))
    v, g = (jax.jit(dv) if jit else dv)(-jnp.inf)
    assert float(v) == 0.0 and float(g) == 0.0
  kv, kg = jax.value_and_grad(lambda x: P.k3_kl_penalty(
      x, jnp.array([[-1.0, -jnp.inf, -2.0]])).sum())(jnp.array([[-1.5, -jnp.inf, -1.0]]))
  # token 1 drops out of the mean: ((e^.5 - .5 - 1) + (e^-1 + 1 - 1)) / 2
  np.testing.assert_allclose(kv, (np.exp(0.5) - 1.5 + np.exp(-1.0)) / 2, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(kg)))


def test_nan_propagates_in_targets_and_losses():  # N1
  r = jnp.array([jnp.nan, 2.0, 3.0])
  assert np.all(np.isnan(np.asarray(P.target_from_rewards(r))))
  assert np.all(np.isnan(np.asarray(P.one_hot_winner(r))))
  assert np.all(np.isnan(np.asarray(P.group_zscore(r))))
  assert np.isnan(np.asarray(P.pair_labels(r))[0, 1])
  q = jnp.array([jnp.nan, 0.5, 0.5])
  assert np.isnan(float(P.adpo_loss(jnp.zeros(3), jnp.zeros(3), q)))
  assert np.isnan(float(jax.jit(P.adpo_loss)(jnp.zeros(3).at[0].set(jnp.nan), jnp.zeros(3),
                                             jnp.ones(3) / 3)))
  assert np.isnan(float(P.adpo_plackett_luce_loss(jnp.zeros(3).at[1].set(jnp.nan), _SC[0])))
  assert np.isnan(np.asarray(P.minmax_normalize(r))).all()


def test_plackett_luce_traced_hyper_parameters():  # N23
  u, s = jnp.asarray(_rand(0, 2, 4)), jnp.asarray(_rand(1, 2, 4))
  f = jax.jit(lambda ls, pe: P.adpo_plackett_luce_loss(u, s, label_smoothing=ls, poly_eps=pe))
  np.testing.assert_allclose(f(0.1, 0.5), P.adpo_plackett_luce_loss(
      u, s, label_smoothing=0.1, poly_eps=0.5), rtol=1e-5)
  np.testing.assert_allclose(f(0.0, 0.0), P.adpo_plackett_luce_loss(u, s), rtol=1e-5)
  assert P.adpo_plackett_luce_loss(u, s, top_k=np.int64(2)).shape == (2,)


@pytest.mark.parametrize("call, match", [
    # N9: targets must be distributions, pair labels in [0, 1], pair shapes must agree
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(3), np.array([1.5, -0.5, 0.0])), "q"),
    (lambda: P.adpo_loss(np.zeros(3), np.zeros(3), np.array([0.5, 0.6, 0.1])), "q"),
    (lambda: P.adpo_kl(np.zeros(3), np.zeros(3), np.array([2.0, 0.0, 0.0])), "q"),
    (lambda: P.adpo_direct_loss(np.zeros(3), np.array([2.0, 0.0, 0.0])), "q"),
    (lambda: P.adpo_soft_pairwise_loss(np.zeros(3), np.full((3, 3), 1.5)), "q_pairs"),
    (lambda: P.dpo_loss(np.zeros(3), np.zeros((3, 1)), 0.0, 0.0), "logp_l"),
    (lambda: P.soft_dpo_loss(np.zeros(3), np.zeros(3), 0.0, 0.0, np.array([0.5, 1.2, 0.0])),
     "q_w"),
    # N3: array hyper-parameters are checked elementwise
    (lambda: P.adpo_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)) / 3,
                         temperature=np.array([1.0, -1.0])), "temperature"),
    (lambda: P.ema_anchor({"a": 1.0}, {"a": 1.0}, decay=np.array([0.5, 1.5])), "decay"),
    (lambda: P.target_from_rewards(np.zeros((2, 3)), beta_r=np.array([0.3, 0.0])), "beta_r"),
    (lambda: P.adpo_plackett_luce_loss(np.zeros(3), np.zeros(3), poly_eps=-1.0), "poly_eps"),
    (lambda: P.adpo_plackett_luce_loss(np.zeros(3), np.zeros(3), label_smoothing=np.array(
        [0.1, 2.0])), "label_smoothing"),
    # N24: wrong-shape per-group temperature names the argument
    (lambda: P.adpo_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)) / 3,
                         temperature=np.ones(3)), "temperature"),
    (lambda: P.group_zscore(np.zeros((2, 3)), eps=-1.0), "eps"),
    (lambda: P.adpo_loss(np.zeros(3), np.array([0.0, np.inf, 0.0]), np.ones(3) / 3),
     "logp_ref"),
])
def test_invalid_concrete_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_masked_target_rows_are_not_checked_and_jit_skips_checks():
  q = np.array([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]])   # an all-zero padding group
  out = P.adpo_loss(np.zeros((2, 3)), np.zeros((2, 3)), q, where=np.array([True, False]))
  assert float(out[1]) == 0.0
  # a traced target cannot be checked: no error under jit
  jax.jit(lambda qq: P.adpo_loss(jnp.zeros(3), jnp.zeros(3), qq))(jnp.array([2.0, 0.0, 0.0]))


def test_where_rule_for_sequences():  # A1, N25
  tok = jnp.asarray(_rand(0, 2, 4))
  with pytest.raises(TypeError, match="where"):
    P.sequence_log_prob(tok, where=jnp.array([[1.0, 0.5, 0.0, 0.0]] * 2))
  with pytest.raises(TypeError, match="where"):
    P.k3_kl_penalty(tok, tok, where=jnp.ones((2, 4)))
  # broadcastable bool masks work
  m = jnp.array([True, True, False, False])
  np.testing.assert_allclose(P.sequence_log_prob(tok, where=m), tok[:, :2].mean(-1), rtol=1e-6)
  with pytest.raises(TypeError):
    P.sequence_log_prob(tok, m)   # keyword-only


def test_temperature_keyword_and_per_group():  # A4
  lp, lr = _rand(0, 2, 3), _rand(1, 2, 3)
  q = _softmax(_rand(2, 2, 3))
  with pytest.raises(TypeError):
    P.adpo_loss(lp, lr, q, tau=1.0)  # pylint: disable=unexpected-keyword-arg
  t = jnp.array([0.5, 2.0])
  np.testing.assert_allclose(P.anchored_logits(lp, lr, temperature=t),
                             (lp - lr) / np.array([[0.5], [2.0]]), rtol=1e-6)
  np.testing.assert_allclose(P.anchored_scores(lp, lr, temperature=t),
                             (lp - lr) / np.array([[0.5], [2.0]]), rtol=1e-6)


def test_group_zscore_is_group_relative_advantages_with_bessel():  # A6, N25
  from kdjax import policy as PO
  r = jnp.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
  np.testing.assert_allclose(P.group_zscore(r), PO.group_relative_advantages(r, ddof=1, eps=1e-8))
  np.testing.assert_allclose(P.group_zscore(r, eps=0.0)[1], 0.0)
  keep = jnp.array([[True, True, False, True], [True, True, True, True]])
  a = P.group_zscore(r, where=keep)
  sub = np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(np.asarray(a)[0, [0, 1, 3]], (sub - sub.mean()) / (sub.std(ddof=1) + 1e-8),
                             rtol=1e-6)
  assert float(a[0, 2]) == 0.0


def test_anchor_updates_equal_optax():  # A8
  optax = pytest.importorskip("optax")
  ref = {"a": jnp.arange(3.0), "b": [jnp.ones(2)]}
  cur = {"a": jnp.ones(3) * 5, "b": [jnp.zeros(2)]}
  e = P.ema_anchor(ref, cur, decay=0.9)
  o = optax.incremental_update(cur, ref, step_size=0.1)
  for x, y in zip(jax.tree.leaves(e), jax.tree.leaves(o)):
    np.testing.assert_array_equal(x, y)
  for step in (6, 7):
    c = P.periodic_anchor(ref, cur, jnp.asarray(step), every=3)
    o = optax.periodic_update(cur, ref, jnp.asarray(step), 3)
    for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(o)):
      np.testing.assert_array_equal(x, y)
  with pytest.raises(TypeError, match="every"):
    P.periodic_anchor(ref, cur, 0, every=2.0)


def test_module_all_is_exact():
  public = {n for n in dir(P) if not n.startswith("_") and callable(getattr(P, n))
            and getattr(getattr(P, n), "__module__", None) == P.__name__}
  assert public <= set(P.__all__), public - set(P.__all__)


def test_nan_order_score_propagates():
  """N1: a NaN score of a kept candidate is never silently dropped from the ordering."""
  u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
  sc = jnp.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]]).at[0, 2].set(jnp.nan)
  for f in (P.adpo_top1_loss, P.adpo_pairwise_loss, P.adpo_plackett_luce_loss):
    out = np.asarray(f(u, sc))
    assert np.isnan(out[0]) and np.isfinite(out[1]), f.__name__
    # a NaN score of a masked-out candidate does not matter
    keep = jnp.array([[True, True, False, True], [True] * 4])
    assert np.isfinite(np.asarray(f(u, sc, where=keep))).all(), f.__name__
  n = np.asarray(P.ordered_pair_count(sc))
  assert np.isnan(n[0]) and n[1] == 6


def test_minmax_normalize_bfloat16_computes_in_float32():
  x = jnp.array([[1.0, 3.0], [2.0, 5.0]], jnp.bfloat16)
  assert P.minmax_normalize(x).dtype == jnp.float32
