r"""The anchored recursion q_t = D(M_α(p0, q_{t−1})) and projections D onto student families.

[paper] arXiv:2601.13100 models generations as repeated anchored operators and claims KL
contraction, geometric convergence and a unique attractive fixed point under realizability and
convexity. Design choice (kdjax) [proposed] (spec §5): the distillation step is the
M-projection D_Q(m) = argmin_{q ∈ Q} KL(m ‖ q) (the usual KD loss, target first); D = identity
is the realizable, convex case.

A projection is a :class:`Projection` ``(init, step)``: ``init(log_q0) -> state`` and
``step(log_target, state) -> (log_q, state)``, so iterative fitters can warm-start from the
previous generation (the state is carried through ``jax.lax.scan``). A plain function
``log_target -> log_q`` is accepted too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import _logspace as LS
from kdjax.operators import _common as C
from kdjax.operators.meta import META_KINDS, meta_teacher

Array = jax.Array

__all__ = ["Projection", "recurse", "mixture_family", "project_mixture",
           "softmax_linear_family", "project_softmax_linear", "alpha_schedule",
           "fixed_point", "FixedPointResult"]


class Projection(NamedTuple):
  """A distillation step D onto a student family, with a state for warm starts."""
  init: Callable[[Array], Any]
  step: Callable[[Array, Any], tuple[Array, Any]]


def _identity_init(log_q):
  del log_q
  return ()


def _identity_step(log_m, state):
  return log_m, state


_IDENTITY = Projection(init=_identity_init, step=_identity_step)


@functools.lru_cache(maxsize=128)
def _wrap_callable(project) -> Projection:
  # Cached so the same function gives the same (hashable) Projection: no retrace per call.
  return Projection(init=_identity_init, step=lambda lm, s: (project(lm), s))


def _as_projection(project) -> Projection:
  if project is None:
    return _IDENTITY
  if isinstance(project, Projection):
    return project
  if callable(project):
    try:
      return _wrap_callable(project)
    except TypeError:  # unhashable callable: works, compiled per call
      return Projection(init=_identity_init, step=lambda lm, s: (project(lm), s))
  raise TypeError(f"`project` must be None, a Projection or a callable, got {project!r}.")


def alpha_schedule(alpha: Any, steps: int | None) -> tuple[Array, int]:
  """Resolves ``alpha`` (scalar, length-``steps`` array, or callable t ↦ α_t) to an array."""
  if callable(alpha):
    if steps is None:
      raise ValueError("`steps` is required when `alpha` is a schedule function.")
    return jax.vmap(alpha)(jnp.arange(steps)), steps
  C.check_alpha("alpha", alpha)
  a = jnp.asarray(alpha)
  if a.ndim == 0:
    if steps is None:
      raise ValueError("`steps` is required when `alpha` is a scalar.")
    return jnp.full((steps,), a), steps
  if a.ndim != 1:
    raise ValueError(f"`alpha` must be a scalar, a 1-D schedule or a callable, got shape "
                     f"{a.shape}.")
  if steps is not None and steps != a.shape[0]:
    raise ValueError(f"`steps`={steps} does not match the schedule length {a.shape[0]}.")
  return a, a.shape[0]


def recurse(log_p0: Array, log_q0: Array, *, alpha: Any, steps: int | None = None,
            kind: str = "arithmetic", power: Any = None, temperature: Any = None,
            operator: Callable | None = None, project: Any = None,
            axis: int = -1) -> Array:
  r"""Runs q_t = D(M_α_t(p0, q_{t−1})), t = 1..steps, with ``jax.lax.scan``.

  Under realizability and convexity (D = identity) and α > 0 the forward KL contracts,
  KL(p0‖q_t) ≤ (1−α) KL(p0‖q_{t−1}) (arXiv:2601.13100 [paper] claim; statement and proof
  [proposed], theory/recursive_meta_distillation.md). With a capacity-limited projection and the
  arithmetic operator, KL(p0‖q_t) is non-increasing and q_t → D_Q(p0) for any α ∈ (0, 1]
  (Theorem 4, [proposed]).

  Eager calls are compiled once per (shapes, kind, power, axis, operator, project): pass the
  *same* ``operator`` / ``project`` objects across calls (not a fresh lambda) to reuse the
  compiled recursion.

  Args:
    log_p0: base-teacher log-probabilities ``[..., K]`` (aggregate several teachers first).
    log_q0: initial student log-probabilities, same shape. Concrete inputs must be normalised.
    alpha: anchor weight: a scalar, a 1-D schedule of length ``steps``, or a function
      ``t -> alpha_t`` (t = 0..steps−1, e.g. an optax schedule).
    steps: number of generations (inferred from an array schedule).
    kind, power, temperature: the meta-teacher family (see :func:`meta_teacher`), ignored when
      ``operator`` is given. For ``kind="geometric"`` (and ``"power"`` with β ≤ 0) a row where
      p0 and q0 have disjoint supports has an empty target (all −inf): concrete inputs with such
      a row are rejected (ValueError); traced ones give −inf rows.
    operator: a custom ``op(log_p0, log_q, alpha) -> log_m``.
    project: ``None`` (identity), a :class:`Projection`, or a function ``log_m -> log_q``.
    axis: class axis (for the built-in operators).

  Returns:
    The trajectory ``[steps + 1, *log_q0.shape]``; index 0 is ``log_q0``.
  """
  lp0 = C.as_log_probs("log_p0", log_p0)
  lq0 = C.as_log_probs("log_q0", log_q0)
  _checks.check_same_shape("log_p0", lp0, "log_q0", lq0)
  if steps is not None:
    steps = _checks.check_int("steps", steps, low=0)
  alphas, steps = alpha_schedule(alpha, steps)
  dtype = _checks.compute_dtype(lp0, lq0)
  lp0, lq0 = lp0.astype(dtype), lq0.astype(dtype)
  alphas = alphas.astype(dtype)
  proj = _as_projection(project)
  if operator is not None:
    if not callable(operator):
      raise TypeError(f"`operator` must be a callable op(log_p0, log_q, alpha), got "
                      f"{operator!r}.")
    return _recurse_custom(lp0, lq0, alphas, operator=operator, proj=proj)
  if kind not in META_KINDS:
    raise ValueError(f"`kind` must be one of {META_KINDS}, got {kind!r}.")
  ax = _checks.normalize_axis(axis, lp0.ndim)
  C.check_log_simplex("log_p0", log_p0, axis=ax)
  C.check_log_simplex("log_q0", log_q0, axis=ax)
  # Validates kind / power / temperature (raises like meta_teacher); one cached compiled call.
  meta_teacher(log_p0, log_q0, alpha=0.5, kind=kind, power=power, temperature=temperature, axis=ax)
  _check_common_support(kind, power, lp0, lq0, ax)
  b = _checks.concrete_scalar(power) if power is not None else None
  t = jnp.asarray(1.0 if temperature is None else temperature, dtype)
  if power is not None and b is None:  # traced β: not a static argument
    return _recurse_builtin_impl(lp0, lq0, alphas, t, power, kind=kind, ax=ax, proj=proj)
  return _recurse_builtin(lp0, lq0, alphas, t, b, kind=kind, ax=ax, proj=proj)


def _check_common_support(kind, power, lp0, lq0, ax):
  """Concrete geometric-type recursion: every row of p0 and q0 must share a class."""
  b = _checks.concrete_scalar(power) if power is not None else None
  if not (kind == "geometric" or (kind == "power" and b is not None and b <= 0)):
    return
  a0, b0 = _checks.concrete_array(lp0), _checks.concrete_array(lq0)
  if a0 is None or b0 is None or a0.size == 0:
    return
  shared = np.any((a0 != -np.inf) & (b0 != -np.inf), axis=ax)
  if not np.all(shared):
    raise ValueError(f"`log_p0` and `log_q0` have disjoint supports in {int(np.sum(~shared))} "
                     f"row(s): the {kind} meta-teacher p0^α q^(1−α) is then empty (all −inf). "
                     "Use kind='arithmetic' or give q0 mass on the support of p0.")


def _scan(lp0, lq0, alphas, op, proj):
  def body(carry, a):
    lq, state = carry
    lm = op(lp0, lq, a)
    lq_new, state = proj.step(lm, state)
    return (lq_new, state), lq_new

  (_, _), traj = jax.lax.scan(body, (lq0, proj.init(lq0)), alphas)
  return jnp.concatenate([lq0[None], traj], axis=0)


# Module-level compiled cores (P4): one compilation per (shapes, static arguments) instead of a
# fresh scan closure, compiled again, on every eager call. A Projection / operator is hashed by
# identity.
def _recurse_builtin_impl(lp0, lq0, alphas, temperature, power, *, kind, ax, proj):
  softened = kind in ("softened_anchor", "softened_mixture")

  def op(p0, q, a):
    return meta_teacher(p0, q, alpha=a, kind=kind, power=power,
                        temperature=temperature if softened else None, axis=ax)

  return _scan(lp0, lq0, alphas, op, proj)


_recurse_builtin = jax.jit(_recurse_builtin_impl, static_argnames=("kind", "ax", "proj", "power"))


@functools.partial(jax.jit, static_argnames=("operator", "proj"))
def _recurse_custom(lp0, lq0, alphas, *, operator, proj):
  return _scan(lp0, lq0, alphas, operator, proj)


# ----------------------------------------------------------------------------- mixture family


def _mixture_log_q(log_pi: Array, log_comp: Array) -> Array:
  # log q_k = log Σ_j π_j c_jk ; log_pi [..., J], log_comp [J, K]
  return LS.masked_logsumexp(log_pi[..., :, None] + log_comp, axis=-2)


def project_mixture(log_m: Array, log_components: Array, *, iters: int = 5000,
                    log_weights0: Array | None = None) -> tuple[Array, Array]:
  r"""M-projection of m onto the mixture family Q = {Σ_j π_j c_j}: argmin_π KL(m ‖ Σ_j π_j c_j).

  EM on the weights, π_j ← π_j Σ_k m_k c_jk / q_k (spec §9 [proposed]); each step does not
  increase the objective (it is the EM for a mixture with fixed components). Log space.

  Args:
    log_m: target log-probabilities ``[..., K]``.
    log_components: ``[J, K]`` fixed component log-probabilities.
    iters: EM iterations.
    log_weights0: optional warm start ``[..., J]`` (default uniform).

  Returns:
    ``(log_q, log_weights)``.
  """
  lm = C.as_log_probs("log_m", log_m)
  lc = C.as_log_probs("log_components", log_components, min_rank=2).astype(lm.dtype)
  if lc.ndim != 2 or lc.shape[-1] != lm.shape[-1]:
    raise ValueError(f"`log_components` must have shape [J, K] with K={lm.shape[-1]}, got "
                     f"{lc.shape}.")
  j = lc.shape[0]
  if log_weights0 is None:
    log_pi = jnp.full(lm.shape[:-1] + (j,), -jnp.log(float(j)), lm.dtype)
  else:
    log_pi = jnp.broadcast_to(jnp.asarray(log_weights0, lm.dtype), lm.shape[:-1] + (j,))

  # EM in probability space (matrix products only: cheap to compile inside scan); the weights
  # stay strictly positive from a positive start, so log π is recovered exactly at the end.
  m = jnp.exp(lm)
  comp = jnp.exp(lc)

  def em(_, pi):
    q = pi @ comp                                                    # [..., K]
    ratio = jnp.where(m == 0, 0.0, m / jnp.where(q > 0, q, 1.0))   # NaN in m propagates
    new = pi * (ratio @ comp.T)                                      # [..., J]
    return new / jnp.sum(new, axis=-1, keepdims=True)

  log_pi = LS.safe_log(jax.lax.fori_loop(0, iters, em, jnp.exp(log_pi)))
  return _mixture_log_q(log_pi, lc), log_pi


def mixture_family(log_components: Array, *, iters: int = 500,
                   init_iters: int = 5000) -> Projection:
  """Projection onto mixtures of fixed components (a convex, capacity-limited family).

  ``init`` fits the weights of q0 (``init_iters`` EM steps from uniform); each ``step`` runs
  ``iters`` EM steps warm-started from the previous generation's weights. Design choice
  (kdjax) [proposed], spec §5 / §9.
  """
  lc = jnp.asarray(log_components)

  def init(log_q0):
    return project_mixture(log_q0, lc, iters=init_iters)[1]

  def step(log_m, log_pi):
    return project_mixture(log_m, lc, iters=iters, log_weights0=log_pi)

  return Projection(init=init, step=step)


# ----------------------------------------------------------------------------- softmax-linear


def _sl_logits(w: Array, feats: Array) -> Array:
  # reference-class parametrisation: the last class has logit 0 (removes softmax's shift
  # invariance, so the M-projection objective is strictly convex for full-rank features).
  z = feats @ w
  return jnp.concatenate([z, jnp.zeros(z.shape[:-1] + (1,), z.dtype)], axis=-1)


def project_softmax_linear(log_m: Array, features: Array, *, iters: int = 30,
                           w0: Array | None = None) -> tuple[Array, Array]:
  r"""M-projection onto Q = ``{q(·|x_n) = softmax(φ(x_n) W)}``: argmin_W mean_n KL(m_n ‖ q_n).

  A log-convex (exponential) family: the geometric analogue of (C) in spec §5 [proposed].
  Solved by damped Newton with backtracking on W ∈ R^{d×(K−1)} (last class logit fixed at 0).

  Args:
    log_m: targets ``[N, K]``.
    features: ``[N, d]`` (include a constant column for a bias).
    iters: Newton iterations.
    w0: warm start ``[d, K−1]``.

  Returns:
    ``(log_q [N, K], W)``.
  """
  lm = C.as_log_probs("log_m", log_m, min_rank=2)
  phi = jnp.asarray(features, lm.dtype)
  if phi.ndim != 2 or phi.shape[0] != lm.shape[0]:
    raise ValueError(f"`features` must have shape [N, d] with N={lm.shape[0]}, got "
                     f"{phi.shape}.")
  d, k = phi.shape[1], lm.shape[-1]
  m = jnp.exp(lm)

  def objective(wflat):
    lq = jax.nn.log_softmax(_sl_logits(wflat.reshape(d, k - 1), phi), axis=-1)
    return -jnp.mean(jnp.sum(jnp.where(m == 0, 0.0, m * lq), axis=-1))

  # Closed-form derivatives of the softmax-regression cross-entropy (what jax.grad/jax.hessian
  # would give, at a fraction of the compile time): with s_n = Σ_k m_nk and q' = q[:, :K−1],
  # g = φᵀ(s q' − m')/N and H = Σ_n s_n φ_n φ_nᵀ ⊗ (diag q'_n − q'_n q'_nᵀ) / N.
  s_row = jnp.sum(m, axis=-1)
  n_rows = lm.shape[0]

  def grad_hess(wflat):
    q = jax.nn.softmax(_sl_logits(wflat.reshape(d, k - 1), phi), axis=-1)[:, :k - 1]
    g = phi.T @ (s_row[:, None] * q - m[:, :k - 1]) / n_rows
    cov = (jax.vmap(jnp.diag)(q) - q[:, :, None] * q[:, None, :]) * s_row[:, None, None]
    h = jnp.einsum("na,nb,njl->ajbl", phi, phi, cov) / n_rows
    return g.reshape(-1), h.reshape(d * (k - 1), d * (k - 1))

  w = jnp.zeros(d * (k - 1), lm.dtype) if w0 is None else jnp.asarray(w0, lm.dtype).reshape(-1)
  eye = jnp.eye(d * (k - 1), dtype=lm.dtype)

  def newton(_, w):
    g, h = grad_hess(w)
    direction = jnp.linalg.solve(h + 1e-12 * jnp.trace(h) * eye, g)
    f0 = objective(w)

    def backtrack(state):
      t, _ = state
      return t * 0.5, objective(w - t * 0.5 * direction)

    slope = jnp.dot(g, direction)  # > 0 for a descent direction -direction

    def armijo_fails(state):
      t, f = state
      return (~(f <= f0 - 1e-4 * t * slope)) & (t > 1e-8)

    t, _ = jax.lax.while_loop(armijo_fails, backtrack,
                              (jnp.asarray(1.0, lm.dtype), objective(w - direction)))
    return jnp.where(objective(w - t * direction) <= f0, w - t * direction, w)

  w = jax.lax.fori_loop(0, iters, newton, w)
  # W is shared by all rows, so a NaN target anywhere makes the whole fit NaN (the Newton
  # step's "accept only if not worse" test would otherwise silently ignore it).
  w = jnp.where(jnp.any(jnp.isnan(lm)) | jnp.any(jnp.isnan(phi)), jnp.nan, w.reshape(d, k - 1))
  return jax.nn.log_softmax(_sl_logits(w, phi), axis=-1), w


def softmax_linear_family(features: Array, *, iters: int = 10,
                          init_iters: int = 50) -> Projection:
  """Projection onto the softmax-linear (log-linear) family on fixed features.

  The trajectory is over the whole batch ``[N, K]`` (a conditional student ``q(·|x_n)``); the state
  is the weight matrix, warm-started across generations. Design choice (kdjax) [proposed].
  """
  phi = jnp.asarray(features)

  def init(log_q0):
    return project_softmax_linear(log_q0, phi, iters=init_iters)[1]

  def step(log_m, w):
    return project_softmax_linear(log_m, phi, iters=iters, w0=w)

  return Projection(init=init, step=step)


# ----------------------------------------------------------------------------- fixed points


class FixedPointResult(NamedTuple):
  """What :func:`fixed_point` returns with ``return_residual=True``."""
  value: Any        # x* (NaN where the iteration did not converge)
  residual: Array   # max |f(x*) − x*| at the returned iterate (before the NaN substitution)
  iterations: Array  # forward iterations used
  converged: Array  # residual <= tol


def _default_tol(x0) -> float:
  leaves = jax.tree_util.tree_leaves(x0)
  f64 = any(jnp.asarray(leaf).dtype == jnp.float64 for leaf in leaves)
  return 1e-12 if f64 else 1e-6


def _max_abs_diff(a, b):
  diffs = [jnp.max(jnp.abs(x - y)) if jnp.size(x) else jnp.zeros((), jnp.result_type(x))
           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  if not diffs:
    return jnp.zeros(())
  out = diffs[0].astype(jnp.result_type(*diffs))
  for d in diffs[1:]:
    out = jnp.maximum(out, d)
  return out


def _iterate(step, x0, tol, iters):
  """Iterates x <- step(x) until max|step(x) - x| <= tol or `iters` steps; (x, res, n)."""
  x1 = step(x0)
  res0 = _max_abs_diff(x1, x0)

  def cond(state):
    _, res, n = state
    return (res > tol) & (n < iters)   # NaN residual stops the loop (and is not converged)

  def body(state):
    x, _, n = state
    nx = step(x)
    return nx, _max_abs_diff(nx, x), n + 1

  return jax.lax.while_loop(cond, body, (x1, res0, jnp.asarray(1, jnp.int32)))


def _nan_unless(ok, tree):
  return jax.tree_util.tree_map(lambda v: jnp.where(ok, v, jnp.nan), tree)


def fixed_point(f: Callable[[Array, Any], Array], x0: Array, params: Any, *,
                tol: float | None = None, iters: int = 100_000,
                return_residual: bool = False) -> Any:
  r"""x* = f(x*, params) by iteration to a tolerance, differentiated implicitly.

  Forward: x_{n+1} = f(x_n, params) in a ``jax.lax.while_loop`` until the residual
  max ``|f(x) − x|`` ≤ ``tol`` or ``iters`` iterations. Backward: the implicit-function theorem,
  u = g + (∂f/∂x)ᵀ u solved at x* by the same iteration (same ``tol`` and ``iters``), then
  (∂f/∂θ)ᵀ u for θ = ``params`` *and* every array ``f`` closes over (``jax.closure_convert``),
  as jaxopt's ``custom_fixed_point`` / optimistix (spec §9, Design choice (kdjax) [proposed]);
  no unrolled graph is stored. Requires f to be a contraction in x near x*.

  **Not converged ⇒ NaN.** If the residual is still above ``tol`` after ``iters`` iterations
  (or is NaN), the value is NaN (and so is the gradient), eagerly and under ``jit`` alike, so a
  training guard fires instead of a silently wrong answer. Use ``return_residual=True`` to see
  the residual and iteration count. The residual bounds the error only through the contraction
  factor L: ``|x − x*|`` ≲ residual / (1 − L), so for slow contractions (L near 1, e.g. the
  anchored maps with a small α) choose ``tol`` accordingly, or work in float64.

  Args:
    f: ``f(x, params) -> x`` (x may be a pytree).
    x0: starting point.
    params: differentiable parameters (a pytree; may be ``None``).
    tol: residual tolerance (default 1e-6 in float32, 1e-12 when ``x0`` is float64); finite > 0.
    iters: maximum number of iterations (an int >= 1), for the forward and backward solves.
    return_residual: also return the residual, iteration count and convergence flag.

  Returns:
    x*, or a :class:`FixedPointResult` with ``return_residual=True``.
  """
  if not callable(f):
    raise TypeError(f"`f` must be a callable f(x, params), got {f!r}.")
  iters = _checks.check_int("iters", iters, low=1)
  if tol is None:
    tol = _default_tol(x0)
  _checks.check_positive("tol", tol)
  if _checks.concrete_scalar(tol) is None:
    raise TypeError(f"`tol` must be a concrete positive number, got {tol!r}.")
  tol = float(tol)
  x0 = jax.tree_util.tree_map(jnp.asarray, x0)
  closed, consts = jax.closure_convert(f, x0, params)
  x, res, n = _fixed_point(closed, tol, iters, x0, params, *consts)
  ok = res <= tol
  if return_residual:
    return FixedPointResult(x, res, n, ok)
  return x


def _fp_forward(f, tol, iters, x0, params, consts):
  x, res, n = _iterate(lambda x: f(x, params, *consts), x0, tol, iters)
  x = _nan_unless(res <= tol, x)
  return x, res, n


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fixed_point(f, tol, iters, x0, params, *consts):
  return _fp_forward(f, tol, iters, x0, params, consts)


def _fp_fwd(f, tol, iters, x0, params, *consts):
  x, res, n = _fp_forward(f, tol, iters, x0, params, consts)
  return (x, res, n), (x, params, consts)


def _fp_bwd(f, tol, iters, saved, cotangents):
  x, params, consts = saved
  g = cotangents[0]
  _, vjp_x = jax.vjp(lambda y: f(y, params, *consts), x)
  zero_u = jax.tree_util.tree_map(jnp.zeros_like, g)
  u, res, _ = _iterate(lambda u: jax.tree_util.tree_map(jnp.add, g, vjp_x(u)[0]), zero_u,
                       tol, iters)
  u = _nan_unless(res <= tol, u)
  _, vjp_p = jax.vjp(lambda p, *c: f(x, p, *c), params, *consts)
  grads = vjp_p(u)
  return (jax.tree_util.tree_map(jnp.zeros_like, x),) + tuple(grads)


_fixed_point.defvjp(_fp_fwd, _fp_bwd)
