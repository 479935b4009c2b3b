r"""AKL — adaptive Kullback–Leibler divergence (Wu et al., arXiv:2404.02657, COLING 2025).

Per position, with teacher p and student q (p = softmax(z / T)):

.. math::
  g_{\rm head} = \sum_{i\in\mathcal H}|p_i-q_i|,\qquad
  g_{\rm tail} = \sum_{i\notin\mathcal H}|p_i-q_i|,

  \mathrm{AKL} = \frac{g_{\rm head}}{g_{\rm head}+g_{\rm tail}}\,\mathrm{KL}(p\|q)
               + \frac{g_{\rm tail}}{g_{\rm head}+g_{\rm tail}}\,\mathrm{KL}(q\|p),

where the head :math:`\mathcal H` holds the teacher's most probable tokens up to cumulative mass
μ. The gaps are computed with the student detached (they only weight the two KLs) [paper].

Boundary conventions [proposed], following the public DistiLLM-derived reference code
(``get_ratio``): the top-1 token is always in the head; the token at which the inclusive
cumulative teacher mass first exceeds μ goes to the tail; 0.5/0.5 weights when both gaps are 0;
the head mask is computed on the sorted order and scattered back to vocabulary order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax import _logspace
from kdjax.losses import _common

Array = jax.Array

__all__ = ["adaptive_kl", "adaptive_kl_weights"]


def _head_mask(log_pt: Array, mu, axis: int) -> Array:
  """Boolean head mask in vocabulary order (teacher top tokens up to cumulative mass mu)."""
  lp = jnp.moveaxis(log_pt, axis, -1)
  p = jnp.exp(lp)
  order = jnp.argsort(-p, axis=-1, stable=True)  # the one sort
  cum = jnp.cumsum(jnp.take_along_axis(p, order, axis=-1), axis=-1)
  head_sorted = cum <= jnp.moveaxis(mu, axis, -1)
  head_sorted = head_sorted.at[..., 0].set(True)  # the top-1 token is always in the head
  # Scatter back (no second argsort): position order[j] gets head_sorted[j].
  flat_order = order.reshape(-1, order.shape[-1])
  rows = jnp.arange(flat_order.shape[0])[:, None]
  head = jnp.zeros(flat_order.shape, bool).at[rows, flat_order].set(
      head_sorted.reshape(flat_order.shape))
  return jnp.moveaxis(head.reshape(p.shape), -1, axis)


def _weights(log_ps, log_pt, mu, axis):
  batch = log_ps.shape[:axis] + log_ps.shape[axis + 1:]
  mu = jax.lax.stop_gradient(_checks.per_position("mu", mu, batch, axis, log_ps.dtype))
  log_ps = jax.lax.stop_gradient(log_ps)
  log_pt = jax.lax.stop_gradient(log_pt)
  head = _head_mask(log_pt, mu, axis)
  err = jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps))
  g_head = jnp.sum(jnp.where(head, err, 0.0), axis=axis)
  g_tail = jnp.sum(jnp.where(head, 0.0, err), axis=axis)
  total = g_head + g_tail
  pos = total != 0  # NaN propagates (a NaN gap is not "both gaps 0")
  w_head = jnp.where(pos, g_head / jnp.where(pos, total, 1.0), 0.5)
  return w_head, 1.0 - w_head


def adaptive_kl_weights(student_logits: Array, teacher_logits: Array, *, mu: float = 0.5,
                        temperature: float = 1.0, axis: int = -1,
                        where: Array | None = None) -> tuple[Array, Array]:
  """The AKL mixing weights (w_head, w_tail) = (g_head, g_tail) / (g_head + g_tail).

  Both lie in [0, 1] and sum to 1 (0.5/0.5 when p = q). They carry no gradient (student and
  teacher detached). Arguments as in :func:`adaptive_kl`; masked positions get 0.5/0.5.
  """
  _checks.check_unit_interval("mu", mu)
  log_ps, log_pt, ax, bm, _ = _common.prepare(student_logits, teacher_logits, temperature, axis,
                                              where)
  w_head, w_tail = _weights(log_ps, log_pt, mu, ax)
  if bm is not None:
    w_head = jnp.where(bm, w_head, 0.5)
    w_tail = jnp.where(bm, w_tail, 0.5)
  return w_head, w_tail


def adaptive_kl(student_logits: Array, teacher_logits: Array, *, mu: float = 0.5,
                temperature: float = 1.0, axis: int = -1,
                where: Array | None = None) -> Array:
  r"""Adaptive KL (AKL): head/tail-gap-weighted mixture of forward and reverse KL.

  .. math:: \mathrm{AKL} = w_{\rm head}\,\mathrm{KL}(p_T\|p_S) + w_{\rm tail}\,\mathrm{KL}(p_S\|p_T),
            \quad w = (g_{\rm head}, g_{\rm tail})/(g_{\rm head}+g_{\rm tail}).

  A large error on the teacher's head favours forward KL (mode covering); a large error on the
  tail favours reverse KL. Hence min(FKL, RKL) ≤ AKL ≤ max(FKL, RKL), AKL = 0 iff p_S = p_T, and
  the value does not depend on the vocabulary order (up to ties in the teacher's probabilities).

  Reference: Wu et al., "Rethinking Kullback–Leibler Divergence in Knowledge Distillation for
  Large Language Models", arXiv:2404.02657 [paper] (μ = 0.5 [paper]). The boundary conventions
  (top-1 always in the head, the token crossing μ in the tail, 0.5/0.5 at zero gaps) are a design
  choice (kdjax) [proposed] following the public reference code.

  Args:
    student_logits: ``[..., V]`` student logits.
    teacher_logits: teacher logits, same shape.
    mu: head mass threshold in [0, 1] (scalar or per position, checked elementwise).
    temperature: T > 0 applied to both sides (no T² factor); scalar or per position.
    axis: the vocabulary axis.
    where: optional vocabulary mask (logits shape) or position mask (batch shape).

  Returns:
    Per-position AKL, the logits shape without ``axis``; masked/empty positions give 0.
  """
  _checks.check_unit_interval("mu", mu)
  log_ps, log_pt, ax, bm, _ = _common.prepare(student_logits, teacher_logits, temperature, axis,
                                              where)
  w_head, w_tail = _weights(log_ps, log_pt, mu, ax)
  fkl = _logspace.plogratio(log_pt, log_ps, ax)
  rkl = _logspace.plogratio(log_ps, log_pt, ax)
  # A zero weight must not meet an infinite KL (support violation) as 0 * inf = NaN.
  # (`!= 0`, not `> 0`: a NaN weight propagates.)
  values = (jnp.where(w_head != 0, w_head * fkl, 0.0)
            + jnp.where(w_tail != 0, w_tail * rkl, 0.0))
  return _common.finish(values, log_ps, log_pt, ax, bm)
