"""Hinton KD, the CE + KD mixture and the integer-label cross-entropy."""

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


def test_two_class_direction_pinning(x64):
  # kd_losses.md §13.1: p_T = (0.9, 0.1), p_S = (0.5, 0.5): forward KL 0.3681.
  zt, zs = np.log([0.9, 0.1]), np.log([0.5, 0.5])
  np.testing.assert_allclose(L.hinton_kd(zs, zt), 0.3681, atol=5e-5)
  np.testing.assert_allclose(L.hinton_kd(zs, zt, temperature=2.0, scale_by_t2=True),
                             4 * D.forward_kl(zs, zt, temperature=2.0), rtol=1e-12)


def test_t2_scaling_and_gradient(x64):
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(2, 4, 7)) * 3
  for temp in (0.5, 4.0):
    v = L.hinton_kd(zs, zt, temperature=temp, scale_by_t2=True)
    np.testing.assert_allclose(v, temp**2 * D.forward_kl(zs, zt, temperature=temp), rtol=1e-12)
    g = jax.jit(jax.grad(lambda s: L.hinton_kd(s, zt, temperature=temp,
                                               scale_by_t2=True).sum()))(zs)
    ps, pt = scipy.special.softmax(zs / temp, -1), scipy.special.softmax(zt / temp, -1)
    np.testing.assert_allclose(g, temp * (ps - pt), atol=1e-12)
  check_grads(jax.jit(lambda s: L.hinton_kd(s, zt, temperature=2.0, scale_by_t2=True)),
              (zs,), order=1, modes=["rev"])


def test_mixture(x64):
  rng = np.random.default_rng(1)
  zs, zt = rng.normal(size=(2, 6, 5)) * 2
  y = rng.integers(0, 5, size=6)
  ce = -np.take_along_axis(scipy.special.log_softmax(zs, -1), y[:, None], -1)[:, 0]
  np.testing.assert_allclose(L.softmax_cross_entropy_with_integer_labels(zs, y), ce, rtol=1e-12)
  kd = np.asarray(L.hinton_kd(zs, zt, temperature=3.0, scale_by_t2=True))
  for alpha in (0.0, 0.3, 1.0):
    got = L.ce_kd_mixture(zs, zt, y, ce_weight=1 - alpha, kd_weight=alpha, temperature=3.0,
                          scale_by_t2=True)
    np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * kd, rtol=1e-12)
  check_grads(jax.jit(lambda s: L.ce_kd_mixture(s, zt, y, kd_weight=0.4, ce_weight=0.6,
                                                temperature=2.0)),
              (zs,), order=1, modes=["rev"])


def test_masks_extremes_bf16():
  zt = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0], [-jnp.inf] * 4])
  zs = jnp.array([[-1e4, 1e4, 3.0, -jnp.inf], [3.0, 2.0, 1.0, 0.0], [-jnp.inf] * 4])
  y = jnp.array([0, 3, 1])
  f = lambda s: L.ce_kd_mixture(s, zt, y, kd_weight=0.5, ce_weight=0.5,
                                where=jnp.array([True, False, True])).sum()
  val, g = _vg(f)(zs)
  assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[1:] == 0)
  allmasked = jax.grad(lambda s: L.hinton_kd(s, zt, where=jnp.zeros(3, bool)).sum())(zs)
  assert np.all(np.asarray(allmasked) == 0)
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 4, 16, 64)) * 3
  got = L.hinton_kd(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), temperature=2.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, L.hinton_kd(a.astype(np.float32), b.astype(np.float32),
                                              temperature=2.0), rtol=5e-2, atol=5e-2)


def test_bad_arguments():
  zs = np.zeros((2, 3))
  with pytest.raises(ValueError, match="labels"):
    L.softmax_cross_entropy_with_integer_labels(zs, np.array([0, 3]))
  with pytest.raises(ValueError, match="labels"):
    L.softmax_cross_entropy_with_integer_labels(zs, np.array([0, 1, 2]))
  with pytest.raises(TypeError, match="labels"):
    L.softmax_cross_entropy_with_integer_labels(zs, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="kd_weight"):
    L.ce_kd_mixture(zs, zs, np.array([0, 1]), kd_weight=-2.0)
  with pytest.raises(ValueError, match="ce_weight"):
    L.ce_kd_mixture(zs, zs, np.array([0, 1]), ce_weight=np.array([1.0, -1.0]))
  with pytest.raises(TypeError, match="alpha"):
    L.ce_kd_mixture(zs, zs, np.array([0, 1]), alpha=0.5)  # the old convention is gone
  with pytest.raises(TypeError, match="scale_by_t2"):
    L.hinton_kd(zs, zs, scale_by_t2="yes")


_ce = L.softmax_cross_entropy_with_integer_labels


def test_ce_nan_propagates():
  # N1: a NaN logit was dropped (log 3 instead of NaN, optax gives NaN).
  z = jnp.array([[jnp.nan, 0., 0., 0.], [0., 1., 2., 3.]])
  for f in (_ce, jax.jit(_ce)):
    out = np.asarray(f(z, jnp.array([1, 0])))
    assert np.isnan(out[0]) and np.isfinite(out[1])
  # -inf still removes a class; an all -inf row gives 0 with zero gradient
  z2 = jnp.array([[-jnp.inf, 0., 0.], [-jnp.inf] * 3])
  val, g = _vg(lambda s: _ce(s, jnp.array([1, 0])).sum())(z2)
  np.testing.assert_allclose(val, np.log(2.0), rtol=1e-6)
  assert np.all(np.asarray(g)[1] == 0)
  with pytest.raises(ValueError, match="logits"):
    _ce(jnp.array([[jnp.inf, 0.]]), jnp.array([0]))


def test_ce_labels_ignore_index_and_traced_out_of_range():
  # N10: traced labels wrapped around (-1 read as the last class, -100 gave NaN).
  s = jnp.array([[1., 2., 3.], [1., 2., 3.], [1., 2., 3.]])
  ref = -jax.nn.log_softmax(s[0])[0]
  jce = jax.jit(_ce)
  for bad in (-1, 3, -100, 7):
    y = jnp.array([0, bad, 2])
    val, g = jax.jit(jax.value_and_grad(lambda z: jce(z, y).sum()))(s)
    out = np.asarray(jce(s, y))
    np.testing.assert_allclose(out[0], ref, rtol=1e-6)
    assert out[1] == 0.0 and np.all(np.asarray(g)[1] == 0)
    assert np.isfinite(float(val))
  np.testing.assert_allclose(_ce(s, jnp.array([0, -100, 2]))[1], 0.0)  # concrete ignore_index
  np.testing.assert_allclose(_ce(s, jnp.array([0, -7, 2]), ignore_index=-7)[1], 0.0)
  for bad in (-1, 3):
    with pytest.raises(ValueError, match="labels"):
      _ce(s, jnp.array([0, bad, 2]))
  with pytest.raises(TypeError, match="ignore_index"):
    _ce(s, jnp.array([0, 1, 2]), ignore_index=1.5)


def test_ce_where_rule():
  s = jnp.zeros((3, 4))
  y = jnp.array([0, 1, 2])
  out = _ce(s, y, where=jnp.array([[True], [False], [True]]))  # position mask, class axis 1
  np.testing.assert_allclose(out, [np.log(4), 0, np.log(4)], rtol=1e-6)
  out = _ce(s, y, where=jnp.array([True, True, False, True]))  # vocabulary mask
  np.testing.assert_allclose(out, [np.log(3), np.log(3), np.inf], rtol=1e-6)
  with pytest.raises(TypeError, match="where"):
    _ce(s, y, where=jnp.array([1, 0, 1]))
  with pytest.raises(ValueError, match="where"):
    _ce(s, y, where=jnp.array([True, False]))  # N9: not broadcastable


def test_mixture_convention_and_divergences():
  rng = np.random.default_rng(4)
  zs, zt = rng.normal(size=(2, 5, 6)).astype(np.float32) * 2
  y = jnp.asarray(rng.integers(0, 6, size=5))
  ce = _ce(zs, y)
  # the old experiments convention c·CE + (1 − c)·T²·D is ce_weight=c, kd_weight=1−c, T² on
  c, temp = 0.1, 4.0
  old = c * ce + (1 - c) * temp**2 * D.forward_kl(zs, zt, temperature=temp)
  new = jax.jit(lambda a, b: L.ce_kd_mixture(a, b, y, ce_weight=c, kd_weight=1 - c,
                                             scale_by_t2=True, temperature=temp))(zs, zt)
  np.testing.assert_allclose(new, old, rtol=1e-5)
  # defaults: CE + D (both weights 1, no T²); labels=None: D only
  np.testing.assert_allclose(L.ce_kd_mixture(zs, zt, y, temperature=2.0),
                             ce + D.forward_kl(zs, zt, temperature=2.0), rtol=1e-5)
  np.testing.assert_allclose(L.ce_kd_mixture(zs, zt, None, temperature=2.0),
                             D.forward_kl(zs, zt, temperature=2.0), rtol=1e-6)
  for name, kw in (("reverse_kl", {}), ("skew_forward_kl", {"skew": 0.2}),
                   ("skew_reverse_kl", {"skew": 0.3}), ("generalized_jsd", {"beta": 0.4}),
                   ("total_variation", {})):
    want = getattr(D, name)(zs, zt, temperature=2.0, **kw)
    got = L.ce_kd_mixture(zs, zt, None, divergence=name, temperature=2.0, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match="divergence"):
    L.ce_kd_mixture(zs, zt, y, divergence="kl")
  # a zero weight drops an infinite term (label on a -inf class) without NaN
  zs_inf = jnp.asarray(zs).at[0, int(y[0])].set(-jnp.inf)
  zt_inf = jnp.asarray(zt).at[0, int(y[0])].set(-jnp.inf)
  assert np.isinf(np.asarray(_ce(zs_inf, y))[0])
  v, g = _vg(lambda s: L.ce_kd_mixture(s, zt_inf, y, ce_weight=0.0).sum())(zs_inf)
  assert np.isfinite(v) and np.all(np.isfinite(np.asarray(g)))


def test_per_position_temperature_t2():
  # N3: a [B] temperature is applied per row (= vmap), T² per row.
  rng = np.random.default_rng(5)
  zs, zt = rng.normal(size=(2, 4, 5)).astype(np.float32)
  temp = jnp.array([0.5, 1.0, 2.0, 4.0])
  f = lambda a, b, t: L.hinton_kd(a, b, temperature=t, scale_by_t2=True)
  np.testing.assert_allclose(jax.jit(f)(zs, zt, temp), jax.vmap(f)(zs, zt, temp), rtol=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    L.hinton_kd(zs, zt, temperature=np.array([1.0, 0.0, 1.0, 1.0]))
  w = jnp.array([0.0, 1.0, 0.5, 2.0])
  np.testing.assert_allclose(L.ce_kd_mixture(zs, zt, None, kd_weight=w),
                             w * D.forward_kl(zs, zt), rtol=1e-6)
