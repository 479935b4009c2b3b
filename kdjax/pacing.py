r"""PACED: weight each problem by the student's pass rate, w(p) = p^α (1 − p)^β.

Xu, Sang, Zhou, He & Wang, *PACED: Distillation at the Frontier of Student Competence*,
arXiv:2603.11178 [paper]. For every problem, sample K rollouts **from the student**, score them
with a verifier, estimate the pass rate p̂, and multiply that problem's distillation loss by
w(p̂). Mastered (p̂ = 1) and currently impossible (p̂ = 0) problems get weight 0; the weight peaks
at p* = α / (α + β). The paper's default is α = β = 1 ("no hyper-parameters", v3).

Typical use inside a trainer (the weights are constants of the step, as the paper's sg(·)):

.. code-block:: python

  p_hat = kdjax.pacing.pass_rate(rewards, where=rollout_mask)        # [B], from [B, K] rewards
  w = kdjax.pacing.paced_weights(p_hat)                               # mean-one, stop-gradient
  tok = kdjax.divergences.forward_kl(student_logits, teacher_logits)  # [B, T]
  acc = kdjax.pacing.weighted_sum_and_count(tok, w, where=token_mask)  # (Σ_b w_b L_b, B)
  loss = acc.mean()

Contents:

* pass-rate estimation from a ``[problems, rollouts]`` reward array: :func:`pass_rate` (raw c/n,
  the [proposed] default), :func:`posterior_pass_rate` (Beta-posterior mean, for ablations);
* :func:`beta_weight`, :func:`normalize_weights`, :func:`paced_weights` and the reduction helper
  :func:`weighted_sum_and_count` (sum-and-count convention of :mod:`kdjax.reductions`);
* the two-stage schedule (forward KL then reverse KL) as pure functions of the step:
  :func:`two_stage_mix`, :func:`two_stage_loss`, :func:`refresh_due`;
* diagnostics: :func:`snr_model` (the [proposed] SNR model), :func:`gradient_snr_by_bin` (measured
  cross-problem SNR per pass-rate bin from per-example gradients), :func:`snr_optimal_weight`
  (μ/σ²), :func:`efficiency` (Eff(w)) and :func:`one_step_gain` (the pointwise surrogate).

Contract: ``where`` is a boolean mask broadcastable to the array it masks; bfloat16/float16
inputs are computed and returned in float32; a NaN pass rate, reward, weight or loss propagates
(it is never read as a boundary or a padding entry; the one exception, as in
:func:`kdjax.reductions.masked_sum_and_count`, is an example of weight exactly 0, which
contributes nothing); concrete hyper-parameters and data ranges (p and rewards in [0, 1],
weights >= 0, σ² > 0) are checked elementwise, traced ones are not.

The AKL baseline the paper compares against is :func:`kdjax.losses.adaptive_kl` (one
implementation, in the loss library). Theory and checks: ``theory/paced.md``,
``python -m theory --only paced``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax.reductions import SumAndCount

Array = jax.Array

__all__ = [
    "pass_rate", "posterior_pass_rate", "rollout_counts", "beta_weight", "beta_weight_mode",
    "normalize_weights", "paced_weights", "weighted_sum_and_count", "paced_loss",
    "two_stage_mix", "two_stage_loss", "refresh_due", "snr_model", "snr_optimal_weight",
    "efficiency", "one_step_gain", "BinnedSNR", "gradient_snr_by_bin",
]

_NORMALIZE_MODES = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- checks


def _check_data(name, x, *, low: float, low_open: bool = False, high: float | None = None,
                allow_posinf: bool = False) -> None:
  """Range check of a concrete data array (pass rates, weights, variances), elementwise.

  NaN entries are not an error here: NaN input propagates to the output (the caller's
  non-finite guard fires). Traced arrays are not checked.
  """
  arr = _checks.concrete_array(x)
  if arr is None or arr.size == 0:
    return
  a = arr.astype(np.float64)
  a = a[~np.isnan(a)]
  bad = (a <= low) if low_open else (a < low)
  if high is not None:
    bad |= a > high
  if not allow_posinf:
    bad |= np.isposinf(a)
  if np.any(bad):
    rng = (f"in [{low:g}, {high:g}]" if high is not None
           else f"{'>' if low_open else '>='} {low:g}{'' if allow_posinf else ' and finite'}")
    raise ValueError(f"`{name}` must hold numbers {rng}, got entries "
                     f"{np.unique(a[bad])[:4].tolist()}.")


# ----------------------------------------------------------------------------- pass rates


def _rewards_and_mask(rewards, where):
  r = _checks.check_array("rewards", rewards, min_rank=2)
  if r.ndim != 2:
    raise ValueError(f"`rewards` must have shape [problems, rollouts], got {r.shape}.")
  _check_data("rewards", r, low=0.0, high=1.0)
  dtype = _checks.compute_dtype(r)
  keep = _checks.check_where(where, r.shape)
  if keep is None:
    keep = jnp.ones(r.shape, bool)
  return r.astype(dtype), keep


def rollout_counts(rewards: Array, *, where: Array | None = None) -> tuple[Array, Array]:
  """(successes c, rollouts n) per problem from a ``[problems, rollouts]`` reward array.

  ``where`` marks the rollouts that exist (variable rollout counts: pad with False); a boolean
  mask broadcastable to the rewards shape. Rewards may be graded scores in [0, 1]; c is then
  their sum. A NaN reward of a kept rollout propagates to c.
  """
  r, keep = _rewards_and_mask(rewards, where)
  c = jnp.sum(jnp.where(keep, r, 0.0), axis=1)
  n = jnp.sum(keep, axis=1).astype(r.dtype)
  return c, n


def pass_rate(rewards: Array, *, where: Array | None = None) -> Array:
  r"""Raw empirical pass rate p̂ = c / n per problem (no smoothing).

  [paper] p̂ is the student's empirical pass rate over its own rollouts. Design choice (kdjax,
  [proposed]): no smoothing by default, so p̂ ∈ {0, 1} gets weight 0 (mastered and currently
  impossible problems are skipped). Facts: E p̂ = p, Var p̂ = p(1−p)/K,
  E[p̂(1−p̂)] = p(1−p)(1 − 1/K) — a constant factor that mean-one normalisation removes.

  Args:
    rewards: ``[problems, rollouts]`` verifier rewards in [0, 1] (usually {0, 1}); concrete
      values outside [0, 1] are a ``ValueError``, a NaN reward propagates to its problem.
    where: optional boolean mask broadcastable to the rewards shape; False marks padding
      rollouts. A problem with no rollout gets p̂ = 0 (and therefore weight 0 for α > 0).

  Returns:
    ``[problems]`` pass rates.
  """
  c, n = rollout_counts(rewards, where=where)
  return jnp.where(n > 0, c / jnp.where(n > 0, n, 1.0), 0.0)


def posterior_pass_rate(rewards: Array, *, where: Array | None = None, a0: float = 1.0,
                        b0: float = 1.0) -> Array:
  r"""Beta-posterior mean pass rate p̂ = (c + a0) / (n + a0 + b0) (Laplace smoothing at 1, 1).

  Design choice (kdjax, [proposed]): an ablation option; it never returns exactly 0 or 1, so
  no problem is skipped. A problem with no rollout gets the prior mean a0 / (a0 + b0). ``a0``,
  ``b0`` > 0 (scalars or ``[problems]`` arrays, checked elementwise when concrete).
  """
  _checks.check_positive("a0", a0)
  _checks.check_positive("b0", b0)
  c, n = rollout_counts(rewards, where=where)
  return (c + a0) / (n + a0 + b0)


# ----------------------------------------------------------------------------- weights


def _check_exponent(name, value):
  _checks.check_range(name, value, low=0.0)


def _log_beta_weight(p: Array, alpha, beta) -> Array:
  """log w(p) = α log p + β log(1 − p), with log 0^0 = 0, log 0^α = −inf; NaN propagates."""
  _check_exponent("alpha", alpha)
  _check_exponent("beta", beta)
  p = _checks.check_array("p", p, min_rank=0)
  _check_data("p", p, low=0.0, high=1.0)
  dtype = _checks.compute_dtype(p)
  p = p.astype(dtype)
  a = jnp.asarray(alpha, dtype)
  b = jnp.asarray(beta, dtype)
  interior = (p > 0) & (p < 1)
  ps = jnp.where(interior, p, 0.5)   # safe value: no log(0) in the gradient path
  log_int = a * jnp.log(ps) + b * jnp.log1p(-ps)
  # Boundary: p = 0 gives 0^α (1 if α = 0); p = 1 gives 0^β (1 if β = 0).
  log_zero = jnp.where(a == 0, 0.0, -jnp.inf)
  log_one = jnp.where(b == 0, 0.0, -jnp.inf)
  log_w = jnp.where(interior, log_int, jnp.where(p <= 0, log_zero, log_one))
  # NaN is not a boundary: it propagates (the comparisons above are False for NaN).
  return jnp.where(jnp.isnan(p), p, log_w).astype(dtype)


def beta_weight(p: Array, *, alpha: float = 1.0, beta: float = 1.0) -> Array:
  r"""The PACED weight w(p) = p^α (1 − p)^β [paper, arXiv:2603.11178].

  w(0) = w(1) = 0 exactly for α, β > 0; maximum at p* = α/(α+β) with value
  α^α β^β / (α+β)^(α+β) (1/4 at α = β = 1); α < β favours harder problems. A zero exponent
  drops its factor (0^0 = 1). Computed as exp(α log p + β log(1−p)); finite gradient
  everywhere (zero outside (0, 1)). Large exponents make the raw weight tiny (at α = β = 64,
  w(1/2) = 2^-128 is below the float32 normal range): :func:`paced_weights` normalises in log
  space, so its weights are mean-one for any exponent. A NaN pass rate gives a NaN weight.

  Args:
    p: pass rates in [0, 1] (any shape; concrete values outside are a ``ValueError``).
    alpha, beta: exponents ≥ 0, finite (scalars or arrays broadcastable to ``p``, checked
      elementwise when concrete; traced values are unchecked).
  """
  return jnp.exp(_log_beta_weight(p, alpha, beta))


def beta_weight_mode(alpha: float = 1.0, beta: float = 1.0) -> tuple[float, float]:
  """(p*, w(p*)) = (α/(α+β), α^α β^β/(α+β)^(α+β)) for α, β > 0 [proposed, elementary]."""
  _check_exponent("alpha", alpha)
  _check_exponent("beta", beta)
  a, b = _checks.concrete_scalar(alpha), _checks.concrete_scalar(beta)
  if a is None or b is None:
    raise TypeError(f"`alpha` and `beta` must be concrete scalars, got {alpha!r} and {beta!r}.")
  if a + b == 0:
    raise ValueError("`alpha` + `beta` must be > 0 for the mode to be defined.")
  p_star = a / (a + b)
  w_star = (p_star**a) * ((1 - p_star)**b)
  return p_star, w_star


def _normalize_scaled(scaled: Array, log_scale: Array, keep: Array, mode: str, eps) -> Array:
  """Normalises weights given as ``scaled · exp(log_scale)`` (max(scaled) = 1, or all 0).

  Working on the scaled weights keeps every exponent in range: the result depends on the
  weights only through their ratios, except for ``eps``, which is in the weights' own units.
  """
  dtype = scaled.dtype
  scaled = jnp.where(keep, scaled, 0.0)
  total = jnp.sum(scaled)
  if mode == "mean":
    n = jnp.maximum(jnp.sum(keep), 1).astype(dtype)
    den = total / n
  else:
    den = total
  zero = total == 0          # an all-zero batch (a NaN total is not zero: it propagates)
  ls = jnp.where(jnp.isfinite(log_scale), log_scale, 0.0)
  e = jnp.asarray(eps, dtype)
  den = den + jnp.where(e > 0, e * jnp.exp(-ls), 0.0)
  return jnp.where(zero, 0.0, scaled / jnp.where(zero, 1.0, den))


def _check_mode_eps(mode, eps):
  if not isinstance(mode, str) or mode not in _NORMALIZE_MODES:
    raise ValueError(f"`mode` must be one of {_NORMALIZE_MODES}, got {mode!r}.")
  _checks.check_nonneg("eps", eps)


def normalize_weights(weights: Array, *, mode: str = "mean", where: Array | None = None,
                      eps: float = 0.0) -> Array:
  r"""Batch normalisation of PACED weights, with stop-gradient.

  Design choice (kdjax, [proposed]): ``"mean"`` gives w̃_b = w_b / (mean_b w_b + ε), keeping the
  loss scale of unweighted training (efficiency is scale-invariant, so the theory is
  unaffected); ``"sum"`` divides by the sum; ``"none"`` returns the weights as they are. With the
  default ε = 0 the result has mean exactly one (sum one) however small the weights are (they
  are rescaled by their maximum first). An all-zero batch stays all-zero (zero loss, zero
  gradient, no NaN); a NaN weight makes the whole batch NaN (its mean is NaN). The result is
  wrapped in ``jax.lax.stop_gradient`` (the paper's sg(·)).

  Args:
    weights: ``[B]`` non-negative finite weights (concrete negative or infinite entries are a
      ``ValueError``; traced weights are unchecked).
    mode: "mean" | "sum" | "none".
    where: optional boolean mask of real examples, broadcastable to the weights shape (padding
      gets weight 0 and is not counted).
    eps: ε ≥ 0 added to the denominator, in the units of the weights (default 0).
  """
  _check_mode_eps(mode, eps)
  w = _checks.check_array("weights", weights, min_rank=1)
  _check_data("weights", w, low=0.0)
  dtype = _checks.compute_dtype(w)
  w = w.astype(dtype)
  keep = _checks.check_where(where, w.shape)
  keep = jnp.ones(w.shape, bool) if keep is None else keep
  w = jnp.where(keep, w, 0.0)
  if mode == "none":
    return jax.lax.stop_gradient(w)
  mx = jnp.max(w) if w.size else jnp.zeros((), dtype)
  pos = mx > 0
  scaled = jnp.where(pos, w / jnp.where(pos, mx, 1.0), w)   # max 1 (or all 0 / NaN)
  log_scale = jnp.log(jnp.where(pos, mx, 1.0))
  return jax.lax.stop_gradient(_normalize_scaled(scaled, log_scale, keep, mode, eps))


def paced_weights(p: Array, *, alpha: float = 1.0, beta: float = 1.0, normalize: str = "mean",
                  where: Array | None = None, eps: float = 0.0) -> Array:
  """``normalize_weights(beta_weight(p, alpha=, beta=), mode=normalize, where=, eps=)``,
  computed in log space.

  The weights are normalised from log w(p) (shifted by its maximum over the kept examples), so
  they are mean-one (``"mean"``) for any exponents, also where the raw weights p^α (1 − p)^β
  underflow (α = β = 64). ``where`` is a boolean mask broadcastable to ``p``; a NaN pass rate
  makes the batch NaN. Stop-gradient, as :func:`normalize_weights`.
  """
  _check_mode_eps(normalize, eps)
  log_w = _log_beta_weight(p, alpha, beta)
  keep = _checks.check_where(where, log_w.shape)
  keep = jnp.ones(log_w.shape, bool) if keep is None else keep
  if normalize == "none":
    return jax.lax.stop_gradient(jnp.where(keep, jnp.exp(log_w), 0.0))
  if log_w.ndim == 0:
    raise ValueError(f"`p` must have rank >= 1 to be normalised over a batch, got shape "
                     f"{log_w.shape}.")
  log_w = jnp.where(keep, log_w, -jnp.inf)
  m = jnp.max(log_w) if log_w.size else jnp.zeros((), log_w.dtype)
  mf = jnp.where(jnp.isfinite(m), m, 0.0)       # NaN m: NaN reaches `scaled` through log_w
  removed = log_w == -jnp.inf
  scaled = jnp.where(removed, 0.0, jnp.exp(jnp.where(removed, 0.0, log_w) - mf))
  return jax.lax.stop_gradient(_normalize_scaled(scaled, m, keep, normalize, eps))


def weighted_sum_and_count(losses: Array, weights: Array, *,
                           where: Array | None = None) -> SumAndCount:
  r"""(Σ_b sg(w_b) L_b, #examples): the PACED loss as a sum-and-count pair.

  [proposed] batch form L = (1/B) Σ_b sg(w̃_b) L_distill(x_b). With token-level ``losses``
  (``[B, T, ...]``), L_distill(x_b) is the masked token mean within the response. An example
  with no valid token is not counted. Add pairs over micro-batches/devices and divide once
  (:func:`kdjax.reductions.finalize_mean`); with weights normalised over the full batch this
  equals the full-batch loss exactly.

  An example of weight 0 contributes nothing, not even a NaN/inf loss it holds (as
  :func:`kdjax.reductions.masked_sum_and_count` with ``weights``); a NaN loss of a weighted,
  kept example (or a NaN weight) propagates to the sum.

  Args:
    losses: per-example ``[B]`` or per-token ``[B, ...]`` losses.
    weights: ``[B]`` non-negative finite weights (e.g. from :func:`paced_weights`;
      stop-gradiented here too). Concrete negative or infinite entries are a ``ValueError``.
    where: optional boolean mask broadcastable to the losses shape (e.g. ``[B, T]`` token mask,
      or ``[B, 1]`` to drop whole examples).

  Returns:
    ``SumAndCount(sum, count)`` with an int32 count of the examples that have a valid entry.
  """
  v = _checks.check_array("losses", losses, min_rank=1)
  w = _checks.check_array("weights", weights, min_rank=1)
  if w.ndim != 1 or w.shape[0] != v.shape[0]:
    raise ValueError(f"`weights` must have shape [B] = ({v.shape[0]},), got {w.shape}.")
  _check_data("weights", w, low=0.0)
  dtype = _checks.compute_dtype(v, w)
  v = v.astype(dtype)
  w = jax.lax.stop_gradient(w.astype(dtype))
  keep = _checks.check_where(where, v.shape)
  keep = jnp.ones(v.shape, bool) if keep is None else keep
  red = tuple(range(1, v.ndim))
  tok_sum = jnp.sum(jnp.where(keep, v, 0.0), axis=red)
  tok_cnt = jnp.sum(keep, axis=red, dtype=jnp.int32)
  valid = tok_cnt > 0
  per_example = jnp.where(valid, tok_sum / jnp.where(valid, tok_cnt, 1).astype(dtype), 0.0)
  total = jnp.sum(jnp.where(valid & (w != 0), w * per_example, 0.0))
  return SumAndCount(total, jnp.sum(valid, dtype=jnp.int32))


def paced_loss(losses: Array, p: Array, *, alpha: float = 1.0, beta: float = 1.0,
               normalize: str = "mean", where: Array | None = None, eps: float = 0.0) -> Array:
  """Convenience: the scalar PACED loss of one full batch (weights normalised over it).

  ``where`` is a boolean mask broadcastable to the losses shape; examples without a valid entry
  are excluded from the weight normalisation too.
  """
  v = _checks.check_array("losses", losses, min_rank=1)
  ex = None
  if where is not None:
    m = _checks.check_where(where, v.shape)
    ex = jnp.any(m.reshape(m.shape[0], -1), axis=1) if m.ndim > 1 else m
  w = paced_weights(p, alpha=alpha, beta=beta, normalize=normalize, where=ex, eps=eps)
  return weighted_sum_and_count(v, w, where=where).mean()


# ----------------------------------------------------------------------------- schedule


def two_stage_mix(step: Any, *, switch_step: int, transition_steps: int = 0) -> Array:
  r"""Fraction λ(step) ∈ [0, 1] of reverse KL in the two-stage FKL → RKL schedule.

  [paper] forward KL first (mode coverage), then reverse KL (consolidation). Stage lengths are
  not published; design choice (kdjax, [proposed]): a hard switch at ``switch_step``
  (λ = 0 before, 1 from it on) or, with ``transition_steps`` = τ > 0, a linear mix
  λ = clip((step − switch_step)/τ, 0, 1). Pure function of ``step``; jit-friendly.
  """
  switch_step = _checks.check_int("switch_step", switch_step, low=0)
  transition_steps = _checks.check_int("transition_steps", transition_steps, low=0)
  s = jnp.asarray(step, jnp.float32)
  if transition_steps == 0:
    return (s >= switch_step).astype(jnp.float32)
  return jnp.clip((s - switch_step) / transition_steps, 0.0, 1.0)


def two_stage_loss(forward_loss: Array, reverse_loss: Array, step: Any, *, switch_step: int,
                   transition_steps: int = 0) -> Array:
  """(1 − λ(step)) · forward_loss + λ(step) · reverse_loss (λ from :func:`two_stage_mix`).

  A term with zero weight is dropped (not multiplied by 0), so an inf/NaN in the inactive
  direction does not leak into the loss.
  """
  lam = two_stage_mix(step, switch_step=switch_step, transition_steps=transition_steps)
  f = jnp.asarray(forward_loss)
  r = jnp.asarray(reverse_loss)
  lam = lam.astype(_checks.compute_dtype(f, r))
  return jnp.where(lam < 1, (1 - lam) * f, 0.0) + jnp.where(lam > 0, lam * r, 0.0)


def refresh_due(step: Any, *, every: int, switch_step: int | None = None) -> Array:
  """True when the pass rates should be re-estimated at ``step``.

  Design choice (kdjax, [proposed]): every ``every`` steps (step 0 included; "once per
  epoch" is ``every = steps_per_epoch``) and at the stage switch of the two-stage schedule.
  """
  every = _checks.check_int("every", every, low=1)
  if switch_step is not None:
    switch_step = _checks.check_int("switch_step", switch_step, low=0)
  s = jnp.asarray(step)
  due = (s % every) == 0
  if switch_step is not None:
    due = due | (s == switch_step)
  return due


# ----------------------------------------------------------------------------- SNR theory


def snr_model(p: Array, *, c: float = 1.0, s: float = 1.0, sigma0: float = 0.05,
              k: int = 8) -> tuple[Array, Array, Array]:
  r"""The [proposed] gradient model of ``theory/paced.md`` §6: returns (μ(p), σ²(p), SNR(p)).

  μ(p) = c p(1−p), σ²(p) = (1−p)³ (p + s²)/K + σ0², SNR = μ²/σ². Realised (c = 1) by averaging
  K rollouts, a correct one contributing (1−p) v, an incorrect one (1−p) s u with u uniform on
  the unit sphere, plus isotropic noise σ0 ζ.
  """
  k = _checks.check_int("k", k, low=1)
  _checks.check_positive("sigma0", sigma0)
  _checks.check_range("c", c)
  _checks.check_range("s", s)
  p = _checks.check_array("p", p, min_rank=0)
  _check_data("p", p, low=0.0, high=1.0)
  p = p.astype(_checks.compute_dtype(p))
  mu = c * p * (1 - p)
  sigma2 = (1 - p)**3 * (p + s**2) / k + sigma0**2
  return mu, sigma2, mu**2 / sigma2


def _snr_inputs(*, sigma2_low_open: bool = True, **arrays):
  out = {k: _checks.check_array(k, v, min_rank=0) for k, v in arrays.items()}
  _check_data("sigma2", out["sigma2"], low=0.0, low_open=sigma2_low_open)
  dtype = _checks.compute_dtype(*out.values())
  return tuple(v.astype(dtype) for v in out.values())


def snr_optimal_weight(mu: Array, sigma2: Array) -> Array:
  """w* = μ/σ² (Proposition B [proposed]): maximises the SNR of Σ_i w_i g_i along v.

  ``sigma2`` > 0 (concrete values are checked elementwise); float32 out for low-precision input.
  """
  mu, sigma2 = _snr_inputs(mu=mu, sigma2=sigma2)
  return mu / sigma2


def efficiency(w: Array, mu: Array, sigma2: Array, *, axis: int = -1) -> Array:
  r"""Eff(w) = (Σ w μ)² / (Σ w² σ² · Σ μ²/σ²) ∈ [0, 1] (Theorem 6′ [proposed]).

  Equal to 1 iff w ∝ μ/σ²; invariant under w ↦ c w. Reductions over ``axis`` (broadcasting).
  ``sigma2`` > 0 (concrete values are checked elementwise: σ² ≤ 0 is a ``ValueError``). A
  degenerate denominator (w = 0 or μ = 0) gives 0; a NaN input propagates.
  """
  w, mu, sigma2 = _snr_inputs(w=w, mu=mu, sigma2=sigma2)
  w, mu, sigma2 = jnp.broadcast_arrays(w, mu, sigma2)
  axis = _checks.normalize_axis(axis, max(w.ndim, 1))
  num = jnp.sum(w * mu, axis=axis)**2
  den = jnp.sum(w**2 * sigma2, axis=axis) * jnp.sum(mu**2 / sigma2, axis=axis)
  zero = den == 0
  return jnp.where(zero, 0.0, num / jnp.where(zero, 1.0, den))


def one_step_gain(w: Array, mu: Array, sigma2: Array) -> Array:
  r"""G(w) = w μ² − (w²/2)(μ² + σ²): expected one-step gain of a quadratic surrogate along v.

  Maximised at w° = μ²/(μ² + σ²); G(m w°)/G(w°) = 1 − (1 − m)² (Theorem 6′ pointwise
  [proposed]). ``sigma2`` ≥ 0 (checked elementwise when concrete).
  """
  w, mu, sigma2 = _snr_inputs(w=w, mu=mu, sigma2=sigma2, sigma2_low_open=False)
  return w * mu**2 - 0.5 * w**2 * (mu**2 + sigma2)


class BinnedSNR(NamedTuple):
  """Per-bin measured gradient SNR (see :func:`gradient_snr_by_bin`)."""
  centers: Array   # [nbins] bin centres in pass rate
  snr: Array       # [nbins] bias-corrected SNR (NaN where a bin has < 2 problems)
  signal: Array    # [nbins] bias-corrected |E g|² (or (E g·v)² with a direction)
  noise: Array     # [nbins] tr Cov g (unbiased sample estimate)
  counts: Array    # [nbins] problems per bin


def gradient_snr_by_bin(grads: Array, p: Array, *, bins: Any = 10,
                        direction: Array | None = None) -> BinnedSNR:
  r"""Cross-problem gradient SNR per pass-rate bin from per-problem gradients.

  Design choice (kdjax, [proposed]) — the empirical analogue of v3's bell curve: within a bin
  of n problems with gradients g_1..g_n (flattened), noise σ̂² = tr Ĉov(g) (unbiased) and signal
  ``|ḡ|² − σ̂²/n`` (bias-corrected: ``E|ḡ|² = |E g|² + tr Cov/n``); SNR = signal/σ̂². With
  ``direction`` v, the signal is ((ḡ·v̂)² − Var(g·v̂)/n) instead (the useful direction is
  known, e.g. the full-data gradient). Matches μ²/σ² of :func:`snr_model` in expectation.

  Args:
    grads: ``[N, ...]`` per-problem gradients (flattened to ``[N, D]``).
    p: ``[N]`` pass rates.
    bins: number of equal-width bins on [0, 1], or an increasing array of edges.
    direction: optional ``[D]`` useful direction.
  """
  g = _checks.check_array("grads", grads, min_rank=2)
  g = g.reshape(g.shape[0], -1)
  dtype = _checks.compute_dtype(g)
  g = g.astype(dtype)
  p = _checks.check_array("p", p, min_rank=1).astype(dtype)
  if p.shape != (g.shape[0],):
    raise ValueError(f"`p` must have shape ({g.shape[0]},), got {p.shape}.")
  if isinstance(bins, numbers.Integral) or isinstance(bins, (bool, np.bool_)):
    bins = _checks.check_int("bins", bins, low=1)
    edges = jnp.linspace(0.0, 1.0, bins + 1, dtype=dtype)
  else:
    edges = jnp.asarray(bins, dtype)
    if edges.ndim != 1 or edges.shape[0] < 2:
      raise ValueError("`bins` must be an int or a 1-D array of at least 2 edges.")
  nb = edges.shape[0] - 1
  idx = jnp.clip(jnp.searchsorted(edges, p, side="right") - 1, 0, nb - 1)
  onehot = jax.nn.one_hot(idx, nb, dtype=dtype)            # [N, nb]
  n = onehot.sum(0)
  safe_n = jnp.maximum(n, 1.0)
  mean = (onehot.T @ g) / safe_n[:, None]                   # [nb, D]
  sq = onehot.T @ jnp.sum(g**2, axis=1)                     # Σ |g|² per bin
  tr_cov = (sq - n * jnp.sum(mean**2, axis=1)) / jnp.maximum(n - 1, 1.0)
  if direction is None:
    signal = jnp.sum(mean**2, axis=1) - tr_cov / safe_n
  else:
    v = jnp.asarray(direction, dtype).reshape(-1)
    if v.shape[0] != g.shape[1]:
      raise ValueError(f"`direction` must have {g.shape[1]} entries, got {v.shape[0]}.")
    v = v / jnp.linalg.norm(v)
    proj = g @ v
    pm = (onehot.T @ proj) / safe_n
    pvar = (onehot.T @ proj**2 - n * pm**2) / jnp.maximum(n - 1, 1.0)
    signal = pm**2 - pvar / safe_n
  ok = n >= 2
  snr = jnp.where(ok & (tr_cov > 0), signal / jnp.where(tr_cov > 0, tr_cov, 1.0), jnp.nan)
  centers = 0.5 * (edges[1:] + edges[:-1])
  return BinnedSNR(centers, snr, jnp.where(ok, signal, jnp.nan), jnp.where(ok, tr_cov, jnp.nan),
                   n)
