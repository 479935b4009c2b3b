r"""Hinton knowledge distillation and the CE + KD mixture (Hinton, Vinyals & Dean,
arXiv:1503.02531).

The soft-target term is the forward KL at temperature T, KL(p_T^τ ‖ p_S^τ) with
p^τ = softmax(z / T). Its value includes the teacher-entropy term (so 0 means equality); the
gradient equals that of Hinton's soft cross-entropy. The paper multiplies the soft term by T² so
that its gradient magnitude stays comparable with the hard-label term when T changes; kdjax makes
that factor an explicit keyword (``scale_by_t2``, default False) [proposed].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax import _logspace
from kdjax import divergences
from kdjax.losses import _common

Array = jax.Array

__all__ = ["hinton_kd", "softmax_cross_entropy_with_integer_labels", "ce_kd_mixture",
           "MIXTURE_DIVERGENCES"]

#: Divergence names accepted by :func:`ce_kd_mixture` (the :mod:`kdjax.divergences` logits
#: functions, student first).
MIXTURE_DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": divergences.forward_kl,
    "reverse_kl": divergences.reverse_kl,
    "skew_forward_kl": divergences.skew_forward_kl,
    "skew_reverse_kl": divergences.skew_reverse_kl,
    "generalized_jsd": divergences.generalized_jsd,
    "total_variation": divergences.total_variation,
}


def _temperature(temperature, logits, axis):
  z = _checks.check_array("student_logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  return _common.temperature_array(temperature, z.shape, ax, _checks.compute_dtype(z)), ax


def hinton_kd(student_logits: Array, teacher_logits: Array, *, temperature: Any = 1.0,
              scale_by_t2: bool = False, axis: int = -1, where: Array | None = None) -> Array:
  r"""Hinton's soft-target distillation loss, per position.

  .. math:: \mathcal L = c\,\mathrm{KL}\big(\mathrm{softmax}(z_T/T)\,\|\,
            \mathrm{softmax}(z_S/T)\big),\qquad c = T^2 \text{ if scale\_by\_t2 else } 1.

  Gradient in the student logits: c (p_S − p_T) / T. Reference: Hinton, Vinyals & Dean,
  arXiv:1503.02531 [paper]; the T² factor as an explicit switch is a design choice (kdjax)
  [proposed].

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits of the same shape.
    temperature: T > 0 (the loss temperature, never the sampling temperature); a scalar or a
      per-position array of the batch shape (checked elementwise when concrete).
    scale_by_t2: multiply by T² (Hinton's gradient-scale correction; per position for a
      per-position T).
    axis: the class axis.
    where: optional boolean vocabulary mask (logits shape) or position mask (batch shape).

  Returns:
    Per-position loss (logits shape without ``axis``); masked positions give 0.
  """
  temp, ax = _temperature(temperature, student_logits, axis)
  value = divergences.forward_kl(student_logits, teacher_logits, temperature=temperature,
                                 axis=axis, where=where)
  return _common.t2_factor(value, temp, ax, scale_by_t2)


def softmax_cross_entropy_with_integer_labels(logits: Array, labels: Array, *,
                                              ignore_index: int = -100, axis: int = -1,
                                              where: Array | None = None) -> Array:
  r"""Cross-entropy with integer labels, −log softmax(z)_y, per position.

  .. math:: \mathcal L = -z_y + \log\textstyle\sum_k e^{z_k}

  (as ``optax.softmax_cross_entropy_with_integer_labels``; standard [paper]).

  Args:
    logits: ``[..., V]`` logits; ``-inf`` entries are removed classes.
    labels: integer labels of the batch shape (logits shape without ``axis``). A label equal to
      ``ignore_index`` drops its position (value 0, gradient 0). Other concrete labels outside
      ``[0, V)`` raise ``ValueError``; traced ones cannot be checked and drop their position
      like ``ignore_index`` (value 0, gradient 0) instead of wrapping around.
    ignore_index: the padding label (default -100, as PyTorch / Hugging Face).
    axis: the class axis.
    where: optional boolean position mask (broadcastable to the batch shape, or with a
      singleton class axis) or vocabulary mask (logits shape: False classes are removed).

  Returns:
    Per-position loss. A label pointing to a removed (``-inf``/masked) class gives +inf; an
    all-removed row gives 0 with gradient 0; NaN logits propagate.
  """
  z = _checks.check_array("logits", logits)
  _checks.check_no_posinf("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  ignore_index = _checks.check_int("ignore_index", ignore_index)
  batch_shape = z.shape[:ax] + z.shape[ax + 1:]
  y_raw = jnp.asarray(labels)
  if y_raw.shape != batch_shape:
    raise ValueError(f"`labels` must have the batch shape {batch_shape} (the logits shape "
                     f"without axis {ax}), got {y_raw.shape}.")
  y, ok = _checks.check_labels("labels", labels, z.shape[ax], ignore_index=ignore_index)
  vocab_mask, batch_mask = _checks.split_where(where, z.shape, ax)
  logp = _logspace.masked_log_softmax(z.astype(_checks.compute_dtype(z)), axis=ax,
                                      where=vocab_mask)
  picked = jnp.take_along_axis(logp, jnp.expand_dims(y, ax), axis=ax).squeeze(ax)
  keep = ok & _logspace.row_nonempty(logp, ax)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, -jnp.where(keep, picked, 0.0), 0.0)


def ce_kd_mixture(student_logits: Array, teacher_logits: Array, labels: Array | None, *,
                  kd_weight: Any = 1.0, ce_weight: Any = 1.0, scale_by_t2: bool = False,
                  temperature: Any = 1.0, divergence: str | Callable[..., Array] = "forward_kl",
                  ignore_index: int = -100, axis: int = -1, where: Array | None = None,
                  **divergence_kwargs) -> Array:
  r"""The CE + KD mixture, per position (the one convention of kdjax):

  .. math:: \mathcal L = w_{\rm ce}\,\mathrm{CE}(y, \mathrm{softmax}(z_S))
            + w_{\rm kd}\,c\,D(z_S, z_T; T),\qquad c = T^2 \text{ if scale\_by\_t2 else } 1.

  The hard-label CE is always at temperature 1 and enters only when ``labels`` is given; D is a
  :mod:`kdjax.divergences` logits function at ``temperature`` (default forward KL — Hinton's
  soft-target term). Reference: Hinton, Vinyals & Dean, arXiv:1503.02531 [paper]; independent
  weights and the explicit T² switch are a design choice (kdjax) [proposed]. The old
  "c·CE + (1 − c)·T²·D" convention is ``ce_weight=c, kd_weight=1 - c, scale_by_t2=True``.

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits (the teacher is not stop-gradiented, see
      :mod:`kdjax.losses`).
    labels: integer labels of the batch shape, or None (pure distillation).
    kd_weight: w_kd >= 0 (scalar or per position; checked elementwise when concrete).
    ce_weight: w_ce >= 0 (scalar or per position), used only with ``labels``.
    scale_by_t2: multiply D by T².
    temperature: T > 0 of D (scalar or per position).
    divergence: a name in :data:`MIXTURE_DIVERGENCES` (``forward_kl``, ``reverse_kl``,
      ``skew_forward_kl``, ``skew_reverse_kl``, ``generalized_jsd``, ``total_variation``) or a
      callable ``f(student_logits, teacher_logits, *, temperature, axis, where, **kwargs)``.
    ignore_index: the CE padding label (see :func:`softmax_cross_entropy_with_integer_labels`).
    axis: the class axis.
    where: optional boolean mask (position or vocabulary mask, as in the divergences).
    **divergence_kwargs: extra hyper-parameters of D (``skew=``, ``beta=``).

  Returns:
    Per-position loss. A zero weight drops its term entirely (an infinite CE at ``ce_weight=0``
    gives no NaN).
  """
  if isinstance(divergence, str):
    if divergence not in MIXTURE_DIVERGENCES:
      raise ValueError(f"`divergence` must be one of {sorted(MIXTURE_DIVERGENCES)} or a "
                       f"callable, got {divergence!r}.")
    div = MIXTURE_DIVERGENCES[divergence]
  elif callable(divergence):
    div = divergence
  else:
    raise TypeError(f"`divergence` must be a name or a callable, got {divergence!r}.")
  _checks.check_nonneg("kd_weight", kd_weight)
  if labels is not None:
    _checks.check_nonneg("ce_weight", ce_weight)
  temp, ax = _temperature(temperature, student_logits, axis)
  kd = div(student_logits, teacher_logits, temperature=temperature, axis=axis, where=where,
           **divergence_kwargs)
  kd = _common.t2_factor(kd, temp, ax, scale_by_t2)
  batch = kd.shape
  wk = _checks.per_position("kd_weight", kd_weight, batch, 0, kd.dtype)[0]
  out = jnp.where(wk > 0, wk * kd, 0.0)
  if labels is None:
    return out
  ce = softmax_cross_entropy_with_integer_labels(student_logits, labels,
                                                 ignore_index=ignore_index, axis=axis,
                                                 where=where).astype(kd.dtype)
  wc = _checks.per_position("ce_weight", ce_weight, batch, 0, kd.dtype)[0]
  return out + jnp.where(wc > 0, wc * ce, 0.0)
