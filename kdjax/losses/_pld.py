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

from kdjax import _checks
from kdjax import _logspace
from kdjax.losses import _common

Array = jax.Array

__all__ = ["plackett_luce_permutation", "plackett_luce_kd"]

# Invalid (masked / -inf) classes are sorted last and given a logit this far below the smallest
# valid student logit: exp(-gap) underflows to 0 in float32 and float64, yet stays finite so no
# -inf - (-inf) reaches the reverse cumulative log-sum-exp's gradient.
_GAP = 1e4


def plackett_luce_permutation(teacher_logits: Array, labels: Array | None = None, *,
                              axis: int = -1, where: Array | None = None) -> Array:
  """π*: the label first (if given), then classes by descending teacher logit; removed last.

  Removed classes are ``-inf`` teacher logits and ``where=False`` entries (``where``: a boolean
  class mask broadcastable to the logits shape). Returns int32 indices of the logits shape
  (``axis`` holds the permutation); ties keep class order. Concrete labels outside ``[0, C)``
  raise; a traced out-of-range label is not placed first. A NaN logit sorts last (an integer
  permutation cannot carry NaN; :func:`plackett_luce_kd` propagates it).
  """
  z = _checks.check_array("teacher_logits", teacher_logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  wm = _checks.check_where(where, z.shape)
  z = jnp.moveaxis(z, ax, -1)
  key = z.astype(_checks.compute_dtype(z))
  ok = _logspace.valid_entries(key, None if wm is None else jnp.moveaxis(wm, ax, -1))
  return jnp.moveaxis(_permutation(key, ok, labels), -1, ax)


def _permutation(key, ok, labels):
  """The permutation on [..., C] (class axis last)."""
  key = jnp.where(ok, key, -jnp.inf)
  if labels is not None:
    y, y_ok = _checks.check_labels("labels", labels, key.shape[-1])
    if y.shape != key.shape[:-1]:
      raise ValueError(f"`labels` must have the batch shape {key.shape[:-1]}, got {y.shape}.")
    first = jax.nn.one_hot(y, key.shape[-1], dtype=bool) & y_ok[..., None]
    key = jnp.where(first & ok, jnp.inf, key)
  # Sort by key descending: -inf keys (removed) sort last, ties stable.
  return jnp.argsort(-key, axis=-1, stable=True).astype(jnp.int32)


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
    labels: optional integer labels (batch shape) placed first in π*. Concrete labels outside
      ``[0, C)`` raise; a traced out-of-range label drops its position (value 0, gradient 0).
    temperature: T > 0 of the confidence weights α (scalar or per position).
    axis: the class axis.
    where: optional class mask (logits shape; masked classes leave the list) or position mask
      (batch shape; masked positions give 0).

  Returns:
    Per-position loss, the logits shape without ``axis``. NaN logits propagate.
  """
  s, t, ax, dtype = _checks.check_logits_pair(student_logits, teacher_logits, axis)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  temp = _common.temperature_array(temperature, s.shape, ax, dtype)
  s = jnp.moveaxis(s.astype(dtype), ax, -1)
  t = jnp.moveaxis(t.astype(dtype), ax, -1)
  temp = jnp.moveaxis(temp, ax, -1)
  vm = None if vocab_mask is None else jnp.moveaxis(vocab_mask, ax, -1)
  valid = _logspace.valid_entries(s, vm) & _logspace.valid_entries(t)
  keep = jnp.any(valid, axis=-1)
  if labels is not None:
    _, y_ok = _checks.check_labels("labels", labels, s.shape[-1])
    if y_ok.shape != keep.shape:
      raise ValueError(f"`labels` must have the batch shape {keep.shape}, got {y_ok.shape}.")
    keep = keep & y_ok
  # Double where: (-inf)/T never enters the graph (finite d/dT with -inf entries).
  alpha_log = _logspace.masked_log_softmax(jnp.where(valid, jnp.where(valid, t, 0.0) / temp, 0.0),
                                           axis=-1, where=valid)
  order = _permutation(t, valid, labels)
  s_perm = jnp.take_along_axis(s, order, axis=-1)
  ok_perm = jnp.take_along_axis(valid, order, axis=-1)
  alpha = jnp.exp(jnp.take_along_axis(alpha_log, order, axis=-1))
  s_min = jnp.min(jnp.where(ok_perm, s_perm, jnp.inf), axis=-1, keepdims=True)
  s_min = jax.lax.stop_gradient(jnp.where(jnp.isfinite(s_min), s_min, 0.0))
  s_safe = jnp.where(ok_perm, s_perm, s_min - _GAP)
  suffix_lse = jax.lax.cumlogsumexp(s_safe, axis=s_safe.ndim - 1, reverse=True)
  terms = jnp.where(ok_perm, alpha * (suffix_lse - s_safe), 0.0)
  values = jnp.sum(terms, axis=-1)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)
