r"""RL-style distillation objectives on student samples: MiniLLM, TRRD, G-OPD/ExOPD, AlignDistil.

Conventions: ``*_logits`` are ``[..., V]`` per position of a sampled sequence; ``*_log_probs`` at
sampled tokens are ``[...]`` (already gathered); ``where`` masks positions (padding, prompt).
Nothing is reduced: reduce with :mod:`kdjax.reductions`. Teachers/references are not
stop-gradiented here (wrap them yourself if they are being trained).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax.divergences import _plogratio, log_mixture, log_softmax, reverse_kl

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
  return values if where is None else jnp.where(jnp.asarray(where, bool), values, 0.0)


def token_log_probs(logits: Array, tokens: Array, *, temperature: float = 1.0,
                    axis: int = -1) -> Array:
  """log softmax(z / T) at the sampled ``tokens`` (batch shape); NaN-free for -inf logits."""
  z = _checks.check_array("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("temperature", temperature)
  y = jnp.asarray(tokens)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"`tokens` must hold integers, got dtype {y.dtype}.")
  batch = z.shape[:ax] + z.shape[ax + 1:]
  if y.shape != batch:
    raise ValueError(f"`tokens` must have the batch shape {batch}, got {y.shape}.")
  dtype = _checks.compute_dtype(z)
  lp = log_softmax(z.astype(dtype) / jnp.asarray(temperature, dtype), axis=ax)
  return jnp.take_along_axis(lp, jnp.expand_dims(y, ax), axis=ax).squeeze(ax)


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
    w = jax.lax.stop_gradient(jnp.asarray(sampling_weights, kl.dtype))
    kl = jnp.where(w != 0, w * kl, 0.0)
  return kl


def teacher_mixed_log_probs(student_logits: Array, teacher_logits: Array, *,
                            alpha: float = 0.2, temperature: float = 1.0,
                            axis: int = -1) -> Array:
  r"""log p̃ = log(α p + (1 − α) q_θ): MiniLLM's teacher-mixed sampling distribution [paper].

  α = 0.2 [paper]. Sample the next token from this distribution; the student term is
  detached (sampling is not differentiated).
  """
  _checks.check_unit_interval("alpha", alpha)
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  ax = _checks.normalize_axis(axis, s.ndim)
  dtype = _checks.compute_dtype(s, t)
  temp = jnp.asarray(temperature, dtype)
  lq = jax.lax.stop_gradient(log_softmax(s.astype(dtype) / temp, axis=ax))
  lp = jax.lax.stop_gradient(log_softmax(t.astype(dtype) / temp, axis=ax))
  return log_mixture(alpha, lp, lq)


def teacher_mixed_importance_weights(student_logits: Array, teacher_logits: Array,
                                     tokens: Array, *, alpha: float = 0.2,
                                     temperature: float = 1.0, axis: int = -1,
                                     where: Array | None = None) -> Array:
  r"""Importance weights q_θ(y_t)/p̃(y_t) for tokens drawn from p̃ = α p + (1 − α) q_θ [paper].

  E_{y∼p̃}[q_θ(y)/p̃(y)] = 1 (theory check ``zoo.minillm_importance_weights``); the weights
  are ≤ 1/(1 − α). Detached. Reference: Gu et al., arXiv:2306.08543 [paper].
  """
  lmix = teacher_mixed_log_probs(student_logits, teacher_logits, alpha=alpha,
                                 temperature=temperature, axis=axis)
  s = jnp.asarray(student_logits)
  ax = _checks.normalize_axis(axis, s.ndim)
  lq_y = jax.lax.stop_gradient(token_log_probs(s, tokens, temperature=temperature, axis=ax))
  lmix_y = jnp.take_along_axis(lmix, jnp.expand_dims(jnp.asarray(tokens), ax), axis=ax
                               ).squeeze(ax)
  ok = lmix_y > -jnp.inf
  w = jnp.where(ok & (lq_y > -jnp.inf), jnp.exp(jnp.where(ok, lq_y - lmix_y, 0.0)), 0.0)
  return _mask(w, where)


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
  keep = jnp.ones(lq.shape, bool) if where is None else jnp.asarray(where, bool)
  r = jnp.where(keep, lp - jnp.where(keep, lq, 0.0), 0.0)
  tail = jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1)
  if not normalize:
    return jnp.where(keep, tail, 0.0)
  n = jnp.flip(jnp.cumsum(jnp.flip(keep.astype(r.dtype), -1), -1), -1)
  return jnp.where(keep, tail / jnp.maximum(n, 1.0), 0.0)


# ----------------------------------------------------------------------------- TRRD / GRPO


def group_relative_advantages(rewards: Array, *, axis: int = -1, eps: float = 1e-6,
                              scale: bool = True) -> Array:
  """GRPO advantages (r − mean_group r) / (std_group r + eps) over ``axis`` (the group)."""
  r = _checks.check_array("rewards", rewards)
  ax = _checks.normalize_axis(axis, r.ndim)
  r = r.astype(_checks.compute_dtype(r))
  centred = r - jnp.mean(r, axis=ax, keepdims=True)
  if not scale:
    return centred
  return centred / (jnp.std(r, axis=ax, keepdims=True) + eps)


def trrd_mix_log_probs(teacher_log_probs: Array, old_log_probs: Array, *, lam: float = 0.5,
                       normalize: bool = False, axis: int = -1) -> Array:
  r"""log π_mix = λ log π_T + (1 − λ) log π_old (token level) [proposed].

  With ``normalize=True`` (full-vocabulary inputs ``[..., V]``) the geometric mixture is
  renormalised over ``axis`` so that π_mix sums to 1.
  """
  _checks.check_unit_interval("lam", lam)
  lt = _checks.check_array("teacher_log_probs", teacher_log_probs, min_rank=0)
  lo = _checks.check_array("old_log_probs", old_log_probs, min_rank=0)
  _checks.check_same_shape("teacher_log_probs", lt, "old_log_probs", lo)
  dtype = _checks.compute_dtype(lt, lo)
  lt, lo = lt.astype(dtype), lo.astype(dtype)
  lmb = jnp.asarray(lam, dtype)
  ft, fo = lt > -jnp.inf, lo > -jnp.inf
  mix = jnp.where(lmb > 0, lmb * jnp.where(ft, lt, 0.0), 0.0) + jnp.where(
      lmb < 1, (1 - lmb) * jnp.where(fo, lo, 0.0), 0.0)
  mix = jnp.where((~ft & (lmb > 0)) | (~fo & (lmb < 1)), -jnp.inf, mix)
  if normalize:
    mix = log_softmax(mix, axis=_checks.normalize_axis(axis, mix.ndim))
  return mix


def trrd_loss(student_log_probs: Array, mix_log_probs: Array, advantages: Array, *,
              clip_eps: float = 0.2, where: Array | None = None) -> Array:
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
    where: optional token mask.
  """
  _checks.check_positive("clip_eps", clip_eps)
  lp = _checks.check_array("student_log_probs", student_log_probs, min_rank=0)
  dtype = _checks.compute_dtype(lp)
  lp = lp.astype(dtype)
  lmix = jax.lax.stop_gradient(jnp.asarray(mix_log_probs, dtype))
  _checks.check_same_shape("student_log_probs", lp, "mix_log_probs", lmix)
  adv = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(advantages, dtype), lp.shape))
  ok = (lp > -jnp.inf) & (lmix > -jnp.inf)
  if where is not None:
    ok = ok & jnp.asarray(where, bool)
  ratio = jnp.exp(jnp.where(ok, lp - jnp.where(ok, lmix, 0.0), 0.0))
  eps = jnp.asarray(clip_eps, dtype)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1 - eps, 1 + eps) * adv
  return jnp.where(ok, -jnp.minimum(unclipped, clipped), 0.0)


# ----------------------------------------------------------------------------- G-OPD / ExOPD


def gopd_token_rewards(student_token_log_probs: Array, teacher_token_log_probs: Array,
                       ref_token_log_probs: Array, *, lam: float = 1.0,
                       where: Array | None = None) -> Array:
  r"""G-OPD token reward r_t = λ(log π*(y_t) − log π_ref(y_t)) − sg(log π_θ(y_t) − log π_ref(y_t)).

  λ = 1 is on-policy distillation (r_t = log π* − log π_θ, the reverse-KL reward), 0 < λ < 1
  interpolates, λ > 1 extrapolates beyond the teacher (ExOPD). Reward correction uses π_ref =
  the teacher's pre-RL base model. Reference: Yang et al., *Learning beyond Teacher*,
  arXiv:2602.12125 [paper] (objective); this token-level form with the last term under
  stop-gradient is a design choice (kdjax) [proposed].
  """
  ls = jax.lax.stop_gradient(_checks.check_array("student_token_log_probs",
                                                 student_token_log_probs, min_rank=0))
  lt = _checks.check_array("teacher_token_log_probs", teacher_token_log_probs, min_rank=0)
  lr = _checks.check_array("ref_token_log_probs", ref_token_log_probs, min_rank=0)
  _checks.check_same_shape("student_token_log_probs", ls, "teacher_token_log_probs", lt)
  _checks.check_same_shape("student_token_log_probs", ls, "ref_token_log_probs", lr)
  dtype = _checks.compute_dtype(ls, lt, lr)
  lmb = jnp.asarray(lam, dtype)
  r = lmb * (lt.astype(dtype) - lr.astype(dtype)) - (ls.astype(dtype) - lr.astype(dtype))
  return _mask(jax.lax.stop_gradient(r), where)


def gopd_objective(student_logits: Array, teacher_logits: Array, ref_logits: Array, *,
                   lam: float = 1.0, axis: int = -1, where: Array | None = None) -> Array:
  r"""Exact per-position G-OPD objective on a finite support (to be *maximised*):

  .. math:: J = \mathbb E_{y\sim\pi_\theta}\Big[\lambda\log\frac{\pi^*(y)}{\pi_{\rm ref}(y)}\Big]
            - \mathrm{KL}(\pi_\theta\|\pi_{\rm ref}).

  At λ = 1, J = −KL(π_θ ‖ π*) for every π_ref; the maximiser is
  π ∝ π_ref (π*/π_ref)^λ (:func:`gopd_optimal_logits`) [proposed, derived].
  Reference: Yang et al., arXiv:2602.12125 [paper].
  """
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  r = _checks.check_array("ref_logits", ref_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  _checks.check_same_shape("student_logits", s, "ref_logits", r)
  ax = _checks.normalize_axis(axis, s.ndim)
  dtype = _checks.compute_dtype(s, t, r)
  ls, lt, lr = (log_softmax(x.astype(dtype), axis=ax) for x in (s, t, r))
  q_pos = ls > -jnp.inf
  ok = q_pos & (lt > -jnp.inf) & (lr > -jnp.inf)
  lmb = jnp.asarray(lam, dtype)
  gain = jnp.sum(jnp.where(ok, jnp.exp(jnp.where(ok, ls, 0.0)) * lmb * (
      jnp.where(ok, lt, 0.0) - jnp.where(ok, lr, 0.0)), 0.0), axis=ax)
  # A student token outside the teacher's support gives J = -inf (λ > 0).
  outside = jnp.any(q_pos & ~ok, axis=ax)
  return _mask(jnp.where(outside, -jnp.inf, gain - _plogratio(ls, lr, ax)), where)


def gopd_optimal_logits(teacher_logits: Array, ref_logits: Array, *, lam: float = 1.0,
                        axis: int = -1) -> Array:
  r"""Logits of the G-OPD optimum π ∝ π_ref (π*/π_ref)^λ: log π_ref + λ(log π* − log π_ref)
  [proposed, derived]."""
  t = _checks.check_array("teacher_logits", teacher_logits)
  r = _checks.check_array("ref_logits", ref_logits)
  _checks.check_same_shape("teacher_logits", t, "ref_logits", r)
  ax = _checks.normalize_axis(axis, t.ndim)
  dtype = _checks.compute_dtype(t, r)
  lt, lr = log_softmax(t.astype(dtype), axis=ax), log_softmax(r.astype(dtype), axis=ax)
  return _extrapolate(lr, lt, lam)


def _extrapolate(base, target, lam):
  """base + λ (target − base) with -inf kept where either side has no support."""
  ok = (base > -jnp.inf) & (target > -jnp.inf)
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
  a = jnp.expand_dims(jnp.asarray(alpha, dtype), ax) if jnp.ndim(alpha) else alpha
  ld, lr = log_softmax(d.astype(dtype), axis=ax), log_softmax(r.astype(dtype), axis=ax)
  if reverse_dpo_logits is None:
    z = _extrapolate(lr, ld, a)
  else:
    v = _checks.check_array("reverse_dpo_logits", reverse_dpo_logits)
    _checks.check_same_shape("dpo_logits", d, "reverse_dpo_logits", v)
    lv = log_softmax(v.astype(dtype), axis=ax)
    ok = (lr > -jnp.inf) & (ld > -jnp.inf) & (lv > -jnp.inf)
    z = jnp.where(ok, jnp.where(ok, lr, 0.0) + jnp.asarray(a, dtype) * (
        jnp.where(ok, ld, 0.0) - jnp.where(ok, lv, 0.0)), -jnp.inf)
  return log_softmax(z, axis=ax)
