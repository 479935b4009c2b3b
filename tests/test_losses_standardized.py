"""Logit-standardised KD: affine invariance, matching up to affine maps, constant logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from kdjax import losses as L


def _vg(f):
  """Jitted value-and-grad: one compilation instead of op-by-op dispatch (test speed)."""
  return jax.jit(jax.value_and_grad(f))


def _ref(zs, zt, tau):
  def z(x):
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)
  p = scipy.special.softmax(z(zt) / tau, -1)
  q = scipy.special.softmax(z(zs) / tau, -1)
  return scipy.special.rel_entr(p, q).sum(-1)


def test_reference_and_affine_invariance(x64):
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(2, 4, 16, 64)) * 3  # std >= 1 per row
  base = np.asarray(L.logit_standardized_kd(zs, zt, temperature=2.0))
  np.testing.assert_allclose(base, _ref(zs, zt, 2.0), rtol=1e-10)
  np.testing.assert_allclose(L.logit_standardized_kd(zs, zt, temperature=2.0, scale_by_t2=True),
                             4 * base, rtol=1e-12)
  for a in (0.5, 2.0, 10.0):
    for b in (-3.0, 5.0):
      np.testing.assert_allclose(L.logit_standardized_kd(a * zs + b, zt, temperature=2.0), base,
                                 rtol=1e-6)
      np.testing.assert_allclose(L.logit_standardized_kd(zs, a * zt + b, temperature=2.0), base,
                                 rtol=1e-6)
      np.testing.assert_allclose(L.logit_standardized_kd(a * zt + b, zt), 0.0, atol=1e-10)


def test_constant_logits_and_gradients(x64):
  const = np.full((3, 5), 2.0)
  rng = np.random.default_rng(1)
  zt = rng.normal(size=(3, 5))
  val, g = _vg(lambda s: L.logit_standardized_kd(s, zt).sum())(const)
  assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
  zs = rng.normal(size=(3, 5)) * 2
  check_grads(jax.jit(lambda s: L.logit_standardized_kd(s, zt, temperature=1.5)), (zs,),
              order=1, modes=["rev"])


def test_masks_extremes_bf16():
  zs = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0], [-jnp.inf] * 4])
  zt = jnp.array([[-1e4, 1e4, 3.0, -jnp.inf], [3.0, 2.0, 1.0, 0.0], [-jnp.inf] * 4])
  val, g = _vg(lambda s: L.logit_standardized_kd(s, zt).sum())(zs)
  assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
  out = L.logit_standardized_kd(zs, zt, where=jnp.array([True, False, True]))
  assert float(out[1]) == 0.0 and float(out[2]) == 0.0
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 4, 16, 64)) * 3
  got = L.logit_standardized_kd(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  np.testing.assert_allclose(got, L.logit_standardized_kd(a.astype(np.float32),
                                                          b.astype(np.float32)),
                             rtol=5e-2, atol=5e-2)


def test_bad_arguments():
  with pytest.raises(ValueError, match="eps"):
    L.standardize_logits(np.zeros(3), eps=0.0)
  with pytest.raises(ValueError, match="same shape"):
    L.logit_standardized_kd(np.zeros((2, 3)), np.zeros((2, 4)))
