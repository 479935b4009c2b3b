r"""On-policy and sequence-level distillation estimators, each with what its gradient estimates.

A language-model student π_θ samples (or is given) a response y = (y_1, …, y_L); the teacher r
scores every token. With the sampled-token log-ratio ℓ_t = log π_t(y_t) − log r_t(y_t):

* sequence-level reverse KL  K_R(θ) = KL(π_θ‖r) = E_{y∼π}[Σ_t ℓ_t];
* sequence-level forward KL  K_F(θ) = KL(r‖π_θ) = E_{y∼r}[Σ_t KL(r_t‖π_t)];
* its exact gradient splits as ∇K_R = g_0 + g_fut [proposed, derived]: g_0 = E_{y∼π}[Σ_t
  ∇_θ KL(π_t‖r_t)] with the prefixes held fixed (the **"γ = 0" / per-token** term) and g_fut =
  E_π[Σ_t ∇log π_t(y_t) V_{t+1}] (the **future-context** term: how the present token changes
  the contexts visited later). Every token-local loss drops g_fut. g_0^F = E_{y∼π}[Σ_t
  ∇KL(r_t‖π_t)] is the forward-KL analogue on student prefixes.

What each estimator here is unbiased for, on-policy (y ∼ π_θ, gradients through log π_θ only,
samples fixed); proved by exact enumeration in ``python -m theory --only onpolicy``
(theory/onpolicy.md):

=====================================================  =======================================
estimator                                              E[gradient]
=====================================================  =======================================
Σ k1 in the loss                                       0 (pure noise)
Σ k2 in the loss                                       g_0
Σ k3 in the loss                                       g_0^F (the *forward* KL, not the reverse)
Σ ρ·k3 in the loss (:func:`rho_k3`)                    g_0 (per sample identical to k2)
k1 as a reward, γ = 0 / γ = 1                          g_0 / ∇K_R (unbiased, sequence level)
k3 as a reward, γ = 0 / γ = 1                          g_0 − g_0^F / ∇K_R − g_0^F
k3 reward (γ = 1) + k3 loss                            ∇K_R
k2 as a reward                                         biased for both
full-vocabulary reverse KL on student prefixes         g_0 (Rao–Blackwellised: lower variance)
full-vocabulary forward KL / NLL on teacher samples    ∇K_F exactly
=====================================================  =======================================

Conventions: token arrays are ``[..., T]`` with the sequence on the **last** axis; logits
``[..., T, V]``; ``where`` is a boolean token mask broadcastable to ``[..., T]`` (False: prompt or
padding, value 0 and gradient 0). Nothing is reduced over tokens unless the name says so (reduce
with :mod:`kdjax.reductions`: per-sequence **sums** are what the identities above are stated for;
a per-batch token mean is a ratio estimator with O(1/B) bias for variable lengths). Rewards and
advantages are detached (``stop_gradient``); losses differentiate what their docstring says. A
token whose log-prob is ``-inf`` in an input drops out (value 0, gradient 0); NaN propagates.

Sampling utilities live where they already were (one implementation each): log-probs of
sampled tokens from logits, :func:`kdjax.policy.token_log_probs` (student and teacher alike);
sequence log-probs with a token mask, :func:`kdjax.preference.sequence_log_prob`
(``length_normalize=False`` for the sum); KV-cache sampling of a Flax model,
``experiments.decoding``. The full-vocabulary per-token objectives are :mod:`kdjax.divergences`
applied at every sampled prefix (``reverse_kl``, ``forward_kl``, ``generalized_jsd``,
``total_variation``; JSD and TV are unbiased for no sequence-level divergence).

Sources: Schulman, "Approximating KL divergence" (2020) for k1/k2/k3; GKD, arXiv:2306.13649;
MiniLLM, arXiv:2306.08543; DistiLLM-2, arXiv:2503.07067; the Thinking Machines on-policy
distillation recipe (tinker-cookbook); student top-k reverse KL, arXiv:2604.13016.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace as LS
from kdjax import divergences
from kdjax import policy
from kdjax import preference

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3")
GKD_SOURCES = ("data", "student", "teacher")

__all__ = [
    "KL_ESTIMATORS",
    "GKD_SOURCES",
    "kl_estimate",
    "discounted_returns",
    "importance_weights",
    "pg_surrogate",
    "rho_k3",
    "opd_advantages",
    "gkd_source",
    "student_topk",
    "student_topk_reverse_kl",
    "topk_renormalized_kl",
    "distillm2_chosen_kl",
    "distillm2_rejected_kl",
    "distillm2_loss",
    "distillm2_gap",
    "distillm2_alpha",
    "distillm2_beta",
]


# ----------------------------------------------------------------------------- helpers


def _tokens(name: str, x: Any, dtype=None) -> Array:
  a = _checks.check_array(name, x)
  _checks.check_no_posinf(name, x)
  return a if dtype is None else a.astype(dtype)


def _token_pair(*named):
  """Checked token log-prob arrays of one shape, in their compute dtype."""
  arrs = [_tokens(n, x) for n, x in named]
  for (n, _), a in zip(named[1:], arrs[1:]):
    _checks.check_same_shape(named[0][0], arrs[0], n, a)
  dtype = _checks.compute_dtype(*arrs)
  return [a.astype(dtype) for a in arrs]


def _keep(where, shape, *arrays) -> Array:
  """Tokens that take part: inside `where` and not -inf in any of `arrays`."""
  ok = jnp.ones(shape, bool)
  for a in arrays:
    ok = ok & LS.valid_entries(a)
  m = _checks.check_where(where, shape)
  return ok if m is None else ok & m


def _batch_param(name: str, value: Any, batch_shape: tuple[int, ...], dtype) -> Array:
  """A scalar or per-sequence hyper-parameter broadcast to `batch_shape` + a trailing 1."""
  return _checks.per_position(name, value, tuple(batch_shape), len(batch_shape), dtype)


# ----------------------------------------------------------------------------- k1 / k2 / k3


def kl_estimate(logp: Array, logp_ref: Array, *, kind: str = "k3",
                where: Array | None = None) -> Array:
  r"""Per-token estimators of KL(π‖r) from sampled-token log-probs (Schulman 2020) [paper].

  With ℓ = log π(y_t) − log r(y_t) (``logp − logp_ref``):

  .. math:: k_1 = \ell,\qquad k_2 = \tfrac12\ell^2,\qquad k_3 = e^{-\ell} - 1 + \ell \;(\ge 0).

  *Values* under y_t ∼ π_t: E k1 = E k3 = KL(π_t‖r_t); E k2 = ½E ℓ² (the KL to second order).
  *Gradients* (differentiable in both inputs; stop ``logp_ref`` yourself for a fixed teacher).
  On-policy, summed over tokens, as a **loss** [proposed, derived; verified by enumeration]:
  k1 → 0 in expectation (mean-zero noise, whatever the length); k2 → g_0 (the per-token reverse
  KL gradient); k3 → g_0^F (the *forward* KL on student prefixes). As a **reward** (wrap in
  ``stop_gradient`` and use :func:`discounted_returns` + :func:`pg_surrogate`): k1 gives g_0 at
  γ = 0 and the exact sequence-level ∇KL(π‖r) at γ = 1; k3 gives g_0 − g_0^F / ∇K_R − g_0^F;
  k2 is biased for both.

  Args:
    logp: ``[..., T]`` log π(y_t) of the sampled tokens (the student).
    logp_ref: ``[..., T]`` log r(y_t) (the teacher / reference), same shape.
    kind: ``"k1"``, ``"k2"`` or ``"k3"``.
    where: boolean token mask broadcastable to ``[..., T]``.

  Returns ``[..., T]``; 0 at masked tokens and at tokens with a ``-inf`` log-prob.
  """
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"`kind` must be one of {KL_ESTIMATORS}, got {kind!r}.")
  lp, lr = _token_pair(("logp", logp), ("logp_ref", logp_ref))
  ok = _keep(where, lp.shape, lp, lr)
  d = jnp.where(ok, lp, 0.0) - jnp.where(ok, lr, 0.0)
  if kind == "k1":
    k = d
  elif kind == "k2":
    k = 0.5 * d * d
  else:
    k = jnp.expm1(-d) + d
  return jnp.where(ok, k, 0.0)


# ----------------------------------------------------------------------------- returns / PG


def discounted_returns(x: Array, *, gamma: Any = 1.0, where: Array | None = None) -> Array:
  r"""G_t = Σ_{t' ≥ t} γ^{t'−t} x_{t'} over the last axis (the current token included).

  γ = 0 gives x itself (the per-token recipe), γ = 1 the reverse cumulative sum (the sequence-
  level return). Masked tokens contribute 0 and get 0, but still count as steps for the discount
  (as a mask multiplying x does, e.g. tinker-cookbook's ``discounted_future_sum_vectorized``)
  [paper]. ``gamma`` ∈ [0, 1], a scalar or one value per sequence (``[...]``). Linear in x: the
  gradient flows through x (detach x for a reward). A reverse ``lax.scan``: O(T), jit-friendly.
  """
  _checks.check_unit_interval("gamma", gamma)
  a = _tokens("x", x)
  a = a.astype(_checks.compute_dtype(a))
  m = _checks.check_where(where, a.shape)
  if m is not None:
    a = jnp.where(m, a, 0.0)
  g = _batch_param("gamma", gamma, a.shape[:-1], a.dtype)[..., 0]

  def step(carry, xt):
    out = xt + g * carry
    return out, out

  xs = jnp.moveaxis(a, -1, 0)
  _, ys = jax.lax.scan(step, jnp.zeros(a.shape[:-1], a.dtype), xs, reverse=True)
  out = jnp.moveaxis(ys, 0, -1)
  return out if m is None else jnp.where(m, out, 0.0)


def importance_weights(logp: Array, logp_sampler: Array, *, mode: str = "token",
                       where: Array | None = None) -> Array:
  r"""Detached importance weights for tokens sampled by μ (an older student, a tempered sampler).

  ``mode="token"``: ρ_t = π_θ(y_t)/μ(y_t). ``mode="prefix"``: w_t = Π_{s≤t} ρ_s (per-decision
  weights; masked tokens count as ρ = 1). [proposed, derived; verified by enumeration] With
  y ∼ μ, the per-decision estimator Σ_t ∇log π_t · Σ_{t'≥t} γ^{t'−t} w_{t'} k1_{t'} —
  ``advantages = -discounted_returns(w * k1, gamma=γ)`` in :func:`pg_surrogate` — is unbiased for
  the on-policy value (g_0 at γ = 0, ∇KL(π‖r) at γ = 1), because the (t, t') term depends on
  y_{≤t'} only. Per-token ratios alone (ρ_t A_t, Tinker's ``importance_sampling`` loss, PPO
  without the clip) are biased unless μ = π: the prefixes stay μ's.

  Returns ``[..., T]`` (1 at masked tokens for ``"token"``; a token with a ``-inf`` log-prob
  gets weight 0 and, for ``"prefix"``, zeroes the rest of its sequence).
  """
  if mode not in ("token", "prefix"):
    raise ValueError(f"`mode` must be 'token' or 'prefix', got {mode!r}.")
  lp, lm = _token_pair(("logp", logp), ("logp_sampler", logp_sampler))
  lp, lm = jax.lax.stop_gradient(lp), jax.lax.stop_gradient(lm)
  ok = _keep(None, lp.shape, lp, lm)
  m = _checks.check_where(where, lp.shape)
  log_rho = jnp.where(ok, lp, 0.0) - jnp.where(ok, lm, 0.0)
  if m is not None:
    log_rho = jnp.where(m, log_rho, 0.0)
    ok = ok | ~m
  if mode == "token":
    return jnp.where(ok, jnp.exp(log_rho), 0.0)
  dead = jnp.cumsum(~ok, axis=-1) > 0
  return jnp.where(dead, 0.0, jnp.exp(jnp.cumsum(log_rho, axis=-1)))


def pg_surrogate(logp: Array, advantages: Array, *, logp_sampler: Array | None = None,
                 clip_eps: Any = None, where: Array | None = None) -> Array:
  r"""Per-token policy-gradient surrogate loss with a stop-gradient advantage.

  * ``logp_sampler=None`` (on-policy REINFORCE): ℓ_t = −log π_θ(y_t) · sg(A_t). Its gradient is
    −∇log π_t · A_t; its value is not meaningful.
  * with ``logp_sampler`` (log μ of the sampler): ℓ_t = −ρ_t · sg(A_t), ρ_t = π_θ(y_t)/sg(μ(y_t))
    (Tinker's ``importance_sampling`` loss [paper]); at μ = sg(π) the gradient equals REINFORCE's.
  * with ``clip_eps`` ε as well: the PPO clipped surrogate −min(ρA, clip(ρ, 1 ± ε)A)
    (:func:`kdjax.policy.trrd_loss` with π_mix = μ). Clipping is biased by design [proposed].

  To minimise a KL, the advantage is a negative cost: ``A = -discounted_returns(sg(k), γ)``
  (see :func:`kl_estimate`, :func:`opd_advantages`); what the gradient is unbiased for is then
  the k-as-reward row of the module table. ``advantages`` broadcast to the token shape.
  A token with a ``-inf`` log-prob drops out; ``where`` masks tokens.
  """
  if clip_eps is not None:
    if logp_sampler is None:
      raise ValueError("`clip_eps` needs `logp_sampler` (the ratio is π_θ / μ).")
    return policy.trrd_loss(logp, logp_sampler, advantages, clip_eps=clip_eps, where=where)
  named = [("logp", logp)] + ([] if logp_sampler is None else [("logp_sampler", logp_sampler)])
  arrs = _token_pair(*named)
  lp = arrs[0]
  adv = _checks.check_array("advantages", advantages, min_rank=0).astype(lp.dtype)
  try:
    adv = jax.lax.stop_gradient(jnp.broadcast_to(adv, lp.shape))
  except ValueError as e:
    raise ValueError(f"`advantages` must be broadcastable to the token shape {lp.shape}, got "
                     f"shape {adv.shape}.") from e
  ok = _keep(where, lp.shape, *arrs)
  lps = jnp.where(ok, lp, 0.0)
  if logp_sampler is None:
    out = -lps * adv
  else:
    lm = jax.lax.stop_gradient(jnp.where(ok, arrs[1], 0.0))
    out = -jnp.exp(lps - lm) * adv
  return jnp.where(ok, out, 0.0)


def rho_k3(logp: Array, logp_sampler: Array, logp_ref: Array, *,
           where: Array | None = None) -> Array:
  r"""ρ_t · k3_t with a differentiable ratio ρ_t = π_θ(y_t)/sg(μ(y_t)) (DeepSeek-V3.2, TRL #6503)
  [paper].

  For tokens sampled by μ, E_μ[ρ k3] = E_π[k3] = KL(π_t‖r_t) per position. [proposed, derived;
  verified by enumeration] On-policy (μ = sg π) its gradient equals k2's *per sample*
  (ℓ_t ∇log π_t), so summed over tokens it is unbiased for g_0 (the γ = 0 term) and never for
  the future-context term g_fut of the sequence-level reverse KL. Off-policy its expectation is
  the per-token reverse-KL gradient on μ's prefixes (biased for g_0 unless μ = π).
  Differentiable in ``logp`` (and ``logp_ref``); ``logp_sampler`` is detached.
  """
  lp, lm, lr = _token_pair(("logp", logp), ("logp_sampler", logp_sampler),
                           ("logp_ref", logp_ref))
  ok = _keep(where, lp.shape, lp, lm, lr)
  lps = jnp.where(ok, lp, 0.0)
  rho = jnp.exp(lps - jax.lax.stop_gradient(jnp.where(ok, lm, 0.0)))
  k3 = kl_estimate(lps, jnp.where(ok, lr, 0.0), kind="k3")
  return jnp.where(ok, rho * k3, 0.0)


def opd_advantages(logp_sampler: Array, logp_teacher: Array, *, coef: Any = 1.0,
                   discount: Any = 0.0, where: Array | None = None) -> Array:
  r"""The Thinking Machines on-policy distillation advantage (tinker-cookbook) [paper].

  A_t = −c · Σ_{k≥0} γ^k m_{t+k}(log μ(y_{t+k}) − log r(y_{t+k})) with the *sampler's* log-probs
  log μ, coefficient c = ``coef`` (1.0) and γ = ``discount`` (0.0), the current token included
  (``incorporate_kl_penalty``). Detached. Use with :func:`pg_surrogate` (``logp_sampler`` =
  log μ: the recipe's ``importance_sampling`` loss). [proposed, derived; verified by
  enumeration] On-policy this is k1 as a reward: unbiased for g_0 at γ = 0 and for the
  sequence-level ∇KL(π‖r) at γ = 1. With stale samples (several substeps per batch) it is biased
  twice: per-token ratios keep μ's prefixes, and log μ replaces log π in the advantage.
  """
  _checks.check_real("coef", coef)
  _checks.check_unit_interval("discount", discount)
  lm, lr = _token_pair(("logp_sampler", logp_sampler), ("logp_teacher", logp_teacher))
  lm, lr = jax.lax.stop_gradient(lm), jax.lax.stop_gradient(lr)
  k1 = kl_estimate(lm, lr, kind="k1", where=where)
  c = jnp.asarray(coef, k1.dtype)
  return -c * discounted_returns(k1, gamma=discount, where=where)


# ----------------------------------------------------------------------------- GKD


def gkd_source(key: Array, *, lam: Any = 0.5, seq_kd: bool = False) -> Array:
  r"""Which batch GKD trains on this step: an index into :data:`GKD_SOURCES`.

  TRL's ``GKDTrainer.training_step`` [paper]: with probability λ (once per step, for the whole
  batch) the student's own generations; otherwise the teacher's generations when ``seq_kd``,
  else the fixed dataset. λ = 0.5 and ``seq_kd=False`` are TRL's defaults. Returns an int32
  scalar: 0 = ``"data"``, 1 = ``"student"``, 2 = ``"teacher"``. A per-step Bernoulli draw makes
  the expected gradient the λ-mixture (1 − λ)∇J_D + λ g_0^{(D)} of GKD's objective
  (arXiv:2306.13649) [paper]; generate only the batch that is drawn (``int(source)`` outside
  ``jit``, or ``lax.switch`` inside).
  """
  _checks.check_unit_interval("lam", lam)
  if not isinstance(seq_kd, (bool, np.bool_)):
    raise TypeError(f"`seq_kd` must be a bool, got {seq_kd!r}.")
  u = jax.random.uniform(key, ())
  student = u < jnp.asarray(lam, u.dtype)
  other = 2 if seq_kd else 0
  return jnp.where(student, 1, other).astype(jnp.int32)


# ----------------------------------------------------------------------------- top-k


def student_topk(student_logits: Array, *, k: int, axis: int = -1) -> Array:
  """The student's top-k token ids ``[*batch, k]`` (detached; ties by lowest id), for the
  teacher to score (:func:`student_topk_reverse_kl`)."""
  z = _checks.check_array("student_logits", student_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  k = _checks.check_int("k", k, low=1, high=z.shape[ax])
  return jax.lax.top_k(jax.lax.stop_gradient(jnp.moveaxis(z, ax, -1)), k)[1].astype(jnp.int32)


def _sparse_inputs(student_logits, ids, log_probs, ids_name, lp_name, temperature, axis, where):
  """Student log-probs (vocab last), position mask, checked ids and the given log-probs."""
  from kdjax.losses import _sparse  # pylint: disable=import-outside-toplevel
  lq, batch_mask = _sparse._student(student_logits, temperature, axis, where)
  lp_np = _sparse._check_topk_log_probs(lp_name, log_probs)
  present = None if lp_np is None else (lp_np != -np.inf)
  ids = _sparse._check_ids(ids_name, ids, lq.shape[:-1], lq.shape[-1], present=present)
  lp = _checks.check_array(lp_name, log_probs).astype(lq.dtype)
  _checks.check_same_shape(ids_name, ids, lp_name, lp)
  return lq, batch_mask, ids, lp, _sparse


def student_topk_reverse_kl(student_logits: Array, teacher_log_probs: Array, ids: Array, *,
                            tail: bool = True, clamp: bool = False, temperature: Any = 1.0,
                            axis: int = -1, where: Array | None = None) -> Array:
  r"""Reverse KL restricted to the student's top-k ids S, with or without a tail bucket.

  ``tail=False`` [paper] (arXiv:2604.13016; verl ``reverse_kl_student_topk``):
  L_k = Σ_{v∈S} q_v log(q_v/p_v), the teacher's log-probs gathered at the student's ids and not
  renormalised. It is *not* a divergence: it can be negative, and its gradient can point away
  from the teacher (q = (0.6, 0.4), p = (0.9, 0.1), k = 1: L_1 = −0.2433, logit gradient
  (+0.1427, −0.1427), the full reverse KL's is (−0.4300, +0.4300)). ``clamp=True`` is verl's
  ``clamp_min(0)`` [paper]: max(L_k, 0), which removes the whole gradient wherever L_k < 0 — kept
  as a documented counter-example.

  ``tail=True`` (default) [proposed]: L_k + (1 − Q) log((1 − Q)/(1 − P)) with Q = Σ_S q, P = Σ_S p:
  the KL between the (k + 1)-category coarsenings, a true divergence with 0 ≤ · ≤ KL(q‖p) (data
  processing), equal at k ≥ V − 1. Gradients flow through the student's logits (including the
  ids' and the tail's); S itself is piecewise constant.

  Args:
    student_logits: ``[..., V]`` (temperature ``temperature`` applied).
    teacher_log_probs: ``[*batch, k]`` teacher log-probs (normalised over the full vocabulary) at
      ``ids``; P ≤ 1 is checked when concrete.
    ids: ``[*batch, k]`` distinct ids, usually :func:`student_topk`.
    where: boolean position mask (batch shape, or size 1 on the vocabulary axis).

  A teacher that puts all its mass on S while the student does not (1 − P = 0 < 1 − Q) makes the
  tail term +inf: the divergence is infinite (no NaN is created).
  """
  if not isinstance(tail, (bool, np.bool_)) or not isinstance(clamp, (bool, np.bool_)):
    raise TypeError(f"`tail` and `clamp` must be bools, got {tail!r}, {clamp!r}.")
  lq, batch_mask, ids, lp, sp = _sparse_inputs(student_logits, ids, teacher_log_probs, "ids",
                                               "teacher_log_probs", temperature, axis, where)
  lq_s = jnp.take_along_axis(lq, ids, axis=-1)
  val = LS.plogratio(lq_s, lp, -1)
  if tail:
    lq_tail = LS.masked_logsumexp(lq, axis=-1, where=~sp._in_set(ids, lq.shape[-1]))
    lp_tail = sp._log1mexp(jnp.minimum(LS.masked_logsumexp(lp, axis=-1), 0.0))
    val = val + LS.plogratio(lq_tail[..., None], lp_tail[..., None], -1)
  if clamp:
    val = jnp.maximum(val, 0.0)
  return sp._finish(val, lq, batch_mask, LS.row_nonempty(lq_s, -1))


def topk_renormalized_kl(student_logits: Array, topk_ids: Array, topk_log_probs: Array, *,
                         temperature: Any = 1.0, axis: int = -1,
                         where: Array | None = None) -> Array:
  r"""KL(p_S/P ‖ q_S/Q) over the teacher's top-k ids, *both* renormalised (Tunix's and MaxText's
  sparse distillation) [paper].

  It depends on the student only through z_S − logsumexp(z_S): the tail logits get exactly zero
  gradient and the student's tail mass 1 − Q is unconstrained (its bias vs the full KL is
  measured in theory/onpolicy.md). Prefer :func:`kdjax.losses.topk_tail_kl` (a true lower bound of
  the full KL). Arguments as in :func:`kdjax.losses.topk_tail_kl`; a row whose top-k values are
  all ``-inf`` (padding) gives 0 with zero gradient.
  """
  lq, batch_mask, ids, lp, sp = _sparse_inputs(student_logits, topk_ids, topk_log_probs,
                                               "topk_ids", "topk_log_probs", temperature, axis,
                                               where)
  # Renormalise the student's scaled *logits* over S (not its log-probs), so that the tail
  # logits are structurally absent from the graph: exactly zero gradient, not rounding error.
  from kdjax.losses import _common  # pylint: disable=import-outside-toplevel
  z = _checks.check_array("student_logits", student_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  vocab_mask, _ = _checks.split_where(where, z.shape, ax)
  temp = _common.temperature_array(temperature, z.shape, ax, lq.dtype)
  present = LS.valid_entries(z, vocab_mask)
  z = jnp.where(present, jnp.where(present, z.astype(lq.dtype), 0.0) / temp, -jnp.inf)
  z_s = jnp.take_along_axis(jnp.moveaxis(z, ax, -1), ids, axis=-1)
  lq_s = LS.masked_log_softmax(z_s, axis=-1)
  lp_s = LS.masked_log_softmax(lp, axis=-1)
  return sp._finish(LS.plogratio(lp_s, lq_s, -1), lq, batch_mask, LS.row_nonempty(lp, -1))


# ----------------------------------------------------------------------------- DistiLLM-2


def distillm2_chosen_kl(student_logits: Array, teacher_logits: Array, *, alpha: Any = 0.1,
                        temperature: Any = 1.0, axis: int = -1,
                        where: Array | None = None) -> Array:
  r"""DistiLLM-2's term on teacher responses: KL(p ‖ α p + (1 − α) q), the student not detached
  (``tea_pos_kl`` in the authors' code) [paper, arXiv:2503.07067].

  This is :func:`kdjax.skew_forward_kl` with skew α (per token; α may be per sequence or per
  position). Logit gradient −(1 − α) q ⊙ (w − ⟨q, w⟩), w = p/m.
  """
  _checks.check_unit_interval("alpha", alpha)
  return divergences.skew_forward_kl(student_logits, teacher_logits, skew=alpha,
                                     temperature=temperature, axis=axis, where=where)


def distillm2_rejected_kl(student_logits: Array, teacher_logits: Array, *, alpha: Any = 0.1,
                          temperature: Any = 1.0, axis: int = -1,
                          where: Array | None = None) -> Array:
  r"""DistiLLM-2's term on student responses: KL(q ‖ (1 − α) p + α sg(q)), the student
  **detached inside the mixture** (``ref_pos_kl``, ``vocab_logps.detach()``) [paper,
  arXiv:2503.07067].

  Same value as :func:`kdjax.skew_reverse_kl` (which does not detach), different gradient:
  q ⊙ (a − ⟨q, a⟩) with a = log(q/m). At p = (0.9, 0.1), q = (0.5, 0.5), α = 0.1: value 0.365321,
  logit gradient (−0.453822, +0.453822) (non-detached: (−0.379072, +0.379072)).
  """
  _checks.check_unit_interval("alpha", alpha)
  return divergences._skew_kl(student_logits, teacher_logits, alpha, temperature, axis, where,
                              reverse=True, detach_mixture=True)


def distillm2_loss(student_chosen_logits: Array, teacher_chosen_logits: Array,
                   student_rejected_logits: Array, teacher_rejected_logits: Array, *,
                   alpha_chosen: Any = 0.1, alpha_rejected: Any = 0.1, beta: Any = 1.0,
                   temperature: Any = 1.0, where_chosen: Array | None = None,
                   where_rejected: Array | None = None) -> Array:
  r"""DistiLLM-2's contrastive loss per sequence pair, exactly as the authors' code computes it
  [paper, arXiv:2503.07067, ``loss_type="distillm_v2"``]:

  .. math:: \mathcal L = (2-\beta)\,\overline{\mathrm{KL}(p\|\alpha_1p+(1-\alpha_1)q)}^{\,y^+}
            + \beta\,\overline{\mathrm{KL}(q\|(1-\alpha_2)p+\alpha_2\,\mathrm{sg}(q))}^{\,y^-},

  the bar a token mean per sequence (``average_log_prob=True``); y⁺ = the teacher's (chosen)
  response, y⁻ = the student's (rejected). The released code runs with fixed α₁ = α₂ = 0.1 and
  β = 1 (``update_alpha``/``gradual_beta`` are hard-coded False; with them on, a stored-metrics
  lookup fails and a bare ``except`` falls back to α = 0.1): these defaults reproduce it. For the
  adaptive modes pass :func:`distillm2_alpha` / :func:`distillm2_beta`. The batch mean is left to
  the caller (:mod:`kdjax.reductions`).

  Args:
    student_chosen_logits, teacher_chosen_logits: ``[B, T, V]`` on the chosen responses.
    student_rejected_logits, teacher_rejected_logits: ``[B, T', V]`` on the rejected ones.
    alpha_chosen, alpha_rejected: α ∈ [0, 1], scalars or ``[B]``.
    beta: β ∈ [0, 2], a scalar or ``[B]``.
    where_chosen, where_rejected: boolean token masks ``[B, T]`` / ``[B, T']`` (response tokens).

  Returns ``[B]``; a sequence without response tokens contributes 0 for that half.
  """
  _checks.check_range("beta", beta, low=0.0, high=2.0)
  chosen = distillm2_chosen_kl(student_chosen_logits, teacher_chosen_logits,
                               alpha=_seq_param("alpha_chosen", alpha_chosen,
                                                student_chosen_logits),
                               temperature=temperature, where=where_chosen)
  rejected = distillm2_rejected_kl(student_rejected_logits, teacher_rejected_logits,
                                   alpha=_seq_param("alpha_rejected", alpha_rejected,
                                                    student_rejected_logits),
                                   temperature=temperature, where=where_rejected)
  if chosen.shape[:-1] != rejected.shape[:-1]:
    raise ValueError(f"the chosen and rejected batches must have one batch shape, got "
                     f"{chosen.shape[:-1]} and {rejected.shape[:-1]}.")
  c = _token_mean(chosen, where_chosen)
  r = _token_mean(rejected, where_rejected)
  b = jnp.broadcast_to(jnp.asarray(beta, c.dtype), c.shape)
  return (2.0 - b) * c + b * r


def _seq_param(name: str, value: Any, logits: Any) -> Array:
  """A scalar or per-sequence α as a per-position array ``[B, T]`` (checked in [0, 1])."""
  _checks.check_unit_interval(name, value)
  shape = jnp.shape(logits)
  if len(shape) < 2:
    raise ValueError(f"DistiLLM-2 logits must be [..., T, V], got shape {shape}.")
  v = jnp.asarray(value)
  if v.ndim == 0:
    return v
  try:
    return jnp.broadcast_to(v[..., None], shape[:-1])
  except ValueError as e:
    raise ValueError(f"`{name}` must be a scalar or one value per sequence {shape[:-2]}, got "
                     f"shape {v.shape}.") from e


def _token_mean(values: Array, where) -> Array:
  m = jnp.ones(values.shape, bool) if where is None else _checks.check_where(where, values.shape)
  n = jnp.sum(m, axis=-1)
  s = jnp.sum(jnp.where(m, values, 0.0), axis=-1)
  return jnp.where(n > 0, s / jnp.maximum(n, 1).astype(values.dtype), 0.0)


def distillm2_gap(token_log_probs_a: Array, token_log_probs_b: Array, *,
                  where: Array | None = None) -> Array:
  r"""exp(mean_t log a(y_t)) − exp(mean_t log b(y_t)) per sequence (DistiLLM-2's likelihood gap)
  [paper].

  The chosen gap is ``distillm2_gap(teacher, student)`` on y⁺, the rejected gap
  ``distillm2_gap(student, teacher)`` on y⁻ (sampled-token log-probs ``[..., T]``, token mask
  ``where``). Detached. Returns ``[...]``.
  """
  a, b = _token_pair(("token_log_probs_a", token_log_probs_a),
                     ("token_log_probs_b", token_log_probs_b))
  a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
  return (jnp.exp(preference.sequence_log_prob(a, where=where))
          - jnp.exp(preference.sequence_log_prob(b, where=where)))


def distillm2_alpha(gap: Array, gap0: Any, *, base: Any = 0.1) -> Array:
  r"""DistiLLM-2's adaptive skew α = clip(1 − (1 − α_b) gap₀/(gap + 1e-5), 0.01, α_b) [paper].

  ``gap0`` is the anchor (meant to be the batch-mean gap at the first logging step; explicit
  here), ``base`` = α_b = 0.1. As written it is close to a step function: α_b for gap ≥ gap₀
  and for gap < 0, 0.01 for gap ≤ 0.909 gap₀. The released code never reaches this (see
  :func:`distillm2_loss`). Detached.
  """
  _checks.check_range("base", base, low=0.01, high=1.0)
  _checks.check_real("gap0", gap0)
  g = jax.lax.stop_gradient(_checks.check_array("gap", gap, min_rank=0))
  g = g.astype(_checks.compute_dtype(g))
  a = 1.0 - (1.0 - jnp.asarray(base, g.dtype)) * jnp.asarray(gap0, g.dtype) / (g + 1e-5)
  return jnp.clip(a, 0.01, jnp.asarray(base, g.dtype))


def distillm2_beta(step: Any, total_steps: Any, *, gradual: bool = False) -> Array:
  r"""DistiLLM-2's β: 1 + 0.5 min(1, 2 step/total) with ``gradual`` (1 → 1.5 over the first half
  of training), else 1 (the released code) [paper]. ``step`` may be traced."""
  if not isinstance(gradual, (bool, np.bool_)):
    raise TypeError(f"`gradual` must be a bool, got {gradual!r}.")
  _checks.check_nonneg("step", step)
  _checks.check_positive("total_steps", total_steps)
  s = jnp.asarray(step)
  s = s.astype(_checks.compute_dtype(s))        # float32, float64 kept
  if not gradual:
    return jnp.ones_like(s)
  return 1.0 + 0.5 * jnp.minimum(1.0, 2.0 * s / jnp.asarray(total_steps, s.dtype))
