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
  np.testing.assert_allclose(L.softmax_cross_entropy(zs, y), ce, rtol=1e-12)
  kd = np.asarray(L.hinton_kd(zs, zt, temperature=3.0, scale_by_t2=True))
  for alpha in (0.0, 0.3, 1.0):
    got = L.ce_kd_mixture(zs, zt, y, alpha=alpha, temperature=3.0, scale_by_t2=True)
    np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * kd, rtol=1e-12)
  check_grads(jax.jit(lambda s: L.ce_kd_mixture(s, zt, y, alpha=0.4, temperature=2.0)),
              (zs,), order=1, modes=["rev"])


def test_masks_extremes_bf16():
  zt = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0], [-jnp.inf] * 4])
  zs = jnp.array([[-1e4, 1e4, 3.0, -jnp.inf], [3.0, 2.0, 1.0, 0.0], [-jnp.inf] * 4])
  y = jnp.array([0, 3, 1])
  f = lambda s: L.ce_kd_mixture(s, zt, y, alpha=0.5, where=jnp.array([True, False, True])).sum()
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
    L.softmax_cross_entropy(zs, np.array([0, 3]))
  with pytest.raises(ValueError, match="labels"):
    L.softmax_cross_entropy(zs, np.array([0, 1, 2]))
  with pytest.raises(TypeError, match="labels"):
    L.softmax_cross_entropy(zs, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="alpha"):
    L.ce_kd_mixture(zs, zs, np.array([0, 1]), alpha=2.0)
  with pytest.raises(TypeError, match="scale_by_t2"):
    L.hinton_kd(zs, zs, scale_by_t2="yes")
