r"""Hinton knowledge distillation and the CE + KD mixture (Hinton, Vinyals & Dean,
arXiv:1503.02531).

The soft-target term is the forward KL at temperature T, KL(p_T^τ ‖ p_S^τ) with
p^τ = softmax(z / T). Its value includes the teacher-entropy term (so 0 means equality); the
gradient equals that of Hinton's soft cross-entropy. The paper multiplies the soft term by T² so
that its gradient magnitude stays comparable with the hard-label term when T changes; kdjax makes
that factor an explicit keyword (``scale_by_t2``, default False) [proposed].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax.divergences import forward_kl, log_softmax

Array = jax.Array

__all__ = ["hinton_kd", "softmax_cross_entropy", "ce_kd_mixture"]


def _t2(value: Array, temperature, scale_by_t2: bool) -> Array:
  if not isinstance(scale_by_t2, bool):
    raise TypeError(f"`scale_by_t2` must be a bool, got {scale_by_t2!r}.")
  if not scale_by_t2:
    return value
  t = jnp.asarray(temperature, value.dtype)
  return value * t * t


def hinton_kd(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
              scale_by_t2: bool = False, axis: int = -1, where: Array | None = None) -> Array:
  r"""Hinton's soft-target distillation loss, per position.

  .. math:: \mathcal L = c\,\mathrm{KL}\big(\mathrm{softmax}(z_T/T)\,\|\,
            \mathrm{softmax}(z_S/T)\big),\qquad c = T^2 \text{ if scale\_by\_t2 else } 1.

  Gradient in the student logits: c (p_S − p_T) / T. Reference: Hinton, Vinyals & Dean,
  arXiv:1503.02531 [paper]; the T² factor as an explicit switch is a design choice (kdjax)
  [proposed].

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits of the same shape.
    temperature: T > 0 (the loss temperature, never the sampling temperature).
    scale_by_t2: multiply by T² (Hinton's gradient-scale correction).
    axis: the class axis.
    where: optional vocabulary mask (logits shape) or position mask (batch shape).

  Returns:
    Per-position loss (logits shape without ``axis``); masked positions give 0.
  """
  value = forward_kl(student_logits, teacher_logits, temperature=temperature, axis=axis,
                     where=where)
  return _t2(value, temperature, scale_by_t2)


def softmax_cross_entropy(logits: Array, labels: Array, *, axis: int = -1,
                          where: Array | None = None) -> Array:
  r"""Cross-entropy with integer labels, −log softmax(z)_y, per position (NaN-free masking).

  ``where`` has the batch shape (masked positions give 0 and gradient 0). A label pointing to a
  ``-inf`` logit gives +inf. Labels are checked against the class count when concrete.
  """
  z = _checks.check_array("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  y = jnp.asarray(labels)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"`labels` must hold integers, got dtype {y.dtype}.")
  batch_shape = z.shape[:ax] + z.shape[ax + 1:]
  if y.shape != batch_shape:
    raise ValueError(f"`labels` must have the batch shape {batch_shape}, got {y.shape}.")
  if not isinstance(labels, jax.core.Tracer):
    yn = np.asarray(labels)
    if yn.size and (yn.min() < 0 or yn.max() >= z.shape[ax]):
      raise ValueError(f"`labels` must lie in [0, {z.shape[ax]}), got range "
                       f"[{yn.min()}, {yn.max()}].")
  logp = log_softmax(z.astype(_checks.compute_dtype(z)), axis=ax)
  picked = jnp.take_along_axis(logp, jnp.expand_dims(y, ax), axis=ax).squeeze(ax)
  nonempty = jnp.any(logp > -jnp.inf, axis=ax)
  keep = nonempty if where is None else nonempty & jnp.asarray(where, bool)
  return jnp.where(keep, -jnp.where(keep, picked, 0.0), 0.0)


def ce_kd_mixture(student_logits: Array, teacher_logits: Array, labels: Array, *,
                  alpha: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False,
                  axis: int = -1, where: Array | None = None) -> Array:
  r"""The classic mixture (1 − α)·CE(y, softmax(z_S)) + α·c·KL(p_T^τ ‖ p_S^τ), per position.

  The hard-label CE is always at temperature 1; the KD term uses ``temperature`` and the
  optional T² factor c (see :func:`hinton_kd`). α = 0 is plain supervised training, α = 1 pure
  distillation. Reference: Hinton, Vinyals & Dean, arXiv:1503.02531 [paper] (the weighting
  convention α on the KD term is a design choice (kdjax) [proposed]).

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits.
    labels: integer labels of the batch shape.
    alpha: weight of the distillation term in [0, 1].
    temperature, scale_by_t2, axis: as in :func:`hinton_kd`.
    where: optional position mask (batch shape).
  """
  _checks.check_unit_interval("alpha", alpha)
  ce = softmax_cross_entropy(student_logits, labels, axis=axis, where=where)
  kd = hinton_kd(student_logits, teacher_logits, temperature=temperature,
                 scale_by_t2=scale_by_t2, axis=axis, where=where)
  a = jnp.asarray(alpha, kd.dtype)
  # Zero-weight terms are dropped so an infinite CE with alpha = 1 cannot give NaN.
  return jnp.where(a < 1, (1 - a) * ce, 0.0) + jnp.where(a > 0, a * kd, 0.0)
