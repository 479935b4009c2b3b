r"""Self-distillation with ground-truth targets in kernel ridge regression: closed forms.

Borup & Andersen, *Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization
Imposed by Self-Distillation*, NeurIPS 2021, arXiv:2102.13088. Write-up and checks:
``theory/kernel_self_distillation.md``.

Step 1 fits the labels :math:`y` by kernel ridge regression; step :math:`t \ge 2` fits the mixed
target :math:`\alpha y + (1-\alpha) y^{(t-1)}` (:math:`\alpha` is the **ground-truth** weight)
[paper]. With :math:`K = V D V^\top` and :math:`a_k = d_k / (d_k + \lambda)`, the training
predictions are :math:`y^{(t)} = V B^{(t)} V^\top y` with diagonal

.. math::
  b^{(t)}_k = \alpha a_k \frac{1 - ((1-\alpha) a_k)^{t-1}}{1 - (1-\alpha) a_k}
              + (1-\alpha)^{t-1} a_k^t ,\qquad
  b^{(\infty)}_k = \frac{d_k}{d_k + \lambda / \alpha}.

Layout (neural-tangents style: the factory does the expensive decomposition once):

* `self_distill_predictor(k_train_train, y_train, lam=...)` does the one expensive
  eigendecomposition and returns a `SelfDistillPredictor` whose methods are cheap diagonal
  operations: any step, any :math:`\alpha` (or per-step schedule), train or test predictions,
  the infinite-step limit, the function-of-initial-fit form, the :math:`\alpha = 0` student and
  the optimal :math:`\alpha^{(t)}`. Every method is jit-able and `vmap`-able over `t` and
  `alpha`.
* Plain reference implementations (`b_recursion`, `explicit_refit`, `ridge`) are the oracles
  the fast path is tested against.
* `optimal_alpha` is Algorithm 1's closed-form step for any model (e.g. a neural network): it
  only needs the first model's and the :math:`\alpha = 0` student's predictions on a reference
  set.

Numerics. Test predictions use the mixed-target form
:math:`f^{(t)}(x) = \mathbf k(x)^\top (K + \lambda I)^{-1} (\alpha y + (1-\alpha) y^{(t-1)})`,
i.e. eigen-coefficients :math:`(\alpha + (1-\alpha) b^{(t-1)}_k) / (d_k + \lambda)`, never
:math:`D^{-1}`, so a singular or ill-conditioned Gram matrix gives *finite* predictions
(Design choice (kdjax), [proposed]). Finite is not accurate: float32 ``eigh`` noise
(~1e-7·‖K‖₂) in the null-space eigenvectors is amplified by 1/λ. With the toy inputs triplicated
(rank 11 of 33, ‖K‖₂ ≈ 5.8) and different noisy targets per copy, float32 test predictions at
t = 3, α = 0.25 deviate from float64 by about 0.03 % at λ = 1e-4, 0.5 % at 1e-5, 3 % at 1e-6 and
35 % at 1e-7. Use float64 (``dtype=jnp.float64`` inside ``jax.enable_x64(True)``) when
λ < about 1e-5·‖K‖₂. Computation runs in float32 unless an input is float64 or float64 is
requested; bfloat16/float16 inputs are computed and returned in float32. A negative round-off
eigenvalue is clipped to 0; a Gram matrix that is not PSD (a kernel that is not positive
definite) is therefore silently projected onto its PSD part.

Contract. ``alpha`` is any finite real (Algorithm 1 is unconstrained; [0, 1] is the paper's
range), scalar or a 1-D per-step schedule, checked elementwise when concrete (NaN/inf, bool and
str are rejected; traced values are unchecked). The recursion converges as t → ∞ only when
:math:`|(1-\alpha) a_1| < 1` (always for :math:`\alpha \in (0, 1]`); outside, ``t = jnp.inf``
returns the fixed-point formula and large finite ``t`` overflows (e.g. α = −5 gives inf/NaN at
t = 1000). A NaN in an input propagates. The derivatives in ``alpha`` are finite everywhere,
also at α = 1 and at t = 1 or t = ∞.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax._checks import (check_array, check_int, check_positive, check_range, check_where,
                           compute_dtype, concrete_array, concrete_scalar, is_traced,
                           normalize_axis)

Array = jax.Array

__all__ = [
    "a_coefficients", "b_coefficients", "b_recursion", "b_limit", "c_coefficients",
    "sparsification_ratios", "optimal_alpha", "mixed_targets", "ridge", "explicit_refit",
    "softmax_mse_self_distill", "SelfDistillPredictor", "self_distill_predictor", "toy_data",
]


# --------------------------------------------------------------------------------------------
# Validation helpers.

def _check_step(t: Any, *, allow_inf: bool = True) -> None:
  """t: an integer step >= 1 (or +inf), concrete values checked elementwise."""
  if is_traced(t):
    return
  if isinstance(t, (bool, np.bool_, str, bytes)) or t is None:
    raise TypeError(f"`t` must be an integer step >= 1 or jnp.inf, got {t!r}.")
  arr = concrete_array(t)
  if arr is None or arr.dtype == bool or not (jnp.issubdtype(arr.dtype, jnp.floating)
                                              or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(f"`t` must be an integer step >= 1 or jnp.inf, got {t!r}.")
  a = arr.astype(np.float64)
  inf = np.isposinf(a)
  if np.any(inf) and not allow_inf:
    raise ValueError("`t` must be finite for a per-step alpha schedule, got inf.")
  ok = inf | ((a >= 1) & (a == np.floor(a)))   # NaN fails both
  if not np.all(ok):
    raise ValueError(f"`t` must be an integer step >= 1 or jnp.inf, got {t!r}.")


def _check_clip(clip) -> tuple[float, float] | None:
  if clip is None:
    return None
  try:
    lo, hi = clip
    lo, hi = float(lo), float(hi)
  except (TypeError, ValueError) as e:
    raise TypeError(f"`clip` must be None or a pair (low, high), got {clip!r}.") from e
  if not lo <= hi:
    raise ValueError(f"`clip` must satisfy low <= high, got {clip!r}.")
  return lo, hi


def _check_alpha(alpha: Any, name: str = "alpha") -> Array:
  """A finite real ground-truth weight (scalar or 1-D schedule), checked elementwise."""
  check_range(name, alpha)
  alpha = jnp.asarray(alpha)
  if alpha.ndim > 1:
    raise ValueError(f"`{name}` must be a scalar or a 1-D per-step schedule, got shape "
                     f"{alpha.shape}.")
  return alpha


def _eigenvalues(d) -> Array:
  """Eigenvalues as a float array of the compute dtype (bfloat16/int -> float32)."""
  d = check_array("d", d)
  return d.astype(compute_dtype(d))


def _resolve_dtype(dtype, *arrays) -> jnp.dtype:
  if dtype is None:
    return compute_dtype(*arrays)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("`dtype`=float64 needs 64-bit mode: call inside `with jax.enable_x64(True):`.")
  if dtype in (jnp.bfloat16, jnp.float16):
    return jnp.dtype(jnp.float32)  # low precision inputs are computed in float32
  return dtype


# --------------------------------------------------------------------------------------------
# Diagonal closed forms (eigenbasis).

def a_coefficients(d: Array, lam) -> Array:
  r""":math:`a_k = d_k / (d_k + \lambda)` (negative round-off eigenvalues are clipped to 0).

  ``lam`` > 0 (finite; arrays checked elementwise). A NaN eigenvalue gives a NaN coefficient.
  """
  check_positive("lam", lam)
  d = jnp.maximum(_eigenvalues(d), 0)
  return d / (d + lam)


def _step_float(t, dtype):
  return jnp.asarray(t, dtype)


def _closed_form_parts(d, lam, alpha, t):
  """Returns (q^(t-1), sum_{j<t-1} q^j) with q = (1-alpha) a, computed without cancellation."""
  d = jnp.maximum(d, 0)
  a = d / (d + lam)
  q = (1 - alpha) * a
  one_minus_q = (lam + alpha * d) / (d + lam)  # = 1 - q exactly, no 1 - a cancellation
  t = _step_float(t, d.dtype)
  n = jnp.where(jnp.isinf(t), 0.0, t - 1)
  # q^n with d/dq finite: at n = 0 the float power's derivative is 0 * q^-1 = NaN for q = 0
  # (alpha = 1, or t = 1 / t = inf where n is set to 0), so n = 0 is taken out (q^0 = 1).
  n0 = n == 0
  qn = jnp.where(n0, 1.0, jnp.power(jnp.where(n0, 1.0, q), jnp.where(n0, 1.0, n)))
  # 1 - q^n via expm1 for q in (0, 1) (q near 1: alpha small, a near 1).
  safe_q = jnp.where(q > 0, q, 0.5)
  one_minus_qn = jnp.where(q > 0, -jnp.expm1(n * jnp.log(safe_q)), 1 - qn)
  tiny = jnp.finfo(d.dtype).tiny
  safe_den = jnp.where(jnp.abs(one_minus_q) > tiny, one_minus_q, 1.0)
  geom = jnp.where(jnp.abs(one_minus_q) > tiny, one_minus_qn / safe_den, n)
  return a, qn, geom


def b_limit(d: Array, lam, alpha) -> Array:
  r"""Infinite-step coefficients :math:`b^{(\infty)}_k = \alpha d_k / (\alpha d_k + \lambda)`.

  Ridge with :math:`\lambda/\alpha` [paper]; 0 for :math:`\alpha = 0` (collapse). Meaningful for
  :math:`\alpha \in [0, 1]` (the recursion diverges when :math:`(1-\alpha) a_1 \ge 1`).
  """
  check_positive("lam", lam)
  alpha = _check_alpha(alpha)
  if alpha.ndim != 0:
    raise ValueError("`alpha` must be a scalar for b_limit.")
  d = jnp.maximum(_eigenvalues(d), 0)
  alpha = alpha.astype(d.dtype)
  den = alpha * d + lam
  ok = den != 0             # a NaN denominator is kept: NaN propagates
  return jnp.where(ok, alpha * d / jnp.where(ok, den, 1.0), 0.0)


def _schedule_all(a: Array, alphas: Array) -> Array:
  """b^(1..T) for a schedule alphas[s] used at step s + 2; shape [T, n]."""
  def step(b, al):
    nb = a * (al + (1 - al) * b)
    return nb, nb
  _, bs = jax.lax.scan(step, a, alphas.astype(a.dtype))
  return jnp.concatenate([a[None], bs], axis=0)


def b_coefficients(d: Array, lam, alpha, t) -> Array:
  r"""Step-:math:`t` shrinkage coefficients :math:`b^{(t)}_k` (diagonal of :math:`B^{(t)}`).

  .. math::
    b^{(t)}_k = \alpha a_k \sum_{j=0}^{t-2} ((1-\alpha) a_k)^j + (1-\alpha)^{t-1} a_k^t

  [paper] (arXiv:2102.13088, closed form of the authors' ``Recurser``).

  Args:
    d: eigenvalues of the train Gram matrix, any order, shape ``[n]``.
    lam: ridge parameter :math:`\lambda > 0`.
    alpha: ground-truth weight, a scalar (any real; :math:`[0, 1]` is the paper's range) or a
      1-D per-step schedule whose entry ``s`` is the weight of step ``s + 2`` (step 1 does not
      depend on alpha).
    t: step (integer >= 1, may be traced; ``jnp.inf`` gives the limit for a scalar alpha).
      With a schedule, ``t <= len(alpha) + 1``.

  Returns:
    ``[n]`` coefficients.
  """
  d = _eigenvalues(d)
  check_positive("lam", lam)
  alpha = _check_alpha(alpha)
  if alpha.ndim == 1:
    _check_step(t, allow_inf=False)
    tv = concrete_scalar(t)
    if tv is not None and tv > alpha.shape[0] + 1:
      raise ValueError(f"`t`={t} needs a schedule of length >= {int(tv) - 1}, got "
                       f"{alpha.shape[0]}.")
    bs = _schedule_all(a_coefficients(d, lam), alpha)
    return jnp.take(bs, jnp.asarray(t, jnp.int32) - 1, axis=0)
  _check_step(t)
  alpha = alpha.astype(d.dtype)
  a, qn, geom = _closed_form_parts(d, lam, alpha, t)
  b_t = alpha * a * geom + qn * a
  return jnp.where(jnp.isinf(_step_float(t, d.dtype)), b_limit(d, lam, alpha), b_t)


def c_coefficients(d: Array, lam, alpha, t) -> Array:
  r"""Function-of-initial-fit coefficients :math:`C^{(t)} = B^{(t)} A^{-1}` [paper].

  .. math::
    c^{(t)}_k = \alpha \sum_{j=0}^{t-2} ((1-\alpha) a_k)^j + ((1-\alpha) a_k)^{t-1},

  so that :math:`y^{(t)} = V C^{(t)} V^\top y^{(1)}` without training intermediate models.
  Computed directly (no :math:`A^{-1}`), hence defined also where :math:`d_k = 0`.
  Scalar ``alpha`` only; ``t = jnp.inf`` gives the limit :math:`\alpha / (1 - (1-\alpha) a_k)
  = \alpha (d_k + \lambda) / (\alpha d_k + \lambda)`, so that ``from_initial_fit(jnp.inf, .)``
  equals ``limit(.)``.
  """
  d = _eigenvalues(d)
  check_positive("lam", lam)
  alpha = _check_alpha(alpha)
  if alpha.ndim != 0:
    raise ValueError("`alpha` must be a scalar for c_coefficients.")
  _check_step(t)
  alpha = alpha.astype(d.dtype)
  _, qn, geom = _closed_form_parts(d, lam, alpha, t)
  c_t = alpha * geom + qn
  # t = inf: the limit alpha / (1 - (1-alpha) a) = alpha (d + lam) / (alpha d + lam).
  dp = jnp.maximum(d, 0)
  den = alpha * dp + lam
  ok = den != 0
  c_inf = jnp.where(ok, alpha * (dp + lam) / jnp.where(ok, den, 1.0), 0.0)
  return jnp.where(jnp.isinf(_step_float(t, d.dtype)), c_inf, c_t)


def b_recursion(d, lam, alpha, t: int) -> np.ndarray:
  r"""Reference implementation: the recursion :math:`B^{(t)} = A(\alpha I + (1-\alpha)B^{(t-1)})`.

  Plain NumPy loop (float64) mirroring the authors' ``Recurser`` [paper]; the oracle for
  `b_coefficients`. ``alpha`` may be a scalar or a per-step schedule (entry s = step s + 2).
  """
  t = check_int("t", t, low=1)
  check_positive("lam", lam)
  _check_alpha(alpha)
  d = np.maximum(np.asarray(d, np.float64), 0)
  a = d / (d + float(lam))
  sched = np.asarray(alpha, np.float64)
  b = a.copy()
  for s in range(2, t + 1):
    al = float(sched) if sched.ndim == 0 else float(sched[s - 2])
    b = a * (al + (1 - al) * b)
  return b


def sparsification_ratios(b: Array) -> Array:
  r""":math:`R_k = b_k / b_{k+1}` for coefficients sorted by decreasing eigenvalue (shape n-1).

  Where :math:`b_{k+1} = 0` (a zero eigenvalue) the ratio is ±inf (the sign of :math:`b_k`),
  and 1 where both are 0 (no NaN is created; a NaN coefficient propagates). float32 out for
  low-precision input.
  """
  b = check_array("b", b)
  b = b.astype(compute_dtype(b))
  num, den = b[..., :-1], b[..., 1:]
  ok = den != 0
  ratio = num / jnp.where(ok, den, 1.0)
  return jnp.where(ok, ratio, jnp.where(num == 0, 1.0, jnp.sign(num) * jnp.inf))


# --------------------------------------------------------------------------------------------
# Algorithm 1 and training targets (model-agnostic).

def optimal_alpha(y1, y0_t, reference, *, clip: Sequence[float] | None = None,
                  where=None) -> Array:
  r"""Closed-form ground-truth weight of one distillation step (Algorithm 1) [paper].

  Predictions of the step-:math:`t` model are affine in :math:`\alpha`:
  :math:`\alpha y^{(1)} + (1-\alpha) y^{(t)}_0`, so the squared error against a reference
  :math:`r` is minimised by

  .. math::
    \alpha^{(t)\star} = \frac{\langle r - y^{(t)}_0,\ y^{(1)} - y^{(t)}_0\rangle}
                             {\|y^{(1)} - y^{(t)}_0\|^2}

  (closed form: [proposed, derived]; Algorithm 1 states the arg-min [paper]). Exact for kernel
  ridge, a heuristic for neural networks (where linearity in alpha is approximate).

  Design choice (kdjax) [proposed]: the caller chooses the reference. Use the noise-free function
  (oracle) or held-out labels with held-out predictions: with the *training* labels the optimum is
  always >= 1 (no distillation), see the write-up.

  Args:
    y1: first model's (teacher's) predictions on the reference set, any shape (e.g. ``[n]`` or
      ``[n, classes]`` softmax outputs).
    y0_t: predictions of the step-:math:`t` model trained with :math:`\alpha = 0` on the
      step-:math:`(t-1)` predictions, same shape.
    reference: reference targets :math:`r`, same shape (e.g. one-hot labels).
    clip: None (unconstrained, :math:`\alpha \in \mathbb R` as Algorithm 1) or ``(low, high)``,
      e.g. ``(0, 1)``.
    where: optional boolean mask broadcastable to the shape; False entries are ignored
      (a non-boolean mask is a ``TypeError``).

  Returns:
    Scalar :math:`\alpha^\star`. If :math:`y^{(1)} = y^{(t)}_0` every alpha is optimal and 1 is
    returned. A NaN in a kept entry of any input propagates (it is not read as "degenerate").
  """
  y1 = check_array("y1", y1, min_rank=0)
  y0 = check_array("y0_t", y0_t, min_rank=0)
  r = check_array("reference", reference, min_rank=0)
  if not (y1.shape == y0.shape == r.shape):
    raise ValueError(f"`y1`, `y0_t` and `reference` must have the same shape, got {y1.shape}, "
                     f"{y0.shape} and {r.shape}.")
  bounds = _check_clip(clip)
  dt = compute_dtype(y1, y0, r)
  y1, y0, r = y1.astype(dt), y0.astype(dt), r.astype(dt)
  diff = y1 - y0
  resid = r - y0
  w = check_where(where, diff.shape)
  if w is not None:
    diff = jnp.where(w, diff, 0)
    resid = jnp.where(w, resid, 0)
  num = jnp.sum(resid * diff)
  den = jnp.sum(diff * diff)
  ok = den != 0             # NaN den is kept: a NaN input propagates
  alpha = jnp.where(ok, num / jnp.where(ok, den, 1), 1.0)
  if bounds is not None:
    alpha = jnp.clip(alpha, bounds[0], bounds[1])
  return alpha


def mixed_targets(y, y_prev, alpha) -> Array:
  r"""Step target :math:`\alpha y + (1-\alpha) y^{(t-1)}` [proposed, derived].

  Completing the square, :math:`\alpha\|y - f\|^2 + (1-\alpha)\|y^{(t-1)} - f\|^2` equals
  :math:`\|\alpha y + (1-\alpha) y^{(t-1)} - f\|^2` plus a constant, so each step is a plain fit
  on this target. ``alpha`` is any finite real (a scalar, or an array broadcastable to the
  targets, e.g. a per-example ``[n, 1]`` weight), checked elementwise when concrete.
  """
  y = check_array("y", y, min_rank=0)
  y_prev = check_array("y_prev", y_prev, min_rank=0)
  if y.shape != y_prev.shape:
    raise ValueError(f"`y` and `y_prev` must have the same shape, got {y.shape} and "
                     f"{y_prev.shape}.")
  check_range("alpha", alpha)
  dt = compute_dtype(y, y_prev)
  al = jnp.asarray(alpha, dt)
  try:
    ok = jnp.broadcast_shapes(al.shape, y.shape) == y.shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"`alpha` must be a scalar or broadcastable to the target shape {y.shape}, "
                     f"got shape {al.shape}.")
  return al * y.astype(dt) + (1 - al) * y_prev.astype(dt)


def softmax_mse_self_distill(student_logits, teacher_probs, targets, *, alpha,
                             axis: int = -1) -> Array:
  r"""Per-example loss of the authors' deep-net code [paper, ``self_distiller.py``].

  .. math::
    \alpha\,\mathrm{MSE}(\mathrm{softmax}(z), y) + (1-\alpha)\,\mathrm{MSE}(\mathrm{softmax}(z), p_T)

  with the mean over classes (torch ``mse_loss``); ``targets`` are one-hot (or soft) labels,
  ``teacher_probs`` the previous step's softmax outputs. No reduction over examples: reduce with
  `kdjax.reductions`. Equals the MSE against `mixed_targets(targets, teacher_probs, alpha)` plus a
  term that does not depend on the student, so it is linear in alpha as Algorithm 1 assumes.
  """
  z = check_array("student_logits", student_logits)
  pt = check_array("teacher_probs", teacher_probs)
  y = check_array("targets", targets)
  if not (z.shape == pt.shape == y.shape):
    raise ValueError(f"`student_logits`, `teacher_probs` and `targets` must have the same shape, "
                     f"got {z.shape}, {pt.shape} and {y.shape}.")
  check_range("alpha", alpha)
  axis = normalize_axis(axis, z.ndim)
  dt = compute_dtype(z, pt, y)
  p = jax.nn.softmax(z.astype(dt), axis=axis)
  gt = jnp.mean((p - y.astype(dt)) ** 2, axis=axis)
  kd = jnp.mean((p - pt.astype(dt)) ** 2, axis=axis)
  return alpha * gt + (1 - alpha) * kd


# --------------------------------------------------------------------------------------------
# Reference implementations (linear solves): the oracles for the factory.

def _square_gram(k) -> Array:
  k = check_array("k_train_train", k, min_rank=2)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"`k_train_train` must be a square [n, n] matrix, got shape {k.shape}.")
  return k


def _check_targets(y, n) -> Array:
  y = check_array("y_train", y)
  if y.ndim > 2 or y.shape[0] != n:
    raise ValueError(f"`y_train` must have shape [n] or [n, m] with n = {n}, got {y.shape}.")
  return y


def _check_test(k_test_train, n, name="k_test_train") -> Array:
  k = check_array(name, k_test_train, min_rank=2)
  if k.ndim != 2 or k.shape[1] != n:
    raise ValueError(f"`{name}` must have shape [m, n] with n = {n} training points, got "
                     f"{k.shape}.")
  return k


def ridge(k_train_train, y_train, *, lam, k_test_train=None) -> Array:
  r"""Kernel ridge predictions :math:`\mathbf k(x)^\top (K + \lambda I)^{-1} y` by a linear solve.

  Train predictions (:math:`K (K + \lambda I)^{-1} y`) when ``k_test_train`` is None.
  """
  k = _square_gram(k_train_train)
  y = _check_targets(y_train, k.shape[0])
  check_positive("lam", lam)
  dt = compute_dtype(k, y)
  k, y = k.astype(dt), y.astype(dt)
  w = jnp.linalg.solve(k + lam * jnp.eye(k.shape[0], dtype=dt), y)
  kt = k if k_test_train is None else _check_test(k_test_train, k.shape[0]).astype(dt)
  return jnp.matmul(kt, w, precision=jax.lax.Precision.HIGHEST)


def explicit_refit(k_train_train, y_train, *, lam, alpha, steps: int,
                   k_test_train=None) -> Array:
  r"""Reference implementation: re-fit kernel ridge at every step on the mixed target.

  Step 1 fits :math:`y`; step :math:`t` fits :math:`\alpha y + (1-\alpha) y^{(t-1)}` with a
  fresh linear solve (what retraining each model costs). ``alpha`` may be a scalar or a per-step
  schedule (entry s = step s + 2).

  Returns:
    Predictions of steps ``1..steps`` stacked on a leading axis: ``[steps, n(, m)]`` on the
    training inputs, or ``[steps, n_test(, m)]`` when ``k_test_train`` is given.
  """
  steps = check_int("steps", steps, low=1)
  k = _square_gram(k_train_train)
  y = _check_targets(y_train, k.shape[0])
  check_positive("lam", lam)
  _check_alpha(alpha)
  sched = np.asarray(alpha)
  if sched.ndim == 1 and sched.shape[0] < steps - 1:
    raise ValueError(f"`alpha` schedule must have >= steps - 1 = {steps - 1} entries.")
  dt = compute_dtype(k, y)
  k, y = k.astype(dt), y.astype(dt)
  reg = k + lam * jnp.eye(k.shape[0], dtype=dt)
  kt = None if k_test_train is None else _check_test(k_test_train, k.shape[0]).astype(dt)
  hp = jax.lax.Precision.HIGHEST
  prev, out = y, []
  for s in range(1, steps + 1):
    al = 1.0 if s == 1 else (sched if sched.ndim == 0 else sched[s - 2])
    w = jnp.linalg.solve(reg, al * y + (1 - al) * prev)
    prev = jnp.matmul(k, w, precision=hp)
    out.append(prev if kt is None else jnp.matmul(kt, w, precision=hp))
  return jnp.stack(out)


# --------------------------------------------------------------------------------------------
# The authors' toy example.

TOY_TARGETS = (0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.69201594888895180,
               -0.29756145531871736, -0.24189291901377769, -0.7964485769175675,
               -0.9616480167034174, -0.49672509509916934, -0.3469066003991437,
               0.5589512650600734)
TOY_GAMMA, TOY_LAM, TOY_ALPHAS, TOY_STEPS = 80.0, 0.2, (0.0, 0.25, 0.35), 6


def toy_data() -> dict[str, np.ndarray]:
  r"""The toy example of the authors' repository (same data as Mobahi et al. 2020) [paper].

  11 inputs :math:`x = 0, 0.1, \dots, 1`, noisy targets of :math:`\sin(2\pi x)`, the 101-point
  evaluation grid and the noise-free function on it (NumPy float64). Use with
  ``kernels.rbf(..., gamma=TOY_GAMMA)`` and ``lam=TOY_LAM``.
  """
  x = np.linspace(0.0, 1.0, 11)
  grid = np.linspace(0.0, 1.0, 101)
  return {"x": x, "y": np.asarray(TOY_TARGETS, np.float64), "grid": grid,
          "f_star": np.sin(2 * np.pi * grid)}


# --------------------------------------------------------------------------------------------
# The factory.

@dataclasses.dataclass(frozen=True)
class SelfDistillPredictor:
  r"""Closed-form self-distillation predictors after one eigendecomposition.

  Build with `self_distill_predictor`. Fields: ``eigenvalues`` (decreasing, clipped at 0),
  ``eigenvectors`` (columns, same order), ``z`` (:math:`V^\top y`), ``lam``. A pytree, so it can
  be passed through ``jax.jit``; every method is ``vmap``-able over ``t`` and scalar ``alpha``.

  Conventions: ``alpha`` is the ground-truth weight, a scalar or a per-step schedule (entry s is
  the weight of step s + 2); ``t`` is a step >= 1, traced or concrete, ``jnp.inf`` for the limit.
  Methods return training predictions unless a test-train kernel ``[m, n]`` is given.
  """
  eigenvalues: Array
  eigenvectors: Array
  z: Array
  lam: Array

  # -- coefficients -------------------------------------------------------------------------
  @property
  def a(self) -> Array:
    """Ridge shrinkage :math:`a_k = d_k/(d_k+\\lambda)` (the step-1 coefficients)."""
    return a_coefficients(self.eigenvalues, self.lam)

  def coefficients(self, t, alpha) -> Array:
    """:math:`b^{(t)}_k`, the diagonal of :math:`B^{(t)}` (decreasing-eigenvalue order)."""
    return b_coefficients(self.eigenvalues, self.lam, alpha, t)

  def _prev_b(self, t, alpha) -> Array:
    """b^(t-1) with b^(0) := 1 (y^(0) = y)."""
    t = jnp.asarray(t, self.eigenvalues.dtype)
    prev = jnp.maximum(t - 1, 1)
    b = b_coefficients(self.eigenvalues, self.lam, alpha, prev)
    return jnp.where(t <= 1, jnp.ones_like(b), b)

  def _alpha_at(self, t, alpha) -> Array:
    alpha = _check_alpha(alpha)
    if alpha.ndim == 0:
      return alpha.astype(self.eigenvalues.dtype)
    idx = jnp.clip(jnp.asarray(t, jnp.int32) - 2, 0, alpha.shape[0] - 1)
    return jnp.take(alpha, idx).astype(self.eigenvalues.dtype)

  def dual_coefficients(self, t, alpha) -> Array:
    r"""Eigen-coefficients of :math:`(K+\lambda I)^{-1}(\alpha y + (1-\alpha) y^{(t-1)})`.

    :math:`(\alpha + (1-\alpha) b^{(t-1)}_k) / (d_k + \lambda)` (:math:`= b^{(t)}_k / d_k`
    without dividing by :math:`d_k`); at ``t = inf`` this is :math:`\alpha/(\alpha d_k+\lambda)`.
    """
    _check_step(t, allow_inf=_check_alpha(alpha).ndim == 0)
    d = self.eigenvalues
    al = self._alpha_at(t, alpha)
    tf = jnp.asarray(t, d.dtype)
    w = jnp.where(tf <= 1, 1.0, al)  # step 1 fits y whatever alpha is
    return (w + (1 - w) * self._prev_b(t, alpha)) / (d + self.lam)

  # -- predictions --------------------------------------------------------------------------
  def apply(self, coef, k_test_train=None) -> Array:
    r"""Predictions of arbitrary eigen-coefficients (e.g. of a custom schedule or a grid search).

    Train points: :math:`V \operatorname{diag}(c) V^\top y` (``coef`` = :math:`b_k`, e.g.
    `coefficients`); test points (``k_test_train`` ``[m, n]``):
    :math:`\mathbf k(x)^\top V \operatorname{diag}(c) V^\top y` (``coef`` = the dual coefficients,
    e.g. `dual_coefficients` or :math:`(\alpha + (1-\alpha) b_k) / (d_k + \lambda)`).
    ``coef`` has shape ``[n]`` (decreasing-eigenvalue order).
    """
    coef = check_array("coef", coef)
    if coef.shape != self.eigenvalues.shape:
      raise ValueError(f"`coef` must have shape {self.eigenvalues.shape} (one per eigenvalue), "
                       f"got {coef.shape}.")
    coef = coef.astype(self.z.dtype)
    c = coef if self.z.ndim == 1 else coef[:, None]
    hp = jax.lax.Precision.HIGHEST
    if k_test_train is None:
      return jnp.matmul(self.eigenvectors, c * self.z, precision=hp)
    kt = _check_test(k_test_train, self.z.shape[0]).astype(self.z.dtype)
    return jnp.matmul(kt, jnp.matmul(self.eigenvectors, c * self.z, precision=hp), precision=hp)

  def predict(self, t, alpha, k_test_train=None) -> Array:
    r"""Step-:math:`t` predictions: :math:`y^{(t)} = V B^{(t)} V^\top y` on the training
    inputs, or :math:`f^{(t)}(x)` for the rows of ``k_test_train`` [paper]."""
    if k_test_train is None:
      return self.apply(self.coefficients(t, alpha), None)
    return self.apply(self.dual_coefficients(t, alpha), k_test_train)

  __call__ = predict

  def limit(self, alpha, k_test_train=None) -> Array:
    r"""Infinite-step limit: kernel ridge with :math:`\lambda/\alpha` [paper]; 0 for alpha = 0."""
    return self.predict(jnp.inf, alpha, k_test_train)

  def initial_fit(self, k_test_train=None) -> Array:
    """The step-1 (teacher) kernel ridge fit on the labels."""
    return self.predict(1, 1.0, k_test_train)

  def from_initial_fit(self, t, alpha, y1=None, k_test_train=None) -> Array:
    r"""Step :math:`t` as a function of the initial fit (no intermediate model) [paper].

    Train: :math:`y^{(t)} = V C^{(t)} V^\top y^{(1)}` with ``y1`` (default: this predictor's own
    step-1 fit). Test: :math:`f^{(t)}(x) = \mathbf k(x)^\top V D^{-1} C^{(t)} A V^\top y`, with
    :math:`D^{-1}A = (D+\lambda I)^{-1}` (safe for singular :math:`K`); needs ``y1=None``.
    Scalar alpha only.
    """
    c = c_coefficients(self.eigenvalues, self.lam, alpha, t)
    if k_test_train is not None:
      if y1 is not None:
        raise ValueError("`y1` and `k_test_train` cannot both be given: test predictions use "
                         "the training labels stored in the predictor.")
      return self.apply(c / (self.eigenvalues + self.lam), k_test_train)
    if y1 is None:
      return self.apply(c * self.a, None)
    y1 = check_array("y1", y1)
    if y1.shape != self.z.shape:
      raise ValueError(f"`y1` must have the training target shape {self.z.shape}, got "
                       f"{y1.shape}.")
    hp = jax.lax.Precision.HIGHEST
    z1 = jnp.matmul(self.eigenvectors.T, y1.astype(self.z.dtype), precision=hp)
    cc = c if z1.ndim == 1 else c[:, None]
    return jnp.matmul(self.eigenvectors, cc * z1, precision=hp)

  def alpha_zero_student(self, t, alpha, k_test_train=None) -> Array:
    r"""The step-:math:`t` model trained with :math:`\alpha = 0` on :math:`y^{(t-1)}`.

    :math:`y^{(t-1)}` is built with ``alpha`` (scalar or schedule for steps 2..t-1); coefficients
    :math:`a_k b^{(t-1)}_k`. This is the :math:`f^{(t)}_0` of Algorithm 1 and of the linearity
    identity :math:`f^{(t)}_\alpha = \alpha f^{(1)} + (1-\alpha) f^{(t)}_0`. For a scalar alpha
    of 0 it is pure self-distillation, :math:`B^{(t)} = A^t` (Mobahi et al., arXiv:2002.05715).
    """
    _check_step(t, allow_inf=_check_alpha(alpha).ndim == 0)
    prev = self._prev_b(t, alpha)
    if k_test_train is None:
      return self.apply(self.a * prev, None)
    return self.apply(prev / (self.eigenvalues + self.lam), k_test_train)

  # -- optimal alpha ------------------------------------------------------------------------
  def optimal_alpha(self, t, alpha, reference, *, k_eval_train=None,
                    clip: Sequence[float] | None = None) -> Array:
    r"""Optimal ground-truth weight :math:`\alpha^{(t)\star}` of step :math:`t \ge 2`.

    The step-:math:`(t-1)` model is built with ``alpha`` (scalar or schedule); the step-:math:`t`
    weight minimises the squared error against ``reference`` on the evaluation inputs
    (training inputs if ``k_eval_train`` is None, else the rows of ``k_eval_train``). See
    `optimal_alpha` (module level) for the caveat about training labels.
    """
    y1 = self.initial_fit(k_eval_train)
    y0 = self.alpha_zero_student(t, alpha, k_eval_train)
    r = check_array("reference", reference)
    if r.shape != y1.shape:
      raise ValueError(f"`reference` must have the shape of the evaluation predictions "
                       f"{y1.shape}, got {r.shape}.")
    return optimal_alpha(y1, y0, r, clip=clip)

  def optimal_alpha_eigen(self, t, alpha, reference, *,
                          clip: Sequence[float] | None = None) -> Array:
    r"""Same as `optimal_alpha` on the training inputs, in the eigenbasis [proposed, derived]:

    .. math::
      \alpha^{(t)\star} = \frac{\sum_k (\tilde r_k - a_k b_k z_k)\, a_k (1 - b_k) z_k}
                               {\sum_k a_k^2 (1 - b_k)^2 z_k^2},\quad b = b^{(t-1)},\
                               \tilde r = V^\top r.
    """
    r = check_array("reference", reference)
    if r.shape != self.z.shape:
      raise ValueError(f"`reference` must have the training target shape {self.z.shape}, got "
                       f"{r.shape}.")
    bounds = _check_clip(clip)
    rt = jnp.matmul(self.eigenvectors.T, r.astype(self.z.dtype),
                    precision=jax.lax.Precision.HIGHEST)
    a, b = self.a, self._prev_b(t, alpha)
    if self.z.ndim == 2:
      a, b = a[:, None], b[:, None]
    diff = a * (1 - b) * self.z
    num = jnp.sum((rt - a * b * self.z) * diff)
    den = jnp.sum(diff * diff)
    out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 1.0)
    return out if bounds is None else jnp.clip(out, *bounds)

  def greedy_alpha_schedule(self, steps: int, reference, *, k_eval_train=None,
                            clip: Sequence[float] | None = None) -> Array:
    r"""Greedy Algorithm-1 schedule :math:`\alpha^{(2)\star}, \dots, \alpha^{(T)\star}`.

    Step :math:`t` starts from the step-:math:`(t-1)` model built with the earlier optimal
    weights. Returns ``[steps - 1]`` weights, usable as the ``alpha`` schedule of every method.
    """
    steps = check_int("steps", steps, low=2)
    bounds = _check_clip(clip)
    r = check_array("reference", reference).astype(self.z.dtype)
    d, lam = self.eigenvalues, self.lam
    a = self.a
    denom_test = d + lam
    y1 = self.initial_fit(k_eval_train)
    if r.shape != y1.shape:
      raise ValueError(f"`reference` must have the shape of the evaluation predictions "
                       f"{y1.shape}, got {r.shape}.")

    def body(b_prev, _):
      coef = a * b_prev if k_eval_train is None else b_prev / denom_test
      y0 = self.apply(coef, k_eval_train)
      al = optimal_alpha(y1, y0, r, clip=bounds)
      return a * (al + (1 - al) * b_prev), al

    _, alphas = jax.lax.scan(body, a, None, length=steps - 1)
    return alphas


jax.tree_util.register_dataclass(
    SelfDistillPredictor, data_fields=["eigenvalues", "eigenvectors", "z", "lam"],
    meta_fields=[])


def self_distill_predictor(k_train_train, y_train, *, lam, dtype=None) -> SelfDistillPredictor:
  r"""Decomposes the train Gram matrix once and returns closed-form self-distillation predictors.

  [paper] Borup & Andersen, arXiv:2102.13088 (kernel ridge with ground-truth weight alpha);
  factory layout after ``neural_tangents.predict.gradient_descent_mse`` [proposed].

  Args:
    k_train_train: ``[n, n]`` symmetric PSD Gram matrix (symmetrised; may be singular).
    y_train: ``[n]`` targets or ``[n, m]`` target matrix (e.g. one-hot labels or logits).
    lam: ridge parameter :math:`\lambda > 0` (absolute scale).
    dtype: computation dtype; None picks float32 (float64 if an input is float64). float64 needs
      ``jax.enable_x64(True)``.

  Returns:
    A `SelfDistillPredictor`.

  Example::

    pred = self_distill_predictor(kernels.rbf(x, x, gamma=80.), y, lam=0.2)
    y6 = pred.predict(6, 0.25)                                  # train predictions, step 6
    f_inf = pred.limit(0.25, kernels.rbf(x_test, x, gamma=80.))  # ridge with lam / alpha
    curves = jax.vmap(lambda a: pred.predict(6, a))(jnp.linspace(0, 1, 11))
  """
  k = _square_gram(k_train_train)
  y = _check_targets(y_train, k.shape[0])
  check_positive("lam", lam)
  dt = _resolve_dtype(dtype, k, y)
  k = k.astype(dt)
  k = 0.5 * (k + k.T)
  d, v = jnp.linalg.eigh(k)
  d, v = jnp.maximum(d[::-1], 0), v[:, ::-1]  # decreasing order, round-off negatives to 0
  z = jnp.matmul(v.T, y.astype(dt), precision=jax.lax.Precision.HIGHEST)
  return SelfDistillPredictor(d, v, z, jnp.asarray(lam, dt))
