"""Tests of kdjax.kernels against scikit-learn's pairwise kernels (independent oracle)."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import pairwise

from kdjax import kernels


@pytest.fixture
def points():
  rng = np.random.default_rng(0)
  return rng.normal(size=(7, 3)), rng.normal(size=(5, 3))


def test_rbf_matches_sklearn(x64, points):
  a, b = points
  np.testing.assert_allclose(kernels.rbf(a, b, gamma=0.7), pairwise.rbf_kernel(a, b, gamma=0.7),
                             rtol=1e-12)


def test_laplace_matches_sklearn(x64, points):
  a, b = points
  np.testing.assert_allclose(kernels.laplace(a, b, gamma=0.3),
                             pairwise.laplacian_kernel(a, b, gamma=0.3), rtol=1e-12)


def test_polynomial_and_linear_match_sklearn(x64, points):
  a, b = points
  np.testing.assert_allclose(kernels.polynomial(a, b, degree=3, gamma=0.5, coef0=2.0),
                             pairwise.polynomial_kernel(a, b, degree=3, gamma=0.5, coef0=2.0),
                             rtol=1e-12)
  np.testing.assert_allclose(kernels.linear(a, b), pairwise.linear_kernel(a, b), rtol=1e-12)


def test_one_dimensional_inputs_and_psd():
  x = jnp.linspace(0, 1, 11)
  k = kernels.rbf(x, x, gamma=80.0)
  assert k.shape == (11, 11) and k.dtype == jnp.float32
  np.testing.assert_allclose(jnp.diag(k), 1.0, atol=1e-6)   # coincident points: distance 0
  assert float(jnp.linalg.eigvalsh(k).min()) > -1e-5


def test_get_kernel_and_errors(points):
  a, b = points
  assert kernels.get_kernel("laplace") is kernels.laplace
  with pytest.raises(ValueError, match="name"):
    kernels.get_kernel("cosine")
  with pytest.raises(ValueError, match="gamma"):
    kernels.rbf(a, b, gamma=-1.0)
  with pytest.raises(ValueError, match="feature dimension"):
    kernels.rbf(a, b[:, :2])
  with pytest.raises(ValueError, match="degree"):
    kernels.polynomial(a, b, degree=0)
  with pytest.raises(TypeError, match="x1"):
    kernels.linear("abc", b)
  with pytest.raises(ValueError, match="x1"):
    kernels.linear(np.zeros((2, 2, 2)), b)
