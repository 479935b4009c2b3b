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
from kdjax.divergences import _plogratio, log_softmax
from kdjax.operators import aggregate

Array = jax.Array

__all__ = ["teacher_weights", "multi_teacher_kd", "WEIGHT_MODES"]

WEIGHT_MODES = ("uniform", "static", "confidence", "min_ce", "avg_ce")
_AGGREGATIONS = ("arithmetic", "geometric", "power", "per_teacher")


def _teacher_log_probs(teacher_logits, temperature, teacher_axis, axis):
  z = _checks.check_array("teacher_logits", teacher_logits, min_rank=2)
  t_ax = _checks.normalize_axis(teacher_axis, z.ndim, "teacher_axis")
  c_ax = _checks.normalize_axis(axis, z.ndim)
  if t_ax == c_ax:
    raise ValueError(f"`teacher_axis` ({teacher_axis}) and `axis` ({axis}) must differ.")
  _checks.check_positive("temperature", temperature)
  z = jnp.moveaxis(z, (t_ax, c_ax), (0, z.ndim - 1))
  dtype = _checks.compute_dtype(z)
  return log_softmax(z.astype(dtype) / jnp.asarray(temperature, dtype), axis=-1)


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

  p_i = softmax(z_i / ``temperature``). ``teacher_logits`` is ``[M, *batch, V]`` by default.
  """
  if mode not in WEIGHT_MODES:
    raise ValueError(f"`mode` must be one of {WEIGHT_MODES}, got {mode!r}.")
  _checks.check_positive("weight_temperature", weight_temperature)
  lp = jax.lax.stop_gradient(_teacher_log_probs(teacher_logits, temperature, teacher_axis, axis))
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
    score = jnp.max(lp, axis=-1)
    return jax.nn.softmax(jnp.where(jnp.isfinite(score), score, -1e30) / tau, axis=0)
  if labels is None:
    raise ValueError(f"`labels` (integer, batch shape {batch}) are required for mode={mode!r}.")
  y = jnp.asarray(labels)
  if not jnp.issubdtype(y.dtype, jnp.integer) or y.shape != batch:
    raise ValueError(f"`labels` must be integers of the batch shape {batch}, got {y.dtype} "
                     f"{y.shape}.")
  picked = jnp.take_along_axis(lp, jnp.broadcast_to(y[None, ..., None], (m,) + batch + (1,)),
                               axis=-1)[..., 0]
  ce = jnp.where(jnp.isfinite(picked), -picked, 1e30)
  if mode == "min_ce":
    return jax.nn.one_hot(jnp.argmin(ce, axis=0), m, axis=0, dtype=lp.dtype)
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
    student_logits: ``[*batch, V]`` student logits (class axis ``axis``).
    teacher_logits: ``[M, *batch, V]`` teacher logits (teacher axis ``teacher_axis``; ``axis``
      refers to the teacher array's class axis, ``-1`` by default for both).
    weights: ``None`` (uniform), ``[M]`` or per-example ``[M, *batch]`` (e.g. from
      :func:`teacher_weights`), on the simplex.
    aggregation: ``"arithmetic"``, ``"geometric"``, ``"power"`` or ``"per_teacher"``.
    direction: ``"forward"`` (KL(teacher ‖ student)) or ``"reverse"``.
    power: β of the power-mean pool.
    temperature: T > 0 applied to students and teachers.
    teacher_axis, axis: the teacher and class axes of ``teacher_logits``.
    where: optional position mask (the student's batch shape).

  Returns:
    Per-position loss, the student's batch shape.
  """
  if aggregation not in _AGGREGATIONS:
    raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}.")
  if direction not in ("forward", "reverse"):
    raise ValueError(f"`direction` must be 'forward' or 'reverse', got {direction!r}.")
  s = _checks.check_array("student_logits", student_logits)
  lpt = _teacher_log_probs(teacher_logits, temperature, teacher_axis, axis)  # [M, *batch, V]
  if lpt.shape[1:] != s.shape:
    raise ValueError(f"`teacher_logits` without the teacher axis must match `student_logits`: "
                     f"got {lpt.shape[1:]} (teacher, moved to [*batch, V]) vs {s.shape}.")
  dtype = jnp.promote_types(lpt.dtype, _checks.compute_dtype(s))
  lq = log_softmax(s.astype(dtype) / jnp.asarray(temperature, dtype), axis=-1)
  lpt = lpt.astype(dtype)
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
      per = _plogratio(lpt, jnp.broadcast_to(lq, lpt.shape), -1)
    else:
      per = _plogratio(jnp.broadcast_to(lq, lpt.shape), lpt, -1)
    values = jnp.sum(jnp.where(wt > 0, wt * per, 0.0), axis=0)
  else:
    pool = aggregate(lpt, weights=weights, kind=aggregation, power=power)
    values = _plogratio(pool, lq, -1) if direction == "forward" else _plogratio(lq, pool, -1)
  nonempty = jnp.any(lq > -jnp.inf, axis=-1) & jnp.all(jnp.any(lpt > -jnp.inf, axis=-1), axis=0)
  keep = nonempty if where is None else nonempty & jnp.asarray(where, bool)
  return jnp.where(keep, values, 0.0)
