"""TAID loss and its adaptive schedule (kd_losses.md §1, checklist item 2)."""

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


def test_endpoints_and_gradient(x64):
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(2, 4, 9)) * 2
  np.testing.assert_allclose(L.taid_loss(zs, zt, interpolation=1.0), D.forward_kl(zs, zt), rtol=1e-12)
  g1 = jax.grad(lambda s: L.taid_loss(s, zt, interpolation=1.0).sum())(zs)
  np.testing.assert_allclose(g1, jax.grad(lambda s: D.forward_kl(s, zt).sum())(zs), atol=1e-12)
  v0, g0 = _vg(lambda s: L.taid_loss(s, zt, interpolation=0.0).sum())(zs)
  assert abs(float(v0)) < 1e-12 and np.max(np.abs(np.asarray(g0))) < 1e-12
  for t in (0.3, 0.7):
    g = jax.grad(lambda s: L.taid_loss(s, zt, interpolation=t).sum())(zs)
    q = scipy.special.softmax(zs, -1)
    pt = scipy.special.softmax((1 - t) * zs + t * zt, -1)
    np.testing.assert_allclose(g, q - pt, atol=1e-12)
  # the teacher side is differentiable (no sg on z_T): finite differences
  check_grads(jax.jit(lambda z: L.taid_loss(zs, z, interpolation=0.6, temperature=2.0)), (zt,), order=1,
              modes=["rev"])


def _synthetic_losses(n, seed=0):
  rng = np.random.default_rng(seed)
  steps = np.arange(n)
  return 3.0 * np.exp(-steps / 300) + 0.1 + 0.05 * rng.normal(size=n) ** 2


def test_schedule_monotone_bounded_above_ramp():
  n_steps, t_start, t_end = 1000, 0.4, 0.9
  losses = jnp.asarray(_synthetic_losses(n_steps))

  def body(state, x):
    n, loss = x
    state = L.taid_update(state, loss, step=n, total_steps=n_steps, t_end=t_end, a=5e-3)
    return state, state.t

  _, ts = jax.lax.scan(body, L.taid_init(t_start=t_start),
                       (jnp.arange(1, n_steps + 1), losses))
  ts = np.asarray(ts)
  ramp = t_start + (t_end - t_start) * np.arange(1, n_steps + 1) / n_steps
  assert ts[0] == np.float32(t_start)  # first call stores J only
  assert np.all(np.diff(ts) >= 0)
  assert np.all(ts <= t_end + 1e-7)
  assert np.all(ts[1:] >= ramp[1:] - 1e-6)
  assert np.any(ts[1:] > ramp[1:] + 1e-3)  # the adaptive branch actually moves ahead

  def body_lin(state, x):
    n, loss = x
    state = L.taid_update(state, loss, step=n, total_steps=n_steps, t_end=t_end,
                          disable_adaptive=True)
    return state, state.t

  _, ts_lin = jax.lax.scan(body_lin, L.taid_init(t_start=t_start),
                           (jnp.arange(1, n_steps + 1), losses))
  np.testing.assert_allclose(ts_lin, ramp, atol=1e-6)


def test_update_matches_hand_computation():
  s = L.taid_init(t_start=0.4)
  s = L.taid_update(s, jnp.asarray(2.0), step=1, total_steps=10)
  assert float(s.t) == pytest.approx(0.4) and float(s.momentum) == 0.0
  s = L.taid_update(s, jnp.asarray(1.0), step=2, total_steps=10, a=0.5, beta=0.9)
  m = 0.1 * 0.5
  t_adapt = 0.4 + 0.5 / (1 + np.exp(-m)) * 0.6
  assert float(s.momentum) == pytest.approx(m, rel=1e-6)
  assert float(s.t) == pytest.approx(max(0.4 + 0.6 * 0.2, t_adapt), rel=1e-6)


def test_masks_extremes():
  zs = jnp.array([[1e4, -1e4, 0.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0], [-jnp.inf] * 4])
  zt = jnp.array([[-1e4, 1e4, 3.0, -jnp.inf], [3.0, 2.0, 1.0, 0.0], [-jnp.inf] * 4])
  for t in (0.0, 0.5, 1.0):
    val, g = _vg(
        lambda s: L.taid_loss(s, zt, interpolation=t, where=jnp.array([True, False, True])).sum())(zs)
    assert np.isfinite(val) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[1:] == 0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="t_start"):
    L.taid_init(t_start=1.0)
  with pytest.raises(ValueError, match="t_end"):
    L.taid_update(L.taid_init(), jnp.asarray(1.0), step=1, total_steps=10, t_end=0.0)
  with pytest.raises(ValueError, match="total_steps"):
    L.taid_update(L.taid_init(), jnp.asarray(1.0), step=1, total_steps=0)
  with pytest.raises(TypeError, match="state"):
    L.taid_update((0.4,), jnp.asarray(1.0), step=1, total_steps=10)
  with pytest.raises(ValueError, match="`interpolation`"):
    L.taid_loss(np.zeros((1, 2)), np.zeros((1, 2)), interpolation=1.5)


def test_nan_loss_leaves_state_unchanged():
  # N2: one NaN loss made t NaN forever, and (through N1) the TAID loss 0.
  st = L.taid_init()
  for n, j in enumerate([1.0, jnp.nan, 0.5], 1):
    before = st
    st = L.taid_update(st, jnp.array(j), step=n, total_steps=10)
    if n == 2:
      for a, b in zip(st, before):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.isfinite(float(st.t)) and float(st.t) > 0.4
  upd = jax.jit(lambda s, l: L.taid_update(s, l, step=4, total_steps=10))
  st2 = upd(st, jnp.asarray(jnp.inf))
  for a, b in zip(st2, st):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loss = jax.jit(lambda a, tt: L.taid_loss(a, jnp.array([[3., 1., 2.]]),
                                           interpolation=tt).sum())
  assert float(loss(jnp.array([[1., 2., 3.]]), st.t)) > 0.1


def test_nan_teacher_propagates():
  zs = jnp.array([[1., 2., 3.]])
  zt = jnp.array([[jnp.nan, 1., 2.]])
  for f in (L.taid_loss, jax.jit(L.taid_loss)):
    assert np.isnan(np.asarray(f(zs, zt, interpolation=0.5))).all()
  assert np.isnan(np.asarray(L.taid_target_logits(zs, zt, interpolation=0.5))[0, 0])


def test_array_hyper_parameters_checked_elementwise():
  z = np.zeros((2, 3))
  with pytest.raises(ValueError, match="interpolation"):
    L.taid_loss(z, z, interpolation=np.array([0.5, 1.5]))
  with pytest.raises(ValueError, match="interpolation"):
    L.taid_loss(z, z, interpolation=np.array([0.5, 0.5, 0.5]))  # not the batch shape
  with pytest.raises(ValueError, match="t_start"):
    L.taid_init(t_start=np.array(-0.1))
  with pytest.raises(ValueError, match="t_start"):
    L.taid_init(t_start=np.array([0.2, 0.3]))
  with pytest.raises(ValueError, match="t_end"):
    L.taid_update(L.taid_init(), jnp.asarray(1.0), step=1, total_steps=10,
                  t_end=np.array([0.5, 2.0]))
  with pytest.raises(TypeError, match="interpolation"):
    L.taid_loss(z, z, interpolation=True)


def test_per_position_interpolation_equals_vmap():
  rng = np.random.default_rng(3)
  zs, zt = rng.normal(size=(2, 4, 5)).astype(np.float32)
  t = jnp.array([0.0, 0.3, 0.7, 1.0])
  got = jax.jit(lambda a, b, c: L.taid_loss(a, b, interpolation=c))(zs, zt, t)
  ref = jax.vmap(lambda a, b, c: L.taid_loss(a, b, interpolation=c))(zs, zt, t)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  # class axis first: a [B] t on axis=0 logits
  got0 = L.taid_loss(zs.T, zt.T, interpolation=t, axis=0)
  np.testing.assert_allclose(got0, ref, rtol=1e-5, atol=1e-6)
