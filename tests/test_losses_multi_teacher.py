"""Multi-teacher KD: weighting modes, pools vs per-teacher sums, masks, errors.
(The §12 identities on many random instances are theory checks zoo.multi_teacher_*.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from kdjax import divergences as D
from kdjax import losses as L


def _vg(f):
  """Jitted value-and-grad: one compilation instead of op-by-op dispatch (test speed)."""
  return jax.jit(jax.value_and_grad(f))


def _data(seed=0, m=3, b=5, v=6):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, v)), rng.normal(size=(m, b, v)) * 2, rng.integers(0, v, size=b)


def test_weight_modes(x64):
  zs, zt, y = _data()
  lp = scipy.special.log_softmax(zt, -1)
  np.testing.assert_allclose(L.teacher_weights(zt), 1 / 3)
  w = L.teacher_weights(zt, mode="static", static_weights=np.array([0.2, 0.3, 0.5]))
  np.testing.assert_allclose(w[:, 0], [0.2, 0.3, 0.5])
  conf = np.asarray(L.teacher_weights(zt, mode="confidence", weight_temperature=0.5))
  mx = lp.max(-1)
  np.testing.assert_allclose(conf, scipy.special.softmax(mx / 0.5, 0), rtol=1e-12)
  ce = -np.take_along_axis(lp, np.broadcast_to(y[None, :, None], (3, 5, 1)), -1)[..., 0]
  np.testing.assert_allclose(L.teacher_weights(zt, mode="min_ce", labels=y),
                             np.eye(3)[np.argmin(ce, 0)].T)
  np.testing.assert_allclose(L.teacher_weights(zt, mode="avg_ce", labels=y),
                             scipy.special.softmax(-ce, 0), rtol=1e-12)


def test_reductions_to_single_teacher_and_per_teacher(x64):
  zs, zt, y = _data(1)
  one = np.eye(3)[1]
  for agg in ("arithmetic", "geometric", "per_teacher"):
    np.testing.assert_allclose(L.multi_teacher_kd(zs, zt, weights=one, aggregation=agg),
                               D.forward_kl(zs, zt[1]), atol=1e-12)
    np.testing.assert_allclose(
        L.multi_teacher_kd(zs, zt, weights=one, aggregation=agg, direction="reverse"),
        D.reverse_kl(zs, zt[1]), atol=1e-12)
  # per-teacher forward sum = weighted sum of forward KLs, with per-example weights
  w = np.asarray(L.teacher_weights(zt, mode="avg_ce", labels=y))
  want = sum(w[i] * np.asarray(D.forward_kl(zs, zt[i], temperature=2.0)) for i in range(3))
  np.testing.assert_allclose(L.multi_teacher_kd(zs, zt, weights=w, aggregation="per_teacher",
                                                temperature=2.0), want, rtol=1e-12)
  # power pool with beta = 1 equals the arithmetic pool
  np.testing.assert_allclose(L.multi_teacher_kd(zs, zt, aggregation="power", power=1.0),
                             L.multi_teacher_kd(zs, zt), rtol=1e-12)
  # teacher axis elsewhere
  np.testing.assert_allclose(L.multi_teacher_kd(zs, np.moveaxis(zt, 0, 1), teacher_axis=1),
                             L.multi_teacher_kd(zs, zt), rtol=1e-12)
  check_grads(jax.jit(lambda s: L.multi_teacher_kd(s, zt, aggregation="geometric",
                                                   direction="reverse")),
              (zs,), order=1, modes=["rev"])


def test_masks_extremes_bf16():
  zs = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0]])
  zt = jnp.stack([jnp.array([[-1e4, 1e4, 3.0, 0.0], [3.0, 2.0, 1.0, 0.0]]),
                  jnp.array([[0.0, 1.0, 1e4, -jnp.inf], [1.0, 1.0, 1.0, 1.0]])])
  for agg in ("arithmetic", "geometric", "per_teacher"):
    val, g = _vg(lambda s: L.multi_teacher_kd(
        s, zt, aggregation=agg, direction="reverse", where=jnp.array([True, False])).sum())(zs)
    assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g))) and np.all(g[1] == 0)
    val, g = _vg(lambda s: L.multi_teacher_kd(
        s, zt, aggregation=agg, where=jnp.zeros(2, bool)).sum())(zs)
    assert val == 0 and np.all(np.asarray(g) == 0)
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(4, 16, 64)) * 3, rng.normal(size=(2, 4, 16, 64)) * 3
  got = L.multi_teacher_kd(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, L.multi_teacher_kd(a.astype(np.float32), b.astype(np.float32)),
                             rtol=5e-2, atol=5e-2)


def test_bad_arguments():
  zs, zt, y = _data(3)
  with pytest.raises(ValueError, match="mode"):
    L.teacher_weights(zt, mode="best")
  with pytest.raises(ValueError, match="labels"):
    L.teacher_weights(zt, mode="min_ce")
  with pytest.raises(ValueError, match="static_weights"):
    L.teacher_weights(zt, mode="static", static_weights=np.array([0.5, 0.6, 0.1]))
  with pytest.raises(ValueError, match="aggregation"):
    L.multi_teacher_kd(zs, zt, aggregation="median")
  with pytest.raises(ValueError, match="direction"):
    L.multi_teacher_kd(zs, zt, direction="both")
  with pytest.raises(ValueError, match="weights"):
    L.multi_teacher_kd(zs, zt, weights=np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match="teacher_logits"):
    L.multi_teacher_kd(zs[:, :5], zt)


def test_axis_applies_to_student_and_teachers():
  """N4: `axis` is the class axis of the student too (it was always softmaxed over the last)."""
  rng = np.random.default_rng(3)
  zs = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)          # [B, V, T]: class axis 1
  zt = jnp.asarray(rng.normal(size=(2, 4, 6, 3)), jnp.float32)       # [M, B, V, T]
  got = L.multi_teacher_kd(zs, zt, axis=1)
  want = L.multi_teacher_kd(jnp.moveaxis(zs, 1, -1), jnp.moveaxis(zt, 2, -1))
  assert got.shape == (4, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda a, b: L.multi_teacher_kd(a, b, axis=1))(zs, zt),
                             want, rtol=1e-5, atol=1e-6)
  w = L.teacher_weights(zt, mode="confidence", axis=1)
  np.testing.assert_allclose(w, L.teacher_weights(jnp.moveaxis(zt, 2, -1), mode="confidence"),
                             rtol=1e-6)


def test_nan_propagates_to_loss_and_weights():
  rng = np.random.default_rng(4)
  zs = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  zt = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  for agg in ("arithmetic", "geometric", "per_teacher"):
    out = np.asarray(L.multi_teacher_kd(zs.at[0, 1].set(jnp.nan), zt, aggregation=agg))
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all(), agg
    out = np.asarray(L.multi_teacher_kd(zs, zt.at[1, 2, 0].set(jnp.nan), aggregation=agg))
    assert np.isnan(out[2]) and np.isfinite(out[:2]).all(), agg
  w = np.asarray(L.teacher_weights(zt.at[0, 1, 3].set(jnp.nan), mode="confidence"))
  assert np.isnan(w[:, 1]).all() and np.isfinite(w[:, [0, 2]]).all()
  w = np.asarray(L.teacher_weights(zt.at[0, 1, 3].set(jnp.nan), mode="min_ce",
                                   labels=jnp.array([0, 1, 2])))
  assert np.isnan(w[:, 1]).all()
  with pytest.raises(ValueError, match="labels"):
    L.teacher_weights(zt, mode="min_ce", labels=jnp.array([0, 5, 2]))
