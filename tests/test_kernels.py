"""Tests of kdjax.kernels against scikit-learn's pairwise kernels (independent oracle)."""

import jax
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


# ----------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("jit", [False, True])
def test_rbf_does_not_cancel_for_uncentred_inputs(jit):
  """N15: |a|^2 + |b|^2 - 2ab in float32 gave k(1000, 1000.1) = 1 at gamma = 80."""
  x1, x2 = np.array([1000.0, 1000.1]), np.array([1000.0])
  f = jax.jit(lambda a, b: kernels.rbf(a, b, gamma=80.0)) if jit else (
      lambda a, b: kernels.rbf(a, b, gamma=80.0))
  got = np.asarray(f(x1, x2))[:, 0]
  x32 = np.asarray(x1, np.float32).astype(np.float64)     # the float32 inputs, exactly
  exact = np.exp(-80.0 * (x32 - 1000.0) ** 2)
  np.testing.assert_allclose(got, exact, rtol=1e-4)
  np.testing.assert_allclose(got, [1.0, np.exp(-0.8)], rtol=1e-3)   # float64 of the inputs


@pytest.mark.parametrize("dim", [3, 40])
def test_squared_distances_offset_invariant(dim):
  """Both code paths (direct differences, centred expansion) ignore a common offset."""
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(6, dim)) * 0.01, rng.normal(size=(5, dim)) * 0.01
  ref = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  for off in (0.0, 1e3):
    got = np.asarray(kernels.squared_distances(a + off, b + off))
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=1e-9)
    got_jit = np.asarray(jax.jit(kernels.squared_distances)(a + off, b + off))
    np.testing.assert_allclose(got_jit, got, rtol=1e-6, atol=1e-12)


def test_kernel_contract_edges():
  x = jnp.array([[0.0, 1.0], [2.0, 3.0]])
  # bfloat16 in -> float32 out.
  for f in (kernels.rbf, kernels.laplace, kernels.linear, kernels.polynomial,
            kernels.squared_distances):
    assert f(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16)).dtype == jnp.float32
  # NaN propagates.
  assert np.isnan(np.asarray(kernels.rbf(x.at[0, 0].set(jnp.nan), x))[0]).all()
  # Coincident points: exact zero distance, finite gradient.
  g = jax.grad(lambda a: kernels.rbf(a, x, gamma=2.0).sum())(x)
  assert np.all(np.isfinite(g))
  assert float(kernels.squared_distances(x, x)[0, 0]) == 0.0
  # numpy integers accepted, bool/str/float degrees rejected; array gamma checked elementwise.
  np.testing.assert_allclose(kernels.polynomial(x, x, degree=np.int64(2)),
                             kernels.polynomial(x, x, degree=2))
  for bad in (True, 2.0, "2"):
    with pytest.raises(TypeError, match="degree"):
      kernels.polynomial(x, x, degree=bad)
  with pytest.raises(ValueError, match="gamma"):
    kernels.rbf(x, x, gamma=np.array([1.0, -1.0]))
  with pytest.raises(TypeError, match="gamma"):
    kernels.rbf(x, x, gamma="1")
  with pytest.raises(ValueError, match="coef0"):
    kernels.polynomial(x, x, coef0=float("nan"))
