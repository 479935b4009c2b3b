r"""RL-style distillation objectives on student samples: MiniLLM, TRRD, G-OPD/ExOPD, AlignDistil.

Conventions: ``*_logits`` are ``[..., V]`` per position of a sampled sequence; ``*_log_probs`` at
sampled tokens are ``[...]`` (already gathered); ``where`` is a boolean position mask (padding,
prompt) broadcastable to the per-position output (for the logits functions also ``[..., 1]``).
Nothing is reduced: reduce with :mod:`kdjax.reductions`. Teachers/references are not
stop-gradiented here (wrap them yourself if they are being trained).

Token ids outside ``[0, V)`` raise when concrete; traced ones are dropped (value 0, gradient 0).
A token whose log-prob is −inf in one of the inputs of a reward or ratio drops out the same way;
NaN is never treated as missing (it propagates). Array hyper-parameters are checked elementwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace
from kdjax.divergences import reverse_kl

Array = jax.Array

__all__ = [
    "token_log_probs",
    "minillm_token_reverse_kl",
    "teacher_mixed_log_probs",
    "teacher_mixed_importance_weights",
    "minillm_long_term_rewards",
    "group_relative_advantages",
    "trrd_mix_log_probs",
    "trrd_loss",
    "gopd_token_rewards",
    "gopd_objective",
    "gopd_optimal_logits",
    "aligndistil_teacher_logits",
]


def _mask(values: Array, where) -> Array:
  """values where the boolean position mask `where` (broadcastable to values) is True, else 0."""
  m = _checks.check_where(where, values.shape)
  return values if m is None else jnp.where(m, values, 0.0)


def _position_where(where, shape, ax):
  """A boolean position mask for logits of `shape` (class axis `ax`): ``[...]`` or ``[..., 1]``
  broadcastable; returned with the batch shape (None when `where` is None)."""
  cand, batch = _checks.split_where(where, tuple(shape), ax)
  if cand is not None:
    raise ValueError(f"`where` must be a position mask (the logits shape without the class "
                     f"axis, or size 1 along it), got shape {jnp.shape(where)}.")
  return batch


def _scaled_log_softmax(z: Array, temp: Array, ax: int) -> Array:
  """log softmax(z / T) with -inf entries kept out of the division (finite gradient in T)."""
  valid = _logspace.valid_entries(z)
  zs = jnp.where(valid, jnp.where(valid, z, 0.0) / temp, -jnp.inf)
  return _logspace.masked_log_softmax(zs, axis=ax)


def _gather(lp: Array, tokens: Array, ax: int) -> tuple[Array, Array]:
  """(log-prob at each token, valid id mask); invalid ids give 0 (checked when concrete)."""
  safe, valid = _checks.check_labels("tokens", tokens, lp.shape[ax])
  batch = lp.shape[:ax] + lp.shape[ax + 1:]
  if safe.shape != batch:
    raise ValueError(f"`tokens` must have the batch shape {batch}, got {safe.shape}.")
  g = jnp.take_along_axis(lp, jnp.expand_dims(safe, ax), axis=ax).squeeze(ax)
  return jnp.where(valid, g, 0.0), valid


def token_log_probs(logits: Array, tokens: Array, *, temperature: Any = 1.0,
                    axis: int = -1) -> Array:
  """log softmax(z / T) at the sampled ``tokens`` (batch shape); NaN-free for -inf logits.

  T > 0 is a scalar or one value per position. Concrete ids outside ``[0, V)`` raise a
  ``ValueError``; traced ones give 0 with gradient 0 (dropped).
  """
  z = _checks.check_array("logits", logits)
  _checks.check_no_posinf("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("temperature", temperature)
  dtype = _checks.compute_dtype(z)
  batch = z.shape[:ax] + z.shape[ax + 1:]
  temp = _checks.per_position("temperature", temperature, batch, ax, dtype)
  lp = _scaled_log_softmax(z.astype(dtype), temp, ax)
  return _gather(lp, tokens, ax)[0]


# ----------------------------------------------------------------------------- MiniLLM


def minillm_token_reverse_kl(student_logits: Array, teacher_logits: Array, *,
                             sampling_weights: Array | None = None, temperature: float = 1.0,
                             axis: int = -1, where: Array | None = None) -> Array:
  r"""MiniLLM's single-step term: the exact token-level reverse KL on student prefixes.

  .. math:: \ell_t = w_t\,\mathrm{KL}\big(q_\theta(\cdot|y_{<t})\,\|\,p(\cdot|y_{<t})\big)

  at every position of a sequence y sampled from the student (or from the teacher-mixed
  distribution, then with w_t = the importance weight from
  :func:`teacher_mixed_importance_weights`). Summed over t and averaged over y ~ q, it equals the
  sequence-level KL(q(y) ‖ p(y)) (chain rule; theory check ``zoo.minillm_chain_rule``).
  Gradient in z_S: w_t q ⊙ (log q − log p − KL)/T.

  Reference: Gu et al., MiniLLM, arXiv:2306.08543 [paper] (``_reg_loss`` in microsoft/LMOps);
  this primitive without the policy-gradient wrapper is a design choice (kdjax) [proposed].
  """
  kl = reverse_kl(student_logits, teacher_logits, temperature=temperature, axis=axis,
                  where=where)
  if sampling_weights is not None:
    _checks.check_array("sampling_weights", sampling_weights, min_rank=0)
    arr = _checks.concrete_array(sampling_weights)
    if arr is not None and np.any(arr < 0):
      raise ValueError("`sampling_weights` are importance weights and must be >= 0, got a "
                       f"minimum of {np.nanmin(arr):.4g}.")
    w = jax.lax.stop_gradient(jnp.asarray(sampling_weights, kl.dtype))
    try:
      ok = jnp.broadcast_shapes(w.shape, kl.shape) == kl.shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"`sampling_weights` must be broadcastable to the per-position shape "
                       f"{kl.shape}, got shape {w.shape}.")
    kl = jnp.where(w != 0, w * kl, 0.0)
  return kl


def _mixed(student_logits, teacher_logits, alpha, temperature, axis):
  _checks.check_unit_interval("alpha", alpha)
  _checks.check_positive("temperature", temperature)
  s, t, ax, dtype = _checks.check_logits_pair(student_logits, teacher_logits, axis)
  batch = s.shape[:ax] + s.shape[ax + 1:]
  temp = _checks.per_position("temperature", temperature, batch, ax, dtype)
  a = _checks.per_position("alpha", alpha, batch, ax, dtype)
  lq = jax.lax.stop_gradient(_scaled_log_softmax(s.astype(dtype), temp, ax))
  lp = jax.lax.stop_gradient(_scaled_log_softmax(t.astype(dtype), temp, ax))
  return _logspace.log_mixture(a, lp, lq), lq, ax


def teacher_mixed_log_probs(student_logits: Array, teacher_logits: Array, *,
                            alpha: Any = 0.2, temperature: Any = 1.0,
                            axis: int = -1) -> Array:
  r"""log p̃ = log(α p + (1 − α) q_θ): MiniLLM's teacher-mixed sampling distribution [paper,
  arXiv:2306.08543].

  α = 0.2 [paper] (here α is the teacher's share of the mixture), in [0, 1]; T > 0. Both may
  be scalars or one value per position (every entry is checked when concrete). Sample the next
  token from this distribution; both terms are detached (sampling is not differentiated).
  """
  return _mixed(student_logits, teacher_logits, alpha, temperature, axis)[0]


def teacher_mixed_importance_weights(student_logits: Array, teacher_logits: Array,
                                     tokens: Array, *, alpha: Any = 0.2,
                                     temperature: Any = 1.0, axis: int = -1,
                                     where: Array | None = None) -> Array:
  r"""Importance weights q_θ(y_t)/p̃(y_t) for tokens drawn from p̃ = α p + (1 − α) q_θ [paper].

  E_{y∼p̃}[q_θ(y)/p̃(y)] = 1 (theory check ``zoo.minillm_importance_weights``); the weights
  are ≤ 1/(1 − α). Detached. Concrete ``tokens`` outside ``[0, V)`` raise; traced ones get
  weight 0. ``where``: a boolean position mask. Reference: Gu et al., arXiv:2306.08543 [paper].
  """
  lmix, lq, ax = _mixed(student_logits, teacher_logits, alpha, temperature, axis)
  pos = _position_where(where, lmix.shape, ax)
  lq_y, valid = _gather(lq, tokens, ax)
  lmix_y, _ = _gather(lmix, tokens, ax)
  ok = valid & _logspace.valid_entries(lmix_y) & _logspace.valid_entries(lq_y)
  w = jnp.where(ok, jnp.exp(jnp.where(ok, lq_y - lmix_y, 0.0)), 0.0)
  return w if pos is None else jnp.where(pos, w, 0.0)


def minillm_long_term_rewards(student_token_log_probs: Array, teacher_token_log_probs: Array,
                              *, where: Array | None = None, normalize: bool = True) -> Array:
  r"""MiniLLM's long-term reward R_t = (1/N_t) Σ_{t'≥t} [log p(y_t') − log q_θ(y_t')] [paper].

  Over the sequence axis (last); N_t = number of remaining unmasked tokens when ``normalize``
  (the normaliser is a design choice (kdjax) [proposed]). Detached (a reward).
  """
  lq = jax.lax.stop_gradient(_checks.check_array("student_token_log_probs",
                                                 student_token_log_probs))
  lp = jax.lax.stop_gradient(_checks.check_array("teacher_token_log_probs",
                                                 teacher_token_log_probs))
  _checks.check_same_shape("student_token_log_probs", lq, "teacher_token_log_probs", lp)
  dtype = _checks.compute_dtype(lq, lp)
  lq, lp = lq.astype(dtype), lp.astype(dtype)
  keep = _checks.check_where(where, lq.shape)
  if keep is None:
    keep = jnp.ones(lq.shape, bool)
  from kdjax.losses.onpolicy import discounted_returns  # pylint: disable=import-outside-toplevel
  r = jnp.where(keep, lp - jnp.where(keep, lq, 0.0), 0.0)
  tail = discounted_returns(r, gamma=1.0, where=keep)
  if not normalize:
    return jnp.where(keep, tail, 0.0)
  n = jnp.flip(jnp.cumsum(jnp.flip(keep.astype(r.dtype), -1), -1), -1)
  return jnp.where(keep, tail / jnp.maximum(n, 1.0), 0.0)


# ----------------------------------------------------------------------------- TRRD / GRPO


def group_relative_advantages(rewards: Array, *, ddof: int = 0, eps: Any = 1e-6,
                              where: Array | None = None) -> Array:
  r"""Group-normalised advantages A_i = (r_i − mean r)/(std r + ε) over the last axis (the group).

  GRPO (Shao et al., arXiv:2402.03300) [paper]; the one advantage function of kdjax
  (:func:`kdjax.preference.group_zscore` is this with ``ddof=1``, the ADPO author's code).

  Args:
    rewards: ``[..., G]`` rewards of the G samples of each group.
    ddof: 0 for the population std (GRPO), 1 for the Bessel-corrected std.
    eps: ε ≥ 0 added to the std. A constant group (std 0) gives A = 0, also at ε = 0; so does a
      group with no more than ``ddof`` valid samples.
    where: boolean mask, candidate-shaped (False removes a sample from its group's mean and
      std; its advantage is 0) or group-shaped (``[...]`` or ``[..., 1]``: the whole group gets 0).

  Returns:
    ``[..., G]`` advantages. NaN rewards propagate to their group. Nothing is reduced.
  """
  ddof = _checks.check_int("ddof", ddof, low=0)
  _checks.check_nonneg("eps", eps)
  r = _checks.check_array("rewards", rewards)
  r = r.astype(_checks.compute_dtype(r))
  cand, batch = _checks.split_where(where, r.shape, r.ndim - 1)
  if cand is None:
    cand = jnp.ones(r.shape, bool)
  n = jnp.sum(cand, axis=-1, keepdims=True).astype(r.dtype)
  mean = jnp.sum(jnp.where(cand, r, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1)
  dev = jnp.where(cand, r - mean, 0.0)
  var = jnp.sum(dev**2, axis=-1, keepdims=True) / jnp.maximum(n - ddof, 1)
  var = jnp.where(n > ddof, var, 0.0 * var)
  std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0 * var)
  denom = std + jnp.asarray(eps, r.dtype)
  a = jnp.where(denom > 0, dev / jnp.where(denom > 0, denom, 1.0), 0.0 * dev)
  a = jnp.where(cand, a, 0.0)
  if batch is not None:
    a = jnp.where(batch[..., None], a, 0.0)
  return a


def trrd_mix_log_probs(teacher_log_probs: Array, old_log_probs: Array, *, lam: Any = 0.5,
                       normalize: bool = False, axis: int = -1) -> Array:
  r"""log π_mix = λ log π_T + (1 − λ) log π_old (token level) [proposed].

  λ ∈ [0, 1] (scalar or broadcastable array, every entry checked when concrete). With
  ``normalize=True`` (full-vocabulary inputs ``[..., V]``) the geometric mixture is renormalised
  over ``axis`` so that π_mix sums to 1. NaN inputs propagate.
  """
  _checks.check_unit_interval("lam", lam)
  lt = _checks.check_array("teacher_log_probs", teacher_log_probs, min_rank=0)
  lo = _checks.check_array("old_log_probs", old_log_probs, min_rank=0)
  _checks.check_same_shape("teacher_log_probs", lt, "old_log_probs", lo)
  dtype = _checks.compute_dtype(lt, lo)
  lt, lo = lt.astype(dtype), lo.astype(dtype)
  lmb = jnp.asarray(lam, dtype)
  ft, fo = _logspace.valid_entries(lt), _logspace.valid_entries(lo)
  mix = jnp.where(lmb > 0, lmb * jnp.where(ft, lt, 0.0), 0.0) + jnp.where(
      lmb < 1, (1 - lmb) * jnp.where(fo, lo, 0.0), 0.0)
  mix = jnp.where((~ft & (lmb > 0)) | (~fo & (lmb < 1)), -jnp.inf, mix)
  if normalize:
    mix = _logspace.masked_log_softmax(mix, axis=_checks.normalize_axis(axis, mix.ndim))
  return mix


def trrd_loss(student_log_probs: Array, mix_log_probs: Array, advantages: Array, *,
              clip_eps: Any = 0.2, max_log_ratio: Any = 10.0,
              where: Array | None = None) -> Array:
  r"""Trust-region ratio distillation (TRRD), per token — the [proposed] instantiation.

  .. math:: \rho_t = \pi_\theta(y_t)/\pi_{\rm mix}(y_t),\qquad
            \ell_t = -\min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)A_t\big),

  with log π_mix from :func:`trrd_mix_log_probs` (λ = 0 gives π_old: the GRPO/PPO clipped
  surrogate) and group-relative advantages A (:func:`group_relative_advantages`).
  Zhang et al., RLAD, arXiv:2602.22495 [paper] describe a ratio objective anchored to a
  teacher–old-policy mixture, advantage-aware and trust-region bounded; the exact formula is
  not published, so this form is a design choice (kdjax) [proposed].

  Args:
    student_log_probs: log π_θ at the sampled tokens (differentiated).
    mix_log_probs: log π_mix at the same tokens (detached here).
    advantages: A_t, broadcastable to the token shape (detached).
    clip_eps: ε > 0 (0.2 by default).
    max_log_ratio: the log-ratio log ρ is clamped to at most this value (10 by default, ρ ≤
      e^10 ≈ 2.2e4) so that the loss and its gradient stay finite when π_mix(y_t) ≈ 0 [proposed];
      beyond the clamp the token's gradient is 0. Only the A < 0 branch ever reaches it (for
      A > 0 the clipped term is active from ρ = 1 + ε on).
    where: optional boolean token mask.

  A token with log π_θ or log π_mix = −inf drops out (value 0, gradient 0).
  """
  _checks.check_positive("clip_eps", clip_eps)
  _checks.check_positive("max_log_ratio", max_log_ratio)
  lp = _checks.check_array("student_log_probs", student_log_probs, min_rank=0)
  dtype = _checks.compute_dtype(lp)
  lp = lp.astype(dtype)
  lmix = jax.lax.stop_gradient(
      _checks.check_array("mix_log_probs", mix_log_probs, min_rank=0).astype(dtype))
  _checks.check_same_shape("student_log_probs", lp, "mix_log_probs", lmix)
  adv = _checks.check_array("advantages", advantages, min_rank=0).astype(dtype)
  try:
    adv = jax.lax.stop_gradient(jnp.broadcast_to(adv, lp.shape))
  except ValueError as e:
    raise ValueError(f"`advantages` must be broadcastable to the token shape {lp.shape}, got "
                     f"shape {adv.shape}.") from e
  ok = _logspace.valid_entries(lp) & _logspace.valid_entries(lmix)
  m = _checks.check_where(where, lp.shape)
  if m is not None:
    ok = ok & m
  log_ratio = jnp.where(ok, lp, 0.0) - jnp.where(ok, lmix, 0.0)
  log_ratio = jnp.minimum(log_ratio, jnp.asarray(max_log_ratio, dtype))
  ratio = jnp.exp(log_ratio)
  eps = jnp.asarray(clip_eps, dtype)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1 - eps, 1 + eps) * adv
  return jnp.where(ok, -jnp.minimum(unclipped, clipped), 0.0)


# ----------------------------------------------------------------------------- G-OPD / ExOPD


def gopd_token_rewards(student_token_log_probs: Array, teacher_token_log_probs: Array,
                       ref_token_log_probs: Array, *, lam: Any = 1.0,
                       where: Array | None = None) -> Array:
  r"""G-OPD token reward r_t = λ(log π*(y_t) − log π_ref(y_t)) − sg(log π_θ(y_t) − log π_ref(y_t)).

  λ = 1 is on-policy distillation (r_t = log π* − log π_θ, the reverse-KL reward), 0 < λ < 1
  interpolates, λ > 1 extrapolates beyond the teacher (ExOPD). Reward correction uses π_ref =
  the teacher's pre-RL base model. Reference: Yang et al., *Learning beyond Teacher*,
  arXiv:2602.12125 [paper] (objective); this token-level form with the last term under
  stop-gradient is a design choice (kdjax) [proposed]. λ ≥ 0. A token with a −inf log-prob
  in any input gets reward 0 (dropped); NaN propagates.
  """
  _checks.check_nonneg("lam", lam)
  ls = jax.lax.stop_gradient(_checks.check_array("student_token_log_probs",
                                                 student_token_log_probs, min_rank=0))
  lt = _checks.check_array("teacher_token_log_probs", teacher_token_log_probs, min_rank=0)
  lr = _checks.check_array("ref_token_log_probs", ref_token_log_probs, min_rank=0)
  _checks.check_same_shape("student_token_log_probs", ls, "teacher_token_log_probs", lt)
  _checks.check_same_shape("student_token_log_probs", ls, "ref_token_log_probs", lr)
  dtype = _checks.compute_dtype(ls, lt, lr)
  ls, lt, lr = ls.astype(dtype), lt.astype(dtype), lr.astype(dtype)
  ok = _logspace.valid_entries(ls) & _logspace.valid_entries(lt) & _logspace.valid_entries(lr)
  ls, lt, lr = (jnp.where(ok, x, 0.0) for x in (ls, lt, lr))
  r = jnp.where(ok, jnp.asarray(lam, dtype) * (lt - lr) - (ls - lr), 0.0)
  return _mask(jax.lax.stop_gradient(r), where)


def gopd_objective(student_logits: Array, teacher_logits: Array, ref_logits: Array, *,
                   lam: Any = 1.0, axis: int = -1, where: Array | None = None) -> Array:
  r"""Exact per-position G-OPD objective on a finite support (to be *maximised*):

  .. math:: J = \mathbb E_{y\sim\pi_\theta}\Big[\lambda\log\frac{\pi^*(y)}{\pi_{\rm ref}(y)}\Big]
            - \mathrm{KL}(\pi_\theta\|\pi_{\rm ref}).

  At λ = 1, J = −KL(π_θ ‖ π*) for every π_ref; the maximiser is
  π ∝ π_ref (π*/π_ref)^λ (:func:`gopd_optimal_logits`) [proposed, derived].
  Reference: Yang et al., arXiv:2602.12125 [paper]. λ ≥ 0; ``where`` a position mask.
  """
  _checks.check_nonneg("lam", lam)
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  r = _checks.check_array("ref_logits", ref_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  _checks.check_same_shape("student_logits", s, "ref_logits", r)
  for n, x in (("student_logits", s), ("teacher_logits", t), ("ref_logits", r)):
    _checks.check_no_posinf(n, x)
  ax = _checks.normalize_axis(axis, s.ndim)
  dtype = _checks.compute_dtype(s, t, r)
  pos = _position_where(where, s.shape, ax)
  ls, lt, lr = (_logspace.masked_log_softmax(x.astype(dtype), axis=ax) for x in (s, t, r))
  q_pos = _logspace.valid_entries(ls)
  ok = q_pos & _logspace.valid_entries(lt) & _logspace.valid_entries(lr)
  lmb = jnp.asarray(lam, dtype)
  gain = jnp.sum(jnp.where(ok, jnp.exp(jnp.where(ok, ls, 0.0)) * lmb * (
      jnp.where(ok, lt, 0.0) - jnp.where(ok, lr, 0.0)), 0.0), axis=ax)
  # A student token outside the teacher's support gives J = -inf (λ > 0).
  outside = jnp.any(q_pos & ~ok, axis=ax)
  out = jnp.where(outside, -jnp.inf, gain - _logspace.plogratio(ls, lr, ax))
  return out if pos is None else jnp.where(pos, out, 0.0)


def gopd_optimal_logits(teacher_logits: Array, ref_logits: Array, *, lam: Any = 1.0,
                        axis: int = -1) -> Array:
  r"""Logits of the G-OPD optimum π ∝ π_ref (π*/π_ref)^λ: log π_ref + λ(log π* − log π_ref)
  [proposed, derived]. λ ≥ 0."""
  _checks.check_nonneg("lam", lam)
  t = _checks.check_array("teacher_logits", teacher_logits)
  r = _checks.check_array("ref_logits", ref_logits)
  _checks.check_same_shape("teacher_logits", t, "ref_logits", r)
  _checks.check_no_posinf("teacher_logits", t)
  _checks.check_no_posinf("ref_logits", r)
  ax = _checks.normalize_axis(axis, t.ndim)
  dtype = _checks.compute_dtype(t, r)
  lt = _logspace.masked_log_softmax(t.astype(dtype), axis=ax)
  lr = _logspace.masked_log_softmax(r.astype(dtype), axis=ax)
  return _extrapolate(lr, lt, lam)


def _extrapolate(base, target, lam):
  """base + λ (target − base) with -inf kept where either side has no support."""
  ok = _logspace.valid_entries(base) & _logspace.valid_entries(target)
  b = jnp.where(ok, base, 0.0)
  t = jnp.where(ok, target, 0.0)
  return jnp.where(ok, b + jnp.asarray(lam, base.dtype) * (t - b), -jnp.inf)


# ----------------------------------------------------------------------------- AlignDistil


def aligndistil_teacher_logits(dpo_logits: Array, ref_logits: Array, *, alpha: Any = 1.0,
                               reverse_dpo_logits: Array | None = None,
                               axis: int = -1) -> Array:
  r"""AlignDistil's combined-logit teacher z* = (1 − α) z_ref + α z_dpo (up to a constant).

  softmax(z*) ∝ π_ref^{1−α} π_dpo^{α}: α = 0 is the reference, α = 1 the DPO model, α > 1
  extrapolates. ``alpha`` may be an array broadcastable to the batch shape (a per-token α_t from
  any rule; the paper's token-adaptive rule is not published). With ``reverse_dpo_logits``
  (the contrastive variant) z* = z_ref + α (z_dpo − z_rev) [proposed].

  Reference: Zhang et al., AlignDistil, arXiv:2503.02832 [paper] (RLHF with the DPO reward
  β₀ log(π_dpo/π_ref) equals token-level distillation to this teacher); α = β₀/β from the
  KL-regularised optimum is [proposed, derived]. Computed on log-softmaxed inputs so the
  result is shift-free; returns log-probabilities of the (normalised) teacher.
  """
  d = _checks.check_array("dpo_logits", dpo_logits)
  r = _checks.check_array("ref_logits", ref_logits)
  _checks.check_same_shape("dpo_logits", d, "ref_logits", r)
  ax = _checks.normalize_axis(axis, d.ndim)
  dtype = _checks.compute_dtype(d, r)
  _checks.check_range("alpha", alpha)
  a = _checks.per_position("alpha", alpha, d.shape[:ax] + d.shape[ax + 1:], ax, dtype)
  ld = _logspace.masked_log_softmax(d.astype(dtype), axis=ax)
  lr = _logspace.masked_log_softmax(r.astype(dtype), axis=ax)
  if reverse_dpo_logits is None:
    z = _extrapolate(lr, ld, a)
  else:
    v = _checks.check_array("reverse_dpo_logits", reverse_dpo_logits)
    _checks.check_same_shape("dpo_logits", d, "reverse_dpo_logits", v)
    lv = _logspace.masked_log_softmax(v.astype(dtype), axis=ax)
    ok = (_logspace.valid_entries(lr) & _logspace.valid_entries(ld)
          & _logspace.valid_entries(lv))
    z = jnp.where(ok, jnp.where(ok, lr, 0.0) + a * (
        jnp.where(ok, ld, 0.0) - jnp.where(ok, lv, 0.0)), -jnp.inf)
  return _logspace.masked_log_softmax(z, axis=ax)
