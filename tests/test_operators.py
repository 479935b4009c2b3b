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


# ----------------------------------------------------------------------------- softening / meta


def test_soften_families_and_errors(x64):
  lp = jnp.log(jnp.array([0.7, 0.2, 0.1, 0.0]))
  p = np.array([0.7, 0.2, 0.1, 0.0])
  ref = p ** 0.5 / np.sum(p ** 0.5)
  np.testing.assert_allclose(np.exp(ops.soften(lp, temperature=2.0)), ref, atol=1e-15)
  np.testing.assert_allclose(np.exp(ops.soften(lp, temperature=2.0, kind="mixing")),
                             p / 2 + 0.125, atol=1e-15)
  with pytest.raises(ValueError, match="temperature"):
    ops.soften(lp, temperature=0.5, kind="mixing")
  with pytest.raises(ValueError, match="temperature"):
    ops.soften(lp, temperature=-1.0)
  with pytest.raises(ValueError, match="kind"):
    ops.soften(lp, temperature=2.0, kind="cubic")


def test_meta_teacher_closed_forms_and_errors(x64):
  p0, q = _dirichlet(6, (5,), 4), _dirichlet(7, (5,), 4)
  a = 0.3
  ar = ops.meta_teacher(jnp.log(p0), jnp.log(q), alpha=a)
  np.testing.assert_allclose(np.exp(ar), a * p0 + (1 - a) * q, atol=1e-15)
  geo = ops.meta_teacher(jnp.log(p0), jnp.log(q), alpha=a, kind="geometric")
  un = p0 ** a * q ** (1 - a)
  np.testing.assert_allclose(np.exp(geo), un / un.sum(-1, keepdims=True), atol=1e-15)
  per_ex = ops.meta_teacher(jnp.log(p0), jnp.log(q), alpha=np.linspace(0, 1, 5))
  np.testing.assert_allclose(np.exp(per_ex[0]), q[0], atol=1e-15)
  np.testing.assert_allclose(np.exp(per_ex[-1]), p0[-1], atol=1e-15)
  with pytest.raises(ValueError, match="alpha"):
    ops.meta_teacher(jnp.log(p0), jnp.log(q), alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    ops.meta_teacher(jnp.log(p0), jnp.log(q), alpha=0.5, kind="softened_mixture")
  with pytest.raises(ValueError, match="same shape"):
    ops.meta_teacher(jnp.log(p0), jnp.log(q[:, :3]), alpha=0.5)


# ----------------------------------------------------------------------------- recursion


def test_recurse_closed_form_schedule_and_errors(x64):
  p0, q0 = _dirichlet(8, (), 5), _dirichlet(9, (), 5)
  traj = ops.recurse(jnp.log(p0), jnp.log(q0), alpha=0.25, steps=12)
  t = np.arange(13)[:, None]
  np.testing.assert_allclose(np.exp(traj), p0 + 0.75 ** t * (q0 - p0), atol=1e-14)
  sched = np.linspace(0.1, 0.9, 6)
  traj = ops.recurse(jnp.log(p0), jnp.log(q0), alpha=sched)
  expected = q0
  for a in sched:
    expected = a * p0 + (1 - a) * expected
  np.testing.assert_allclose(np.exp(traj[-1]), expected, atol=1e-14)
  traj_fn = ops.recurse(jnp.log(p0), jnp.log(q0), alpha=lambda t: 0.1 + 0.8 * t / 5, steps=6)
  np.testing.assert_allclose(traj_fn, traj, atol=1e-14)
  with pytest.raises(ValueError, match="steps"):
    ops.recurse(jnp.log(p0), jnp.log(q0), alpha=0.3)
  with pytest.raises(TypeError, match="project"):
    ops.recurse(jnp.log(p0), jnp.log(q0), alpha=0.3, steps=2, project=3)


def test_softmax_linear_projection_is_exact_for_geometric_anchoring(x64):
  rng = np.random.default_rng(10)
  n, d, k = 20, 3, 4
  phi = np.concatenate([rng.normal(size=(n, d - 1)), np.ones((n, 1))], 1)

  def member(w):
    return jax.nn.log_softmax(np.concatenate([phi @ w, np.zeros((n, 1))], 1))

  lp0, lq0 = member(rng.normal(size=(d, k - 1))), member(rng.normal(size=(d, k - 1)))
  proj = ops.softmax_linear_family(phi)
  geo = ops.recurse(lp0, lq0, alpha=0.3, steps=5, kind="geometric", project=proj)
  np.testing.assert_allclose(geo, ops.recurse(lp0, lq0, alpha=0.3, steps=5, kind="geometric"),
                             atol=1e-7)
  # arithmetic targets leave the (log-convex) family; the projected recursion still descends
  ar = ops.recurse(lp0, lq0, alpha=0.3, steps=8, project=proj)
  kl = np.asarray(jax.vmap(lambda lq: jnp.mean(ops_kl(lp0, lq)))(ar))
  assert np.all(np.diff(kl) <= 1e-12)


def ops_kl(lp, lq):
  from kdjax import divergences
  return divergences.kl_from_log(log_p=lp, log_q=lq)


def test_fixed_point_implicit_gradient_matches_closed_form(x64):
  # x = a * b + (1 - a) * c * x  =>  x* = a b / (1 - (1 - a) c)
  b, c = 2.0, 0.5
  f = lambda x, a: a * b + (1 - a) * c * x  # noqa: E731
  g = jax.grad(lambda a: ops.fixed_point(f, jnp.asarray(0.0), a, iters=200))(0.3)
  exact = jax.grad(lambda a: a * b / (1 - (1 - a) * c))(0.3)
  np.testing.assert_allclose(g, exact, rtol=1e-10)


# ----------------------------------------------------------------------------- axiom checkers


def test_axiom_checkers_pass_valid_and_flag_bad_operators(x64):
  good = ops.check_meta_axioms(ops.make_operator("geometric"), num_draws=200, num_classes=(4,))
  assert not {"M1", "M2", "M3", "M4", "M5"} & set(good.failed(1e-12))
  assert "M6" in good.failed()  # geometric anchoring is not a pairwise contraction (F5)
  assert "M7" not in good.failed(1e-12)

  def bad(lp0, lq, alpha):  # ignores the anchor and sharpens the student
    return jax.nn.log_softmax(3.0 * lq)

  rep = ops.check_meta_axioms(bad, num_draws=200, num_classes=(4,))
  assert {"M2", "M4"} <= set(rep.failed())
  assert "q" in rep.witnesses["M4"]
  assert "M4" in str(rep)
  const = ops.check_meta_axioms(lambda lp0, lq, a: lp0, num_draws=50, num_classes=(3,))
  assert const.violations["M5"] > 0.9

  rev = ops.check_softening_axioms(lambda lp, t: jax.nn.log_softmax(-lp / t), num_draws=100,
                                   num_classes=(4,))
  assert {"S1", "S4"} <= set(rev.failed())
  agg = ops.check_aggregation_axioms(lambda lps, w: ops.aggregate(lps, weights=w[::-1]),
                                     num_draws=100, num_classes=(4,))
  assert "G3" in agg.failed()  # weights applied to the wrong teachers
  ok = ops.check_aggregation_axioms(lambda lps, w: ops.aggregate(lps, weights=w),
                                    num_draws=100, num_classes=(4,))
  assert not {"G1", "G2", "G3"} & set(ok.failed(1e-12))


# ----------------------------------------------------------------------------- regressions (defects file)

_LPS = jnp.log(jnp.array([[.7, .2, .1], [.1, .1, .8]]))


def test_power_pool_continuous_as_beta_to_zero():  # N12
  geo = np.asarray(ops.aggregate(_LPS, kind="geometric"))
  with jax.enable_x64(True):
    ref = lambda b: np.asarray(ops.aggregate(jnp.asarray(np.log([[.7, .2, .1], [.1, .1, .8]])),
                                             kind="power", power=b))
    for b in (1e-8, 1e-6, 1e-4):
      r64 = ref(b)
      for fn in (lambda b: ops.aggregate(_LPS, kind="power", power=b),
                 jax.jit(lambda b: ops.aggregate(_LPS, kind="power", power=b))):
        got = np.asarray(fn(jnp.float32(b)))
        np.testing.assert_allclose(got, r64, atol=2e-6)
        np.testing.assert_allclose(got, geo, atol=1e-4)   # old code: 0.48 nats off at 1e-8


def test_aggregate_nan_propagates_and_named_weight_error():  # N1, N24
  bad = _LPS.at[0, 0].set(jnp.nan)
  assert np.isnan(np.asarray(ops.aggregate(bad, kind="arithmetic"))[0])  # old: NaN dropped
  assert np.isnan(np.asarray(jax.jit(lambda x: ops.aggregate(x, kind="geometric"))(bad))).all()
  with pytest.raises(ValueError, match="weights.*NaN"):
    ops.aggregate(_LPS, weights=jnp.array([jnp.nan, .6]))


def test_meta_teacher_rejects_unnormalised_and_uses_power():  # N9, A4
  with pytest.raises(ValueError, match="log_p0"):
    ops.meta_teacher(jnp.zeros(3), jnp.log(jnp.array([.2, .3, .5])), alpha=.5)
  with pytest.raises(TypeError):
    ops.meta_teacher(_LPS[0], _LPS[1], alpha=.5, kind="power", beta=.5)  # pylint: disable=unexpected-keyword-arg
  m = ops.meta_teacher(_LPS[0], _LPS[1], alpha=.5, kind="power", power=.5)
  np.testing.assert_allclose(np.exp(m).sum(), 1.0, atol=1e-6)


def test_recurse_eager_does_not_retrace_and_rejects_disjoint_geometric():  # P4, N25
  lp0, lq = _LPS[0], _LPS[1]
  ops.recurse(lp0, lq, alpha=.3, steps=20)
  from kdjax.operators import recursion  # pylint: disable=import-outside-toplevel
  n = recursion._recurse_builtin._cache_size()  # pylint: disable=protected-access
  ops.recurse(lp0, lq, alpha=.3, steps=20)
  assert recursion._recurse_builtin._cache_size() == n  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="disjoint"):
    ops.recurse(jnp.log(jnp.array([1., 0.])), jnp.log(jnp.array([0., 1.])), alpha=.5, steps=2,
                kind="geometric")


def test_fixed_point_tolerance_residual_and_gradients():  # N13, N14, N24, N25
  lp0, lq = jnp.log(jnp.array([.7, .2, .1])), jnp.log(jnp.array([.1, .1, .8]))
  f = lambda x, a: ops.meta_teacher(lp0, x, alpha=a)  # noqa: E731
  res = ops.fixed_point(f, lq, 1e-3, return_residual=True)
  assert bool(res.converged) and float(res.residual) <= 1e-6
  np.testing.assert_allclose(res.value, lp0, atol=2e-3)        # old: [-1.09 -1.97 -0.65]
  g = jax.grad(lambda a: ops.fixed_point(f, lq, a)[0])(1e-3)
  assert abs(float(g)) < 1.0                                   # old: 336.6 (float32 floor ~0.1)
  with jax.enable_x64(True):
    lp0d, lqd = jnp.log(jnp.array([.7, .2, .1])), jnp.log(jnp.array([.1, .1, .8]))
    fd = lambda x, a: ops.meta_teacher(lp0d, x, alpha=a)  # noqa: E731
    np.testing.assert_allclose(ops.fixed_point(fd, lqd, jnp.float64(1e-3)), lp0d, atol=1e-8)
    assert abs(float(jax.grad(lambda a: ops.fixed_point(fd, lqd, a)[0])(jnp.float64(1e-3)))) < 1e-5
  assert np.isnan(np.asarray(ops.fixed_point(f, lq, 1e-3, iters=10))).all()  # not converged
  gc = jax.grad(lambda c: ops.fixed_point(lambda x, p: .5 * x + c, 0., None))(1.0)
  np.testing.assert_allclose(gc, 2.0, rtol=1e-5)               # old: UnexpectedTracerError
  with pytest.raises(TypeError, match="iters"):
    ops.fixed_point(f, lq, .5, iters=2.5)
  with pytest.raises(ValueError, match="iters"):
    ops.fixed_point(f, lq, .5, iters=-1)


def test_soften_nan_propagates_and_finite_temperature_grad():  # N1, N18
  lp = jnp.log(jnp.array([.5, .5, 0.]))
  out = np.asarray(ops.soften(lp.at[0].set(jnp.nan), temperature=2.))
  assert np.isnan(out[:2]).all() and out[2] == -np.inf   # NaN reaches the row; a zero stays 0
  g = jax.grad(lambda t: ops.soften(lp, temperature=t)[0])(2.0)
  assert np.isfinite(float(g))
