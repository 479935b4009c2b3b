r"""TAID — temporally adaptive interpolated distillation (Shing et al., arXiv:2501.16937,
ICLR 2025; official code SakanaAI/TAID, ``src/distil_losses/taid.py``).

The student is trained towards an intermediate target that moves from (a copy of) itself to the
teacher, interpolating logits with the *detached* student:

.. math:: p_t = \mathrm{softmax}\big((1-t)\,\mathrm{sg}(z_S) + t\,z_T\big),\qquad
          J = \mathrm{KL}(p_t\,\|\,\mathrm{softmax}(z_S)).

The interpolation coefficient t follows an adaptive schedule driven by the relative loss
decrease, written here as a pure state update (jit-able, no Python state):

.. code-block:: python

  state = taid_init(t_start=0.4)
  for step in range(total_steps):
    loss = mean(taid_loss(student(x), teacher(x), interpolation=state.t))
    ...
    state = taid_update(state, loss, step=step + 1, total_steps=total_steps)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import _checks
from kdjax.divergences import forward_kl
from kdjax.losses import _common

Array = jax.Array

__all__ = ["TaidState", "taid_init", "taid_update", "taid_target_logits", "taid_loss"]


class TaidState(NamedTuple):
  """TAID schedule state (a pytree). ``t_start`` is kept so the linear ramp needs no
  extra argument (design choice (kdjax) [proposed])."""

  t: Array
  prev_loss: Array
  momentum: Array
  initialised: Array
  t_start: Array


def taid_init(*, t_start: float = 0.4) -> TaidState:
  """Initial state: t = t_start (default 0.4 [paper]), momentum 0, no previous loss.

  ``t_start`` is a scalar in [0, 1) (checked when concrete; a traced value is unchecked).
  """
  _checks.check_range("t_start", t_start, low=0.0, high=1.0, high_open=True)
  if jnp.ndim(t_start) != 0:
    raise ValueError(f"`t_start` must be a scalar, got shape {jnp.shape(t_start)}.")
  f = jnp.float32
  return TaidState(t=jnp.asarray(t_start, f), prev_loss=jnp.zeros((), f),
                   momentum=jnp.zeros((), f), initialised=jnp.asarray(False),
                   t_start=jnp.asarray(t_start, f))


def taid_update(state: TaidState, loss: Array, *, step, total_steps, t_end: float = 1.0,
                a: float = 5e-4, beta: float = 0.99, eps: float = 1e-15,
                disable_adaptive: bool = False) -> TaidState:
  r"""One step of TAID's adaptive schedule [paper] (Shing et al., arXiv:2501.16937, Alg. 1).

  .. math::
    \delta_n = \frac{J_{n-1}-J_n}{J_{n-1}+\varepsilon},\quad
    m_n = \beta m_{n-1} + (1-\beta)\delta_n,\quad
    t_{\rm lin}(n) = t_{\rm start} + (t_{\rm end}-t_{\rm start})\,n/N,

    t_n = \min\big(t_{\rm end},\ \max(t_{\rm lin}(n),\ t_{n-1} + a\,\sigma(m_n)(1-t_{n-1}))\big).

  The first call only stores J (t unchanged). ``disable_adaptive=True`` gives t_n = t_lin(n) on
  every call. A non-finite ``loss`` (NaN/inf, e.g. a skipped bad step) leaves the whole state
  unchanged [proposed], so one bad step cannot switch distillation off. t is non-decreasing
  whenever the ramp is (its max with the previous t grows), and never exceeds t_end. Defaults t_end = 1, a = 5·10⁻⁴, β = 0.99, ε = 10⁻¹⁵ [paper].

  Args:
    state: the current :class:`TaidState`.
    loss: the scalar loss J_n of this step (detached).
    step: optimiser step n (1-based; may be traced).
    total_steps: N > 0.
    t_end: final t in (0, 1].
    a: the adaptive step size in [0, 1].
    beta: momentum coefficient in [0, 1].
    eps: the guard of the relative change.
    disable_adaptive: use the plain linear ramp.

  Returns:
    The new state.
  """
  _checks.check_range("t_end", t_end, low=0.0, low_open=True, high=1.0)
  _checks.check_unit_interval("a", a)
  _checks.check_unit_interval("beta", beta)
  _checks.check_positive("eps", eps)
  _checks.check_positive("total_steps", total_steps)
  _checks.check_nonneg("step", step)
  if not isinstance(disable_adaptive, bool):
    raise TypeError(f"`disable_adaptive` must be a bool, got {disable_adaptive!r}.")
  if not isinstance(state, TaidState):
    raise TypeError(f"`state` must be a TaidState (from taid_init), got {type(state).__name__}.")
  f = state.t.dtype
  loss = jnp.asarray(jax.lax.stop_gradient(loss), f)
  if loss.shape != ():
    raise ValueError(f"`loss` must be a scalar, got shape {loss.shape}.")
  t_end_ = jnp.asarray(t_end, f)
  progress = jnp.asarray(step, f) / jnp.asarray(total_steps, f)
  t_lin = state.t_start + (t_end_ - state.t_start) * progress
  finite = jnp.isfinite(loss)
  if disable_adaptive:
    new = state._replace(t=jnp.minimum(t_end_, t_lin), prev_loss=loss,
                         initialised=jnp.asarray(True))
  else:
    delta = (state.prev_loss - loss) / (state.prev_loss + jnp.asarray(eps, f))
    momentum = beta * state.momentum + (1.0 - beta) * delta
    t_adapt = state.t + a * jax.nn.sigmoid(momentum) * (1.0 - state.t)
    t_new = jnp.minimum(t_end_, jnp.maximum(t_lin, t_adapt))
    init = state.initialised
    new = TaidState(t=jnp.where(init, t_new, state.t), prev_loss=loss,
                    momentum=jnp.where(init, momentum, state.momentum),
                    initialised=jnp.asarray(True), t_start=state.t_start)
  # A non-finite loss leaves every field unchanged.
  return jax.tree.map(lambda a_, b_: jnp.where(finite, a_, b_), new, state)


def _interpolation(interpolation, shape, axis, dtype):
  _checks.check_unit_interval("interpolation", interpolation)
  batch = tuple(shape[:axis]) + tuple(shape[axis + 1:])
  return _checks.per_position("interpolation", interpolation, batch, axis, dtype)


def taid_target_logits(student_logits: Array, teacher_logits: Array, *, interpolation,
                       axis: int = -1) -> Array:
  r"""(1 − t)·sg(z_S) + t·z_T with t = ``interpolation`` (scalar or per position, in [0, 1]).

  An entry is ``-inf`` where the teacher is ``-inf`` (t > 0) or the student is ``-inf`` (t < 1)
  — a design choice (kdjax) [proposed] that avoids 0·∞. NaN propagates.
  """
  s = _checks.check_array("student_logits", student_logits)
  z = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", z)
  ax = _checks.normalize_axis(axis, s.ndim)
  s = jax.lax.stop_gradient(s)
  dtype = _checks.compute_dtype(s, z)
  s, z = s.astype(dtype), z.astype(dtype)
  tt = _interpolation(interpolation, s.shape, ax, dtype)
  s_ok, z_ok = s != -jnp.inf, z != -jnp.inf
  mixed = (1 - tt) * jnp.where(s_ok, s, 0.0) + tt * jnp.where(z_ok, z, 0.0)
  invalid = (~s_ok & (tt < 1)) | (~z_ok & (tt > 0))
  return jnp.where(invalid, -jnp.inf, mixed)


def taid_loss(student_logits: Array, teacher_logits: Array, *, interpolation,
              temperature: float = 1.0, axis: int = -1, where: Array | None = None) -> Array:
  r"""TAID loss KL(p_t ‖ q), p_t = softmax(((1 − t)·sg(z_S) + t·z_T)/T), per position.

  t = 1 is :func:`kdjax.divergences.forward_kl` (value and gradient); t = 0 gives value 0 and
  gradient 0; the gradient in z_S is (q − p_t)/T (the target is detached except through z_T).
  Reference: Shing et al., arXiv:2501.16937 [paper].

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits.
    interpolation: the coefficient t in [0, 1] (``state.t`` from :func:`taid_update`; may be
      traced — then unchecked); a scalar or per position (batch shape), checked elementwise.
    temperature: T > 0 applied to both the target and the student (scalar or per position).
    axis: the vocabulary axis.
    where: optional vocabulary mask (logits shape) or position mask (batch shape).
  """
  s = _checks.check_array("student_logits", student_logits)
  z = _checks.check_array("teacher_logits", teacher_logits)
  _checks.check_same_shape("student_logits", s, "teacher_logits", z)
  target = taid_target_logits(s, z, interpolation=interpolation, axis=axis)
  return forward_kl(s, target, temperature=temperature, axis=axis, where=where)
