r"""Multi-teacher distillation losses on top of :func:`kdjax.operators.aggregate`.

Two ways to use M teachers p_1..p_M with weights w (per example allowed):

* **pool, then distil**: D(A_w(p_1..p_M), q) with A_w arithmetic, geometric or power-mean
  (``aggregation=...``);
* **per-teacher sum**: Σ_i w_i D(p_i, q) (``aggregation="per_teacher"``; big_vision's distill
  trainer and EasyDistill sum per-teacher KLs [paper]).

They are linked [proposed, derived; kd_losses.md §12]:
Σ_i w_i KL(p_i‖q) = KL(p̄‖q) + Σ_i w_i KL(p_i‖p̄) (same gradient as the arithmetic pool), and
Σ_i w_i KL(q‖p_i) = KL(q‖G) − log Z (same gradient as the geometric pool). Logit averaging
(TextBrewer) is the geometric pool, not probability averaging.

Weighting modes requested in TRL issue #6151 (:func:`teacher_weights`): ``uniform``, ``static``,
``confidence``, ``min_ce``, ``avg_ce`` — their exact definitions are a design choice (kdjax)
[proposed], documented in :func:`teacher_weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace as LS
from kdjax.losses import _common
from kdjax.operators import aggregate

Array = jax.Array

__all__ = ["teacher_weights", "multi_teacher_kd", "WEIGHT_MODES"]

WEIGHT_MODES = ("uniform", "static", "confidence", "min_ce", "avg_ce")
_AGGREGATIONS = ("arithmetic", "geometric", "power", "per_teacher")


def _teacher_log_probs(teacher_logits, temperature, teacher_axis, axis, *, student_shape=None,
                       vocab_mask=None, dtype=None):
  """log softmax(z_i / T) of each teacher, as ``[M, *batch, V]`` (class axis last).

  ``teacher_axis`` is the axis of ``teacher_logits`` that holds the teachers; ``axis`` is the
  class axis of one teacher's logits (the array without the teacher axis), as for the student.
  """
  z = _checks.check_array("teacher_logits", teacher_logits, min_rank=2)
  t_ax = _checks.normalize_axis(teacher_axis, z.ndim, "teacher_axis")
  zt = jnp.moveaxis(z, t_ax, 0)                                       # [M, *shape]
  if student_shape is not None and zt.shape[1:] != tuple(student_shape):
    raise ValueError(f"`teacher_logits` without the teacher axis must match `student_logits`: "
                     f"got {zt.shape[1:]} (teacher axis {teacher_axis} removed) vs "
                     f"{tuple(student_shape)}.")
  c_ax = _checks.normalize_axis(axis, zt.ndim - 1)
  lp, _, _ = _common.log_probs("teacher_logits", zt, temperature, c_ax + 1,
                               None if vocab_mask is None else vocab_mask[None], dtype)
  return jnp.moveaxis(lp, c_ax + 1, -1), c_ax


def teacher_weights(teacher_logits: Array, *, mode: str = "uniform", labels: Array | None = None,
                    static_weights: Any = None, temperature: float = 1.0,
                    weight_temperature: float = 1.0, teacher_axis: int = 0,
                    axis: int = -1) -> Array:
  r"""Per-example teacher weights ``[M, *batch]`` on the simplex (no gradient) [proposed].

  Modes (TRL #6151 names; definitions are Design choice (kdjax) [proposed]):

  * ``uniform``: w_i = 1/M;
  * ``static``: w = ``static_weights`` (shape [M], non-negative, summing to 1);
  * ``confidence``: w ∝ exp(log max_k p_i,k / τ_w) — teachers that are surer of their top class
    weigh more (τ_w = ``weight_temperature``; τ_w → 0 picks the most confident teacher);
  * ``min_ce``: w = one-hot of the teacher with the lowest cross-entropy on ``labels``
    (ties: the first);
  * ``avg_ce``: w = softmax(−CE_i(y) / τ_w): a soft version of ``min_ce`` that averages the
    teachers, weighting by how well each predicts the label.

  p_i = softmax(z_i / ``temperature``). ``teacher_logits`` is ``[M, *batch, V]`` by default
  (teachers on ``teacher_axis``; ``axis`` is the class axis of one teacher's logits, as in
  :func:`multi_teacher_kd`).
  """
  if mode not in WEIGHT_MODES:
    raise ValueError(f"`mode` must be one of {WEIGHT_MODES}, got {mode!r}.")
  _checks.check_positive("weight_temperature", weight_temperature)
  lp = jax.lax.stop_gradient(
      _teacher_log_probs(teacher_logits, temperature, teacher_axis, axis)[0])
  m, batch = lp.shape[0], lp.shape[1:-1]
  if mode == "uniform":
    return jnp.full((m,) + batch, 1.0 / m, lp.dtype)
  if mode == "static":
    if static_weights is None:
      raise ValueError("`static_weights` (shape [M]) is required when mode='static'.")
    w = _checks.check_array("static_weights", static_weights).astype(lp.dtype)
    if w.shape != (m,):
      raise ValueError(f"`static_weights` must have shape ({m},), got {w.shape}.")
    if not isinstance(static_weights, jax.core.Tracer):
      wn = np.asarray(static_weights, np.float64)
      if np.any(wn < 0) or abs(float(wn.sum()) - 1.0) > 1e-5:
        raise ValueError("`static_weights` must be non-negative and sum to 1.")
    return jnp.broadcast_to(w.reshape((m,) + (1,) * len(batch)), (m,) + batch)
  tau = jnp.asarray(weight_temperature, lp.dtype)
  if mode == "confidence":
    score = jnp.max(lp, axis=-1)                  # NaN in a teacher row stays NaN
    return jax.nn.softmax(jnp.where(score == -jnp.inf, -1e30, score) / tau, axis=0)
  if labels is None:
    raise ValueError(f"`labels` (integer, batch shape {batch}) are required for mode={mode!r}.")
  if jnp.shape(labels) != batch:
    raise ValueError(f"`labels` must have the batch shape {batch}, got {jnp.shape(labels)}.")
  y, _ = _checks.check_labels("labels", labels, lp.shape[-1])
  picked = jnp.take_along_axis(lp, jnp.broadcast_to(y[None, ..., None], (m,) + batch + (1,)),
                               axis=-1)[..., 0]
  ce = jnp.where(picked == -jnp.inf, 1e30, -picked)   # NaN stays NaN
  if mode == "min_ce":
    hard = jax.nn.one_hot(jnp.argmin(ce, axis=0), m, axis=0, dtype=lp.dtype)
    return jnp.where(jnp.any(jnp.isnan(ce), axis=0), jnp.nan, hard)
  return jax.nn.softmax(-ce / tau, axis=0)


def multi_teacher_kd(student_logits: Array, teacher_logits: Array, *, weights: Any = None,
                     aggregation: str = "arithmetic", direction: str = "forward",
                     power: Any = None, temperature: float = 1.0, teacher_axis: int = 0,
                     axis: int = -1, where: Array | None = None) -> Array:
  r"""Distillation from M teachers, per position.

  .. math::
    \text{pool: } D(A_w(p_1,\dots,p_M),\,q),\qquad
    \text{per\_teacher: } \textstyle\sum_i w_i\,D(p_i, q),

  D = KL(· ‖ q) for ``direction="forward"`` and KL(q ‖ ·) for ``"reverse"``; A_w from
  :func:`kdjax.operators.aggregate` (``aggregation`` = ``"arithmetic"``, ``"geometric"`` or
  ``"power"`` with ``power`` = β). Pools: Flouro & Chadwick arXiv:2601.09165 [paper]; per-teacher
  sums: big_vision distill trainer [paper]; the identities linking them are [proposed, derived]
  (theory checks ``zoo.multi_teacher_*``).

  Args:
    student_logits: student logits, class axis ``axis`` (e.g. ``[*batch, V]``).
    teacher_logits: teacher logits with the teachers on ``teacher_axis`` (e.g.
      ``[M, *batch, V]``).
    weights: ``None`` (uniform), ``[M]`` or per-example ``[M, *batch]`` (e.g. from
      :func:`teacher_weights`), on the simplex.
    aggregation: ``"arithmetic"``, ``"geometric"``, ``"power"`` or ``"per_teacher"``.
    direction: ``"forward"`` (KL(teacher ‖ student)) or ``"reverse"``.
    power: β of the power-mean pool.
    temperature: T > 0 applied to students and teachers (scalar or per position ``[*batch]``).
    teacher_axis: the axis of ``teacher_logits`` that holds the M teachers.
    axis: the class axis of ``student_logits`` and of each teacher's logits (``teacher_logits``
      with the teacher axis removed has the student's shape).
    where: optional boolean mask broadcastable to the student logits (a position mask, size 1
      on the class axis or the batch shape; or a vocabulary mask applied to every model).

  Returns:
    Per-position loss, the student's batch shape.
  """
  if aggregation not in _AGGREGATIONS:
    raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}.")
  if direction not in ("forward", "reverse"):
    raise ValueError(f"`direction` must be 'forward' or 'reverse', got {direction!r}.")
  s = _checks.check_array("student_logits", student_logits)
  ax = _checks.normalize_axis(axis, s.ndim)
  vocab_mask, batch_mask = _checks.split_where(where, s.shape, ax)
  dtype = _checks.compute_dtype(s, _checks.check_array("teacher_logits", teacher_logits))
  lpt, _ = _teacher_log_probs(teacher_logits, temperature, teacher_axis, ax, student_shape=s.shape,
                              vocab_mask=vocab_mask, dtype=dtype)          # [M, *batch, V]
  lq, _, _ = _common.log_probs("student_logits", s, temperature, ax, vocab_mask, dtype)
  lq = jnp.moveaxis(lq, ax, -1)
  if aggregation == "per_teacher":
    w = aggregate(lpt, weights=weights, kind="arithmetic")  # validates the weights only
    del w
    m = lpt.shape[0]
    wt = (jnp.full((m,), 1.0 / m, dtype) if weights is None
          else jnp.asarray(weights, dtype))
    nb = lpt.ndim - 2  # batch rank
    # [M] -> [M, 1...]; [M, b_k.., b_n] (right-aligned, as in aggregate) -> [M, 1.., b_k.., b_n]
    wt = wt.reshape((m,) + (1,) * (nb - (wt.ndim - 1)) + wt.shape[1:])
    wt = jnp.broadcast_to(wt, lpt.shape[:-1])
    if direction == "forward":
      per = LS.plogratio(lpt, jnp.broadcast_to(lq, lpt.shape), -1)
    else:
      per = LS.plogratio(jnp.broadcast_to(lq, lpt.shape), lpt, -1)
    values = jnp.sum(jnp.where(wt > 0, wt * per, 0.0), axis=0)
  else:
    pool = aggregate(lpt, weights=weights, kind=aggregation, power=power)
    values = LS.plogratio(pool, lq, -1) if direction == "forward" else LS.plogratio(lq, pool, -1)
  keep = LS.row_nonempty(lq, -1) & jnp.all(LS.row_nonempty(lpt, -1), axis=0)
  if batch_mask is not None:
    keep = keep & batch_mask
  return jnp.where(keep, values, 0.0)
