r"""Fused linear-head distillation losses for large vocabularies.

The student's logits are ``z_S = x_S W_S^T`` (hidden states ``x_S [N, H]``, LM-head weight
``W_S [V, H]``), the teacher's ``z_T = x_T W_T^T`` or precomputed ``teacher_logits [N, V]``. With
N = 8192 tokens and V = 128256 one ``[N, V]`` float32 tensor is 4.2 GB and a plain
value-and-grad keeps about five of them (XLA's own count: ~21 GB of temporaries). The functions
here take the hidden states and head weights instead of logits and never hold the ``[N, V]``
logits:

* ``implementation="reference"`` materialises both logits and applies
  :mod:`kdjax.divergences` — the oracle the fast paths are tested against.
* ``implementation="chunked"``: ``lax.scan`` over token chunks of ``chunk_size`` rows. A
  ``jax.custom_vjp`` stores nothing but the inputs; its backward pass recomputes each chunk's
  logits, takes the chunk's logit gradient from the *same* per-chunk math as the reference
  (``jax.vjp`` of the divergence on ``[C, V]``) and accumulates ``dW_S`` in float32.
  Memory: ``O(C·V)`` plus the ``V×H`` float32 gradient accumulator.
* ``implementation="streaming"``: ``lax.scan`` over vocabulary tiles of ``tile_size`` columns
  with an online log-sum-exp, keeping a few float32 scalars per token (anchors §4.4):
  forward KL and reverse KL need one pass (running max, sum of exponentials and the
  ``Σ e^{t−m}(t−s)`` accumulator per side); generalized JSD and skew KL a second pass that
  forms the mixture ``M`` tile by tile once both log-normalisers are known. The backward pass
  recomputes the logits tile by tile from the stored scalars and writes ``dW_S`` one tile of
  rows at a time. Memory: ``O(N·tile)`` plus the head-weight gradient.

Per-token logit gradients (scaled logits s = z_S/T, t = z_T/T, p = softmax(s), q = softmax(t),
all [proposed, derived] in anchors §4.4 and checked against autodiff of the reference in
``tests/test_fused_linear.py``):

.. math::
  \partial_s \mathrm{KL}(q\|p) = p - q,\qquad
  \partial_s \mathrm{KL}(p\|q) = p\odot(\log p - \log q - \mathrm{KL}(p\|q)),

  \partial_s \mathrm{JSD}_\beta = p\odot(g - \langle p, g\rangle),\ g = (1-\beta)\log(p/M),
  \quad M = \beta q + (1-\beta) p,

  \partial_s \mathrm{KL}(q\,\|\,\lambda q + (1-\lambda)p) = p\odot(g - \langle p, g\rangle),\
  g = -(1-\lambda)\,q/M,

and ``∂z_S = ∂s / T``; the head gradients are ``dW_S = dz^T x_S`` and ``dx_S = dz W_S``.

Semantics shared by every implementation:

* The per-token loss is ``kd_weight · D(p_T, p_S; T) + ce_weight · CE(z_S, label)``. The
  divergence uses the temperature on both sides; the cross-entropy uses the raw student logits
  (T = 1), as in Hinton et al. (arXiv:1503.02531) [paper]. No T² factor is applied: pass
  ``kd_weight=T**2`` for Hinton's scaling. The CE term exists only when ``labels`` is given.
* ``where`` ([N] bool) and ``labels == ignore_index`` remove a token: value 0, gradient 0, and it
  is not counted in the normaliser of the :class:`~kdjax.reductions.SumAndCount`.
* The teacher is a constant (``stop_gradient``): no gradient flows to ``x_T``, ``W_T`` or
  ``teacher_logits``.
* Matmuls read the inputs in their own dtype (bfloat16 stays bfloat16) and accumulate in
  float32 (float64 if an input is float64); all softmax math is in that compute dtype; the
  logit gradient is rounded to the head weight's dtype before the two backward matmuls (as
  fused GPU kernels do) while ``dW_S`` is accumulated in float32. Design choice (kdjax)
  [proposed].
* Generalized JSD at β = 0 is forward KL and at β = 1 reverse KL, the endpoint convention of
  :func:`kdjax.divergences.generalized_jsd` [proposed, following TRL and Liger], selected with
  ``jnp.where`` on β: the same eagerly and under ``jax.jit`` (a traced β schedule included).
* Gradients flow to ``temperature``, ``beta``/``skew``, ``kd_weight`` and ``ce_weight`` in every
  implementation and equal the reference's (the fast paths accumulate them in their custom
  VJPs; streaming by forward mode over the four hyper-parameters).
* Vocabularies that are not a multiple of ``tile_size`` work: the last tile is shifted back to
  end at the last row (no padded copy of a ``[V, H]`` weight or ``[N, V]`` teacher tensor) and
  the rows it repeats are masked. ``"chunked"`` scans K steps of C ≤ ``chunk_size`` tokens,
  step j taking tokens s·K + j, so token-sharded inputs stay sharded (no all-gather under
  ``jax.jit``); C is a divisor of the token count in [chunk_size/2, chunk_size] when one exists,
  else fewer than K padding rows are added (a padded copy of the per-token inputs). Design
  choice (kdjax) [proposed].
* Inside ``jax.shard_map`` (default ``check_vma=True``) both fast paths run: scan carries take
  the inputs' device-varying-ness and a replicated head weight's gradient is summed over the
  token axis, as autodiff would.
* Under ``jax.jit`` with token-sharded inputs on a mesh the result equals the single-device
  one, on ``Auto`` meshes and on ``Explicit`` ones (``jax.make_mesh``'s default axis type, used
  with ``jax.set_mesh``: the head-weight gradient keeps the weight's sharding). For pure data parallelism without any cross-device traffic inside the loss, call it
  inside ``jax.shard_map`` on the local tokens and add the pairs with
  :func:`kdjax.reductions.psum`.

Vocabulary parallelism: ``implementation="streaming", mesh=mesh, vocab_axis="model"`` (optionally
``token_axis="data"``) shards the vocabulary. Use it when the LM head is already sharded over a
tensor-parallel axis (``W_S``/``W_T`` rows, or the last axis of ``teacher_logits``, over
``vocab_axis``) or too large to replicate: inside ``jax.shard_map`` each device sweeps only its
``V/P`` rows with the streaming math above and the per-token statistics are merged with
collectives of a few ``[N]`` float32 vectors (``pmax`` of the running maxima, ``psum`` of the
rescaled sums of exponentials, the KL accumulators and the CE's picked logit; JSD and skew KL add
one ``psum`` of the second pass, formed from the global log-normalisers). The head weights are
never all-gathered and no ``[N, V]`` array is formed; ``dW_S`` stays sharded like ``W_S`` (summed
over ``token_axis``), ``dx_S`` is summed over ``vocab_axis``, and the hyper-parameter gradients
equal the reference's. Call it eagerly or under ``jax.jit``, not inside an outer
``jax.shard_map``; on a mesh with Explicit axes (``jax.make_mesh``'s default) differentiate
under ``jax.set_mesh(mesh)`` or inside ``jax.jit``, as JAX requires for Explicit-typed values. V not a multiple of the vocab-axis size is padded with masked columns (one
padded copy of ``W_S``, ``W_T`` or ``teacher_logits``), N not a multiple of the token-axis size
with masked rows (a padded copy of the per-token inputs); such a V cannot be a sharded input,
so the weight usually arrives replicated and its gradient comes back replicated (gathered at
the end). For a replicated head,
plain ``"streaming"`` or ``"chunked"`` on token-sharded inputs is the better choice.

A ``-inf`` teacher logit removes that word in every implementation (streaming masks it in its
online log-sum-exp); a NaN teacher logit propagates to the token's loss. Output biases: ``student_bias`` / ``teacher_bias``. Limitation: top-k sparse teacher targets are not supported.

Prior art [paper]: Liger-Kernel ``LigerFusedLinearJSDLoss`` (arXiv:2410.10989; token chunks,
gradients in the forward pass), MaxText vocabulary tiling (token tiles + custom VJP), Levanter
blockwise CE and Cut Cross-Entropy (arXiv:2411.09009; online log-sum-exp over the vocabulary,
for CE only). The streaming KL/JSD/skew-KL statistics are [proposed] (anchors §4.4).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import divergences
from kdjax import reductions

Array = jax.Array

__all__ = [
    "DIVERGENCES",
    "IMPLEMENTATIONS",
    "fused_linear_distillation",
    "fused_linear_distillation_per_token",
    "fused_linear_forward_kl",
    "fused_linear_reverse_kl",
    "fused_linear_generalized_jsd",
    "fused_linear_skew_forward_kl",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl")
IMPLEMENTATIONS = ("reference", "chunked", "streaming", "pallas")


class _Cfg(NamedTuple):
  """Static configuration (hashable: a custom_vjp non-differentiable argument)."""
  divergence: str
  chunk_size: int
  tile_size: int
  has_labels: bool
  teacher_is_logits: bool
  dtype: str = "float32"  # compute dtype: float64 when an input is float64, else float32


# ----------------------------------------------------------------------------- shared math


def _matmul(x: Array, w: Array, dtype) -> Array:
  # einsum, not x @ w.T: XLA:CPU copies a transposed weight for the latter (anchors §4.5).
  return jnp.einsum("nh,vh->nv", x, w, preferred_element_type=dtype)


def _window(total: int, size: int, i: Array) -> tuple[Array, Array]:
  """Start of window i (shifted back so it ends inside the array) and its not-yet-seen rows."""
  nominal = i * size
  start = jnp.minimum(nominal, total - size)
  fresh = start + jnp.arange(size) >= nominal
  return start, fresh


def _num_windows(total: int, size: int) -> int:
  return -(-total // size)


def _varying_like(tree, *refs):
  """`tree` (scan-carry initial values) made device-varying over every mesh axis the inputs
  `refs` vary over, so a scan inside ``jax.shard_map`` (``check_vma=True``) type-checks."""
  def varying(a) -> set:
    t = jax.typeof(a)
    m = getattr(t, "manual_axis_type", None)
    return set(getattr(m, "varying", None) or getattr(t, "vma", None) or ())

  names = set()
  for r in jax.tree.leaves(refs):
    names |= varying(r)
  if not names:
    return tree

  def cast(z):
    missing = tuple(sorted(names - varying(z)))
    return jax.lax.pcast(z, missing, to="varying") if missing else z
  return jax.tree.map(cast, tree)


def _explicit_sharding(ref):
  """`ref`'s sharding when it lives on a mesh with Explicit axes (``jax.make_mesh``'s default),
  else None. A product that contracts a sharded token axis (dW = dzᵀx) must then be told its
  output sharding (the weight's), or JAX raises an ambiguity error."""
  sh = getattr(jax.typeof(ref), "sharding", None)
  mesh = getattr(sh, "mesh", None)
  types = getattr(mesh, "axis_types", None) or ()
  if any(t == jax.sharding.AxisType.Explicit for t in types):
    return sh
  return None


def _weight_grad(spec: str, dz: Array, x: Array, w: Array, dtype) -> Array:
  """dz^T x contracted over tokens, with the weight's sharding under an Explicit mesh."""
  out = _explicit_sharding(w)
  kw = {} if out is None else {"out_sharding": out}
  return jnp.einsum(spec, dz, x, preferred_element_type=dtype, **kw)


def _vjp_like(grads, primals):
  """Cotangents with the primals' varying-ness: a gradient that varies over a mesh axis its
  (replicated) primal does not is summed over it, the transpose of the implicit broadcast."""
  def one(g, p):
    if g is None:
      return None
    def axes(a):
      m = getattr(jax.typeof(a), "manual_axis_type", None)
      return set(getattr(m, "varying", None) or ())
    extra = tuple(sorted(axes(g) - axes(p)))
    return jax.lax.psum(g, extra) if extra else g
  return tuple(one(g, p) for g, p in zip(grads, primals))


def _teacher_cols(teacher: tuple, start, size: int, cfg: _Cfg) -> Array:
  """Teacher logits of all tokens for vocabulary columns [start, start + size)."""
  dt = jnp.dtype(cfg.dtype)
  if cfg.teacher_is_logits:
    (logits,) = teacher
    return jax.lax.dynamic_slice_in_dim(logits, start, size, 1).astype(dt)
  x_t, w_t = teacher
  return _matmul(x_t, _weight_rows(w_t, start, size), dt)


def _values_from_logits(s_logits: Array, t_logits: Array, labels: Array, mask: Array,
                        hp: Array, cfg: _Cfg) -> Array:
  """Per-token loss from materialised float32 logits [C, V], built on kdjax.divergences."""
  temperature, coef, kd_weight, ce_weight = hp[0], hp[1], hp[2], hp[3]
  kw = dict(temperature=temperature, where=mask)
  if cfg.divergence == "forward_kl":
    d = divergences.forward_kl(s_logits, t_logits, **kw)
  elif cfg.divergence == "reverse_kl":
    d = divergences.reverse_kl(s_logits, t_logits, **kw)
  elif cfg.divergence == "generalized_jsd":
    d = divergences.generalized_jsd(s_logits, t_logits, beta=coef, **kw)
  else:
    d = divergences.skew_forward_kl(s_logits, t_logits, skew=coef, **kw)
  values = kd_weight * d
  if cfg.has_labels:
    log_p = divergences.log_softmax(s_logits)
    picked = jnp.take_along_axis(log_p, jnp.where(mask, labels, 0)[:, None], axis=-1)[:, 0]
    values = values + ce_weight * jnp.where(mask, -picked, 0.0)
  return jnp.where(mask, values, 0.0)


# ----------------------------------------------------------------------------- reference


def _reference(x_s, w_s, teacher, mask, labels, hp, cfg):
  dt = jnp.dtype(cfg.dtype)
  s = _matmul(x_s, w_s, dt)
  if cfg.teacher_is_logits:
    t = teacher[0].astype(dt)
  else:
    t = _matmul(*teacher, dt)
  return _values_from_logits(s, jax.lax.stop_gradient(t), labels, mask, hp, cfg)


# ----------------------------------------------------------------------------- chunked


def _to_steps(a: Array, k: int, c: int) -> Array:
  """``[N, ...]`` -> ``[K, C, ...]`` (zero-padded to K·C rows): token ``s·K + j`` is row ``s`` of
  step ``j``. A token-sharded array keeps its sharding on the C axis, so every scan step takes
  its rows from every device locally: no all-gather of the hidden states under ``jit`` (P2)."""
  pad = k * c - a.shape[0]
  if pad:
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
  return jnp.swapaxes(a.reshape((c, k) + a.shape[1:]), 0, 1)


def _from_steps(a: Array, n: int) -> Array:
  """Inverse of :func:`_to_steps` (padding rows dropped)."""
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])[:n]


def _steps_layout(n: int, c: int) -> tuple[int, int]:
  """``(K, C)`` with ``K·C >= n``, ``C <= c``: a divisor of ``n`` in ``[c/2, c]`` when there is
  one (no padding), else ``K = ceil(n / c)`` steps of ``ceil(n / K)`` tokens (< K padding rows)."""
  for cc in range(c, (c + 1) // 2 - 1, -1):
    if n % cc == 0:
      return n // cc, cc
  k = _num_windows(n, c)
  return k, _num_windows(n, k)


def _chunk_xs(x_s, teacher, mask, labels, cfg):
  """The scanned inputs ``[K, C, ...]`` of the chunked implementation (padding rows masked)."""
  k, c = _steps_layout(x_s.shape[0], cfg.chunk_size)
  t_rows = teacher[0]  # teacher logits [N, V] or teacher hidden states [N, H_T]
  return (k, c), tuple(_to_steps(a, k, c) for a in (x_s, t_rows, mask, labels))


def _chunk_teacher(t_chunk, teacher, cfg):
  dt = jnp.dtype(cfg.dtype)
  if cfg.teacher_is_logits:
    return t_chunk.astype(dt)
  return _matmul(t_chunk, teacher[1], dt)


def _chunked_forward(x_s, w_s, teacher, mask, labels, hp, cfg):
  dt = jnp.dtype(cfg.dtype)
  n = x_s.shape[0]
  _, xs = _chunk_xs(x_s, teacher, mask, labels, cfg)

  def body(carry, inp):
    xc, tc, m, lab = inp
    s = _matmul(xc, w_s, dt)
    return carry, _values_from_logits(s, _chunk_teacher(tc, teacher, cfg), lab, m, hp, cfg)

  _, out = jax.lax.scan(body, None, xs)
  return _from_steps(out, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(x_s, w_s, teacher, mask, labels, hp, cfg):
  return _chunked_forward(x_s, w_s, teacher, mask, labels, hp, cfg)


def _chunked_fwd(x_s, w_s, teacher, mask, labels, hp, cfg):
  out = _chunked_forward(x_s, w_s, teacher, mask, labels, hp, cfg)
  return out, (x_s, w_s, teacher, mask, labels, hp)


def _chunked_bwd(cfg, res, g):
  dt = jnp.dtype(cfg.dtype)
  x_s, w_s, teacher, mask, labels, hp = res
  n, v = x_s.shape[0], w_s.shape[0]
  vt = cfg.tile_size
  (k, c), xs = _chunk_xs(x_s, teacher, mask, labels, cfg)
  g_steps = _to_steps(g, k, c)

  def body(carry, inp):
    dw, dhp = carry
    xc, tc, m, lab, gc = inp
    s = _matmul(xc, w_s, dt)
    t = _chunk_teacher(tc, teacher, cfg)
    gc = jnp.where(m, gc, 0.0)
    _, vjp = jax.vjp(lambda z, h: _values_from_logits(z, t, lab, m, h, cfg), s, hp)
    dz, dhc = vjp(gc.astype(dt))
    dhp = dhp + dhc
    dz = dz.astype(w_s.dtype)
    dxc = jnp.einsum("cv,vh->ch", dz, w_s, preferred_element_type=dt)
    xw = xc.astype(w_s.dtype)

    # dW += dz^T x one vocabulary tile of rows at a time: a whole-[V, H] product would be a
    # second V x H float32 temporary next to the accumulator (XLA:CPU does not fuse the add).
    def dw_tile(dw, j):
      vstart, vfresh = _window(v, vt, j)
      dz_t = jnp.where(vfresh[None, :], jax.lax.dynamic_slice_in_dim(dz, vstart, vt, 1), 0)
      upd = _weight_grad("cv,ch->vh", dz_t, xw, w_s, dt)
      old_t = jax.lax.dynamic_slice_in_dim(dw, vstart, vt, 0)
      return jax.lax.dynamic_update_slice_in_dim(dw, old_t + upd, vstart, 0), None

    dw, _ = jax.lax.scan(dw_tile, dw, jnp.arange(_num_windows(v, vt)))
    return (dw, dhp), dxc

  init = _varying_like((jnp.zeros_like(w_s, dtype=dt), jnp.zeros_like(hp)),
                       x_s, w_s, teacher, mask, labels, hp, g)
  (dw, dhp), dx = jax.lax.scan(body, init, xs + (g_steps,))
  dx = _from_steps(dx, n)
  dx, dw, dhp = _vjp_like((dx.astype(x_s.dtype), dw.astype(w_s.dtype), dhp), (x_s, w_s, hp))
  return dx, dw, None, None, None, dhp


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------- streaming


def _lse_step(m, l, z, valid):
  """One online log-sum-exp step over a tile: returns (m', l', rescale, e = exp(z − m'))."""
  zm = jnp.where(valid, z, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(zm, axis=-1))
  m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  scale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_ref), 0.0)
  e = jnp.where(valid, jnp.exp(jnp.where(valid, z, 0.0) - m_ref[:, None]), 0.0)
  return m_new, l * scale + jnp.sum(e, axis=-1), scale, e


def _log_norm(m, l):
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def _weight_rows(w: Array, start, size: int) -> Array:
  """Rows [start, start + size) of a head weight (one vocabulary tile)."""
  return jax.lax.dynamic_slice_in_dim(w, start, size, 0)


def _tile_window(v: int, vt: int, i: Array, col_ok: Array | None):
  """:func:`_window` of vocabulary tile i, its fresh columns also restricted to ``col_ok``
  ([V] bool or None: the vocabulary-parallel path's padding columns are not words)."""
  start, fresh = _window(v, vt, i)
  if col_ok is not None:
    fresh = fresh & jax.lax.dynamic_slice_in_dim(col_ok, start, vt)
  return start, fresh


def _tile_logits(x_s, w_s, teacher, start, size, cfg):
  dt = jnp.dtype(cfg.dtype)
  w_tile = _weight_rows(w_s, start, size)
  return _matmul(x_s, w_tile, dt), _teacher_cols(teacher, start, size, cfg), w_tile


def _mixture_terms(lp, lq, coef, cfg):
  """Log-mixture log M for JSD (M = β q + (1−β) p) or skew KL (M = λ q + (1−λ) p)."""
  log_c = jnp.log(coef)  # -inf at 0: logaddexp drops that term
  log_1mc = jnp.log1p(-coef)
  return jnp.logaddexp(log_c + lq, log_1mc + lp)


def _stream_stats(x_s, w_s, teacher, labels, hp, cfg, col_ok=None, combine=None):
  """Per-token statistics (compute dtype): log-normalisers, divergence and the backward scalar.

  ``col_ok`` ([V] bool) drops columns from every statistic; ``combine`` (None: one device)
  merges the sweeps' partial results over vocabulary shards (``_fused_vocab_parallel``):
  ``combine.pass1(carry, cfg)`` after pass 1 and ``combine.sum(div, aux)`` after pass 2."""
  dt = jnp.dtype(cfg.dtype)
  v = w_s.shape[0]
  vt = cfg.tile_size
  temperature, coef = hp[0], hp[1]
  nt = _num_windows(v, vt)
  # Token-shaped carries take the token axis' sharding from x (an Explicit mesh types it).
  zero = jnp.zeros_like(x_s[:, 0], dtype=dt)
  neg = jnp.full_like(zero, -jnp.inf)

  # Pass 1: log-normalisers of both sides (and of the raw student logits for CE), plus the
  # one-pass KL accumulators a = Σ e^{t−m_t}(t − s), b = Σ e^{s−m_s}(s − t).
  def pass1(carry, i):
    ms, ls, mt, lt, a, b, mc, lc, picked = carry
    start, fresh = _tile_window(v, vt, i, col_ok)
    zs, zt, _ = _tile_logits(x_s, w_s, teacher, start, vt, cfg)
    s, t = zs / temperature, zt / temperature
    valid = fresh[None, :]
    # A -inf teacher logit is a removed word (N21): it leaves the teacher's log-sum-exp and the
    # a-accumulator (0·log 0 = 0) and gives +inf in b (reverse-KL support violation), never NaN.
    # NaN is not -inf, so a NaN logit propagates.
    t_ok = valid & (t != -jnp.inf)
    diff = jnp.where(t_ok, t - s, 0.0)
    ms, ls, rs, es = _lse_step(ms, ls, s, valid)
    mt, lt, rt, et = _lse_step(mt, lt, t, t_ok)
    a = a * rt + jnp.sum(jnp.where(t_ok, et * diff, 0.0), axis=-1)
    b = b * rs - jnp.sum(jnp.where(t_ok, es * diff, jnp.where(valid & (es > 0), -jnp.inf, 0.0)),
                         axis=-1)
    if cfg.has_labels:
      mc, lc, _, _ = _lse_step(mc, lc, zs, valid)
      cols = start + jnp.arange(vt)
      hit = valid & (cols[None, :] == labels[:, None])
      picked = picked + jnp.sum(jnp.where(hit, zs, 0.0), axis=-1)
    return (ms, ls, mt, lt, a, b, mc, lc, picked), None

  init = _varying_like((neg, zero, neg, zero, zero, zero, neg, zero, zero), x_s, w_s, teacher,
                       labels, hp)
  carry, _ = jax.lax.scan(pass1, init, jnp.arange(nt))
  if combine is not None:
    carry = combine.pass1(carry, cfg)
  # Pass 2 (JSD, skew KL): the mixture needs both normalisers, so it is a second sweep.
  def second_pass(lse_s, lse_t):
    def pass2(carry, i):
      div, aux = carry
      start, fresh = _tile_window(v, vt, i, col_ok)
      zs, zt, _ = _tile_logits(x_s, w_s, teacher, start, vt, cfg)
      valid = fresh[None, :]
      lp = zs / temperature - lse_s[:, None]
      # A removed word's lq is -inf with a zero tangent (the forward-mode hp gradient would
      # otherwise be inf·0 = NaN in the mixture's logaddexp).
      lq = jnp.where(zt == -jnp.inf, -jnp.inf, zt / temperature - lse_t[:, None])
      lm = _mixture_terms(lp, lq, coef, cfg)
      p, q = jnp.exp(lp), jnp.exp(lq)
      if cfg.divergence == "generalized_jsd":
        term_s = jnp.sum(jnp.where(valid, p * (lp - lm), 0.0), axis=-1)
        term_t = jnp.sum(jnp.where(valid & (lq != -jnp.inf), q * (lq - lm), 0.0), axis=-1)
        div = div + coef * term_t + (1.0 - coef) * term_s
        aux = aux + (1.0 - coef) * term_s          # <p, g>, g = (1 − β) log(p / M)
      else:
        div = div + jnp.sum(jnp.where(valid & (lq != -jnp.inf), q * (lq - lm), 0.0), axis=-1)
        aux = aux - (1.0 - coef) * jnp.sum(jnp.where(valid, jnp.exp(lp + lq - lm), 0.0), -1)
      return (div, aux), None

    (div, aux), _ = jax.lax.scan(
        pass2, _varying_like((zero, zero), x_s, w_s, teacher, hp), jnp.arange(nt))
    if combine is not None:
      div, aux = combine.sum(div, aux)
    return div, aux

  return _finish_stats(carry, coef, cfg, second_pass)


def _finish_stats(carry, coef, cfg, second_pass):
  """The stats dict from the pass-1 sums ``carry`` (max, sum-exp per side, the KL accumulators,
  the CE's log-sum-exp and picked logit); ``second_pass(lse_s, lse_t) -> (div, aux)`` runs the
  mixture sweep of JSD / skew KL. Shared by the XLA and Pallas streaming paths."""
  ms, ls, mt, lt, a, b, mc, lc, picked = carry
  lse_s, lse_t = _log_norm(ms, ls), _log_norm(mt, lt)
  safe_lt = jnp.where(lt > 0, lt, 1.0)
  safe_ls = jnp.where(ls > 0, ls, 1.0)
  stats = dict(lse_s=lse_s, lse_t=lse_t)
  if cfg.divergence == "forward_kl":
    stats["div"] = a / safe_lt - lse_t + lse_s
    stats["aux"] = jnp.zeros_like(lse_s)
  elif cfg.divergence == "reverse_kl":
    stats["div"] = b / safe_ls - lse_s + lse_t
    stats["aux"] = stats["div"]  # the KL itself enters the backward pass
  else:
    div, aux = second_pass(lse_s, lse_t)
    if cfg.divergence == "generalized_jsd":
      # Endpoint convention of divergences.generalized_jsd, selected with jnp.where on β so it
      # is the same eagerly and under jit: β = 0 is KL(p_T‖p_S), β = 1 is KL(p_S‖p_T).
      kl_f = a / safe_lt - lse_t + lse_s
      kl_r = b / safe_ls - lse_s + lse_t
      div = jnp.where(coef == 0.0, kl_f, jnp.where(coef == 1.0, kl_r, div))
      stats["kl_r"] = kl_r
    stats["div"], stats["aux"] = div, aux
  if cfg.has_labels:
    stats["lse_c"] = _log_norm(mc, lc)
    stats["ce"] = stats["lse_c"] - picked
  return stats


def _stream_values(stats, mask, hp, cfg):
  values = hp[2] * stats["div"]
  if cfg.has_labels:
    values = values + hp[3] * stats["ce"]
  return jnp.where(mask, values, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _streaming(x_s, w_s, teacher, mask, labels, hp, cfg):
  return _stream_values(_stream_stats(x_s, w_s, teacher, labels, hp, cfg), mask, hp, cfg)


def _streaming_fwd(x_s, w_s, teacher, mask, labels, hp, cfg):
  stats = _stream_stats(x_s, w_s, teacher, labels, hp, cfg)
  return _stream_values(stats, mask, hp, cfg), (x_s, w_s, teacher, mask, labels, hp, stats)


def _streaming_bwd(cfg, res, g):
  x_s, w_s, hp = res[0], res[1], res[5]
  dx, dw, dhp = _streaming_bwd_parts(cfg, res, g)
  dx, dw, dhp = _vjp_like((dx.astype(x_s.dtype), dw.astype(w_s.dtype), dhp), (x_s, w_s, hp))
  return dx, dw, None, None, None, dhp


def _streaming_bwd_parts(cfg, res, g, col_ok=None, combine=None):
  """(dx, dW, dhp) of one device's vocabulary (compute dtype, not yet summed over devices);
  ``col_ok`` and ``combine`` as in :func:`_stream_stats`."""
  dt = jnp.dtype(cfg.dtype)
  x_s, w_s, teacher, mask, labels, hp, stats = res
  v = w_s.shape[0]
  vt = cfg.tile_size
  temperature, coef, kd_weight, ce_weight = hp[0], hp[1], hp[2], hp[3]
  g = jnp.where(mask, g, 0.0).astype(dt)
  lse_s, lse_t, aux = stats["lse_s"][:, None], stats["lse_t"][:, None], stats["aux"][:, None]
  x_w = x_s.astype(w_s.dtype)

  def body(carry, i):
    dw, dx = carry
    start, fresh = _tile_window(v, vt, i, col_ok)
    zs, zt, w_tile = _tile_logits(x_s, w_s, teacher, start, vt, cfg)
    lp = zs / temperature - lse_s
    lq = zt / temperature - lse_t
    p = jnp.exp(lp)
    if cfg.divergence == "forward_kl":
      ds = p - jnp.exp(lq)
    elif cfg.divergence == "reverse_kl":
      ds = p * (lp - lq - aux)
    elif cfg.divergence == "generalized_jsd":
      ds = p * ((1.0 - coef) * (lp - _mixture_terms(lp, lq, coef, cfg)) - aux)
      ds = jnp.where(coef == 0.0, p - jnp.exp(lq),
                     jnp.where(coef == 1.0, p * (lp - lq - stats["kl_r"][:, None]), ds))
    else:
      lm = _mixture_terms(lp, lq, coef, cfg)
      ds = -(1.0 - coef) * jnp.exp(lp + lq - lm) - p * aux
    dz = (kd_weight / temperature) * ds
    if cfg.has_labels:
      cols = start + jnp.arange(vt)
      onehot = (cols[None, :] == labels[:, None]).astype(dt)
      dz = dz + ce_weight * (jnp.exp(zs - stats["lse_c"][:, None]) - onehot)
    dz = jnp.where(fresh[None, :], g[:, None] * dz, 0.0).astype(w_s.dtype)
    dw_tile = _weight_grad("nv,nh->vh", dz, x_w, w_s, dt)
    # Shifted last tile: its repeated rows carry dz = 0, so adding is exact.
    old = jax.lax.dynamic_slice_in_dim(dw, start, vt, 0)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dw_tile, start, 0)
    dx = dx + jnp.einsum("nv,vh->nh", dz, w_tile, preferred_element_type=dt)
    return (dw, dx), None

  init = _varying_like((jnp.zeros_like(w_s, dtype=dt), jnp.zeros_like(x_s, dtype=dt)), x_s, w_s,
                       teacher, mask, labels, hp, g, stats)
  (dw, dx), _ = jax.lax.scan(body, init, jnp.arange(_num_windows(v, vt)))
  # Hyper-parameter gradients (T, β/λ, kd_weight, ce_weight): forward mode over the 4 entries
  # of hp, so the cost is a few extra streaming sweeps and no [N, V] residual is stored.
  def weighted(h):
    return jnp.sum(g * _stream_values(_stream_stats(x_s, w_s, teacher, labels, h, cfg, col_ok,
                                                    combine), mask, h, cfg))
  return dx, dw, jax.jacfwd(weighted)(hp)


_streaming.defvjp(_streaming_fwd, _streaming_bwd)


# ----------------------------------------------------------------------------- front end


def _check_size(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
  if value < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  return int(value)


def _check_float(name: str, x: Any, rank: int) -> Array:
  arr = _checks.check_array(name, x)
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise TypeError(f"`{name}` must be a floating-point array, got dtype {arr.dtype}.")
  if rank and arr.ndim != rank:
    raise ValueError(f"`{name}` must have rank {rank}, got shape {arr.shape}.")
  return arr


def fused_linear_distillation_per_token(
    student_hidden: Array, student_weight: Array, teacher_hidden: Array | None = None,
    teacher_weight: Array | None = None, *, teacher_logits: Array | None = None,
    student_bias: Array | None = None, teacher_bias: Array | None = None,
    divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
    skew: float = 0.1, kd_weight: float = 1.0, scale_by_t2: bool = False,
    labels: Array | None = None, ce_weight: float = 1.0, ignore_index: int = -100,
    where: Array | None = None,
    implementation: str = "chunked", chunk_size: int = 512, tile_size: int = 4096,
    mesh: jax.sharding.Mesh | None = None, vocab_axis: str | None = None,
    token_axis: str | None = None) -> Array:
  r"""Per-token fused-head distillation loss, never materialising ``[N, V]`` (except "reference").

  .. math:: \ell_n = w_{kd}\,c_T\,D\big(\mathrm{softmax}(z_{T,n}/T), \mathrm{softmax}(z_{S,n}/T)\big)
            + w_{ce}\,\big(\mathrm{lse}(z_{S,n}) - z_{S,n,y_n}\big),\quad z_S = x_S W_S^\top,
            \quad c_T = T^2 \text{ if scale\_by\_t2 else } 1.

  Args:
    student_hidden: ``x_S [..., H]`` final hidden states (leading dims are flattened to tokens).
    student_weight: ``W_S [V, H]`` LM-head weight (the ``nn.Linear``/embedding layout).
    teacher_hidden: ``x_T [..., H_T]`` teacher hidden states (with ``teacher_weight``).
    teacher_weight: ``W_T [V, H_T]``.
    teacher_logits: ``[..., V]`` precomputed teacher logits, instead of the two above.
    student_bias: optional ``[V]`` output bias of the student head (``nnx.Linear``'s ``bias``):
      z_S = x_S W_S^T + b_S, with its gradient. It is appended to the head as one more hidden
      column (a copy of ``x_S`` and ``W_S`` one column wider), so every implementation is
      unchanged.
    teacher_bias: optional ``[V]`` output bias of the teacher head (or added to
      ``teacher_logits``); no gradient, like the rest of the teacher.
    divergence: one of ``"forward_kl"`` KL(p_T‖p_S), ``"reverse_kl"`` KL(p_S‖p_T),
      ``"generalized_jsd"`` (β) or ``"skew_forward_kl"`` KL(p_T‖λp_T + (1−λ)p_S) (λ = skew).
    temperature: T > 0 for the divergence (both sides). Scalars only: ``temperature``, ``beta``,
      ``skew``, ``kd_weight`` and ``ce_weight`` are one value for all tokens (a per-token array
      is rejected with a ValueError naming it).
    beta: β ∈ [0, 1] of the generalized JSD (arXiv:2306.13649 [paper]).
    skew: λ ∈ [0, 1] of the skew forward KL (arXiv:2402.03898 [paper]).
    kd_weight: weight of the divergence term.
    scale_by_t2: also multiply the divergence term by T² (Hinton et al.'s gradient-scale
      correction), as ``kdjax.losses.ce_kd_mixture(scale_by_t2=True)``: the one CE + KD mixture
      ``ce_weight·CE + kd_weight·(T² if scale_by_t2 else 1)·D``. Default False (no hidden factor).
    labels: optional ``[...]`` integer targets; adds ``ce_weight`` × cross-entropy at T = 1.
    ce_weight: weight of the cross-entropy term (used only with ``labels``).
    ignore_index: label value that removes a token (both terms, and the normaliser).
    where: optional ``[...]`` boolean token mask.
    implementation: ``"reference"``, ``"chunked"``, ``"streaming"`` or ``"pallas"``.
    chunk_size: tokens per scan step (``"chunked"``; clipped to the token count). Step j takes
      the tokens s·K + j (K steps), so token-sharded inputs stay sharded: no all-gather.
    tile_size: vocabulary columns per tile (``"streaming"``; ``"chunked"`` accumulates the
      head-weight gradient in row tiles of this size); clipped to V (to V / P with ``mesh``).
    mesh: optional ``jax.sharding.Mesh`` for vocabulary parallelism, with
      ``implementation="streaming"`` only (see "Vocabulary parallelism" in the module
      docstring). None (default): the single-program behaviour above. Call from outside
      ``jax.shard_map`` (eagerly or under ``jax.jit``).
    vocab_axis: the mesh axis that shards the vocabulary: the rows of ``student_weight`` and
      ``teacher_weight`` (or the last axis of ``teacher_logits``). Required with ``mesh``.
    token_axis: optional mesh axis that shards the tokens at the same time (None: tokens
      replicated over the mesh). Both axes are single axis names (str).

  Returns:
    ``[...]`` per-token loss (float32; float64 for float64 inputs), 0 at removed tokens.
  """
  values, _ = _per_token_and_mask(**locals())
  return values


def _per_token_and_mask(*, student_hidden, student_weight, teacher_hidden, teacher_weight,
                        teacher_logits, student_bias, teacher_bias, divergence, temperature, beta, skew, kd_weight,
                        scale_by_t2, labels, ce_weight, ignore_index, where, implementation,
                        chunk_size, tile_size, mesh=None, vocab_axis=None, token_axis=None):
  if divergence not in DIVERGENCES:
    raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}.")
  if mesh is not None or vocab_axis is not None or token_axis is not None:
    from kdjax.losses import _fused_vocab_parallel  # pylint: disable=import-outside-toplevel
    _fused_vocab_parallel.check_args(mesh, vocab_axis, token_axis, implementation)
  chunk_size = _check_size("chunk_size", chunk_size)
  tile_size = _check_size("tile_size", tile_size)
  _checks.check_positive("temperature", temperature)
  _checks.check_unit_interval("beta", beta)
  _checks.check_unit_interval("skew", skew)
  if not isinstance(scale_by_t2, (bool, np.bool_)):
    raise TypeError(f"`scale_by_t2` must be a Python bool, got {scale_by_t2!r}.")
  # Per-token hyper-parameters are not supported by the fused heads: scalars only (N24).
  for name, val in (("temperature", temperature), ("beta", beta), ("skew", skew),
                    ("kd_weight", kd_weight), ("ce_weight", ce_weight)):
    _checks.check_real(name, val)
    if jnp.ndim(val) != 0:
      raise ValueError(f"`{name}` must be a scalar for the fused losses (one value for all "
                       f"tokens), got shape {jnp.shape(val)}.")

  x_s = _check_float("student_hidden", student_hidden, 0)
  w_s = _check_float("student_weight", student_weight, 2)
  if x_s.ndim < 2:
    raise ValueError(f"`student_hidden` must have shape [..., H], got {x_s.shape}.")
  batch_shape, h = x_s.shape[:-1], x_s.shape[-1]
  v = w_s.shape[0]
  if v == 0:
    raise ValueError(f"`student_weight` must have a non-empty vocabulary (shape [V, H] with "
                     f"V >= 1), got {w_s.shape}.")
  if w_s.shape[1] != h:
    raise ValueError(f"`student_weight` must have shape [V, {h}] (H of `student_hidden`), "
                     f"got {w_s.shape}; transpose an nnx.Linear kernel (shape [H, V]), "
                     f"e.g. `kernel.T`.")
  n = int(np.prod(batch_shape))
  x_s = x_s.reshape(n, h)

  if teacher_logits is not None:
    if teacher_hidden is not None or teacher_weight is not None:
      raise ValueError("Pass either `teacher_logits` or (`teacher_hidden`, `teacher_weight`), "
                       "not both.")
    tl = _check_float("teacher_logits", teacher_logits, 0)
    if tl.shape != batch_shape + (v,):
      raise ValueError(f"`teacher_logits` must have shape {batch_shape + (v,)}, got {tl.shape}.")
    teacher = (tl.reshape(n, v),)
  else:
    if teacher_hidden is None or teacher_weight is None:
      raise ValueError("Pass `teacher_hidden` and `teacher_weight`, or `teacher_logits`.")
    x_t = _check_float("teacher_hidden", teacher_hidden, 0)
    w_t = _check_float("teacher_weight", teacher_weight, 2)
    if x_t.shape[:-1] != batch_shape:
      raise ValueError(f"`teacher_hidden` must have shape {batch_shape} + (H_T,), "
                       f"got {x_t.shape}.")
    if w_t.shape != (v, x_t.shape[-1]):
      raise ValueError(f"`teacher_weight` must have shape {(v, x_t.shape[-1])} "
                       f"([V, H_T], the student's vocabulary), got {w_t.shape}; transpose an "
                       f"nnx.Linear kernel (shape [H_T, V]), e.g. `kernel.T`.")
    teacher = (x_t.reshape(n, x_t.shape[-1]), w_t)

  def bias(name, b):
    b = _check_float(name, b, 1)
    if b.shape != (v,):
      raise ValueError(f"`{name}` must have shape ({v},) (the vocabulary of `student_weight`), "
                       f"got {b.shape}.")
    return b

  def with_bias(x, w, b):  # x w^T + b as [x, 1] [w, b]^T
    return (jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1),
            jnp.concatenate([w, b[:, None].astype(w.dtype)], axis=1))

  if student_bias is not None:
    x_s, w_s = with_bias(x_s, w_s, bias("student_bias", student_bias))
  if teacher_bias is not None:
    b_t = jax.lax.stop_gradient(bias("teacher_bias", teacher_bias))
    if teacher_logits is not None:
      teacher = (teacher[0] + b_t.astype(teacher[0].dtype),)
    else:
      teacher = with_bias(teacher[0], teacher[1], b_t)

  mask = jnp.ones((n,), bool)
  if where is not None:
    w = jnp.asarray(where)
    if w.dtype != jnp.bool_:
      raise TypeError(f"`where` must be a boolean token mask, got dtype {w.dtype}.")
    if w.shape != batch_shape:
      raise ValueError(f"`where` must have the token shape {batch_shape}, got {w.shape}.")
    mask = w.reshape(n)
  if labels is not None:
    lab = jnp.asarray(labels)
    if not jnp.issubdtype(lab.dtype, jnp.integer):
      raise TypeError(f"`labels` must be integers, got dtype {lab.dtype}.")
    if lab.shape != batch_shape:
      raise ValueError(f"`labels` must have the token shape {batch_shape}, got {lab.shape}.")
    if not isinstance(labels, jax.core.Tracer):
      lab_np = np.asarray(labels).reshape(n)
      bad = (lab_np != ignore_index) & ((lab_np < 0) | (lab_np >= v))
      if where is not None and not isinstance(where, jax.core.Tracer):
        bad &= np.asarray(where).reshape(n)
      if bad.any():
        raise ValueError(f"`labels` must lie in [0, {v}) or equal ignore_index={ignore_index}.")
    lab = lab.reshape(n).astype(jnp.int32)
    # A traced out-of-range label cannot be reported; it removes its token instead.
    mask = mask & (lab != ignore_index) & (lab >= 0) & (lab < v)
    lab = jnp.where(mask, lab, 0)
  else:
    lab = jnp.zeros((n,), jnp.int32)

  dt = _checks.compute_dtype(x_s, w_s, *teacher)
  # The generalized-JSD endpoints (β ∈ {0, 1}) are selected inside every implementation with
  # jnp.where on β, never by a Python branch on a concrete value (jit(f)(x) == f(x)).
  coef = skew if divergence == "skew_forward_kl" else beta
  hp = jnp.stack([jnp.asarray(temperature, dt), jnp.asarray(coef, dt),
                  jnp.asarray(kd_weight, dt) * (jnp.asarray(temperature, dt) ** 2
                                                if scale_by_t2 else 1),
                  jnp.asarray(ce_weight, dt)])

  if n == 0:
    return jnp.zeros(batch_shape, dt), mask.reshape(batch_shape)
  cfg = _Cfg(divergence=divergence, chunk_size=min(chunk_size, n), tile_size=min(tile_size, v),
             has_labels=labels is not None, teacher_is_logits=teacher_logits is not None,
             dtype=jnp.dtype(dt).name)
  if mesh is not None:
    from kdjax.losses import _fused_vocab_parallel  # pylint: disable=import-outside-toplevel
    values = _fused_vocab_parallel.vocab_parallel_values(
        x_s, w_s, teacher, mask, lab, hp, cfg, mesh=mesh, vocab_axis=vocab_axis,
        token_axis=token_axis)
  else:
    values = _IMPLS[implementation](x_s, w_s, teacher, mask, lab, hp, cfg)
  return values.reshape(batch_shape), mask.reshape(batch_shape)


# Module-level jits keyed on the static config: an eager call compiles once per shape/config
# instead of tracing fresh scan closures on every call (P4); under an outer jit they inline.
def _pallas(x_s, w_s, teacher, mask, labels, hp, cfg):
  # Imported on first use: the kernel module pulls in jax.experimental.pallas.
  from kdjax.losses import _fused_pallas  # pylint: disable=import-outside-toplevel
  return _fused_pallas.pallas_values(x_s, w_s, teacher, mask, labels, hp, cfg)


_IMPLS = {name: jax.jit(fn, static_argnums=(6,)) for name, fn in
          (("reference", _reference), ("chunked", _chunked), ("streaming", _streaming),
           ("pallas", _pallas))}


def fused_linear_distillation(
    student_hidden: Array, student_weight: Array, teacher_hidden: Array | None = None,
    teacher_weight: Array | None = None, *, teacher_logits: Array | None = None,
    student_bias: Array | None = None, teacher_bias: Array | None = None,
    divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
    skew: float = 0.1, kd_weight: float = 1.0, scale_by_t2: bool = False,
    labels: Array | None = None, ce_weight: float = 1.0, ignore_index: int = -100,
    where: Array | None = None,
    implementation: str = "chunked", chunk_size: int = 512,
    tile_size: int = 4096, mesh: jax.sharding.Mesh | None = None, vocab_axis: str | None = None,
    token_axis: str | None = None) -> reductions.SumAndCount:
  """(sum, count) of :func:`fused_linear_distillation_per_token` over the kept tokens.

  The count excludes tokens removed by ``where`` or ``ignore_index``; take the mean once per
  optimiser step with :func:`kdjax.reductions.finalize_mean` (``.mean()``). Arguments as in
  :func:`fused_linear_distillation_per_token`.

  Example::

    acc = fused_linear_distillation(x_s, w_s, x_t, w_t, divergence="generalized_jsd", beta=0.5,
                                    temperature=2.0, where=mask, implementation="streaming")
    loss = acc.mean()
  """
  values, mask = _per_token_and_mask(**locals())
  return reductions.masked_sum_and_count(values, where=mask)


def _named(divergence: str, doc: str):
  def fn(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, **kwargs):
    if "divergence" in kwargs:
      raise TypeError(f"`divergence` is fixed to {divergence!r} by this function.")
    return fused_linear_distillation(student_hidden, student_weight, teacher_hidden,
                                     teacher_weight, divergence=divergence, **kwargs)
  fn.__name__ = fn.__qualname__ = f"fused_linear_{divergence}"
  fn.__doc__ = doc + "\n\n  Keyword arguments as in :func:`fused_linear_distillation`; returns a " \
      "SumAndCount."
  return fn


fused_linear_forward_kl = _named(
    "forward_kl", "Fused-head forward KL(p_T ‖ p_S) (Hinton et al., arXiv:1503.02531 [paper]).")
fused_linear_reverse_kl = _named(
    "reverse_kl", "Fused-head reverse KL(p_S ‖ p_T) (MiniLLM, arXiv:2306.08543 [paper]).")
fused_linear_generalized_jsd = _named(
    "generalized_jsd", "Fused-head generalized JSD(β) (GKD, arXiv:2306.13649 [paper]).")
fused_linear_skew_forward_kl = _named(
    "skew_forward_kl", "Fused-head skew forward KL(p_T ‖ λp_T + (1−λ)p_S) (DistiLLM, "
    "arXiv:2402.03898 [paper]).")
