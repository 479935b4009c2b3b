r"""Pallas kernel for the streaming statistics of the fused linear-head KL/JSD losses.

``fused_linear_distillation_per_token(..., implementation="pallas")`` lands here
(:func:`pallas_values`). It returns the same per-token values as ``implementation="streaming"``
of :mod:`kdjax.losses.fused_linear` and never materialises the ``[N, V]`` logits: the
forward statistics are computed by Pallas kernels, everything per token (``[N]`` vectors) and
the backward pass by XLA.

What runs where
---------------
* **Pass 1 (Pallas).** Grid ``(N_pad / block_n, V_pad / block_v)``, the vocabulary axis last
  and sequential (``"arbitrary"``; the token axis ``"parallel"``). Grid step ``(i, j)`` reads the
  student hidden block ``x_S[i] [block_n, H]`` and the head tile ``W_S[j] [block_v, H]``, forms
  the logits tile ``z_S = x_S W_S^T`` (inputs in their own dtype, float32 accumulation; float64
  for float64 inputs) and the teacher tile (``x_T W_T^T`` or the ``teacher_logits`` block),
  divides by the temperature and updates, per token, the online log-sum-exp of both sides
  (running max ``m`` and ``l = Σ e^{z-m}``) and the one-pass KL accumulators
  ``a = Σ e^{t-m_t}(t-s)``, ``b = Σ e^{s-m_s}(s-t)``; with labels also the log-sum-exp of the
  raw student logits and the picked logit. The accumulators live in the output blocks, which
  stay resident across the vocabulary axis (their index map ignores ``j``).
* **Pass 2 (Pallas, generalized JSD / skew KL only).** Once both log-normalisers are known (an
  XLA ``[N]`` computation between the two ``pallas_call``\ s), a second sweep over the same grid
  accumulates the mixture terms ``Σ p(log p − log M)``, ``Σ q(log q − log M)`` (JSD) or
  ``Σ q(log q − log M)``, ``Σ pq/M`` (skew KL) with ``M = βq + (1−β)p``.
* **XLA.** The per-token finalisation (``lse = m + log l``, ``KL = a/l_t − lse_t + lse_s`` …, the
  JSD endpoint selection ``jnp.where(β == 0, KL(q‖p), jnp.where(β == 1, KL(p‖q), JSD))`` exactly
  as ``fused_linear._stream_stats``), the per-token values (``fused_linear._stream_values``) and
  the whole backward pass: a ``jax.custom_vjp`` whose backward is
  ``fused_linear._streaming_bwd`` (XLA vocabulary tiles, ``dW_S`` one tile of rows at a time,
  hyper-parameter gradients by forward mode over the 4 entries of ``hp``) on the residual tuple
  ``(x_S, W_S, teacher, mask, labels, hp, stats)`` that ``_streaming_fwd`` builds. So the
  gradients are exactly the streaming implementation's (which are tested against autodiff of
  the reference).

The math is that of ``fused_linear``'s streaming path (``s = z_S/T``, ``t = z_T/T``,
``p = softmax(s)``, ``q = softmax(t)``; forward KL ``KL(q‖p) = Σq(t−s)/… = a/l_t − lse_t + lse_s``,
reverse KL ``b/l_s − lse_s + lse_t``, generalized JSD ``β KL(q‖M) + (1−β) KL(p‖M)``, skew KL
``KL(q‖λq + (1−λ)p)``, CE ``lse(z_S) − z_{S,y}`` at T = 1). A ``-inf`` teacher logit is a removed
word: it leaves the teacher's log-sum-exp and ``a`` and makes ``b`` (reverse KL) ``+inf``, as in
the XLA path; the in-kernel ``logaddexp`` is a copy of ``jnp.logaddexp``'s formula.

Ragged sizes (a copy)
---------------------
``N`` and ``V`` that are not multiples of the blocks are handled by **zero-padding** the inputs
to block multiples (``x_S``, ``x_T``, labels to ``N_pad`` rows; ``W_S``, ``W_T`` to ``V_pad`` rows;
``teacher_logits`` to ``[N_pad, V_pad]``): a padded *copy* of each array that needs it (none
when the sizes divide). Padded vocabulary columns are masked out of every statistic by an iota
against the true ``V`` (``col < V``); padded token rows are sliced off the ``[N]`` statistics.
The GPU variant also zero-pads the hidden width to a multiple of ``block_h`` (zero columns do
not change the products).

Two kernel variants
-------------------
* ``"grid"`` (TPU Mosaic, and the default in interpret mode): the 2-D grid above; Pallas'
  pipeline double-buffers the ``W`` tiles HBM→VMEM.
* ``"loop"`` (GPU Triton): Triton programs of one grid are not sequential, so an accumulator
  carried across a grid axis would race. Grid ``(N_pad / block_n,)``; each program loops over the
  vocabulary tiles with ``lax.fori_loop`` (the ``W`` refs are whole arrays in HBM, sliced with
  ``pl.ds``) and over the hidden dimension in chunks of ``block_h`` (so that no ``[block_n, H]``
  block has to fit in registers). Same per-tile update function as ``"grid"``.

Backends and interpret mode
---------------------------
``interpret`` resolves as: the keyword of :func:`pallas_values`, else the module-level
``INTERPRET`` (``None`` = automatic), else ``True`` iff ``jax.default_backend() == "cpu"``
(Pallas interpret mode: the kernel body is evaluated as ordinary JAX on the CPU with a
sequential grid). ``interpret=pltpu.InterpretParams()`` runs the TPU interpreter of
``jax._src.pallas.mosaic.interpret`` (TPU semantics: SMEM scalars, TPU block rules checked by
:func:`check_block_sizes`, out-of-bounds reads raise). On a GPU the ``"loop"`` variant is
compiled with Triton (``pallas.triton.CompilerParams``), on a TPU the ``"grid"`` variant with
Mosaic (``dimension_semantics=("parallel", "arbitrary")``). ``TARGET = "tpu"`` / ``"gpu"`` (with
``INTERPRET = False``) forces that lowering on any host, e.g. to lower for another platform
(``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))``): this is how the Mosaic and
Triton lowerings are checked on a CPU-only machine (``tests/test_fused_pallas.py``). The front
end's ``jax.jit`` is keyed on the config only, so after changing ``INTERPRET`` / ``TARGET`` /
``BLOCK_OVERRIDES`` use :func:`override` (a context manager that also clears that jit cache).

Block sizes
-----------
``block_n`` defaults to ``min(chunk_size, backend default)`` and ``block_v`` to
``min(tile_size, backend default)`` of the front end (rounded up to a legal size for the
backend and clipped to the padded array), so ``chunk_size``/``tile_size`` steer the kernel too;
defaults are shrunk until :func:`check_block_sizes` accepts them. Explicit block sizes
(``override(block_n=…)``) are validated and rejected with a ValueError naming the argument.

Prior art [paper]: to our knowledge no Pallas kernel for KL/JSD distillation losses existed in
JAX before: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (arXiv:2410.10989) is Triton/PyTorch
(token chunks, gradients in the forward pass); Tokamax and Levanter ship fused / blockwise
linear **cross-entropy** kernels only; Cut Cross-Entropy (arXiv:2411.09009) is an online
log-sum-exp over the vocabulary for CE only. The streaming KL/JSD/skew statistics are
[proposed] (anchors §4.4 of this project).

Not done
--------
* No Pallas backward: the backward is the XLA streaming backward (one more sweep over the
  vocabulary, plus forward-mode sweeps for the 4 hyper-parameter gradients).
* Numerics only checked in interpret mode on CPU (plain and TPU-semantics). The Mosaic (TPU)
  and Triton (GPU) versions are only checked to *lower* (Pallas' lowering rules, from a CPU
  host); the device-side compilation (Mosaic layout passes in libtpu, Triton → PTX) and the
  results have **not** been run on a TPU or GPU. No Mosaic GPU variant. No autotuning: the
  default blocks are untuned and the VMEM / shared-memory / register budgets of
  :func:`check_block_sizes` are estimates. The TPU ``"grid"`` variant keeps the whole hidden
  width in each block (no H tiling), so very wide float32 heads need small blocks.
* float32 products in the kernels use the default dot precision of each lowering (Triton:
  TF32 on Ampere and later, like XLA's default on those GPUs); no ``precision`` argument.
* Meshes (checked on 2 fake CPU devices, not in the test file): under ``jax.jit`` with
  token-sharded inputs on an ``Auto`` mesh the values and gradients are right (the
  ``pallas_call`` is not partitioned by GSPMD, so expect gathers); on an ``Explicit`` mesh
  (``jax.set_mesh``) ``pallas_call`` itself refuses ("pallas_call requires all mesh axes to be
  Manual"). Inside ``jax.shard_map``, ``check_vma=False`` works (the head-weight gradient is
  then the local sum, as for any ``check_vma=False`` code); with ``check_vma=True`` the outputs
  are typed with the inputs' varying axes, but JAX's interpret-mode HLO interpreter then fails
  (a ``dynamic_slice`` vma mismatch in ``jax/_src/pallas/hlo_interpreter.py``); the compiled
  kernels under ``shard_map`` are untested. ``vmap`` is untested.
* The padded copies above (of ``W`` and ``teacher_logits`` when V is not a multiple of
  ``block_v``) cost one extra read/write of those arrays per call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

__all__ = ["INTERPRET", "TARGET", "BLOCK_OVERRIDES", "DEFAULT_BLOCKS", "check_block_sizes",
           "default_block_sizes", "override", "pallas_values", "pallas_stats"]

#: ``None``: interpret mode iff the default backend is the CPU; else passed as ``interpret=``.
INTERPRET: Any = None
#: ``None``: the target is ``jax.default_backend()``; ``"tpu"`` / ``"gpu"`` force that lowering
#: (with ``INTERPRET = False``), e.g. to lower with ``.lower(lowering_platforms=...)`` on a CPU
#: host.
TARGET: str | None = None
#: Explicit block sizes / variant (keys ``block_n``, ``block_v``, ``block_h``, ``variant``).
BLOCK_OVERRIDES: dict = {}

#: Upper bounds per backend (``block_h`` only used by the GPU ``"loop"`` variant).
DEFAULT_BLOCKS = {
    "cpu": dict(block_n=128, block_v=1024, block_h=None),
    "tpu": dict(block_n=256, block_v=512, block_h=None),
    "gpu": dict(block_n=64, block_v=64, block_h=64),
}

_TPU_LANES = 128
_TPU_VMEM_BUDGET = 16 * 2**20      # default scoped-VMEM limit of Mosaic on v4/v5e (v6e: 32 MiB)
_GPU_SMEM_BUDGET = 100 * 2**10     # below A100 (163 KiB) / H100 (227 KiB) per-block maximum
_GPU_REGS_PER_BLOCK = 65536        # 32-bit registers per thread block (sm_70 … sm_90)
_GPU_LIVE_TILES = 6                # f32 [block_n, block_v] tiles live at once (estimate)
_GPU_NUM_STAGES = 2
_GPU_NUM_WARPS = 4


# ----------------------------------------------------------------------------- block rules


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


def _sublanes(dtype) -> int:
  """TPU sublane tiling of the second-to-last block dim: 8 rows of 32-bit, 16 of bf16, …"""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _check_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  return value


def check_block_sizes(block_n: int, block_v: int, h: int, dtype, backend: str, *,
                      block_h: int | None = None, teacher_h: int | None = None,
                      teacher_logits: bool = False, n: int | None = None,
                      v: int | None = None) -> None:
  """Raise ValueError (naming the argument) if the block sizes break a hardware rule.

  Interpret mode checks none of these; they are the rules of the compiled lowerings:

  * ``backend="tpu"`` (Mosaic): the last two dims of every block must be divisible by
    (8, 128) or equal the array's dims (the check in ``jax/_src/pallas/mosaic/lowering.py``,
    "divisible by 8 and 128"; Pallas TPU docs, "Pallas TPU details: block shapes"). For
    16-bit dtypes we require 16 rows (8-bit: 32): they pack 2 (4) rows per 32-bit sublane, the
    native tiling being (16, 128) for bf16 (same docs, memory layouts). The blocks here are
    ``x_S [block_n, H]``, ``W_S [block_v, H]``, teacher ``[block_n, block_v]`` or
    ``[block_n/block_v, H_T]`` and the ``[block_n, 1]`` statistics, so: ``block_n`` a multiple
    of the sublane count, ``block_v`` a multiple of 128 (the lane dim of the logits tile and
    the teacher-logits block); ``H`` is always the full dim. A block equal to the full (padded)
    dim ``n`` / ``v`` is allowed. VMEM estimate: double-buffered input blocks plus 8 float32
    ``[block_n, block_v]`` temporaries within 16 MiB (the default scoped VMEM limit on
    v4/v5e).
  * ``backend="gpu"`` (Triton): every loaded array's size must be a power of two (the check
    in ``jax/_src/pallas/triton/lowering.py``, ``_check_tensor_size``), so ``block_n``,
    ``block_v``, ``block_h`` must be powers of two, and at least 16 (``tl.dot`` needs M, N,
    K ≥ 16). Shared memory: ``num_stages`` (2) copies of the dot operands
    ``(block_n + block_v) · block_h`` (and the teacher's) within 100 KiB (below the A100's
    163 KiB and H100's 227 KiB per-block maximum); registers: ~6 live float32
    ``[block_n, block_v]`` tiles within the 64K 32-bit registers of one thread block. Both
    are estimates (spilling is slow, not wrong).
  * ``backend="cpu"`` (interpret mode): positive ints only.
  """
  block_n = _check_int("block_n", block_n)
  block_v = _check_int("block_v", block_v)
  h = _check_int("h", h)
  if block_h is not None:
    block_h = _check_int("block_h", block_h)
  isz = jnp.dtype(dtype).itemsize
  if backend == "tpu":
    sub = _sublanes(dtype)
    if not (block_n % sub == 0 or block_n == n):
      raise ValueError(f"`block_n` must be a multiple of {sub} on TPU for {jnp.dtype(dtype).name}"
                       f" (second-to-last dim of the [block_n, H] / [block_n, block_v] blocks; "
                       f"Mosaic (8, 128) tiling{', 16 rows for 16-bit' if sub == 16 else ''}), "
                       f"got {block_n}.")
    if not (block_v % _TPU_LANES == 0 or block_v == v):
      raise ValueError(f"`block_v` must be a multiple of {_TPU_LANES} on TPU (lane dim of the "
                       f"[block_n, block_v] logits tile and teacher-logits block), got {block_v}.")
    need = 2 * (block_n + block_v) * h * isz + 8 * block_n * block_v * 4
    if teacher_logits:
      need += 2 * block_n * block_v * isz
    if teacher_h:
      need += 2 * (block_n + block_v) * teacher_h * isz
    if need > _TPU_VMEM_BUDGET:
      raise ValueError(f"`block_n`={block_n}, `block_v`={block_v} need about "
                       f"{need / 2**20:.1f} MiB of VMEM for h={h} (budget "
                       f"{_TPU_VMEM_BUDGET / 2**20:.0f} MiB); use smaller blocks.")
  elif backend == "gpu":
    bh = block_h if block_h is not None else min(64, _next_pow2(h))
    for name, val in (("block_n", block_n), ("block_v", block_v), ("block_h", bh)):
      if not _is_pow2(val) or val < 16:
        raise ValueError(f"`{name}` must be a power of two >= 16 on GPU (Pallas Triton needs "
                         f"power-of-two array sizes; tl.dot needs dims >= 16), got {val}.")
    smem = _GPU_NUM_STAGES * (block_n + block_v) * bh * isz
    if teacher_h:
      smem *= 2
    if smem > _GPU_SMEM_BUDGET:
      raise ValueError(f"`block_h`={bh} with `block_n`={block_n}, `block_v`={block_v} needs "
                       f"about {smem // 1024} KiB of shared memory (budget "
                       f"{_GPU_SMEM_BUDGET // 1024} KiB); use a smaller block_h.")
    if _GPU_LIVE_TILES * block_n * block_v > _GPU_REGS_PER_BLOCK:
      raise ValueError(f"`block_v`={block_v} with `block_n`={block_n}: "
                       f"{_GPU_LIVE_TILES} float32 [block_n, block_v] tiles exceed the "
                       f"{_GPU_REGS_PER_BLOCK} registers of a thread block; use smaller blocks.")
  elif backend != "cpu":
    raise ValueError(f"`backend` must be 'cpu', 'gpu' or 'tpu', got {backend!r}.")


def _legal(size: int, axis: str, backend: str, dtype) -> int:
  if backend == "tpu":
    return _round_up(size, _sublanes(dtype) if axis == "n" else _TPU_LANES)
  if backend == "gpu":
    return max(16, _next_pow2(size))
  return size


def default_block_sizes(n: int, v: int, h: int, dtype, backend: str, *, chunk_size=None,
                        tile_size=None, teacher_h=None, teacher_logits=False):
  """Default ``(block_n, block_v, block_h)``: ``min(chunk/tile size, backend bound)`` made legal,
  clipped to the (legal-rounded) array and shrunk until :func:`check_block_sizes` accepts."""
  d = DEFAULT_BLOCKS[backend]
  bn = min(chunk_size or d["block_n"], d["block_n"])
  bv = min(tile_size or d["block_v"], d["block_v"])
  bn = min(_legal(bn, "n", backend, dtype), _legal(n, "n", backend, dtype))
  bv = min(_legal(bv, "v", backend, dtype), _legal(v, "v", backend, dtype))
  bh = None
  if backend == "gpu":
    bh = min(d["block_h"], max(16, _next_pow2(h)))
  kw = dict(teacher_h=teacher_h, teacher_logits=teacher_logits)
  for _ in range(32):
    try:
      check_block_sizes(bn, bv, h, dtype, backend, block_h=bh, **kw)
      return bn, bv, bh
    except ValueError:
      floor = 16 if backend == "gpu" else 1
      if bh is not None and bh > 16:
        bh //= 2
      elif bv > (_TPU_LANES if backend == "tpu" else floor) and bv >= bn:
        bv //= 2
      elif bn > (_sublanes(dtype) if backend == "tpu" else floor):
        bn //= 2
      else:
        break
  check_block_sizes(bn, bv, h, dtype, backend, block_h=bh, **kw)  # raises the real error
  return bn, bv, bh


# ----------------------------------------------------------------------------- options


class _Opts(NamedTuple):
  """Static kernel options (hashable: a custom_vjp non-differentiable argument)."""
  variant: str          # "grid" (TPU / interpret) or "loop" (GPU Triton)
  target: str           # block rules / lowering: "cpu" (plain interpret), "tpu", "gpu"
  interpret: Any        # False, True or a pltpu.InterpretParams
  block_n: int
  block_v: int
  block_h: int | None


def _is_tpu_interpret(interpret) -> bool:
  return type(interpret).__name__ == "InterpretParams" and "mosaic" in type(interpret).__module__


def _resolve(x_s, w_s, teacher, cfg, interpret=None, block_n=None, block_v=None, block_h=None,
             variant=None) -> _Opts:
  kw = dict(BLOCK_OVERRIDES)
  block_n = block_n if block_n is not None else kw.get("block_n")
  block_v = block_v if block_v is not None else kw.get("block_v")
  block_h = block_h if block_h is not None else kw.get("block_h")
  variant = variant if variant is not None else kw.get("variant")
  if interpret is None:
    interpret = INTERPRET
  backend = TARGET or jax.default_backend()
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
  if interpret is None:
    interpret = backend == "cpu"
  if _is_tpu_interpret(interpret):
    target = "tpu"
  elif interpret is not False and interpret is not None:
    target = "cpu"
  elif backend in ("tpu", "gpu"):
    target = backend
  else:
    raise ValueError(f"`interpret`=False needs a GPU or TPU backend, got {backend!r}.")
  if backend == "gpu" and interpret is False:
    variant = variant or "loop"
  variant = variant or "grid"
  if variant not in ("grid", "loop"):
    raise ValueError(f"`variant` must be 'grid' or 'loop', got {variant!r}.")
  if target == "gpu" and variant != "loop":
    raise ValueError("`variant` must be 'loop' on GPU (Triton grids are not sequential).")
  if target == "tpu" and variant != "grid":
    raise ValueError("`variant` must be 'grid' on TPU (the 'loop' variant keeps W whole).")

  n, h = x_s.shape
  v = w_s.shape[0]
  arrays = (x_s, w_s) + tuple(teacher)
  dtype = min((a.dtype for a in arrays), key=lambda d: jnp.dtype(d).itemsize)
  teacher_h = None if cfg.teacher_is_logits else teacher[0].shape[1]
  tkw = dict(teacher_h=teacher_h, teacher_logits=cfg.teacher_is_logits)
  rules = target
  dn, dv, dh = default_block_sizes(n, v, h, dtype, rules, chunk_size=cfg.chunk_size,
                                   tile_size=cfg.tile_size, **tkw)
  bn = _check_int("block_n", block_n) if block_n is not None else dn
  bv = _check_int("block_v", block_v) if block_v is not None else dv
  bh = _check_int("block_h", block_h) if block_h is not None else dh
  if variant == "loop" and bh is None:
    bh = h if rules == "cpu" else max(16, min(64, _next_pow2(h)))
  check_block_sizes(bn, bv, h, dtype, rules, block_h=bh, n=_round_up(n, bn),
                    v=_round_up(v, bv), **tkw)
  return _Opts(variant=variant, target=target, interpret=interpret, block_n=bn, block_v=bv,
               block_h=bh if variant == "loop" else None)


@contextlib.contextmanager
def override(*, interpret: Any = "unset", target: Any = "unset", **blocks):
  """Temporarily set ``INTERPRET``, ``TARGET`` and/or ``BLOCK_OVERRIDES`` (``block_n``, ``block_v``,
  ``block_h``, ``variant``) for calls through the public API, clearing the front end's cached
  ``jax.jit`` of the pallas implementation on entry and exit (it is keyed on the config only)."""
  from kdjax.losses import fused_linear  # pylint: disable=import-outside-toplevel
  global INTERPRET, TARGET
  unknown = set(blocks) - {"block_n", "block_v", "block_h", "variant"}
  if unknown:
    raise TypeError(f"override() got unknown options {sorted(unknown)}.")
  old_i, old_t, old_b = INTERPRET, TARGET, dict(BLOCK_OVERRIDES)
  if not (isinstance(interpret, str) and interpret == "unset"):
    INTERPRET = interpret
  if not (isinstance(target, str) and target == "unset"):
    TARGET = target
  BLOCK_OVERRIDES.update(blocks)
  fused_linear._IMPLS["pallas"].clear_cache()  # pylint: disable=protected-access
  try:
    yield
  finally:
    INTERPRET, TARGET = old_i, old_t
    BLOCK_OVERRIDES.clear()
    BLOCK_OVERRIDES.update(old_b)
    fused_linear._IMPLS["pallas"].clear_cache()  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- kernel math
# All per-token quantities are [block_n, 1] (2-D keeps Mosaic / Triton layouts simple).


def _finite(x):
  return jnp.abs(x) < jnp.inf  # is_finite without the primitive (Triton has no lowering)


def _lse_tile(m, l, z, valid):
  """fused_linear._lse_step on [block_n, 1] carries."""
  zm = jnp.where(valid, z, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(zm, axis=1, keepdims=True))
  m_ref = jnp.where(_finite(m_new), m_new, 0.0)
  scale = jnp.where(_finite(m), jnp.exp(m - m_ref), 0.0)
  e = jnp.where(valid, jnp.exp(jnp.where(valid, z, 0.0) - m_ref), 0.0)
  return m_new, l * scale + jnp.sum(e, axis=1, keepdims=True), scale, e


def _logaddexp(x1, x2):
  """jnp.logaddexp's formula (max + log1p(exp(−|Δ|)), Δ = NaN -> x1 + x2), kernel-safe."""
  amax = jnp.maximum(x1, x2)
  delta = x1 - x2
  return jnp.where(delta != delta, x1 + x2, amax + jnp.log1p(jnp.exp(-jnp.abs(delta))))


def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _pass1_update(carry, zs, zt, cols, lab, temperature, cfg, v):
  """One vocabulary tile of fused_linear._stream_stats pass 1."""
  ms, ls, mt, lt, a, b, mc, lc, picked = carry
  s, t = zs / temperature, zt / temperature
  valid = cols < v
  t_ok = valid & (t != -jnp.inf)
  diff = jnp.where(t_ok, t - s, 0.0)
  ms, ls, rs, es = _lse_tile(ms, ls, s, valid)
  mt, lt, rt, et = _lse_tile(mt, lt, t, t_ok)
  a = a * rt + _rowsum(jnp.where(t_ok, et * diff, 0.0))
  b = b * rs - _rowsum(jnp.where(t_ok, es * diff, jnp.where(valid & (es > 0), -jnp.inf, 0.0)))
  if cfg.has_labels:
    mc, lc, _, _ = _lse_tile(mc, lc, zs, valid)
    picked = picked + _rowsum(jnp.where(valid & (cols == lab), zs, 0.0))
  return ms, ls, mt, lt, a, b, mc, lc, picked


def _pass2_update(carry, zs, zt, cols, lse_s, lse_t, params, cfg, v):
  """One vocabulary tile of fused_linear._stream_stats pass 2 (JSD / skew KL)."""
  div, aux = carry
  temperature, coef, log_c, log_1mc = params
  valid = cols < v
  lp = zs / temperature - lse_s
  lq = zt / temperature - lse_t
  lm = _logaddexp(log_c + lq, log_1mc + lp)
  p, q = jnp.exp(lp), jnp.exp(lq)
  q_ok = valid & (lq != -jnp.inf)
  if cfg.divergence == "generalized_jsd":
    term_s = _rowsum(jnp.where(valid, p * (lp - lm), 0.0))
    term_t = _rowsum(jnp.where(q_ok, q * (lq - lm), 0.0))
    div = div + coef * term_t + (1.0 - coef) * term_s
    aux = aux + (1.0 - coef) * term_s
  else:
    div = div + _rowsum(jnp.where(q_ok, q * (lq - lm), 0.0))
    aux = aux - (1.0 - coef) * _rowsum(jnp.where(valid, jnp.exp(lp + lq - lm), 0.0))
  return div, aux


def _dot_nt(x, w, dt):
  """x [n, k] · w [v, k]^T with accumulation in dt (the einsum of fused_linear._matmul)."""
  ct = jnp.result_type(x.dtype, w.dtype)
  return jax.lax.dot_general(x.astype(ct), w.astype(ct), (((1,), (1,)), ((), ())),
                             preferred_element_type=dt)


def _dot_rows(x_ref, w_ref, start, bv, bh, dt):
  """x_ref[:, :] · w_ref[start:start+bv, :]^T, looping over the hidden dim in bh chunks."""
  bn, hp = x_ref.shape
  nk = hp // bh
  if nk == 1:
    return _dot_nt(x_ref[...], w_ref[pl.ds(start, bv), :], dt)

  def body(k, acc):
    ks = pl.multiple_of(k * bh, bh)
    return acc + _dot_nt(x_ref[:, pl.ds(ks, bh)], w_ref[pl.ds(start, bv), pl.ds(ks, bh)], dt)
  return jax.lax.fori_loop(0, nk, body, jnp.zeros((bn, bv), dt))


def _n_stats(cfg, pass_no):
  if pass_no == 2:
    return 2
  return 9 if cfg.has_labels else 6


def _init_values(cfg, pass_no, shape, dt):
  if pass_no == 2:
    return (jnp.zeros(shape, dt),) * 2
  neg, zero = jnp.full(shape, -jnp.inf, dt), jnp.zeros(shape, dt)
  vals = [neg, zero, neg, zero, zero, zero]
  if cfg.has_labels:
    vals += [neg, zero, zero]
  return tuple(vals)


def _make_kernel(cfg, opts, pass_no, v, dt):
  """Kernel over refs (params, x_s, w_s, *teacher, [labels | lse_s, lse_t], *outs)."""
  n_t = 1 if cfg.teacher_is_logits else 2
  n_out = _n_stats(cfg, pass_no)
  bn, bv = opts.block_n, opts.block_v

  def split(refs):
    p_ref, xs_ref, ws_ref = refs[:3]
    t_refs = refs[3:3 + n_t]
    extra = refs[3 + n_t:len(refs) - n_out]
    return p_ref, xs_ref, ws_ref, t_refs, extra, refs[len(refs) - n_out:]

  def update(carry, zs, zt, cols, params, extra):
    if pass_no == 1:
      full = tuple(carry) + (None,) * (9 - len(carry))
      lab = extra[0][...] if cfg.has_labels else None
      out = _pass1_update(full, zs, zt, cols, lab, params[0], cfg, v)
      return out[:n_out]
    return _pass2_update(carry, zs, zt, cols, extra[0][...], extra[1][...], params, cfg, v)

  def read_params(p_ref):
    return tuple(p_ref[k] for k in range(4))

  if opts.variant == "grid":
    def kernel(*refs):
      p_ref, xs_ref, ws_ref, t_refs, extra, outs = split(refs)
      j = pl.program_id(1)

      @pl.when(j == 0)
      def _():
        for o, val in zip(outs, _init_values(cfg, pass_no, (bn, 1), dt)):
          o[...] = val

      params = read_params(p_ref)
      zs = _dot_nt(xs_ref[...], ws_ref[...], dt)
      if cfg.teacher_is_logits:
        zt = t_refs[0][...].astype(dt)
      else:
        zt = _dot_nt(t_refs[0][...], t_refs[1][...], dt)
      cols = j * bv + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
      new = update(tuple(o[...] for o in outs), zs, zt, cols, params, extra)
      for o, val in zip(outs, new):
        o[...] = val
    return kernel

  def kernel(*refs):  # "loop": one program per token block, loop over vocabulary tiles
    p_ref, xs_ref, ws_ref, t_refs, extra, outs = split(refs)
    params = read_params(p_ref)
    nv = ws_ref.shape[0] // bv

    def body(j, carry):
      start = pl.multiple_of(j * bv, bv)
      zs = _dot_rows(xs_ref, ws_ref, start, bv, opts.block_h, dt)
      if cfg.teacher_is_logits:
        zt = t_refs[0][:, pl.ds(start, bv)].astype(dt)
      else:
        zt = _dot_rows(t_refs[0], t_refs[1], start, bv, opts.block_h, dt)
      cols = start + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
      return tuple(update(carry, zs, zt, cols, params, extra))

    out = jax.lax.fori_loop(0, nv, body, _init_values(cfg, pass_no, (bn, 1), dt))
    for o, val in zip(outs, out):
      o[...] = val
  return kernel


def _pad_to(a, shape):
  pads = [(0, s - d) for s, d in zip(shape, a.shape)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _prepare(x_s, w_s, teacher, labels, opts, cfg):
  """Zero-padded copies (only where needed) of the inputs to block multiples."""
  n, h = x_s.shape
  v = w_s.shape[0]
  n_pad, v_pad = _round_up(n, opts.block_n), _round_up(v, opts.block_v)
  loop = opts.variant == "loop"
  h_pad = _round_up(h, opts.block_h) if loop else h
  xs = _pad_to(x_s, (n_pad, h_pad))
  ws = _pad_to(w_s, (v_pad, h_pad))
  if cfg.teacher_is_logits:
    tp = (_pad_to(teacher[0], (n_pad, v_pad)),)
  else:
    x_t, w_t = teacher
    ht = x_t.shape[1]
    ht_pad = _round_up(ht, opts.block_h) if loop else ht
    tp = (_pad_to(x_t, (n_pad, ht_pad)), _pad_to(w_t, (v_pad, ht_pad)))
  lab = _pad_to(labels.astype(jnp.int32)[:, None], (n_pad, 1))
  return xs, ws, tp, lab


def _call(cfg, opts, pass_no, v, params, xs, ws, tp, extra):
  dt = jnp.dtype(cfg.dtype)
  bn, bv = opts.block_n, opts.block_v
  n_pad, v_pad = xs.shape[0], ws.shape[0]
  n_out = _n_stats(cfg, pass_no)
  tpu = opts.target == "tpu"
  if opts.variant == "grid":
    grid = (n_pad // bn, v_pad // bv)
    rows = lambda a: pl.BlockSpec((bn, a.shape[1]), lambda i, j: (i, 0))
    vrows = lambda a: pl.BlockSpec((bv, a.shape[1]), lambda i, j: (j, 0))
    tlog = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
    stat = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    pspec = pl.BlockSpec((4,), lambda i, j: (0,))
  else:
    grid = (n_pad // bn,)
    rows = lambda a: pl.BlockSpec((bn, a.shape[1]), lambda i: (i, 0))
    vrows = lambda a: pl.BlockSpec(a.shape, lambda i: (0, 0))  # whole array, sliced in-kernel
    tlog = pl.BlockSpec((bn, v_pad), lambda i: (i, 0))
    stat = pl.BlockSpec((bn, 1), lambda i: (i, 0))
    pspec = pl.BlockSpec((4,), lambda i: (0,))
  if tpu:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    pspec = pl.BlockSpec(memory_space=pltpu.SMEM)
  t_specs = [tlog] if cfg.teacher_is_logits else [rows(tp[0]), vrows(tp[1])]
  in_specs = [pspec, rows(xs), vrows(ws)] + t_specs + [stat] * len(extra)
  # Inside jax.shard_map (check_vma=True) the outputs must be typed with the mesh axes they
  # vary over: every input is made varying over the union of its inputs' axes, the outputs too.
  from kdjax.losses import fused_linear as fl  # pylint: disable=import-outside-toplevel
  params, xs, ws, tp, extra = fl._varying_like(  # pylint: disable=protected-access
      (params, xs, ws, tuple(tp), tuple(extra)), params, xs, ws, tp, extra)
  mat = getattr(jax.typeof(xs), "manual_axis_type", None)
  vary = getattr(mat, "varying", None)
  sds_kw = {"manual_axis_type": mat} if vary else {}
  out_shape = [jax.ShapeDtypeStruct((n_pad, 1), dt, **sds_kw)] * n_out
  kw = {}
  if tpu:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    sem = ("parallel", "arbitrary") if opts.variant == "grid" else ("parallel",)
    kw["compiler_params"] = pltpu.CompilerParams(dimension_semantics=sem)
  elif opts.target == "gpu":
    from jax.experimental.pallas import triton as pltr  # pylint: disable=import-outside-toplevel
    kw["compiler_params"] = pltr.CompilerParams(num_warps=_GPU_NUM_WARPS,
                                                num_stages=_GPU_NUM_STAGES)
  fn = pl.pallas_call(
      _make_kernel(cfg, opts, pass_no, v, dt), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=[stat] * n_out, interpret=opts.interpret,
      name=f"kdjax_fused_{cfg.divergence}_pass{pass_no}", **kw)
  return fn(params, xs, ws, *tp, *extra)


def pallas_stats(x_s, w_s, teacher, labels, hp, cfg, opts: _Opts) -> dict:
  """The dict of fused_linear._stream_stats (same keys, [N] each), from the Pallas kernels."""
  from kdjax.losses import fused_linear as fl  # pylint: disable=import-outside-toplevel
  dt = jnp.dtype(cfg.dtype)
  n, v = x_s.shape[0], w_s.shape[0]
  teacher = tuple(jax.lax.stop_gradient(t) for t in teacher)
  temperature, coef = hp[0], hp[1]
  params = jnp.stack([temperature, coef, jnp.log(coef), jnp.log1p(-coef)]).astype(dt)
  xs, ws, tp, lab = _prepare(x_s, w_s, teacher, labels, opts, cfg)
  out = _call(cfg, opts, 1, v, params, xs, ws, tp, [lab] if cfg.has_labels else [])
  out = [o[:n, 0] for o in out]
  carry = tuple(out[:9]) if cfg.has_labels else tuple(out[:6]) + (None,) * 3

  def second_pass(lse_s, lse_t):  # JSD / skew KL: a second kernel once the normalisers are known
    n_pad = xs.shape[0]
    extra = [_pad_to(lse_s[:, None], (n_pad, 1)), _pad_to(lse_t[:, None], (n_pad, 1))]
    return tuple(o[:n, 0] for o in _call(cfg, opts, 2, v, params, xs, ws, tp, extra))

  return fl._finish_stats(carry, coef, cfg, second_pass)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas_loss(x_s, w_s, teacher, mask, labels, hp, cfg, opts):
  from kdjax.losses import fused_linear as fl  # pylint: disable=import-outside-toplevel
  stats = pallas_stats(x_s, w_s, teacher, labels, hp, cfg, opts)
  return fl._stream_values(stats, mask, hp, cfg)  # pylint: disable=protected-access


def _pallas_loss_fwd(x_s, w_s, teacher, mask, labels, hp, cfg, opts):
  from kdjax.losses import fused_linear as fl  # pylint: disable=import-outside-toplevel
  stats = pallas_stats(x_s, w_s, teacher, labels, hp, cfg, opts)
  values = fl._stream_values(stats, mask, hp, cfg)  # pylint: disable=protected-access
  return values, (x_s, w_s, teacher, mask, labels, hp, stats)


def _pallas_loss_bwd(cfg, opts, res, g):
  del opts
  from kdjax.losses import fused_linear as fl  # pylint: disable=import-outside-toplevel
  return fl._streaming_bwd(cfg, res, g)  # pylint: disable=protected-access


_pallas_loss.defvjp(_pallas_loss_fwd, _pallas_loss_bwd)


def pallas_values(x_s, w_s, teacher, mask, labels, hp, cfg, *, interpret=None, block_n=None,
                  block_v=None, block_h=None, variant=None) -> Array:
  """Per-token values ``[N]`` of ``fused_linear._streaming`` with Pallas forward statistics.

  Arguments as ``fused_linear._streaming`` (``teacher`` = ``(logits,)`` or ``(x_T, W_T)``,
  ``hp = [T, β or λ, kd_weight, ce_weight]``, ``cfg`` the static ``_Cfg``). ``interpret``:
  ``None`` (module ``INTERPRET``, else interpret iff the backend is the CPU), ``True``/``False``
  or a ``pltpu.InterpretParams``. Block sizes / ``variant`` (``"grid"``, ``"loop"``) default as
  described in the module docstring; explicit ones are checked by :func:`check_block_sizes`.
  Differentiable in ``x_S``, ``W_S`` and ``hp`` (custom VJP: the XLA streaming backward).
  """
  opts = _resolve(x_s, w_s, teacher, cfg, interpret, block_n, block_v, block_h, variant)
  return _pallas_loss(x_s, w_s, teacher, mask, labels, hp, cfg, opts)
