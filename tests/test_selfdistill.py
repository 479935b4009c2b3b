"""Tests of kdjax.selfdistill: the factory against the plain re-fit oracle, API behaviour, errors.

The theorem-level agreement (many random instances, spec tolerances) lives in
theory/kernel_self_distillation.py; these tests cover the API surface.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import kernels
from kdjax import selfdistill as sd


def _problem(n=25, m=None, seed=0, gamma=10.0):
  rng = np.random.default_rng(seed)
  x, xt = rng.uniform(size=(n, 2)), rng.uniform(size=(13, 2))
  shape = (n,) if m is None else (n, m)
  y = np.sin(3 * x.sum(1)).reshape((n,) + (1,) * (m is not None)) + 0.3 * rng.normal(size=shape)
  return (jnp.asarray(kernels.rbf(x, x, gamma=gamma)), jnp.asarray(y),
          jnp.asarray(kernels.rbf(xt, x, gamma=gamma)))


def test_matches_explicit_refit_train_test_and_schedule(x64):
  k, y, kt = _problem()
  p = sd.self_distill_predictor(k, y, lam=0.05)
  steps = jnp.arange(1, 6)
  for alpha in (0.4, jnp.array([0.2, 0.9, -0.3, 0.5])):
    ref_te = sd.explicit_refit(k, y, lam=0.05, alpha=alpha, steps=5, k_test_train=kt)
    np.testing.assert_allclose(jax.vmap(lambda t: p(t, alpha, kt))(steps), ref_te, atol=1e-10)
  ref_tr = sd.explicit_refit(k, y, lam=0.05, alpha=0.0, steps=5)
  np.testing.assert_allclose(jax.vmap(lambda t: p.predict(t, 0.0))(steps), ref_tr, atol=1e-10)


def test_matrix_targets_equal_columnwise(x64):
  k, y, kt = _problem(m=3)
  p = sd.self_distill_predictor(k, y, lam=0.1)
  got = p.predict(4, 0.3, kt)
  assert got.shape == (13, 3)
  for j in range(3):
    pj = sd.self_distill_predictor(k, y[:, j], lam=0.1)
    np.testing.assert_allclose(got[:, j], pj.predict(4, 0.3, kt), atol=1e-12)
  # optimal alpha with matrix targets sums over all entries (both formulas agree).
  r = y + 0.1
  np.testing.assert_allclose(p.optimal_alpha(3, 0.5, r), p.optimal_alpha_eigen(3, 0.5, r),
                             rtol=1e-10)


def test_vmap_over_alpha_and_steps_and_jit(x64):
  k, y, kt = _problem()
  p = sd.self_distill_predictor(k, y, lam=0.05)
  alphas = jnp.linspace(0, 1, 5)
  grid = jax.vmap(lambda a: jax.vmap(lambda t: p.predict(t, a, kt))(jnp.arange(1, 7)))(alphas)
  assert grid.shape == (5, 6, 13)
  for i, a in enumerate(alphas):
    np.testing.assert_allclose(grid[i, 3], p.predict(4, float(a), kt), atol=1e-12)
  jitted = jax.jit(lambda pred, t, a: pred.limit(a) + pred.predict(t, a))
  np.testing.assert_allclose(jitted(p, 3, 0.2), p.limit(0.2) + p.predict(3, 0.2), atol=1e-12)


def test_limit_is_ridge_and_alpha_zero_collapses(x64):
  k, y, kt = _problem()
  p = sd.self_distill_predictor(k, y, lam=0.05)
  np.testing.assert_allclose(p.limit(0.25, kt), sd.ridge(k, y, lam=0.2, k_test_train=kt),
                             atol=1e-10)
  np.testing.assert_allclose(p.limit(0.0), 0.0)
  np.testing.assert_allclose(p.predict(jnp.inf, 1.0), p.initial_fit(), atol=1e-12)


def test_from_initial_fit_and_alpha_zero_student(x64):
  k, y, kt = _problem()
  p = sd.self_distill_predictor(k, y, lam=0.05)
  y1 = sd.ridge(k, y, lam=0.05)
  np.testing.assert_allclose(p.from_initial_fit(5, 0.3, y1), p.predict(5, 0.3), atol=1e-10)
  np.testing.assert_allclose(p.from_initial_fit(5, 0.3), p.predict(5, 0.3), atol=1e-10)
  np.testing.assert_allclose(p.from_initial_fit(5, 0.3, None, kt), p.predict(5, 0.3, kt),
                             atol=1e-10)
  # Pure self-distillation: B^(t) = A^t.
  np.testing.assert_allclose(p.alpha_zero_student(4, 0.0), p.predict(4, 0.0), atol=1e-12)
  np.testing.assert_allclose(p.coefficients(4, 0.0), p.a ** 4, rtol=1e-12)
  with pytest.raises(ValueError, match="y1"):
    p.from_initial_fit(2, 0.3, y1, kt)


def test_optimal_alpha_properties(x64):
  k, y, kt = _problem()
  p = sd.self_distill_predictor(k, y, lam=0.01)
  r = jnp.sin(jnp.linspace(0, 3, 13))
  a_star = p.optimal_alpha(3, 0.5, r, k_eval_train=kt)
  risk = lambda a: jnp.mean((p.predict(3, jnp.array([0.5, a]), kt) - r) ** 2)
  assert float(jax.grad(risk)(a_star)) == pytest.approx(0.0, abs=1e-10)
  assert float(p.optimal_alpha(3, 0.5, r, k_eval_train=kt, clip=(0, 1))) == pytest.approx(
      min(max(float(a_star), 0), 1))
  # Training labels as the reference: never below 1 (the caveat).
  assert float(p.optimal_alpha(3, 0.5, y)) >= 1 - 1e-9
  # Greedy schedule == sequence of single optimal steps.
  sched = p.greedy_alpha_schedule(4, r, k_eval_train=kt)
  assert float(sched[0]) == pytest.approx(float(p.optimal_alpha(2, 0.0, r, k_eval_train=kt)))
  assert float(sched[2]) == pytest.approx(
      float(p.optimal_alpha(4, sched[:2], r, k_eval_train=kt)), abs=1e-12)


def test_module_optimal_alpha_mask_degenerate_and_errors():
  y1, y0 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 1.0, 5.0])
  r = 0.3 * y1 + 0.7 * y0
  assert float(sd.optimal_alpha(y1, y0, r)) == pytest.approx(0.3, abs=1e-6)
  r_bad = r.at[2].set(100.0)
  assert float(sd.optimal_alpha(y1, y0, r_bad, where=jnp.array([1, 1, 0], bool))) == \
      pytest.approx(0.3, abs=1e-6)
  assert float(sd.optimal_alpha(y1, y1, r)) == 1.0   # every alpha optimal -> no distillation
  with pytest.raises(ValueError, match="same shape"):
    sd.optimal_alpha(y1, y0[:2], r)
  with pytest.raises(TypeError, match="clip"):
    sd.optimal_alpha(y1, y0, r, clip=0.5)
  with pytest.raises(ValueError, match="clip"):
    sd.optimal_alpha(y1, y0, r, clip=(1, 0))


def test_softmax_mse_loss_is_mixed_target_mse_plus_constant(x64):
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(6, 5)))
  pt = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 5))))
  y = jax.nn.one_hot(jnp.arange(6) % 5, 5)
  losses = [sd.softmax_mse_self_distill(z, pt, y, alpha=a) for a in (0.0, 0.3, 1.0)]
  assert losses[0].shape == (6,)
  np.testing.assert_allclose(losses[1], 0.3 * losses[2] + 0.7 * losses[0], atol=1e-12)
  # Gradients w.r.t. the student equal those of the MSE to the mixed target.
  mixed = sd.mixed_targets(y, pt, 0.3)
  g1 = jax.grad(lambda z: sd.softmax_mse_self_distill(z, pt, y, alpha=0.3).sum())(z)
  g2 = jax.grad(lambda z: jnp.mean((jax.nn.softmax(z) - mixed) ** 2, -1).sum())(z)
  np.testing.assert_allclose(g1, g2, atol=1e-12)


def test_float32_default_and_ill_conditioned_gram():
  k, y, kt = _problem(n=80, gamma=0.5)           # cond(K) far beyond 1e8
  p = sd.self_distill_predictor(k, y, lam=1e-3)
  assert p.eigenvalues.dtype == jnp.float32
  out = p.predict(10, 0.3, kt)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  with jax.enable_x64(True):
    k64, y64, kt64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (k, y, kt))
    ref = sd.explicit_refit(k64, y64, lam=1e-3, alpha=0.3, steps=10, k_test_train=kt64)[-1]
    assert np.linalg.cond(np.asarray(k64)) > 1e8
    p64 = sd.self_distill_predictor(k64, y64, lam=1e-3)
    np.testing.assert_allclose(p64.predict(10, 0.3, kt64), ref, atol=1e-8)
  np.testing.assert_allclose(out, np.asarray(ref), atol=5e-3)


def test_gradient_wrt_alpha_and_lam(x64):
  k, y, _ = _problem()
  f = lambda a, lam: jnp.sum(sd.b_coefficients(jnp.linalg.eigvalsh(k), lam, a, 6))
  g = jax.grad(f, argnums=(0, 1))(0.3, 0.1)
  eps = 1e-6
  np.testing.assert_allclose(g[0], (f(0.3 + eps, 0.1) - f(0.3 - eps, 0.1)) / (2 * eps), rtol=1e-5)
  np.testing.assert_allclose(g[1], (f(0.3, 0.1 + eps) - f(0.3, 0.1 - eps)) / (2 * eps), rtol=1e-5)
  assert np.isfinite(jax.grad(lambda a: f(a, 0.1))(0.0))


def test_bad_input_errors():
  k, y, kt = _problem()
  with pytest.raises(ValueError, match="lam"):
    sd.self_distill_predictor(k, y, lam=0.0)
  with pytest.raises(ValueError, match="k_train_train"):
    sd.self_distill_predictor(k[:, :5], y, lam=0.1)
  with pytest.raises(ValueError, match="y_train"):
    sd.self_distill_predictor(k, y[:5], lam=0.1)
  with pytest.raises(TypeError, match="dtype"):
    sd.self_distill_predictor(k, y, lam=0.1, dtype=jnp.int32)
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="enable_x64"):
      sd.self_distill_predictor(k, y, lam=0.1, dtype=jnp.float64)
  p = sd.self_distill_predictor(k, y, lam=0.1)
  with pytest.raises(ValueError, match="`t`"):
    p.predict(0, 0.5)
  with pytest.raises(ValueError, match="`t`"):
    p.predict(2.5, 0.5)
  with pytest.raises(ValueError, match="schedule"):
    p.predict(5, jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="finite"):
    p.predict(jnp.inf, jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="k_test_train"):
    p.predict(2, 0.5, kt[:, :3])
  with pytest.raises(ValueError, match="alpha"):
    p.predict(2, jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="reference"):
    p.optimal_alpha(2, 0.5, y[:3])
  with pytest.raises(ValueError, match="steps"):
    p.greedy_alpha_schedule(1, y)
  with pytest.raises(ValueError, match="steps"):
    sd.explicit_refit(k, y, lam=0.1, alpha=0.5, steps=0)
  with pytest.raises(ValueError, match="`t`"):
    sd.b_recursion(np.ones(3), 0.1, 0.5, 0)


# ----------------------------------------------------------------------------- regressions

_JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _toy_predictor(dtype=None):
  d = sd.toy_data()
  k = kernels.rbf(d["x"], d["x"], gamma=sd.TOY_GAMMA)
  kt = kernels.rbf(d["grid"], d["x"], gamma=sd.TOY_GAMMA)
  return sd.self_distill_predictor(k, d["y"], lam=sd.TOY_LAM, dtype=dtype), kt


@_JIT
def test_t_inf_equals_limit(jit):
  """N16: c_coefficients(t=inf) gave 1 (n = 0), so from_initial_fit(inf) missed the limit by 0.3."""
  p, kt = _toy_predictor()
  d, lam, al = p.eigenvalues, p.lam, 0.25
  c = (jax.jit(sd.c_coefficients) if jit else sd.c_coefficients)(d, lam, al, jnp.inf)
  np.testing.assert_allclose(c, sd.c_coefficients(d, lam, al, 10**6), rtol=1e-5)
  np.testing.assert_allclose(c, al * (d + lam) / (al * d + lam), rtol=1e-6)
  fit = jax.jit(lambda q, t: q.from_initial_fit(t, al)) if jit else (
      lambda q, t: q.from_initial_fit(t, al))
  np.testing.assert_allclose(fit(p, jnp.inf), p.limit(al), atol=1e-5)
  np.testing.assert_allclose(p.from_initial_fit(jnp.inf, al, k_test_train=kt), p.limit(al, kt),
                             atol=1e-5)


@_JIT
@pytest.mark.parametrize("t", [1, 2, 3, jnp.inf])
def test_alpha_derivative_finite_at_one(t, jit):
  """N18: power(0, 0) inside a where gave NaN d/dalpha at alpha = 1 (limit, predict(1, .))."""
  p, kt = _toy_predictor()
  for f in (lambda a: p.predict(t, a).sum(), lambda a: p.predict(t, a, kt).sum(),
            lambda a: p.from_initial_fit(t, a).sum(), lambda a: p.alpha_zero_student(t, a).sum(),
            lambda a: sd.b_coefficients(p.eigenvalues, p.lam, a, t).sum(),
            lambda a: sd.c_coefficients(p.eigenvalues, p.lam, a, t).sum()):
    g = (jax.jit(jax.grad(f)) if jit else jax.grad(f))(1.0)
    assert np.isfinite(float(g))


def test_alpha_derivative_at_one_matches_finite_difference(x64):
  p, _ = _toy_predictor(jnp.float64)
  d, lam = np.asarray(p.eigenvalues), float(p.lam)
  for t in (1, 2, 3, 7, jnp.inf):
    f = lambda a: jnp.sum(sd.b_coefficients(p.eigenvalues, p.lam, a, t))  # noqa: E731
    fd = (f(1.0) - f(1.0 - 1e-6)) / 1e-6        # one-sided: the formula holds for any alpha
    np.testing.assert_allclose(float(jax.grad(f)(1.0)), float(fd), rtol=1e-4, atol=1e-9)
  # At alpha = 1 every step t >= 2 is ridge: d b/d alpha = a (1 - a) = d lam / (d + lam)^2.
  g = jax.grad(lambda a: jnp.sum(p.limit(a)))(1.0)
  assert np.isfinite(float(g))
  np.testing.assert_allclose(jax.jacobian(lambda a: sd.b_limit(p.eigenvalues, p.lam, a))(1.0),
                             d * lam / (d + lam) ** 2, rtol=1e-10)


def test_bfloat16_in_float32_out():
  """N7: the closed forms returned bfloat16 (or float16) for low-precision input."""
  d = jnp.array([3.0, 1.0, 0.5, 0.0], jnp.bfloat16)
  y = jnp.array([0.5, 1.0, -1.0], jnp.bfloat16)
  outs = [sd.a_coefficients(d, 0.2), sd.b_coefficients(d, 0.2, 0.25, 3),
          sd.b_coefficients(d, 0.2, jnp.array([0.3, 0.5]), 3), sd.b_limit(d, 0.2, 0.25),
          sd.c_coefficients(d, 0.2, 0.25, 3), sd.c_coefficients(d, 0.2, 0.25, jnp.inf),
          sd.sparsification_ratios(d + 1), sd.optimal_alpha(y, y * 0.5, y),
          sd.mixed_targets(y, y * 0.5, 0.3)]
  assert all(o.dtype == jnp.float32 for o in outs), [o.dtype for o in outs]
  np.testing.assert_allclose(outs[1], sd.b_coefficients(d.astype(jnp.float32), 0.2, 0.25, 3))


@_JIT
def test_nan_propagates(jit):
  """optimal_alpha read a NaN denominator as 'degenerate' and returned 1."""
  y1, y0 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 1.0, 5.0])
  f = jax.jit(sd.optimal_alpha) if jit else sd.optimal_alpha
  assert np.isnan(float(f(y1.at[0].set(jnp.nan), y0, y1)))
  assert np.isnan(float(f(y1, y0, y1.at[1].set(jnp.nan))))
  # A masked NaN is dropped.
  assert np.isfinite(float(sd.optimal_alpha(y1.at[0].set(jnp.nan), y0, y1,
                                            where=jnp.array([False, True, True]))))
  d = jnp.array([3.0, jnp.nan, 0.5])
  for out in (sd.a_coefficients(d, 0.2), sd.b_coefficients(d, 0.2, 0.3, 4),
              sd.b_limit(d, 0.2, 0.3), sd.c_coefficients(d, 0.2, 0.3, jnp.inf)):
    assert np.isnan(np.asarray(out)[1]) and np.isfinite(np.asarray(out)[[0, 2]]).all()
  r = np.asarray(sd.sparsification_ratios(jnp.array([0.5, jnp.nan, 0.2])))
  assert np.isnan(r).all()


def test_sparsification_ratios_zero_coefficients():
  r = np.asarray(sd.sparsification_ratios(jnp.array([0.5, 0.25, 0.0, 0.0])))
  np.testing.assert_array_equal(r, [2.0, np.inf, 1.0])
  g = jax.grad(lambda b: jnp.sum(jnp.where(jnp.isfinite(sd.sparsification_ratios(b)),
                                           sd.sparsification_ratios(b), 0.0)))(
      jnp.array([0.5, 0.25, 0.0, 0.0]))
  assert np.isfinite(np.asarray(g)).all()


def test_hyper_parameters_checked_elementwise_and_typed():
  """N3/N24: array hyper-parameters are checked elementwise; bool/str rejected, numpy ints ok."""
  d = jnp.array([3.0, 1.0, 0.5])
  with pytest.raises(ValueError, match="lam"):
    sd.a_coefficients(d, jnp.array([0.2, -0.1, 0.2]))
  with pytest.raises(ValueError, match="alpha"):
    sd.b_coefficients(d, 0.2, jnp.array([0.3, jnp.nan]), 3)
  with pytest.raises(ValueError, match="alpha"):
    sd.b_limit(d, 0.2, float("inf"))
  for bad in (True, "0.5"):
    with pytest.raises(TypeError, match="alpha"):
      sd.b_coefficients(d, 0.2, bad, 3)
    with pytest.raises(TypeError, match="alpha"):
      sd.mixed_targets(d, d, bad)
  with pytest.raises(TypeError, match="`t`"):
    sd.b_coefficients(d, 0.2, 0.3, True)
  with pytest.raises(ValueError, match="`t`"):
    sd.c_coefficients(d, 0.2, 0.3, jnp.array([1.0, 2.5]))
  with pytest.raises(ValueError, match="alpha"):
    sd.mixed_targets(d, d, jnp.ones(2))
  with pytest.raises(TypeError, match="where"):
    sd.optimal_alpha(d, d * 0.5, d, where=jnp.ones(3))
  # numpy integers are integers.
  np.testing.assert_allclose(sd.b_coefficients(d, 0.2, 0.3, np.int64(3)),
                             sd.b_coefficients(d, 0.2, 0.3, 3))
  assert sd.explicit_refit(jnp.eye(3), d, lam=0.1, alpha=0.5, steps=np.int32(2)).shape == (2, 3)
  np.testing.assert_allclose(sd.b_recursion(d, 0.2, 0.3, np.int64(3)),
                             sd.b_coefficients(d, 0.2, 0.3, 3), rtol=1e-6)
  # alpha outside [0, 1] is allowed at finite steps (Algorithm 1 is unconstrained).
  assert np.isfinite(np.asarray(sd.b_coefficients(d, 0.2, 1.5, 3))).all()
  np.testing.assert_allclose(sd.mixed_targets(d, 2 * d, 1.5), 1.5 * d - 0.5 * 2 * d, rtol=1e-6)


def test_singular_gram_float32_is_finite_not_accurate():
  """N17: the docstring's numbers (triplicated toy inputs, rank 11 of 33, t = 3, alpha = .25)."""
  toy = sd.toy_data()
  rng = np.random.default_rng(0)
  x = np.concatenate([toy["x"]] * 3)
  y = np.sin(2 * np.pi * x) + 0.3 * rng.normal(size=33)
  k32 = kernels.rbf(x, x, gamma=80.0)
  kt32 = kernels.rbf(toy["grid"], x, gamma=80.0)
  with jax.enable_x64(True):
    k64 = np.exp(-80.0 * (x[:, None] - x[None]) ** 2)
    kt64 = np.exp(-80.0 * (toy["grid"][:, None] - x[None]) ** 2)
    assert np.linalg.matrix_rank(k64) == 11
    dev = {}
    for lam in (1e-4, 1e-7):
      f64 = np.asarray(sd.self_distill_predictor(jnp.asarray(k64), jnp.asarray(y), lam=lam,
                                                 dtype=jnp.float64).predict(3, .25,
                                                                            jnp.asarray(kt64)))
      with jax.enable_x64(False):
        f32 = np.asarray(sd.self_distill_predictor(k32, y, lam=lam).predict(3, .25, kt32))
      assert np.isfinite(f32).all()
      dev[lam] = np.abs(f32 - f64).max() / np.abs(f64).max()
  assert dev[1e-4] < 1e-3          # lam above 1e-5 |K|: accurate
  assert dev[1e-7] > 0.05          # lam far below it: finite but wrong in float32


def test_public_apply_of_coefficients():
  """A5: experiments called the private `_apply`; `apply` is the public way to use custom
  eigen-coefficients."""
  p, kt = _toy_predictor()
  np.testing.assert_allclose(p.apply(p.coefficients(3, 0.25)), p.predict(3, 0.25), atol=1e-6)
  np.testing.assert_allclose(p.apply(p.dual_coefficients(3, 0.25), kt), p.predict(3, 0.25, kt),
                             atol=1e-6)
  with pytest.raises(ValueError, match="coef"):
    p.apply(jnp.ones(3))
