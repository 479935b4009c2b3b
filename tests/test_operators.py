"""Tests of kdjax.operators (aggregation, softening, meta-teachers, recursion, axiom checkers).

Closed forms are compared in float64 against plain NumPy reference implementations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import operators as ops


def _dirichlet(seed, shape, k, conc=1.0):
  return np.random.default_rng(seed).dirichlet(np.full(k, conc), size=shape)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("kind,power", [("arithmetic", None), ("geometric", None),
                                        ("power", 0.5), ("power", -0.7), ("power", 2.0)])
def test_aggregate_matches_numpy_reference(x64, kind, power):
  p = _dirichlet(0, (3, 4), 6)
  w = np.array([0.2, 0.3, 0.5])
  if kind == "arithmetic":
    ref = np.einsum("m,mbk->bk", w, p)
  elif kind == "geometric":
    ref = np.prod(p ** w[:, None, None], axis=0)
  else:
    ref = np.einsum("m,mbk->bk", w, p ** power) ** (1 / power)
  ref = ref / ref.sum(-1, keepdims=True)
  out = ops.aggregate(jnp.log(p), weights=w, kind=kind, power=power)
  np.testing.assert_allclose(np.exp(out), ref, rtol=1e-12, atol=1e-14)


def test_aggregate_power_limits_and_uniform_default(x64):
  lp = jnp.log(_dirichlet(1, (4, 2), 5))
  geo = ops.aggregate(lp, kind="geometric")
  np.testing.assert_allclose(ops.aggregate(lp, kind="power", power=1e-8), geo, atol=1e-6)
  np.testing.assert_allclose(ops.aggregate(lp, kind="power", power=0.0), geo, atol=0)
  np.testing.assert_allclose(ops.aggregate(lp, kind="power", power=1.0),
                             ops.aggregate(lp, weights=np.full(4, 0.25)), atol=1e-15)
  # geometric pool of softmax(z_i) == softmax of averaged logits
  z = np.random.default_rng(2).normal(size=(4, 2, 5)) * 3
  np.testing.assert_allclose(ops.aggregate(jax.nn.log_softmax(z), kind="geometric"),
                             jax.nn.log_softmax(z.mean(0)), atol=1e-12)


def test_aggregate_per_example_weights_and_axes(x64):
  p = _dirichlet(3, (3, 4), 5)
  we = np.random.default_rng(4).dirichlet(np.ones(3), size=4).T  # [M, batch]
  out = ops.aggregate(jnp.log(p), weights=we)
  np.testing.assert_allclose(np.exp(out), np.einsum("mb,mbk->bk", we, p), atol=1e-14)
  # teacher axis and class axis elsewhere
  moved = jnp.moveaxis(jnp.log(p), (0, 2), (2, 0))  # [K, batch, M]
  out2 = ops.aggregate(moved, weights=we, teacher_axis=2, axis=0)
  np.testing.assert_allclose(out2, out.T, atol=1e-14)


def test_aggregate_zeros_and_empty_rows_are_nan_free(x64):
  lp = jnp.log(jnp.array([[0.0, 0.4, 0.6], [0.5, 0.0, 0.5]]))
  ar = ops.aggregate(lp)
  np.testing.assert_allclose(np.exp(ar), [0.25, 0.2, 0.55], atol=1e-15)
  geo = ops.aggregate(lp, kind="geometric")
  np.testing.assert_allclose(np.exp(geo), [0, 0, 1], atol=1e-15)
  neg = ops.aggregate(lp, kind="power", power=-1.0)
  np.testing.assert_allclose(np.exp(neg), [0, 0, 1], atol=1e-15)
  empty = jnp.full((2, 2, 3), -jnp.inf)
  for kind, power in (("arithmetic", None), ("geometric", None), ("power", 0.5)):
    out = ops.aggregate(empty, kind=kind, power=power)
    assert np.all(out == -np.inf)
    g = jax.grad(lambda x: jnp.sum(jnp.where(
        jnp.isfinite(ops.aggregate(x, kind=kind, power=power)),
        ops.aggregate(x, kind=kind, power=power), 0.0)))(lp)
    assert np.all(np.isfinite(g))


def test_aggregate_bf16_and_extreme_logits():
  z = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
  lp = jax.nn.log_softmax(z).astype(jnp.bfloat16)
  for kind in ("arithmetic", "geometric"):
    out = ops.aggregate(lp, kind=kind)
    assert out.dtype == jnp.float32
    assert not np.any(np.isnan(out))


def test_aggregate_jit_and_traced_weights_and_power(x64):
  lp = jnp.log(_dirichlet(5, (3, 2), 4))
  w = jnp.array([0.1, 0.6, 0.3])
  np.testing.assert_allclose(jax.jit(lambda w: ops.aggregate(lp, weights=w))(w),
                             ops.aggregate(lp, weights=w), atol=1e-15)
  f = jax.jit(lambda b: ops.aggregate(lp, weights=w, kind="power", power=b))
  np.testing.assert_allclose(f(0.5), ops.aggregate(lp, weights=w, kind="power", power=0.5),
                             atol=1e-13)
  np.testing.assert_allclose(f(0.0), ops.aggregate(lp, weights=w, kind="geometric"), atol=1e-13)


@pytest.mark.parametrize("weights,match", [
    ([0.5, 0.6, 0.1], "sum to 1"), ([-0.1, 0.6, 0.5], "non-negative"),
    ([0.5, 0.5], "shape"), (np.ones((3, 7)) / 3, "broadcast"), ("abc", "weights")])
def test_aggregate_bad_weights(weights, match):
  lp = jnp.log(jnp.full((3, 4, 5), 0.2))
  with pytest.raises((ValueError, TypeError), match=match):
    ops.aggregate(lp, weights=weights)


def test_aggregate_bad_arguments():
  lp = jnp.log(jnp.full((3, 5), 0.2))
  with pytest.raises(ValueError, match="kind"):
    ops.aggregate(lp, kind="median")
  with pytest.raises(ValueError, match="power"):
    ops.aggregate(lp, kind="power")
  with pytest.raises(ValueError, match="power"):
    ops.aggregate(lp, kind="geometric", power=0.5)
  with pytest.raises(ValueError, match="teacher_axis"):
    ops.aggregate(lp, teacher_axis=-1)
  with pytest.raises(ValueError, match="rank"):
    ops.aggregate(jnp.zeros(3))
