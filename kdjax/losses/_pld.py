r"""PLD — Plackett–Luce distillation (Bassam et al., arXiv:2506.12542, NeurIPS 2025).

The teacher's logits act as Plackett–Luce worth scores. The student is trained on one
teacher-optimal permutation π* (the true label first, then the other classes by descending
teacher logit) with a confidence-weighted listwise loss:

.. math:: \mathcal L(s) = \sum_{k=1}^{C}\alpha_k\Big[\log\sum_{j\ge k} e^{s_{\pi^*_j}}
          - s_{\pi^*_k}\Big],\qquad \alpha_k = \mathrm{softmax}(z_T/T)_{\pi^*_k}.

Every bracket is a log-sum-exp minus a linear function, so the loss is convex in the student
logits s; it is invariant to s ↦ s + c·1; the last position contributes 0; α = e_1 gives the CE of
the true label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax.divergences import log_softmax

Array = jax.Array

__all__ = ["plackett_luce_permutation", "plackett_luce_kd"]

# Invalid (masked / -inf) classes are sorted last and given a logit this far below the smallest
# valid student logit: exp(-gap) underflows to 0 in float32 and float64, yet stays finite so no
# -inf - (-inf) reaches the reverse cumulative log-sum-exp's gradient.
_GAP = 1e4


def _check_labels(labels, batch_shape, num_classes):
  y = jnp.asarray(labels)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"`labels` must hold integers, got dtype {y.dtype}.")
  if y.shape != batch_shape:
    raise ValueError(f"`labels` must have the batch shape {batch_shape}, got {y.shape}.")
  if not isinstance(labels, jax.core.Tracer):
    yn = np.asarray(labels)
    if yn.size and (yn.min() < 0 or yn.max() >= num_classes):
      raise ValueError(f"`labels` must lie in [0, {num_classes}), got range "
                       f"[{yn.min()}, {yn.max()}].")
  return y


def plackett_luce_permutation(teacher_logits: Array, labels: Array | None = None, *,
                              axis: int = -1, valid: Array | None = None) -> Array:
  """π*: the label first (if given), then classes by descending teacher logit; invalid last.

  Returns indices of the logits shape (``axis`` holds the permutation). Ties keep class order.
  """
  z = jnp.moveaxis(jnp.asarray(teacher_logits), axis, -1)
  key = z.astype(_checks.compute_dtype(z))
  ok = key > -jnp.inf if valid is None else (key > -jnp.inf) & jnp.moveaxis(valid, axis, -1)
  key = jnp.where(ok, key, -jnp.inf)
  if labels is not None:
    first = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    key = jnp.where(first & ok, jnp.inf, key)
  # Sort by (valid desc, key desc); -inf keys sort last already, ties stable.
  order = jnp.argsort(-key, axis=-1, stable=True)
  return jnp.moveaxis(order, -1, axis)


def plackett_luce_kd(student_logits: Array, teacher_logits: Array, labels: Array | None = None,
                     *, temperature: float = 1.0, axis: int = -1,
                     where: Array | None = None) -> Array:
  r"""Plackett–Luce distillation loss, per position (see the module docstring for the formula).

  Reference: Bassam et al., arXiv:2506.12542 [paper] (teacher-optimal permutation, listwise
  PL loss with confidence weights). Design choice (kdjax) [proposed]: α_k = softmax(z_T/T)_{π*_k}
  with T = 1 by default (the published material does not fix the temperature/normalisation of
  α); ``labels=None`` ranks by the teacher alone; the student logits are not temperature-scaled.

  Args:
    student_logits: ``[..., C]`` student logits s.
    teacher_logits: teacher logits z_T, same shape (ranking and confidences; no gradient is
      intended through the ranking, which is piecewise constant).
    labels: optional integer labels (batch shape) placed first in π*.
    temperature: T > 0 of the confidence weights α.
    axis: the class axis.
    where: optional class mask (logits shape; masked classes leave the list) or position mask
      (batch shape; masked positions give 0).

  Returns:
    Per-position loss, the logits shape without ``axis``.
  """
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  ax = _checks.normalize_axis(axis, s.ndim)
  _checks.check_positive("temperature", temperature)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  dtype = _checks.compute_dtype(s, t)
  s = jnp.moveaxis(s.astype(dtype), ax, -1)
  t = jnp.moveaxis(t.astype(dtype), ax, -1)
  vm = None if vocab_mask is None else jnp.moveaxis(vocab_mask, ax, -1)
  y = None
  if labels is not None:
    y = _check_labels(labels, s.shape[:-1], s.shape[-1])
  valid = (s > -jnp.inf) & (t > -jnp.inf)
  if vm is not None:
    valid = valid & vm
  alpha_log = log_softmax(t / jnp.asarray(temperature, dtype), axis=-1, where=valid)
  order = plackett_luce_permutation(t, y, valid=valid)
  s_perm = jnp.take_along_axis(s, order, axis=-1)
  ok_perm = jnp.take_along_axis(valid, order, axis=-1)
  alpha = jnp.exp(jnp.take_along_axis(alpha_log, order, axis=-1))
  s_min = jnp.min(jnp.where(ok_perm, s_perm, jnp.inf), axis=-1, keepdims=True)
  s_min = jax.lax.stop_gradient(jnp.where(jnp.isfinite(s_min), s_min, 0.0))
  s_safe = jnp.where(ok_perm, s_perm, s_min - _GAP)
  suffix_lse = jax.lax.cumlogsumexp(s_safe, axis=s_safe.ndim - 1, reverse=True)
  terms = jnp.where(ok_perm, alpha * (suffix_lse - s_safe), 0.0)
  values = jnp.sum(terms, axis=-1)
  keep = jnp.any(valid, axis=-1)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)
