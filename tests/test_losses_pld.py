"""Plackett–Luce distillation (kd_losses.md §7, checklist item 8)."""

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


def _ref(s, zt, y):
  """Direct O(C²) NumPy transcription of the formula."""
  key = zt.copy()
  key[y] = np.inf
  pi = np.argsort(-key, kind="stable")
  alpha = scipy.special.softmax(zt)[pi]
  sp = s[pi]
  return sum(alpha[k] * (scipy.special.logsumexp(sp[k:]) - sp[k]) for k in range(len(s)))


def test_reference_shift_and_ce(x64):
  rng = np.random.default_rng(0)
  s, zt = rng.normal(size=(2, 6, 10)) * 2
  y = rng.integers(0, 10, size=6)
  got = np.asarray(L.plackett_luce_kd(s, zt, y))
  np.testing.assert_allclose(got, [_ref(s[i], zt[i], y[i]) for i in range(6)], rtol=1e-12)
  np.testing.assert_allclose(L.plackett_luce_kd(s + 7.5, zt, y), got, rtol=1e-12)
  # alpha = e_1 (a one-hot teacher on the label) gives the CE of the label.
  onehot_t = np.where(np.arange(10) == y[:, None], 0.0, -1e4)
  np.testing.assert_allclose(L.plackett_luce_kd(s, onehot_t, y),
                             L.softmax_cross_entropy_with_integer_labels(s, y), rtol=1e-10)
  # The last position contributes 0: dropping the worst class only changes its own alpha term.
  pi = np.asarray(L.plackett_luce_permutation(zt, y))
  assert np.all(pi[np.arange(6), 0] == y)


def test_convexity(x64):
  rng = np.random.default_rng(1)
  zt = rng.normal(size=10) * 2
  hess = jax.jit(jax.hessian(lambda s: L.plackett_luce_kd(s, zt, jnp.asarray(3))))
  worst = min(np.linalg.eigvalsh(np.asarray(hess(rng.normal(size=10) * 3))).min()
              for _ in range(100))
  assert worst >= -1e-10


def test_gradients_masks_extremes(x64):
  rng = np.random.default_rng(2)
  s, zt = rng.normal(size=(2, 3, 6))
  y = np.array([0, 5, 2])
  check_grads(jax.jit(lambda x: L.plackett_luce_kd(x, zt, y, temperature=2.0)), (s,), order=1,
              modes=["rev"])
  check_grads(jax.jit(lambda t: L.plackett_luce_kd(s, t, y)), (zt,), order=1, modes=["rev"])
  # class mask = removing the classes
  vm = np.array([True, True, False, True, True, False])
  idx = np.flatnonzero(vm)
  y2 = np.array([0, 3, 2])  # labels 0, 4, 3 re-indexed inside the kept classes
  np.testing.assert_allclose(
      L.plackett_luce_kd(s, zt, np.array([0, 4, 3]), where=np.broadcast_to(vm, s.shape)),
      L.plackett_luce_kd(s[:, idx], zt[:, idx], y2), rtol=1e-12)
  zs_e = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [-jnp.inf] * 4])
  zt_e = jnp.array([[-1e4, 1e4, 3.0, 1.0], [-jnp.inf] * 4])
  val, g = _vg(lambda x: L.plackett_luce_kd(x, zt_e, jnp.array([1, 0])).sum())(zs_e)
  assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
  val, g = _vg(
      lambda x: L.plackett_luce_kd(x, zt, y, where=np.zeros(3, bool)).sum())(s)
  assert val == 0 and np.all(np.asarray(g) == 0)


def test_bf16_and_errors():
  rng = np.random.default_rng(3)
  s, zt = rng.normal(size=(2, 4, 16, 64)) * 3
  y = rng.integers(0, 64, size=(4, 16))
  got = L.plackett_luce_kd(jnp.asarray(s, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16), y)
  want = L.plackett_luce_kd(s.astype(np.float32), zt.astype(np.float32), y)
  np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)
  with pytest.raises(ValueError, match="labels"):
    L.plackett_luce_kd(s[0], zt[0], np.full(16, 64))
  with pytest.raises(TypeError, match="labels"):
    L.plackett_luce_kd(s[0], zt[0], np.zeros(16))


def test_nan_propagates_and_inf_rejected():
  # N1: a NaN logit was treated as a removed class.
  zs, zt = jnp.array([[1., 2., 3.], [1., 2., 3.]]), jnp.array([[jnp.nan, 1., 2.], [3., 1., 2.]])
  y = jnp.array([1, 0])
  for f in (L.plackett_luce_kd, jax.jit(L.plackett_luce_kd)):
    out = np.asarray(f(zs, zt, y))
    assert np.isnan(out[0]) and np.isfinite(out[1])
    out = np.asarray(f(zt, zs, y))  # NaN in the student
    assert np.isnan(out[0]) and np.isfinite(out[1])
  with pytest.raises(ValueError, match="teacher_logits"):
    L.plackett_luce_kd(zs, zt.at[1, 1].set(jnp.inf), y)


def test_traced_out_of_range_labels_drop_the_position():
  # N10: a traced label -1 wrapped around to the last class.
  zs, zt = jnp.array([[1., 2., 3.], [1., 2., 3.]]), jnp.array([[3., 1., 2.], [3., 1., 2.]])
  f = jax.jit(jax.value_and_grad(lambda s, y: L.plackett_luce_kd(s, zt, y).sum()))
  for bad in (-1, 3):
    val, g = f(zs, jnp.array([0, bad]))
    np.testing.assert_allclose(val, L.plackett_luce_kd(zs[:1], zt[:1], jnp.array([0]))[0],
                               rtol=1e-6)
    assert np.all(np.asarray(g)[1] == 0)
  with pytest.raises(ValueError, match="labels"):
    L.plackett_luce_kd(zs, zt, jnp.array([0, -1]))
  perm = jax.jit(L.plackett_luce_permutation)(zt, jnp.array([1, -1]))
  np.testing.assert_array_equal(perm, [[1, 0, 2], [0, 2, 1]])


def test_permutation_where_keyword_and_per_position_temperature():
  zt = jnp.array([[3., 1., 2.], [0., 5., 4.]])
  perm = L.plackett_luce_permutation(zt, where=jnp.array([False, True, True]))
  np.testing.assert_array_equal(perm, [[2, 1, 0], [1, 2, 0]])
  with pytest.raises(TypeError, match="where"):
    L.plackett_luce_permutation(zt, where=jnp.array([0, 1, 1]))
  with pytest.raises(TypeError):
    L.plackett_luce_permutation(zt, valid=jnp.array([False, True, True]))  # renamed to where
  rng = np.random.default_rng(6)
  zs, zt2 = rng.normal(size=(2, 4, 5)).astype(np.float32)
  temp = jnp.array([0.5, 1.0, 2.0, 4.0])
  y = jnp.array([0, 1, 2, 3])
  f = lambda a, b, c, t: L.plackett_luce_kd(a, b, c, temperature=t)
  np.testing.assert_allclose(jax.jit(f)(zs, zt2, y, temp), jax.vmap(f)(zs, zt2, y, temp),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    L.plackett_luce_kd(zs, zt2, y, temperature=np.array([1.0, -1.0, 1.0, 1.0]))
