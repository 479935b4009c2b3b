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
from kdjax.losses._hinton import _t2

Array = jax.Array

__all__ = ["standardize_logits", "logit_standardized_kd"]


def standardize_logits(logits: Array, *, axis: int = -1, eps: float = 1e-7, ddof: int = 1,
                       where: Array | None = None) -> Array:
  r"""Z-score :math:`\mathcal Z(z) = (z - \mathrm{mean}(z)) / (\mathrm{std}(z) + \epsilon)`.

  Statistics use only the finite entries kept by ``where`` (logits-shaped vocabulary mask);
  ``-inf``/masked entries stay ``-inf``. ``ddof=1`` (the unbiased std) matches the authors'
  PyTorch code (``Tensor.std``) [paper]. A constant vector maps to 0 with a finite gradient.
  """
  z = _checks.check_array("logits", logits)
  ax = _checks.normalize_axis(axis, z.ndim)
  _checks.check_positive("eps", eps)
  z = z.astype(_checks.compute_dtype(z))
  valid = z > -jnp.inf
  if where is not None:
    valid = valid & jnp.asarray(where, bool)
  zf = jnp.where(valid, z, 0.0)
  n = jnp.sum(valid, axis=ax, keepdims=True).astype(z.dtype)
  mean = jnp.sum(zf, axis=ax, keepdims=True) / jnp.maximum(n, 1.0)
  dev = jnp.where(valid, zf - mean, 0.0)
  var = jnp.sum(dev * dev, axis=ax, keepdims=True) / jnp.maximum(n - ddof, 1.0)
  pos = var > 0
  std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)  # safe sqrt: finite grad at 0
  return jnp.where(valid, dev / (std + eps), -jnp.inf)


def logit_standardized_kd(student_logits: Array, teacher_logits: Array, *,
                          temperature: float = 1.0, scale_by_t2: bool = False, eps: float = 1e-7,
                          axis: int = -1, where: Array | None = None) -> Array:
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
    axis: the class axis.
    where: optional vocabulary mask (logits shape) or position mask (batch shape).
  """
  s = _checks.check_array("student_logits", student_logits)
  t = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", t)
  ax = _checks.normalize_axis(axis, s.ndim)
  vocab_mask, _ = _checks.split_where(where, s.shape, ax)
  zs = standardize_logits(s, axis=ax, eps=eps, where=vocab_mask)
  zt = standardize_logits(t, axis=ax, eps=eps, where=vocab_mask)
  value = forward_kl(zs, zt, temperature=temperature, axis=ax, where=where)
  return _t2(value, temperature, scale_by_t2)
