"""kdjax.divergences against an independent float64 NumPy/SciPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from kdjax import divergences as D
from kdjax import reductions as R

LOGIT_FNS = {
    "forward_kl": D.forward_kl,
    "reverse_kl": D.reverse_kl,
    "skew_forward_kl": D.skew_forward_kl,
    "skew_reverse_kl": D.skew_reverse_kl,
    "generalized_jsd": D.generalized_jsd,
    "total_variation": D.total_variation,
}


# ----------------------------------------------------------------------------- reference


def _rel(p, q):
  return scipy.special.rel_entr(p, q).sum(-1)


def reference(name, zs, zt, *, temperature=1.0, skew=0.1, beta=0.5):
  """Straightforward float64 NumPy formulas, written independently of kdjax."""
  ps = scipy.special.softmax(np.asarray(zs, np.float64) / temperature, axis=-1)
  pt = scipy.special.softmax(np.asarray(zt, np.float64) / temperature, axis=-1)
  if name == "forward_kl":
    return _rel(pt, ps)
  if name == "reverse_kl":
    return _rel(ps, pt)
  if name == "skew_forward_kl":
    return _rel(pt, skew * pt + (1 - skew) * ps)
  if name == "skew_reverse_kl":
    return _rel(ps, skew * ps + (1 - skew) * pt)
  if name == "generalized_jsd":
    m = beta * pt + (1 - beta) * ps
    return beta * _rel(pt, m) + (1 - beta) * _rel(ps, m)
  if name == "total_variation":
    return 0.5 * np.abs(pt - ps).sum(-1)
  raise KeyError(name)


def _kwargs(name, skew=0.1, beta=0.5):
  return {"skew": skew} if "skew" in name else {"beta": beta} if "jsd" in name else {}


def _ref_kwargs(name, skew=0.1, beta=0.5):
  return {"skew": skew, "beta": beta}


# ----------------------------------------------------------------------------- pinned values


def test_direction_pinned_two_class():
  # Teacher p = (0.9, 0.1), student q = (0.5, 0.5) (kd_losses.md checklist item 1).
  zt = jnp.log(jnp.array([0.9, 0.1]))
  zs = jnp.log(jnp.array([0.5, 0.5]))
  assert float(D.forward_kl(zs, zt)) == pytest.approx(0.3681, abs=5e-5)
  assert float(D.reverse_kl(zs, zt)) == pytest.approx(0.5108, abs=5e-5)


def test_hand_computed_two_class_family(x64):
  p, q = np.array([0.9, 0.1]), np.array([0.5, 0.5])   # teacher, student
  zt, zs = jnp.log(p), jnp.log(q)
  m = 0.1 * p + 0.9 * q                                # skew mixture for lambda = 0.1
  assert float(D.skew_forward_kl(zs, zt, skew=0.1)) == pytest.approx(
      0.9 * np.log(0.9 / m[0]) + 0.1 * np.log(0.1 / m[1]), rel=1e-12)
  m2 = 0.1 * q + 0.9 * p
  assert float(D.skew_reverse_kl(zs, zt, skew=0.1)) == pytest.approx(
      0.5 * np.log(0.5 / m2[0]) + 0.5 * np.log(0.5 / m2[1]), rel=1e-12)
  mj = np.array([0.7, 0.3])                            # beta = 0.5 mixture
  jsd = 0.5 * (0.9 * np.log(0.9 / 0.7) + 0.1 * np.log(0.1 / 0.3)) + 0.5 * (
      0.5 * np.log(0.5 / 0.7) + 0.5 * np.log(0.5 / 0.3))
  assert float(D.generalized_jsd(zs, zt, beta=0.5)) == pytest.approx(jsd, rel=1e-12)
  assert float(D.total_variation(zs, zt)) == pytest.approx(0.4, rel=1e-12)


def test_temperature_is_applied_to_both_sides(x64):
  zs, zt = jnp.array([1.0, -2.0, 0.5]), jnp.array([3.0, 0.0, -1.0])
  assert float(D.forward_kl(zs, zt, temperature=2.0)) == pytest.approx(
      float(D.forward_kl(zs / 2, zt / 2)), rel=1e-12)


# ----------------------------------------------------------------------------- properties


logit_arrays = st.integers(0, 2**31 - 1).map(lambda seed: np.random.default_rng(seed))


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
@settings(max_examples=20, deadline=None)
@given(rng=logit_arrays, temperature=st.sampled_from([0.5, 1.0, 3.0]),
       coef=st.floats(0.0, 1.0), scale=st.floats(0.1, 20.0))
def test_matches_float64_reference(name, rng, temperature, coef, scale):
  zs = rng.normal(size=(3, 7)) * scale
  zt = rng.normal(size=(3, 7)) * scale
  kw = _kwargs(name, skew=coef, beta=coef)

  def expect(dtype):
    # The endpoint convention applies where β, as the compute dtype holds it (XLA flushes
    # subnormals to zero), is exactly 0 or 1.
    c = dtype(coef)
    if name == "generalized_jsd" and (c < np.finfo(dtype).tiny or c == 1.0):
      return reference("forward_kl" if c < 0.5 else "reverse_kl", zs, zt,
                       temperature=temperature)
    if c < np.finfo(dtype).tiny:
      # A subnormal skew is 0 in the compute dtype; in float64 λ·q can still bound the ratio.
      return reference(name, zs, zt, temperature=temperature, skew=0.0, beta=0.0)
    return reference(name, zs, zt, temperature=temperature, skew=coef, beta=coef)

  with jax.enable_x64(True):
    got64 = np.asarray(LOGIT_FNS[name](zs, zt, temperature=temperature, **kw))
  np.testing.assert_allclose(got64, expect(np.float64), rtol=1e-9, atol=1e-12)
  got32 = LOGIT_FNS[name](zs.astype(np.float32), zt.astype(np.float32),
                          temperature=temperature, **kw)
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got32), expect(np.float32), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_zero_iff_equal(name):
  z = np.random.default_rng(0).normal(size=(5, 9)) * 3
  np.testing.assert_allclose(np.asarray(LOGIT_FNS[name](z, z + 2.5)), 0.0, atol=1e-6)
  other = np.roll(z, 1, axis=0)   # every row paired with a different row
  assert np.all(np.asarray(LOGIT_FNS[name](z, other)) > 1e-4)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_vocabulary_mask_equals_slicing(name):
  rng = np.random.default_rng(1)
  zs, zt = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
  keep = np.ones(10, bool)
  keep[[2, 5, 9]] = False
  mask = np.broadcast_to(keep, zs.shape)
  sliced = LOGIT_FNS[name](zs[:, keep], zt[:, keep])
  masked = LOGIT_FNS[name](zs, zt, where=mask)
  neg_inf = LOGIT_FNS[name](np.where(mask, zs, -np.inf), np.where(mask, zt, -np.inf))
  np.testing.assert_allclose(masked, sliced, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(neg_inf, sliced, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_batch_mask_zeroes_positions_and_gradients(name):
  rng = np.random.default_rng(2)
  zs, zt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  keep = np.array([True, False, True, True, False, True])
  fn = LOGIT_FNS[name]
  vals = fn(zs, zt, where=keep)
  np.testing.assert_allclose(vals[keep], fn(zs[keep], zt[keep]), rtol=1e-6)
  np.testing.assert_array_equal(vals[~keep], 0.0)
  g = jax.grad(lambda s: fn(s, zt, where=keep).sum())(jnp.asarray(zs))
  np.testing.assert_array_equal(g[~keep], 0.0)


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_all_masked_rows_are_zero_without_nan(name):
  fn = LOGIT_FNS[name]
  zs = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
  zt = jnp.array([[0.5, 0.0, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
  vocab_none = jnp.zeros((2, 3), bool)
  for kwargs, args in (({}, (zs, zt)), ({"where": vocab_none}, (zs, zt)),
                       ({"where": jnp.array([False, False])}, (zs, zt))):
    v = fn(*args, **kwargs)
    g = jax.grad(lambda s: fn(s, args[1], **kwargs).sum())(args[0])
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(v[1], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_extreme_logits_finite_values_and_gradients(name):
  fn = LOGIT_FNS[name]
  zs = jnp.array([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, -1e4]])
  zt = jnp.array([[-1e4, 1e4, 3.0, 0.0], [1e4, -1e4, 0.0, 1e4]])
  for t in (0.5, 1.0, 4.0):
    v = fn(zs, zt, temperature=t)
    gs, gt = jax.grad(lambda s, u: fn(s, u, temperature=t).sum(), argnums=(0, 1))(zs, zt)
    assert np.all(np.isfinite(v)), (name, t, v)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)), (name, t)


def test_bounded_divergences_saturate_on_extreme_logits():
  zs = jnp.array([-1e4, 0.0])
  zt = jnp.array([1e4, 0.0])  # teacher one-hot where the student has no mass
  assert float(D.skew_forward_kl(zs, zt, skew=0.1)) == pytest.approx(np.log(10), rel=1e-5)
  assert float(D.generalized_jsd(zs, zt, beta=0.5)) == pytest.approx(np.log(2), rel=1e-5)
  assert float(D.total_variation(zs, zt)) == pytest.approx(1.0)


def test_support_violation_is_inf_not_nan():
  zs = jnp.array([0.0, -jnp.inf, 1.0])
  zt = jnp.array([0.0, 2.0, 1.0])
  assert float(D.forward_kl(zs, zt)) == np.inf
  assert np.isfinite(float(D.reverse_kl(zs, zt)))
  assert np.all(np.isfinite(jax.grad(lambda s: D.reverse_kl(s, zt))(zs)))


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_bfloat16_inputs_computed_in_float32(name):
  rng = np.random.default_rng(3)
  zs, zt = rng.normal(size=(4, 16)) * 2, rng.normal(size=(4, 16)) * 2
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  out = LOGIT_FNS[name](zs16, zt16)
  assert out.dtype == jnp.float32
  expected = reference(name, np.asarray(zs16, np.float64), np.asarray(zt16, np.float64))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_jit_equals_no_jit_and_axis_moves(name):
  rng = np.random.default_rng(4)
  zs, zt = rng.normal(size=(3, 6, 5)), rng.normal(size=(3, 6, 5))
  fn = LOGIT_FNS[name]
  eager = fn(zs, zt, temperature=2.0)
  jitted = jax.jit(lambda a, b: fn(a, b, temperature=2.0))(zs, zt)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)
  moved = fn(np.moveaxis(zs, -1, 1), np.moveaxis(zt, -1, 1), temperature=2.0, axis=1)
  np.testing.assert_allclose(eager, moved, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in sorted(LOGIT_FNS) if n != "total_variation"])
def test_gradients_match_finite_differences(name, x64):
  rng = np.random.default_rng(5)
  zs, zt = jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(rng.normal(size=(2, 4)))
  fn = LOGIT_FNS[name]
  check_grads(lambda s, t: fn(s, t, temperature=1.5, **_kwargs(name, 0.3, 0.3)),
              (zs, zt), order=2, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_traced_hyperparameters_are_accepted():
  zs, zt = jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3)
  f = jax.jit(lambda t, b: D.generalized_jsd(zs, zt, temperature=t, beta=b))
  np.testing.assert_allclose(f(2.0, 0.3), D.generalized_jsd(zs, zt, temperature=2.0, beta=0.3),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"axis": 2}, "axis"),
    ({"where": np.ones((3,), bool)}, "where"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  z = np.zeros((2, 4))
  with pytest.raises(ValueError, match=match):
    D.forward_kl(z, z, **kwargs)


def test_bad_inputs():
  z = np.zeros((2, 4))
  with pytest.raises(ValueError, match="same shape"):
    D.reverse_kl(z, np.zeros((2, 5)))
  with pytest.raises(ValueError, match="skew"):
    D.skew_forward_kl(z, z, skew=1.5)
  with pytest.raises(ValueError, match="skew"):
    D.skew_reverse_kl(z, z, skew=-0.1)
  with pytest.raises(ValueError, match="beta"):
    D.generalized_jsd(z, z, beta=2.0)
  with pytest.raises(ValueError, match="endpoint"):
    D.generalized_jsd(z, z, endpoint="nope")
  with pytest.raises(TypeError, match="student_logits"):
    D.forward_kl("logits", z)
  with pytest.raises(TypeError, match="axis"):
    D.forward_kl(z, z, axis=1.5)
  with pytest.raises(ValueError, match="rank"):
    D.forward_kl(np.float32(1.0), np.float32(1.0))


# ----------------------------------------------------------------------------- probabilities


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_probability_forms(x64):
  p = np.array([0.5, 0.5, 0.0])
  q = np.array([0.25, 0.25, 0.5])
  assert float(D.kl(p=p, q=q)) == pytest.approx(np.log(2), rel=1e-12)   # 0 log 0 = 0
  assert float(D.kl(p=q, q=p)) == np.inf                                # support violation
  assert float(D.kl_from_log(log_p=np.log(p), log_q=np.log(q))) == pytest.approx(np.log(2),
                                                                          rel=1e-12)
  assert float(D.total_variation_from_probs(p=p, q=q)) == pytest.approx(0.5)
  assert float(D.entropy_from_log(np.log(p))) == pytest.approx(np.log(2))
  jsd = D.generalized_jsd_from_log(log_p=np.log(p), log_q=np.log(q), beta=0.5)
  m = 0.5 * (p + q)
  assert float(jsd) == pytest.approx(0.5 * _rel(p, m) + 0.5 * _rel(q, m), rel=1e-12)
  with pytest.raises(ValueError, match="non-negative"):
    D.kl(p=np.array([-0.1, 1.1]), q=np.array([0.5, 0.5]))


def test_log_mixture_endpoints_and_gradient():
  la = jnp.log(jnp.array([0.2, 0.8, 0.0]))
  lb = jnp.log(jnp.array([0.5, 0.0, 0.5]))
  np.testing.assert_allclose(jnp.exp(D.log_mixture(0.0, la, lb)), [0.5, 0.0, 0.5], atol=1e-7)
  np.testing.assert_allclose(jnp.exp(D.log_mixture(1.0, la, lb)), [0.2, 0.8, 0.0], atol=1e-7)
  np.testing.assert_allclose(jnp.exp(D.log_mixture(0.25, la, lb)), [0.425, 0.2, 0.375],
                             rtol=1e-6)
  g = jax.grad(lambda a: jnp.sum(jnp.where(jnp.isfinite(a), D.log_mixture(0.0, a, lb), 0.0)))(la)
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- reductions


def test_sum_and_count_over_micro_batches_equals_full_batch():
  rng = np.random.default_rng(6)
  zs, zt = rng.normal(size=(10, 7, 5)), rng.normal(size=(10, 7, 5))
  mask = rng.random((10, 7)) < 0.6
  full = R.masked_mean(D.forward_kl(zs, zt), where=mask)
  acc = R.zeros()
  for sl in (slice(0, 1), slice(1, 5), slice(5, 10)):   # uneven micro-batches
    acc = acc + R.masked_sum_and_count(D.forward_kl(zs[sl], zt[sl]), where=mask[sl])
  np.testing.assert_allclose(R.finalize_mean(acc), full, rtol=1e-6)
  expected = reference("forward_kl", zs, zt)[mask].mean()
  np.testing.assert_allclose(full, expected, rtol=1e-5)
  # The naive mean of micro-batch means is different: the bug sum-and-count avoids.
  naive = np.mean([R.masked_mean(D.forward_kl(zs[sl], zt[sl]), where=mask[sl])
                   for sl in (slice(0, 1), slice(1, 5), slice(5, 10))])
  assert abs(naive - float(full)) > 1e-3


def test_finalize_mean_of_nothing_is_zero_with_zero_gradient():
  v = jnp.array([1.0, jnp.nan, 3.0])
  none = jnp.zeros(3, bool)
  assert float(R.masked_mean(v, where=none)) == 0.0
  g = jax.grad(lambda x: R.masked_mean(x, where=none))(v)
  np.testing.assert_array_equal(g, 0.0)
  w = R.masked_mean(jnp.array([1.0, 2.0, 3.0]), weights=jnp.array([1.0, 0.0, 3.0]))
  assert float(w) == pytest.approx(2.5)


# ----------------------------------------------------------------------------- devices


def test_sharded_over_8_devices_equals_single_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(7)
  zs, zt = rng.normal(size=(16, 4, 11)).astype(np.float32), rng.normal(
      size=(16, 4, 11)).astype(np.float32)
  mask = rng.random((16, 4)) < 0.7
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = [jax.device_put(a, sharding) for a in (zs, zt, mask)]

  def step(s, t, m):
    loss_fn = lambda s_: R.masked_mean(D.generalized_jsd(s_, t, beta=0.3, temperature=2.0),
                                       where=m)
    return jax.value_and_grad(loss_fn)(s)

  v_sharded, g_sharded = jax.jit(step)(*args)
  assert len(g_sharded.sharding.device_set) == 8
  v_single, g_single = jax.jit(step)(zs, zt, mask)
  np.testing.assert_allclose(v_sharded, v_single, rtol=1e-6)
  np.testing.assert_allclose(g_sharded, g_single, rtol=1e-5, atol=1e-8)

  # The same mean written with shard_map and an explicit psum of (sum, count) pairs.
  P = jax.sharding.PartitionSpec

  def local(s, t, m):
    return R.psum(R.masked_sum_and_count(D.generalized_jsd(s, t, beta=0.3, temperature=2.0),
                                         where=m), "data")

  pair = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 3,
                               out_specs=P()))(*args)
  np.testing.assert_allclose(R.finalize_mean(pair), v_single, rtol=1e-6)


# ----------------------------------------------------------------------------- regressions
# Each test below fails on 7229df3 (the repro of the defect as an assertion).

import chex  # noqa: E402

from kdjax import _logspace  # noqa: E402

_S3, _T3 = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 1.0, 2.0])


class NaNPropagates(chex.TestCase):
  """N1: a NaN logit is never treated as a masked entry."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_reaches_the_value(self):
    for name, fn in LOGIT_FNS.items():
      f = self.variant(lambda s, t, fn=fn: fn(s, t))
      assert np.isnan(f(_S3, _T3.at[0].set(jnp.nan))), name
      assert np.isnan(f(_S3, jnp.full(3, jnp.nan))), name
      assert np.isnan(f(_S3.at[1].set(jnp.nan), _T3)), name
      assert np.isfinite(f(_S3, _T3)), name

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_at_a_masked_position_is_dropped(self):
    s = jnp.stack([_S3, _S3.at[0].set(jnp.nan)])
    t = jnp.stack([_T3, _T3])
    keep = jnp.array([True, False])
    for name, fn in LOGIT_FNS.items():
      f = self.variant(lambda s, fn=fn: fn(s, t, where=keep))
      v = f(s)
      g = jax.grad(lambda s: f(s).sum())(s)
      assert float(v[1]) == 0.0 and np.all(np.asarray(g[1]) == 0.0), name
      assert np.isfinite(float(v[0])), name


def test_posinf_logits_rejected_when_concrete_nan_when_traced():
  for name, fn in LOGIT_FNS.items():
    with pytest.raises(ValueError, match="teacher_logits"):
      fn(_S3, _T3.at[0].set(jnp.inf))
    with pytest.raises(ValueError, match="student_logits"):
      fn(_S3.at[0].set(jnp.inf), _T3)
    assert np.isnan(jax.jit(fn)(_S3.at[0].set(jnp.inf), _T3)), name
  with pytest.raises(ValueError, match="logits"):
    D.log_softmax(jnp.array([0.0, jnp.inf]))


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_per_row_temperature_equals_vmap(name):
  """N3: a [B] temperature is applied per row (it was broadcast along V)."""
  s = jax.random.normal(jax.random.key(0), (4, 4))
  t = jax.random.normal(jax.random.key(1), (4, 4))
  temp = jnp.array([1.0, 2.0, 3.0, 4.0])
  fn = LOGIT_FNS[name]
  kw = _kwargs(name, 0.3, 0.3)
  per_row = jax.vmap(lambda a, b, c: fn(a, b, temperature=c, **kw))(s, t, temp)
  np.testing.assert_allclose(fn(s, t, temperature=temp, **kw), per_row, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.jit(lambda c: fn(s, t, temperature=c, **kw))(temp), per_row,
                             rtol=1e-5, atol=1e-7)


def test_per_row_skew_and_beta_equal_vmap():
  s = jax.random.normal(jax.random.key(0), (3, 5))
  t = jax.random.normal(jax.random.key(1), (3, 5))
  c = jnp.array([0.0, 0.3, 1.0])
  for fn, key in ((D.skew_forward_kl, "skew"), (D.skew_reverse_kl, "skew"),
                  (D.generalized_jsd, "beta")):
    per_row = jax.vmap(lambda a, b, x: fn(a, b, **{key: x}))(s, t, c)
    np.testing.assert_allclose(fn(s, t, **{key: c}), per_row, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,arg", [
    ({"temperature": jnp.array([1.0, -2.0])}, "temperature"),
    ({"temperature": np.array([1.0, np.nan])}, "temperature"),
    ({"temperature": jnp.ones(3)}, "temperature"),      # not broadcastable to the batch [2]
    ({"skew": jnp.array([[0.1], [2.0]])}, "skew"),
])
def test_array_hyperparameters_checked_elementwise(kwargs, arg):
  z = jnp.zeros((2, 3))
  fn = D.skew_forward_kl if "skew" in kwargs else D.forward_kl
  with pytest.raises(ValueError, match=arg):
    fn(z, z, **kwargs)


def test_hyperparameter_types_name_the_argument():
  """N24: a str or bool temperature is a TypeError naming it."""
  z = jnp.zeros((2, 3))
  for bad in ("2", True, None):
    with pytest.raises(TypeError, match="temperature"):
      D.forward_kl(z, z, temperature=bad)
  with pytest.raises(TypeError, match="beta"):
    D.generalized_jsd(z, z, beta="0.5")
  # NumPy and integral scalars are accepted.
  np.testing.assert_allclose(D.forward_kl(_S3, _T3, temperature=np.int64(2)),
                             D.forward_kl(_S3, _T3, temperature=2.0), rtol=1e-6)


class GeneralizedJSDEndpoints(chex.TestCase):
  """N6: the endpoint convention is the same eagerly and under jit (value and gradient)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_endpoints(self):
    f = self.variant(lambda s, b: D.generalized_jsd(s, _T3, beta=b))
    g = self.variant(jax.grad(lambda s, b: D.generalized_jsd(s, _T3, beta=b)))
    for b, ref in ((0.0, D.forward_kl), (1.0, D.reverse_kl)):
      np.testing.assert_allclose(f(_S3, b), ref(_S3, _T3), rtol=1e-6)
      np.testing.assert_allclose(g(_S3, b), jax.grad(lambda s: ref(s, _T3))(_S3), rtol=1e-5)
    raw = self.variant(lambda s, b: D.generalized_jsd(s, _T3, beta=b, endpoint="raw"))
    np.testing.assert_allclose(raw(_S3, 0.0), 0.0, atol=1e-7)
    np.testing.assert_allclose(f(_S3, 0.5), raw(_S3, 0.5), rtol=1e-6)


def test_temperature_gradient_with_a_minus_inf_entry():
  """N18: d/dT is the one without the -inf entry (it was NaN)."""
  for fn in LOGIT_FNS.values():
    with_inf = jax.grad(lambda T, fn=fn: fn(jnp.array([0., 1., -jnp.inf]),
                                            jnp.array([1., 0., -jnp.inf]), temperature=T))(2.0)
    without = jax.grad(lambda T, fn=fn: fn(jnp.array([0., 1.]), jnp.array([1., 0.]),
                                           temperature=T))(2.0)
    np.testing.assert_allclose(with_inf, without, rtol=1e-6)
    assert np.isfinite(with_inf)


def test_where_rule():
  """A1: boolean only; a broadcast [B, 1] position mask equals the [B] mask."""
  s = jax.random.normal(jax.random.key(0), (3, 5))
  t = jax.random.normal(jax.random.key(1), (3, 5))
  m = jnp.array([True, False, True])
  for fn in LOGIT_FNS.values():
    np.testing.assert_array_equal(fn(s, t, where=m[:, None]), fn(s, t, where=m))
    with pytest.raises(TypeError, match="where"):
      fn(s, t, where=m.astype(jnp.float32))
  p, q = jax.nn.softmax(s), jax.nn.softmax(t)
  for f in (lambda w: D.kl(p=p, q=q, where=w), lambda w: D.total_variation_from_probs(
      p=p, q=q, where=w), lambda w: D.entropy_from_log(jnp.log(p), where=w)):
    np.testing.assert_array_equal(f(m[:, None]), f(m))
    assert float(f(m)[1]) == 0.0
    with pytest.raises(TypeError, match="where"):
      f(m.astype(jnp.int32))
  # A vocabulary mask on probabilities restricts the sum.
  vm = jnp.arange(5) < 3
  np.testing.assert_allclose(D.total_variation_from_probs(p=p, q=q, where=vm),
                             0.5 * jnp.sum(jnp.abs(p - q)[:, :3], -1), rtol=1e-6)


def test_probability_functions_are_keyword_only():
  """A3: `kl_from_log(lp, lq)` positionally (optax's order reads the reverse) is an error."""
  lp, lq = jax.nn.log_softmax(_S3), jax.nn.log_softmax(_T3)
  for fn, args in ((D.kl_from_log, (lp, lq)), (D.kl, (jnp.exp(lp), jnp.exp(lq))),
                   (D.generalized_jsd_from_log, (lp, lq)),
                   (D.total_variation_from_probs, (jnp.exp(lp), jnp.exp(lq)))):
    with pytest.raises(TypeError):
      fn(*args)
  np.testing.assert_allclose(D.kl_from_log(log_p=lq, log_q=lp), D.forward_kl(_S3, _T3),
                             rtol=1e-6)


def test_probability_functions_bfloat16_computed_in_float32():
  """N7: bf16 in -> float32 out, equal to float32 on the up-cast input."""
  lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (4, 8)))
  lq = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (4, 8)))
  lp16, lq16 = lp.astype(jnp.bfloat16), lq.astype(jnp.bfloat16)
  up = lambda x: x.astype(jnp.float32)
  cases = [
      (lambda a, b: D.generalized_jsd_from_log(log_p=a, log_q=b, beta=0.3), lp16, lq16),
      (lambda a, b: D.kl_from_log(log_p=a, log_q=b), lp16, lq16),
      (lambda a, b: D.total_variation_from_probs(p=a, q=b), jnp.exp(lp16), jnp.exp(lq16)),
      (lambda a, b: D.entropy_from_log(a), lp16, lq16),
      (lambda a, b: D.log_mixture(0.3, a, b), lp16, lq16),
      (lambda a, b: D.log_softmax(a), lp16, lq16),
  ]
  for f, a, b in cases:
    out = f(a, b)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, f(up(a), up(b)), rtol=1e-6, atol=1e-7)


def test_invalid_distributions_rejected_when_concrete():
  """N9."""
  with pytest.raises(ValueError, match="`p`"):
    D.kl(p=jnp.array([2., 3.]), q=jnp.array([.5, .5]))
  with pytest.raises(ValueError, match="`p`"):
    D.total_variation_from_probs(p=jnp.array([-1., 2.]), q=jnp.array([.5, .5]))
  with pytest.raises(ValueError, match="weight"):
    D.log_mixture(2.0, jnp.log(jnp.array([.5, .5])), jnp.log(jnp.array([.5, .5])))
  with pytest.raises(ValueError, match="log_q"):
    D.kl_from_log(log_p=jnp.log(jnp.array([.5, .5])), log_q=jnp.array([0.0, 0.0]))
  with pytest.raises(ValueError, match="beta"):
    D.generalized_jsd_from_log(log_p=jnp.log(jnp.array([.5, .5])),
                               log_q=jnp.log(jnp.array([.5, .5])), beta=jnp.array([0.5, 2.0]))
  # Traced inputs are unchecked (documented).
  jax.jit(lambda p: D.kl(p=p, q=jnp.array([.5, .5])))(jnp.array([2., 3.]))


def _reference_kl(z_p, z_q):
  """Autodiff reference for the closed-form KL core: plogratio(log_softmax(p), log_softmax(q))."""
  lp = _logspace.masked_log_softmax(z_p)
  lq = _logspace.masked_log_softmax(z_q)
  keep = _logspace.row_nonempty(lp, -1) & _logspace.row_nonempty(lq, -1)
  return jnp.where(keep, _logspace.plogratio(lp, lq, -1), 0.0)


class ClosedFormKLCore(chex.TestCase):
  """The fast path (closed-form backward) equals the plain reference in value and gradients."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_both_gradients(self):
    ninf = -jnp.inf
    zs = jnp.array([[1.0, -2.0, 0.5, 3.0], [0.2, ninf, 1.0, 2.0], [ninf] * 4, [1e4, -1e4, 0., 5.],
                    [0.0, ninf, 1.0, 0.0], [0.3, 0.1, -0.2, 0.0]])
    zt = jnp.array([[0.0, 1.0, -1.0, 2.0], [1.0, ninf, ninf, 0.0], [ninf] * 4, [-1e4, 1e4, 3., 0.],
                    [0.0, 2.0, 1.0, 0.0], [ninf] * 4])
    for fn, args in ((D.forward_kl, lambda a, b: (b, a)), (D.reverse_kl, lambda a, b: (a, b))):
      f = self.variant(fn)
      np.testing.assert_allclose(f(zs, zt), _reference_kl(*args(zs, zt)), rtol=1e-6)
      cot = jnp.arange(1.0, 7.0)
      g = jax.grad(lambda a, b: jnp.sum(cot * f(a, b)), argnums=(0, 1))
      # Rows with a support violation (value +inf) have no reference gradient to compare.
      finite = np.isfinite(np.asarray(f(zs, zt)))
      gr = jax.grad(lambda a, b: jnp.sum(jnp.where(finite, cot * _reference_kl(*args(a, b)), 0.)),
                    argnums=(0, 1))
      for x, y in zip(self.variant(g)(zs, zt), gr(zs, zt)):
        assert np.all(np.isfinite(x))
        # atol: the ±1e4 row's O(1) gradient terms cancel to ~1e-7 in float32.
        np.testing.assert_allclose(np.asarray(x)[finite], np.asarray(y)[finite], rtol=1e-5,
                                   atol=1e-6)

  def test_float64_gradients_match_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(9)
      zs = jnp.asarray(rng.normal(size=(3, 5)))
      zt = jnp.asarray(rng.normal(size=(3, 5))).at[0, 2].set(-jnp.inf)
      zs = zs.at[0, 2].set(-jnp.inf)
      T = jnp.array([1.0, 2.0, 0.7])
      for fn in (D.forward_kl, D.reverse_kl):
        check_grads(lambda s, t, c, fn=fn: fn(s, t, temperature=c), (zs, zt, T), order=1,
                    modes=["rev"], atol=1e-6, rtol=1e-6)
