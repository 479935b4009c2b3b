"""Checks of PACED (arXiv:2603.11178): Beta weights, pass-rate estimator, the SNR model
(Propositions A/B), minimax robustness (Theorem 6'), loss plumbing, AKL and the two-stage schedule.

Write-up: paced.md. The CPU experiment is report-only (experiments/configs/paced_*.py),
not a check. Every check runs
in float64 (the runner wraps it in jax.enable_x64) unless it pins float32 plumbing explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as D
from kdjax import pacing as P
from kdjax import reductions as R
from theory.registry import Result, register

_DOC = "paced.md"


def _adaptive_kl():
  """The one AKL implementation (loss zoo): kdjax.losses.adaptive_kl and its weights."""
  from kdjax.losses import adaptive_kl, adaptive_kl_weights  # pylint: disable=import-outside-toplevel
  return adaptive_kl, adaptive_kl_weights


# ----------------------------------------------------------------------------- 1. weight


@register("paced.weight_boundary", source="[paper] arXiv:2603.11178 w(p)=p^a(1-p)^b",
          statement="w(0)=w(1)=0 exactly and w>=0 on a 1e5 grid, for 6 (alpha, beta) pairs",
          doc=f"{_DOC}#weight")
def _weight_boundary():
  grid = jnp.linspace(0.0, 1.0, 100_001)
  worst = 0.0
  for a, b in [(1, 1), (1, 3), (2, 0.5), (0.3, 0.3), (5, 5), (1e-3, 2)]:
    w = np.asarray(P.beta_weight(grid, alpha=a, beta=b))
    worst = max(worst, abs(w[0]), abs(w[-1]), max(0.0, -w.min()))
  return Result(measured=worst, tolerance=0.0)


@register("paced.weight_argmax", source="[proposed] elementary (paced.md §3)",
          statement="argmax of w on a 1e5-point grid is within 1e-5 of alpha/(alpha+beta), "
                    "and max w = a^a b^b/(a+b)^(a+b)", doc=f"{_DOC}#weight")
def _weight_argmax():
  grid = np.linspace(0.0, 1.0, 100_001)
  worst = 0.0
  for a, b in [(1, 1), (1, 3), (2, 0.5)]:
    w = np.asarray(P.beta_weight(jnp.asarray(grid), alpha=a, beta=b))
    p_star, w_star = P.beta_weight_mode(a, b)
    worst = max(worst, abs(grid[w.argmax()] - p_star), abs(w.max() - w_star) / w_star)
  return Result(measured=worst, tolerance=1e-5)


@register("paced.weight_half", source="[paper] arXiv:2603.11178 v3 default alpha=beta=1",
          statement="w(1/2) = 1/4 at alpha = beta = 1", doc=f"{_DOC}#weight")
def _weight_half():
  return Result(measured=abs(float(P.beta_weight(jnp.asarray(0.5))) - 0.25), tolerance=1e-15)


# ----------------------------------------------------------------------------- 2. normalisation


@register("paced.normalize_mean_one", source="[proposed] mean-one normalisation (paced.md §3)",
          statement="normalised weights have batch mean 1 +- 1e-6 (float32, B=64, 200 batches)",
          doc=f"{_DOC}#normalisation")
def _normalize_mean_one():
  rng = np.random.default_rng(0)
  k = 8
  c = rng.binomial(k, rng.uniform(size=(200, 64)))
  p = jnp.asarray(c / k, jnp.float32)
  w = jax.jit(jax.vmap(P.paced_weights))(p)
  assert w.dtype == jnp.float32
  means = np.asarray(w, np.float64).mean(axis=1)
  # Batches whose weights are all zero are the all-zero case (next check), not mean one.
  nonzero = np.asarray(P.beta_weight(p)).sum(axis=1) > 0
  return Result(measured=float(np.abs(means[nonzero] - 1).max()), tolerance=1e-6,
                detail=f"{nonzero.sum()} non-degenerate batches")


@register("paced.normalize_all_zero", source="[proposed] paced.md §1 (all-zero batch skipped)",
          statement="a batch with all p in {0,1} gives loss 0 and finite zero gradients",
          doc=f"{_DOC}#normalisation")
def _normalize_all_zero():
  rng = np.random.default_rng(1)
  zs = jnp.asarray(rng.normal(size=(16, 5, 7)), jnp.float32)
  zt = jnp.asarray(rng.normal(size=(16, 5, 7)), jnp.float32)
  p = jnp.asarray(rng.integers(0, 2, size=16), jnp.float32)

  def loss(z):
    return P.paced_loss(D.forward_kl(z, zt), p)

  val, g = jax.jit(jax.value_and_grad(loss))(zs)
  g = np.asarray(g)
  bad = 0.0 if np.all(np.isfinite(g)) else np.inf
  return Result(measured=max(abs(float(val)), float(np.abs(g).max()), bad), tolerance=0.0)


@register("paced.normalize_stop_gradient", source="[paper] arXiv:2603.11178 sg(w) in the loss",
          statement="jax.grad through the normalised weights w~(p) is exactly zero",
          doc=f"{_DOC}#normalisation")
def _normalize_stop_gradient():
  rng = np.random.default_rng(2)
  p = jnp.asarray(rng.uniform(0.01, 0.99, size=32))
  losses = jnp.asarray(rng.uniform(size=32))
  g1 = jax.grad(lambda q: jnp.sum(P.paced_weights(q)))(p)
  g2 = jax.grad(lambda q: P.weighted_sum_and_count(losses, P.beta_weight(q)).sum)(p)
  return Result(measured=float(max(np.abs(g1).max(), np.abs(g2).max())), tolerance=0.0)


# ----------------------------------------------------------------------------- 3. estimator

_PS = (0.05, 0.3, 0.5, 0.9)
_K = 8
_DRAWS = 100_000


def _estimator_draws():
  rng = np.random.default_rng(3)
  out = []
  for p in _PS:
    rewards = (rng.uniform(size=(_DRAWS, _K)) < p).astype(np.float64)
    out.append(np.asarray(P.pass_rate(jnp.asarray(rewards))))
  return out


@register("paced.estimator_mean", source="[proposed] elementary (paced.md §2)",
          statement="E p_hat = p: sample mean within 5 sigma (K=8, 1e5 draws, 4 values of p)",
          doc=f"{_DOC}#estimator")
def _estimator_mean():
  z = max(abs(ph.mean() - p) / np.sqrt(p * (1 - p) / _K / _DRAWS)
          for p, ph in zip(_PS, _estimator_draws()))
  return Result(measured=float(z), tolerance=5.0, detail="max |z-score|")


@register("paced.estimator_variance", source="[proposed] elementary (paced.md §2)",
          statement="Var p_hat within 3% of p(1-p)/K (K=8, 1e5 draws)", doc=f"{_DOC}#estimator")
def _estimator_variance():
  rel = max(abs(ph.var(ddof=1) / (p * (1 - p) / _K) - 1) for p, ph in zip(_PS, _estimator_draws()))
  return Result(measured=float(rel), tolerance=0.03)


@register("paced.estimator_plugin_weight", source="[proposed] elementary (paced.md §2)",
          statement="E[p_hat(1-p_hat)] within 3% of p(1-p)(1-1/K)", doc=f"{_DOC}#estimator")
def _estimator_plugin_weight():
  rel = max(abs(np.mean(np.asarray(P.beta_weight(jnp.asarray(ph)))) /
                (p * (1 - p) * (1 - 1 / _K)) - 1) for p, ph in zip(_PS, _estimator_draws()))
  return Result(measured=float(rel), tolerance=0.03)


# ----------------------------------------------------------------------------- 4. SNR model


def _sum_of_unit_vectors_norm2(rng, m: np.ndarray, dim: int, kmax: int) -> np.ndarray:
  """|u_1 + ... + u_m|² for m iid uniform unit vectors in R^dim, one per entry of ``m``.

  Exact and cheap: the Gram matrix of z_1..z_kmax ~ N(0, I_dim) is Wishart(dim, I), sampled by
  Bartlett's decomposition W = A Aᵀ (A lower triangular, A_ii² ~ χ²_{dim−i}, A_ij ~ N(0,1));
  unit vectors have Gram diag(W)^{-1/2} W diag(W)^{-1/2}; the first m of the kmax vectors give
  the sum over m. O(kmax²) draws per problem instead of kmax · dim.
  """
  n = m.shape[0]
  a = np.tril(rng.standard_normal((n, kmax, kmax)), -1)
  idx = np.arange(kmax)
  a[:, idx, idx] = np.sqrt(rng.chisquare(dim - idx, size=(n, kmax)))
  w = a @ np.swapaxes(a, 1, 2)
  d = 1 / np.sqrt(np.diagonal(w, axis1=1, axis2=2))
  e = (idx[None, :] < m[:, None]) * d                      # first m vectors, normalised
  return np.einsum("ni,nij,nj->n", e, w, e)


def simulate_rollout_gradients(p: float, n: int, *, k: int = 8, s: float = 1.0,
                               sigma0: float = 0.05, dim: int = 64, seed: int = 0) -> np.ndarray:
  """[n, dim] per-problem gradients from the rollout generator of paced.md §6 (v = e_1).

  g = (1/K) Σ_k g_k + σ0 ζ; a correct rollout gives (1−p) v, an incorrect one (1−p) s u_k with
  u_k uniform on the unit sphere; ζ ~ N(0, I/dim) (isotropic, E|ζ|² = 1).

  Sampled exactly in law but cheaply: by rotational invariance the sum of the m incorrect
  directions is R ω with ω uniform on the sphere, independent of R = |Σ u_k| (drawn from the
  Gram matrix, see ``_sum_of_unit_vectors_norm2``); the isotropic part X = (1−p) s R ω / K + σ0 ζ
  is again R_X θ with θ uniform and |X|² = b² + 2 b σ0 |ζ| t + σ0²|ζ|² (b = (1−p) s R / K,
  t = ω·ζ/|ζ| distributed as one coordinate of a uniform unit vector). ``tests/test_pacing.py``
  compares it with the direct simulation.
  """
  rng = np.random.default_rng(seed)
  correct = (rng.uniform(size=(n, k)) < p).sum(1)
  r2 = _sum_of_unit_vectors_norm2(rng, k - correct, dim, k)
  b = (1 - p) * s * np.sqrt(np.maximum(r2, 0)) / k
  zeta = sigma0 * np.sqrt(rng.chisquare(dim, size=n) / dim)
  t = 2 * rng.beta((dim - 1) / 2, (dim - 1) / 2, size=n) - 1
  rx = np.sqrt(np.maximum(b * b + 2 * b * zeta * t + zeta * zeta, 0))
  theta = rng.standard_normal((n, dim))
  theta /= np.linalg.norm(theta, axis=1, keepdims=True)
  g = rx[:, None] * theta
  g[:, 0] += (1 - p) * correct / k
  return g


def simulate_rollout_gradients_direct(p: float, n: int, *, k: int = 8, s: float = 1.0,
                                      sigma0: float = 0.05, dim: int = 64,
                                      seed: int = 0) -> np.ndarray:
  """The same generator simulated literally (every rollout's direction drawn); the oracle."""
  rng = np.random.default_rng(seed)
  correct = rng.uniform(size=(n, k)) < p
  u = rng.standard_normal((n, k, dim))
  u /= np.linalg.norm(u, axis=2, keepdims=True)
  g = (1 - p) * s * np.sum(np.where(correct[..., None], 0.0, u), axis=1)
  g[:, 0] += (1 - p) * correct.sum(1)
  return g / k + sigma0 * rng.standard_normal((n, dim)) / np.sqrt(dim)


_SNR_PS = np.round(np.arange(0.05, 0.951, 0.05), 2)


@register("paced.snr_model_monte_carlo", source="[proposed] SNR model, Proposition A (§6)",
          statement="bias-corrected Monte-Carlo SNR of the rollout generator (K=8, s=1, "
                    "sigma0=0.05, d=64, 2e4 problems per p on 0.05..0.95) matches mu^2/sigma^2 "
                    "within 5% (gradient_snr_by_bin)", doc=f"{_DOC}#snr-model")
def _snr_model_monte_carlo():
  est_fn = jax.jit(P.gradient_snr_by_bin, static_argnames="bins")
  _, _, snr = P.snr_model(jnp.asarray(_SNR_PS))
  worst = 0.0
  for i, p in enumerate(_SNR_PS):
    g = simulate_rollout_gradients(float(p), 20_000, seed=10 + i)
    est = est_fn(g, np.full(g.shape[0], p), bins=1)
    worst = max(worst, abs(float(est.snr[0]) / float(snr[i]) - 1))
  return Result(measured=worst, tolerance=0.05, detail="max relative error over 19 values of p")


@register("paced.snr_vanishes_at_ends", source="[paper] arXiv:2603.11178 SNR vanishes at p=0,1",
          statement="analytic SNR is exactly 0 at p in {0,1}; simulated: the signal part is "
                    "exactly 0 at p=1 and the bias-corrected SNR at p=0 is < 1e-4 (~10 s.e.; "
                    "SNR(0.05) = 0.02)", doc=f"{_DOC}#snr-model")
def _snr_vanishes_at_ends():
  _, _, snr = P.snr_model(jnp.asarray([0.0, 1.0]))
  at_one = np.abs(simulate_rollout_gradients(1.0, 2000, sigma0=0.0, seed=5)).max()
  g0 = simulate_rollout_gradients(0.0, 20_000, seed=6)
  at_zero = abs(float(P.gradient_snr_by_bin(jnp.asarray(g0), jnp.zeros(20_000), bins=1).snr[0]))
  exact = float(max(np.abs(np.asarray(snr)).max(), at_one))
  return Result(measured=exact if at_zero < 1e-4 else np.inf, tolerance=0.0,
                detail=f"|SNR_hat(0)| = {at_zero:.2e}")


@register("paced.snr_interior_maximum", source="[proposed] Proposition A",
          statement="analytic SNR on a 1e5 grid rises then falls: one interior maximum",
          doc=f"{_DOC}#snr-model")
def _snr_interior_maximum():
  grid = jnp.linspace(0.0, 1.0, 100_001)
  _, _, snr = P.snr_model(grid)
  d = np.sign(np.diff(np.asarray(snr)))
  changes = int(np.sum(d[1:] != d[:-1]))
  arg = int(np.argmax(np.asarray(snr)))
  interior = 0 < arg < grid.shape[0] - 1
  return Result(measured=float(abs(changes - 1) + (not interior)), tolerance=0.0,
                detail=f"argmax p={float(grid[arg]):.4f}")


@register("paced.snr_quadratic_ends", source="[proposed] Proposition A",
          statement="log-log slopes of the analytic SNR in p and in 1-p on [1e-4, 1e-2] lie in "
                    "[1.95, 2.05]", doc=f"{_DOC}#snr-model")
def _snr_quadratic_ends():
  x = np.logspace(-4, -2, 50)
  slopes = []
  for p in (x, 1 - x):
    _, _, snr = P.snr_model(jnp.asarray(p))
    slopes.append(np.polyfit(np.log(x), np.log(np.asarray(snr)), 1)[0])
  return Result(measured=float(max(abs(sl - 2) for sl in slopes)), tolerance=0.05,
                detail=f"slopes {slopes[0]:.4f} (p->0), {slopes[1]:.4f} (p->1)")


@register("paced.snr_needs_noise_floor", source="[proposed] Proposition A (counter-example)",
          statement="without the floor sigma0 (a hypothesis of Prop. A) the model's SNR diverges "
                    "as p->1: SNR(1-1e-4)/SNR(1/2) >= 100", doc=f"{_DOC}#snr-model")
def _snr_needs_noise_floor():
  def snr0(p, k=8, s=1.0):
    return (p * (1 - p))**2 / ((1 - p)**3 * (p + s * s) / k)
  return Result(measured=snr0(1 - 1e-4) / snr0(0.5), tolerance=100.0, mode="min")


# ----------------------------------------------------------------------------- 5. Prop. B


@register("paced.propB_leading_order", source="[proposed] Proposition B",
          statement="w*(p)/(p(1-p)) has finite non-zero limits: values at 1e-6 and 1e-4 agree "
                    "within 1%, likewise at 1-p", doc=f"{_DOC}#proposition-b")
def _propB_leading_order():
  worst = 0.0
  for pts in ([1e-6, 1e-4], [1 - 1e-6, 1 - 1e-4]):
    p = jnp.asarray(pts)
    mu, s2, _ = P.snr_model(p)
    r = np.asarray(P.snr_optimal_weight(mu, s2) / (p * (1 - p)))
    if not (np.all(np.isfinite(r)) and np.all(r > 0)):
      return Result(measured=np.inf, tolerance=0.01)
    worst = max(worst, abs(r[0] / r[1] - 1))
  return Result(measured=worst, tolerance=0.01)


@register("paced.propB_cauchy_schwarz", source="[proposed] Proposition B",
          statement="Eff(w*) = 1 and Eff(w) <= 1 for 2000 random weight vectors on random "
                    "(mu, sigma^2); also the measured SNR of the aggregate is maximal at w*",
          doc=f"{_DOC}#proposition-b")
def _propB_cauchy_schwarz():
  rng = np.random.default_rng(7)
  mu = rng.uniform(0.1, 1, size=(2000, 30))
  s2 = rng.uniform(0.1, 2, size=(2000, 30))
  w = rng.uniform(0, 1, size=(2000, 30)) ** 3
  eff_star = np.asarray(P.efficiency(P.snr_optimal_weight(mu, s2), mu, s2))
  eff = np.asarray(P.efficiency(w, mu, s2))
  # Direct aggregate SNR (sum w mu)^2 / sum w^2 sigma^2 of w* vs random w.
  snr = lambda ww: (ww * mu).sum(1)**2 / (ww**2 * s2).sum(1)  # noqa: E731
  excess = np.maximum(snr(w) - snr(np.asarray(P.snr_optimal_weight(mu, s2))), 0).max()
  return Result(measured=float(max(np.abs(eff_star - 1).max(), max(eff.max() - 1, 0), excess)),
                tolerance=1e-12)


@register("paced.beta_kernel_not_exact_optimum",
          source="[proposed] Prop. B: p(1-p) is leading-order only (counter-example)",
          statement="under the SNR model, p(1-p) is not exactly SNR-optimal: 1-Eff(p(1-p)) on "
                    "a uniform p grid is >= 1e-3 (while Eff(w*) = 1)", doc=f"{_DOC}#proposition-b")
def _beta_kernel_not_exact_optimum():
  p = jnp.linspace(0.01, 0.99, 99)
  mu, s2, _ = P.snr_model(p)
  loss = 1 - float(P.efficiency(P.beta_weight(p), mu, s2))
  return Result(measured=loss, tolerance=1e-3, mode="min",
                detail=f"1-Eff(p(1-p)) = {loss:.4f}")


# ----------------------------------------------------------------------------- 6-7. Theorem 6'

_DELTAS = (0.2, 0.1, 0.05, 0.025)


def _aggregate_draws(delta, seed, n=50, draws=2000):
  rng = np.random.default_rng(seed)
  mu = rng.uniform(0.1, 1, size=(draws, n))
  s2 = rng.uniform(0.1, 2, size=(draws, n))
  m = rng.uniform(1 - delta, 1 + delta, size=(draws, n))
  w = np.asarray(P.snr_optimal_weight(mu, s2)) * m
  return 1 - np.asarray(P.efficiency(w, mu, s2)), mu, s2, w


def _bound(d):
  return d * d / ((1 - d)**2 + d * d)


@register("paced.thm6_aggregate_bound", source="[proposed] derived: Theorem 6' aggregate",
          statement="1-Eff <= d^2/((1-d)^2+d^2) on every one of 2000 draws x 4 deltas (50 "
                    "problems, m ~ U(1-d, 1+d))", doc=f"{_DOC}#theorem-6-aggregate")
def _thm6_aggregate_bound():
  worst = max((_aggregate_draws(d, 20 + i)[0] - _bound(d)).max() for i, d in enumerate(_DELTAS))
  return Result(measured=float(max(worst, 0.0)), tolerance=1e-12)


@register("paced.thm6_aggregate_quadratic", source="[paper] arXiv:2603.11178 Thm 6 O(delta^2)",
          statement="worst-case 1-Eff over draws scales as delta^2: log-log slope in [1.8, 2.2]",
          doc=f"{_DOC}#theorem-6-aggregate")
def _thm6_aggregate_quadratic():
  worst = [_aggregate_draws(d, 20 + i)[0].max() for i, d in enumerate(_DELTAS)]
  slope = np.polyfit(np.log(_DELTAS), np.log(worst), 1)[0]
  return Result(measured=float(abs(slope - 2)), tolerance=0.2, detail=f"slope {slope:.3f}")


@register("paced.thm6_scale_invariance", source="[proposed] Eff definition (paced.md §7)",
          statement="Eff(c w) = Eff(w), rtol 1e-12, c log-uniform in [1e-3, 1e3]",
          doc=f"{_DOC}#theorem-6-aggregate")
def _thm6_scale_invariance():
  _, mu, s2, w = _aggregate_draws(0.2, 30)
  c = np.exp(np.random.default_rng(31).uniform(np.log(1e-3), np.log(1e3), size=(w.shape[0], 1)))
  e1 = np.asarray(P.efficiency(w, mu, s2))
  e2 = np.asarray(P.efficiency(c * w, mu, s2))
  return Result(measured=float(np.abs(e2 / e1 - 1).max()), tolerance=1e-12)


@register("paced.thm6_two_point", source="[proposed] derived: Theorem 6' aggregate",
          statement="symmetric two-point misspecification gives 1-Eff = d^2/(1+d^2) exactly "
                    "(rtol 1e-12)", doc=f"{_DOC}#theorem-6-aggregate")
def _thm6_two_point():
  rng = np.random.default_rng(40)
  worst = 0.0
  for d in (0.3, 0.2, 0.1, 0.05, 0.025, 0.01):
    mu = np.repeat(rng.uniform(0.1, 1, size=25), 2)
    s2 = np.repeat(rng.uniform(0.1, 2, size=25), 2)
    m = np.tile([1 - d, 1 + d], 25)
    loss = 1 - float(P.efficiency(np.asarray(P.snr_optimal_weight(mu, s2)) * m, mu, s2))
    worst = max(worst, abs(loss / (d * d / (1 + d * d)) - 1))
  return Result(measured=worst, tolerance=1e-9,
                detail="rtol on 1-Eff; Eff itself matches to ~1e-16 absolute")


@register("paced.thm6_sharp_bound", source="[proposed] derived: Kantorovich, sharper than spec",
          statement="1-Eff <= d^2 on every draw (tighter than d^2/((1-d)^2+d^2)), attained "
                    "exactly by the two-point m with a-mass (1-d)/2 at 1+d", doc=f"{_DOC}#sharp")
def _thm6_sharp_bound():
  worst = max((_aggregate_draws(d, 20 + i)[0] - d * d).max() for i, d in enumerate(_DELTAS))
  # Extremal case: a-weights (mu^2/sigma^2) split (1-d)/2 : (1+d)/2 between m = 1+d and 1-d.
  gap = 0.0
  for d in (0.3, 0.2, 0.1, 0.05):
    mu = np.array([np.sqrt((1 - d) / 2), np.sqrt((1 + d) / 2)])
    s2 = np.ones(2)
    loss = 1 - float(P.efficiency(mu * np.array([1 + d, 1 - d]), mu, s2))
    gap = max(gap, abs(loss / (d * d) - 1))
  return Result(measured=float(max(worst, 0.0, gap)), tolerance=1e-12,
                detail="spec bound is valid but not tight")


@register("paced.thm6_pointwise", source="[proposed] derived: Theorem 6' pointwise",
          statement="G(m w°)/G(w°) = 1-(1-m)^2 (rtol 1e-12) on 1e4 random (mu, sigma^2, m); "
                    "w° = mu^2/(mu^2+sigma^2) maximises G", doc=f"{_DOC}#theorem-6-pointwise")
def _thm6_pointwise():
  rng = np.random.default_rng(50)
  mu = rng.uniform(0.05, 2, size=10_000)
  s2 = rng.uniform(0.05, 4, size=10_000)
  m = rng.uniform(0.5, 1.5, size=10_000)
  w0 = mu**2 / (mu**2 + s2)
  ratio = np.asarray(P.one_step_gain(m * w0, mu, s2) / P.one_step_gain(w0, mu, s2))
  err = np.abs(ratio / (1 - (1 - m)**2) - 1).max()
  # w° is the maximiser: no perturbed weight does better.
  better = np.maximum(np.asarray(P.one_step_gain(w0 * (1 + 1e-3 * rng.normal(size=10_000)),
                                                 mu, s2) - P.one_step_gain(w0, mu, s2)), 0).max()
  return Result(measured=float(max(err, better)), tolerance=1e-12)


# ----------------------------------------------------------------------------- 8. plumbing


def _plumbing_inputs(seed=60, b=24, t=6, v=11):
  rng = np.random.default_rng(seed)
  zs = jnp.asarray(rng.normal(size=(b, t, v)) * 2, jnp.float32)
  zt = jnp.asarray(rng.normal(size=(b, t, v)) * 2, jnp.float32)
  lengths = rng.integers(1, t + 1, size=b)
  mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
  p = jnp.asarray(rng.integers(0, 9, size=b) / 8, jnp.float32)
  return zs, zt, mask, p


@register("paced.plumbing_equal_rates", source="[proposed] batch form (paced.md §1)",
          statement="with all p_hat equal the PACED loss equals the unweighted loss (float32, "
                    "rtol 1e-6)", doc=f"{_DOC}#loss-plumbing")
def _plumbing_equal_rates():
  zs, zt, mask, _ = _plumbing_inputs()
  tok = D.forward_kl(zs, zt)
  paced_fn = jax.jit(lambda t, p, m: P.paced_loss(t, p, where=m, eps=1e-12))
  # Unweighted: mean over examples of the masked token mean within each response.
  ex = jnp.sum(jnp.where(mask, tok, 0), 1) / jnp.sum(mask, 1)
  plain = R.masked_mean(ex)
  worst = 0.0
  for pv in (0.125, 0.5, 0.875):
    paced = paced_fn(tok, jnp.full((tok.shape[0],), pv, jnp.float32), mask)
    assert paced.dtype == jnp.float32
    worst = max(worst, abs(float(paced) / float(plain) - 1))
  return Result(measured=worst, tolerance=1e-6)


@register("paced.plumbing_padding", source="[proposed] batch form (paced.md §1)",
          statement="masked padding tokens (garbage logits, +-1e4, -inf) do not change the loss "
                    "or its gradient", doc=f"{_DOC}#loss-plumbing")
def _plumbing_padding():
  zs, zt, mask, p = _plumbing_inputs()
  rng = np.random.default_rng(61)
  junk = jnp.asarray(rng.choice([1e4, -1e4, 3.0], size=zs.shape), jnp.float32)
  zs2 = jnp.where(mask[..., None], zs, junk)
  zt2 = jnp.where(mask[..., None], zt, -jnp.inf)

  def loss(z, t):
    return P.paced_loss(D.forward_kl(z, t, where=mask), p, where=mask)

  vg = jax.jit(jax.value_and_grad(loss))
  v1, g1 = vg(zs, zt)
  v2, g2 = vg(zs2, zt2)
  gdiff = float(jnp.max(jnp.abs(jnp.where(mask[..., None], g1 - g2, g2))))
  return Result(measured=max(abs(float(v1) - float(v2)), gdiff if np.isfinite(gdiff) else np.inf),
                tolerance=0.0)


@register("paced.plumbing_microbatch", source="[proposed] sum-and-count (anchors.md §5)",
          statement="micro-batch accumulation of (sum, count) pairs equals the full-batch PACED "
                    "loss (float32, rtol 1e-6), uneven micro-batches", doc=f"{_DOC}#loss-plumbing")
def _plumbing_microbatch():
  zs, zt, mask, p = _plumbing_inputs()
  tok = jax.jit(lambda a, b, m: D.forward_kl(a, b, where=m))(zs, zt, mask)
  full = jax.jit(lambda t, q, m: P.paced_loss(t, q, where=m))(tok, p, mask)
  w = P.paced_weights(p)  # normalised over the full batch, then split
  acc = R.zeros()
  for lo, hi in [(0, 5), (5, 6), (6, 17), (17, 24)]:
    acc = acc + P.weighted_sum_and_count(tok[lo:hi], w[lo:hi], where=mask[lo:hi])
  return Result(measured=abs(float(acc.mean()) / float(full) - 1), tolerance=1e-6)


# ----------------------------------------------------------------------------- 9. AKL


def _akl_inputs(seed, n=2000, v=12):
  rng = np.random.default_rng(seed)
  sc = np.exp(rng.uniform(np.log(0.1), np.log(6), size=(n, 1)))
  return rng.normal(size=(n, v)) * sc, rng.normal(size=(n, v)) * sc


@register("paced.akl_weights", source="[paper] arXiv:2404.02657 AKL",
          statement="AKL head/tail weights lie in [0,1] and sum to 1 (2000 random pairs, p=q too)",
          doc=f"{_DOC}#akl")
def _akl_weights():
  _, weights = _adaptive_kl()
  zs, zt = _akl_inputs(70)
  zs = np.concatenate([zs, zt[:100]])
  zt = np.concatenate([zt, zt[:100]])
  wh, wt = (np.asarray(a) for a in weights(zs, zt))
  viol = max(np.maximum(-wh, 0).max(), np.maximum(wh - 1, 0).max(), np.maximum(-wt, 0).max(),
             np.abs(wh + wt - 1).max())
  return Result(measured=float(viol), tolerance=1e-15)


@register("paced.akl_between_kls", source="[paper] arXiv:2404.02657 AKL (convex mixture)",
          statement="min(FKL, RKL) <= AKL <= max(FKL, RKL) + 1e-12 on 2000 random pairs",
          doc=f"{_DOC}#akl")
def _akl_between_kls():
  akl, _ = _adaptive_kl()
  zs, zt = _akl_inputs(71)
  a = np.asarray(akl(zs, zt))
  f = np.asarray(D.forward_kl(zs, zt))
  r = np.asarray(D.reverse_kl(zs, zt))
  viol = max(np.maximum(np.minimum(f, r) - a, 0).max(), np.maximum(a - np.maximum(f, r), 0).max())
  return Result(measured=float(viol), tolerance=1e-12)


@register("paced.akl_zero_at_equal", source="[paper] arXiv:2404.02657 AKL",
          statement="AKL = 0 when p = q (also for shifted logits)", doc=f"{_DOC}#akl")
def _akl_zero_at_equal():
  akl, _ = _adaptive_kl()
  _, zt = _akl_inputs(72)
  return Result(measured=float(max(np.abs(np.asarray(akl(zt, zt))).max(),
                                   np.abs(np.asarray(akl(zt + 2.5, zt))).max())), tolerance=1e-12)


@register("paced.akl_head_boundary", source="[proposed] boundary convention (paced.md §5)",
          statement="p=(.4,.3,.2,.06,.04), mu=0.5: head = {1}; the AKL value equals the "
                    "hand-computed mixture with that head", doc=f"{_DOC}#akl")
def _akl_head_boundary():
  akl, weights = _adaptive_kl()
  p = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
  q = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
  # Present in a shuffled vocabulary order too.
  worst = 0.0
  for perm in (np.arange(5), np.array([3, 0, 4, 2, 1])):
    pp, qq = p[perm], q[perm]
    head = perm == 0                                   # only the top-1 token
    gh = np.abs(pp - qq)[head].sum()
    gt = np.abs(pp - qq)[~head].sum()
    fkl = np.sum(pp * np.log(pp / qq))
    rkl = np.sum(qq * np.log(qq / pp))
    want = gh / (gh + gt) * fkl + gt / (gh + gt) * rkl
    got = float(akl(jnp.log(jnp.asarray(qq)), jnp.log(jnp.asarray(pp)), mu=0.5))
    wh, _ = weights(jnp.log(jnp.asarray(qq)), jnp.log(jnp.asarray(pp)), mu=0.5)
    worst = max(worst, abs(got - want), abs(float(wh) - gh / (gh + gt)))
  return Result(measured=worst, tolerance=1e-12, detail="g_head=0.3, g_tail=0.5")


@register("paced.akl_permutation", source="[paper] arXiv:2404.02657 AKL",
          statement="AKL does not depend on the vocabulary order (random permutations, "
                    "atol 1e-12)", doc=f"{_DOC}#akl")
def _akl_permutation():
  akl, _ = _adaptive_kl()
  zs, zt = _akl_inputs(73, n=500)
  rng = np.random.default_rng(74)
  perm = np.argsort(rng.uniform(size=zs.shape), axis=1)
  a1 = np.asarray(akl(zs, zt))
  a2 = np.asarray(akl(np.take_along_axis(zs, perm, 1), np.take_along_axis(zt, perm, 1)))
  return Result(measured=float(np.abs(a1 - a2).max()), tolerance=1e-12)


# ----------------------------------------------------------------------------- 10. schedule


def mocked_two_stage_pipeline(num_steps: int, *, switch_step: int, refresh_every: int,
                              transition_steps: int = 0):
  """A mocked trainer: records which loss each step used and where p_hat was re-estimated.

  The 'losses' are tagged constants (forward = 1, reverse = 1000), so the value at each step
  reveals the mix; the 'estimator' counts its calls.
  """
  used, refreshed = [], []
  step_fn = jax.jit(lambda s: (P.two_stage_loss(1.0, 1000.0, s, switch_step=switch_step,
                                                transition_steps=transition_steps),
                               P.refresh_due(s, every=refresh_every, switch_step=switch_step)))
  for step in range(num_steps):
    val, due = step_fn(step)
    used.append(float(val))
    if bool(due):
      refreshed.append(step)
  return np.asarray(used), refreshed


@register("paced.two_stage_switch", source="[paper] two-stage FKL->RKL; [proposed] switch rule",
          statement="mocked pipeline: forward KL strictly before switch_step, reverse KL from it; "
                    "p_hat is re-estimated at the switch; smooth mix is linear and monotone",
          doc=f"{_DOC}#two-stage-schedule")
def _two_stage_switch():
  errs = 0
  for switch, every in [(7, 5), (10, 5), (0, 3), (13, 100)]:
    used, refreshed = mocked_two_stage_pipeline(20, switch_step=switch, refresh_every=every)
    want = np.where(np.arange(20) < switch, 1.0, 1000.0)
    errs += int(np.any(used != want)) + int(switch not in refreshed) + int(0 not in refreshed)
  used, _ = mocked_two_stage_pipeline(20, switch_step=5, refresh_every=4, transition_steps=4)
  lam = (used - 1) / 999
  want = np.clip((np.arange(20) - 5) / 4, 0, 1)
  errs += int(np.abs(lam - want).max() > 1e-6)
  return Result(measured=float(errs), tolerance=0.0, detail="number of failed sub-cases")
