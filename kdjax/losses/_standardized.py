r"""Logit-standardised KD (Sun et al., "Logit Standardization in Knowledge Distillation",
arXiv:2403.01427, CVPR 2024).

Each logit vector is z-scored before the temperature softmax, so teacher and student each get
a per-sample temperature τ·std(z) and the student only has to match the teacher's logit *shape*,
not its scale or offset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax.divergences import forward_kl
from kdjax.losses import _common

Array = jax.Array

__all__ = ["standardize_logits", "logit_standardized_kd"]


def standardize_logits(logits: Array, *, axis: int = -1, eps: float = 1e-7, ddof: int = 1,
                       min_std: float = 1e-3, where: Array | None = None) -> Array:
  r"""Z-score :math:`\mathcal Z(z) = (z - \mathrm{mean}(z)) / (\max(\mathrm{std}(z),
  s_{\min}) + \epsilon)`.

  Statistics use only the entries kept by ``where`` (boolean mask broadcastable to the logits
  shape) that are not ``-inf``; ``-inf``/masked entries stay ``-inf``; NaN propagates.
  ``ddof=1`` (the unbiased std) matches the authors' PyTorch code (``Tensor.std``) [paper].

  **Floor** [proposed]: the paper divides by std + ε with ε = 10⁻⁷ only, so at a (nearly)
  constant vector the Jacobian is ~1/ε (a gradient norm of ~10⁶ for a freshly initialised,
  constant student). kdjax floors the std at ``min_std`` (default 10⁻³), which bounds the
  Jacobian by ~1/min_std and leaves any vector with std ≥ min_std exactly as in the paper. A
  constant vector maps to 0. ``min_std=0`` gives the paper's formula.
  """
  z = _checks.check_array("logits", logits)
  _checks.check_no_posinf("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("eps", eps)
  _checks.check_nonneg("min_std", min_std)
  ddof = _checks.check_int("ddof", ddof, low=0)
  z = z.astype(_checks.compute_dtype(z))
  valid = z != -jnp.inf
  wm = _checks.check_where(where, z.shape)
  if wm is not None:
    valid = valid & wm
  zf = jnp.where(valid, z, 0.0)
  n = jnp.sum(valid, axis=ax, keepdims=True).astype(z.dtype)
  mean = jnp.sum(zf, axis=ax, keepdims=True) / jnp.maximum(n, 1.0)
  dev = jnp.where(valid, zf - mean, 0.0)
  var = jnp.sum(dev * dev, axis=ax, keepdims=True) / jnp.maximum(n - ddof, 1.0)
  pos = var > 0
  std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)  # safe sqrt: finite grad at 0
  std = jnp.maximum(std, jnp.asarray(min_std, z.dtype))
  return jnp.where(valid, dev / (std + eps), -jnp.inf)


def logit_standardized_kd(student_logits: Array, teacher_logits: Array, *,
                          temperature: float = 1.0, scale_by_t2: bool = False, eps: float = 1e-7,
                          min_std: float = 1e-3, axis: int = -1,
                          where: Array | None = None) -> Array:
  r"""Logit-standardised forward KL, per position.

  .. math:: \mathcal L = c\,\mathrm{KL}\big(\mathrm{softmax}(\mathcal Z(z_T)/\tau)\,\|\,
            \mathrm{softmax}(\mathcal Z(z_S)/\tau)\big),\quad
            \mathcal Z(z)=\frac{z-\mathrm{mean}(z)}{\mathrm{std}(z)+10^{-7}},

  c = τ² if ``scale_by_t2`` (the paper's loss uses τ²: pass ``scale_by_t2=True`` to reproduce
  it; the default False follows kdjax's convention [proposed]). Invariant to z ↦ a·z + b (a > 0)
  on either side up to the ε guard, and ≈ 0 when z_S = a·z_T + b.

  Reference: Sun et al., arXiv:2403.01427 [paper]; also torchdistill ``LogitStdKDLoss``.

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits.
    temperature: the base temperature τ > 0.
    scale_by_t2: multiply by τ².
    eps: the std guard (10⁻⁷ in the paper).
    min_std: the std floor of :func:`standardize_logits` [proposed] (bounds the gradient at a
      constant student; 0 restores the paper's formula).
    axis: the class axis.
    where: optional vocabulary mask (logits shape) or position mask (batch shape).
  """
  s, t, ax, _ = _checks.check_logits_pair(student_logits, teacher_logits, axis)
  vocab_mask, _ = _checks.split_where(where, s.shape, ax)
  zs = standardize_logits(s, axis=ax, eps=eps, min_std=min_std, where=vocab_mask)
  zt = standardize_logits(t, axis=ax, eps=eps, min_std=min_std, where=vocab_mask)
  temp = _common.temperature_array(temperature, s.shape, ax, zs.dtype)
  value = forward_kl(zs, zt, temperature=temperature, axis=ax, where=where)
  return _common.t2_factor(value, temp, ax, scale_by_t2)
