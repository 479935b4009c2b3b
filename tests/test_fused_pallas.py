"""Pallas streaming statistics (``implementation="pallas"``) against the materialising reference.

Runs the kernels in Pallas interpret mode on the CPU (the default there). Interpret mode
compiles slowly, so shapes are tiny and each test compiles one function that holds both
implementations and is then called with several hyper-parameter values (data, not static).
Tolerances as in ``tests/test_fused_linear.py``: float32 rtol 1e-5; bfloat16 values rtol 1e-4,
gradients rtol 5e-2 / atol 2e-2 of the gradient's scale (the fused backward rounds the logit
gradient to bf16, autodiff of the reference does not).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _fused_pallas as fp
from kdjax.losses import fused_linear as fl

N, H, HT, V = 19, 8, 6, 45   # ragged: N, V not multiples of the blocks below
BLOCKS = dict(chunk_size=8, tile_size=16)   # -> block_n = 8, block_v = 16: a 3 x 3 grid
# XLA:CPU backend optimisation level 0 halves the compile time of these interpret-mode
# programs (the numerics are the same ops; compile time dominates this file's runtime).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(n=N, v=V, dtype=jnp.float32, seed=0):
  # NumPy draws: eager jax.random calls compile one small program each (seconds here).
  rng = np.random.default_rng(seed)
  def normal(*shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)
  x_s, w_s, b_s = normal(n, H), normal(v, H), normal(v, scale=0.5)
  x_t, w_t = normal(n, HT), normal(v, HT)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) < 0.7)
  return x_s, w_s, b_s, x_t, w_t, labels, mask


def _both(divergence, teacher_kw, labels, mask, hp_grads=True, **extra):
  """jit of (per-token values, grads wrt x_s, w_s, bias and the 4 hyper-parameters) for pallas
  and reference; the hyper-parameters are arguments, so one compile serves several values."""
  def run(impl, x_s, w_s, b_s, hps):
    def loss(x_s, w_s, b_s, hps):
      t, c, kd, ce = hps
      per = fl.fused_linear_distillation_per_token(
          x_s, w_s, student_bias=b_s, divergence=divergence, temperature=t, beta=c, skew=c,
          kd_weight=kd, ce_weight=ce, labels=labels, where=mask, implementation=impl,
          **teacher_kw, **BLOCKS, **extra)
      return per.sum() / 7.0, per
    argnums = (0, 1, 2, 3) if hp_grads else (0, 1, 2)
    (_, per), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
        x_s, w_s, b_s, hps)
    return per, grads

  @_jit
  def f(x_s, w_s, b_s, hps):
    return run("pallas", x_s, w_s, b_s, hps), run("reference", x_s, w_s, b_s, hps)
  return f


def _close(got, want, rtol=1e-5, atol_scale=1e-6, finite=True):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if finite:
      assert np.all(np.isfinite(g))
    scale = np.abs(w[np.isfinite(w)]).max(initial=0.0)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * (scale + 1e-30))


def _hps(t=2.0, c=0.3, kd=1.3, ce=0.7):
  return tuple(jnp.float32(a) for a in (t, c, kd, ce))


@pytest.mark.parametrize("divergence,teacher", [
    ("forward_kl", "logits"), ("reverse_kl", "hidden"), ("generalized_jsd", "hidden"),
    ("skew_forward_kl", "logits")])
def test_values_and_grads_match_reference_f32(divergence, teacher):
  """Values and gradients (x_s, W_s, bias, T, β/λ, kd_weight, ce_weight) with labels and a
  `where` mask, ragged N and V; logits teachers carry -inf (removed) words; the JSD endpoints
  β = 0 / 1 (jnp.where on a traced β) and eager == jit."""
  x_s, w_s, b_s, x_t, w_t, labels, mask = _inputs()
  if teacher == "logits":
    logits = x_t @ w_t.T
    logits = logits.at[0, 3].set(-jnp.inf).at[5, 40].set(-jnp.inf).at[6, :17].set(-jnp.inf)
    t_kw = dict(teacher_logits=logits)
  else:
    t_kw = dict(teacher_hidden=x_t, teacher_weight=w_t)
  f = _both(divergence, t_kw, labels, mask)
  coefs = (0.3, 0.0, 1.0) if divergence == "generalized_jsd" else (0.3,)
  for c in coefs:
    got, want = f(x_s, w_s, b_s, _hps(c=c))
    _close(got, want)


def test_bfloat16_inputs_and_eager_equals_jit():
  """bfloat16 hidden states and heads (JSD; gradients wrt x_s, W_s, bias); the eager public
  call (the front end's own jit) equals the same values under an outer jax.jit."""
  x_s, w_s, b_s, x_t, w_t, labels, mask = _inputs(dtype=jnp.bfloat16, seed=1)
  t_kw = dict(teacher_hidden=x_t, teacher_weight=w_t)
  f = _both("generalized_jsd", t_kw, labels, mask, hp_grads=False)
  (per, g), (per_ref, g_ref) = f(x_s, w_s, b_s, _hps(c=0.4))
  assert per.dtype == jnp.float32 and g[1].dtype == jnp.bfloat16
  _close(per, per_ref, rtol=1e-4, atol_scale=1e-5)
  _close(g, g_ref, rtol=5e-2, atol_scale=2e-2)
  eager = fl.fused_linear_distillation_per_token(
      x_s, w_s, student_bias=b_s, divergence="generalized_jsd", temperature=2.0, beta=0.4,
      kd_weight=1.3, ce_weight=0.7, labels=labels, where=mask, implementation="pallas", **t_kw,
      **BLOCKS)
  _close(eager, per, rtol=1e-6)


def test_gpu_loop_variant_and_tpu_interpret():
  """The GPU ("loop": vocabulary and hidden-dim loops inside the kernel) code path, and the
  TPU-semantics interpreter (pltpu.InterpretParams of the pinned JAX: SMEM scalars, (8, 128)
  blocks), both in interpret mode, equal the reference. The TPU run is reverse KL with a -inf
  teacher logit: +inf at that token exactly as the reference (support violation)."""
  x_s, w_s, _, x_t, w_t, labels, mask = _inputs(seed=3)
  kw = dict(teacher_hidden=x_t, teacher_weight=w_t, divergence="generalized_jsd",
            temperature=2.0, beta=0.3, labels=labels, where=mask, **BLOCKS)

  def both():
    return _jit(lambda a, b: [fl.fused_linear_distillation_per_token(
        a, b, implementation=impl, **kw) for impl in ("pallas", "reference")])(x_s, w_s)
  with fp.override(variant="loop", block_h=4):   # H = 8, H_T = 6 -> padded to 8: 2 chunks
    _close(*both())
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  kw = dict(teacher_logits=(x_t @ w_t.T).at[2, 7].set(-jnp.inf), divergence="reverse_kl",
            temperature=1.5, labels=labels, **BLOCKS)
  with fp.override(interpret=pltpu.InterpretParams()):
    got, want = both()
  assert np.isposinf(float(got[2])) and np.isposinf(float(want[2]))
  _close(np.delete(np.asarray(got), 2), np.delete(np.asarray(want), 2))


def test_block_size_validator():
  """TPU / GPU rules are enforced with a message naming the argument; defaults pass."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  fp.check_block_sizes(256, 512, 4096, bf16, "tpu")
  fp.check_block_sizes(64, 64, 4096, bf16, "gpu", block_h=64)
  fp.check_block_sizes(3, 5, 7, f32, "cpu")
  bad = [
      ((12, 512, 64, f32, "tpu"), {}, "`block_n`"),        # not a multiple of 8
      ((8, 512, 64, bf16, "tpu"), {}, "`block_n`"),        # bf16 needs 16 rows
      ((16, 100, 64, f32, "tpu"), {}, "`block_v`"),        # not a multiple of 128
      ((1024, 4096, 8192, f32, "tpu"), {}, "VMEM"),        # over the VMEM budget
      ((48, 64, 64, f32, "gpu"), {}, "`block_n`"),         # not a power of two
      ((64, 8, 64, f32, "gpu"), {}, "`block_v`"),          # below tl.dot's 16
      ((64, 64, 64, f32, "gpu"), dict(block_h=24), "`block_h`"),
      ((64, 64, 4096, f32, "gpu"), dict(block_h=512), "shared memory"),
      ((256, 256, 64, f32, "gpu"), dict(block_h=16), "registers"),
      ((0, 64, 64, f32, "cpu"), {}, "`block_n`"),
  ]
  for args, kw, msg in bad:
    with pytest.raises(ValueError, match=msg):
      fp.check_block_sizes(*args, **kw)
  # A block equal to the full (padded) dimension is allowed on TPU.
  fp.check_block_sizes(20, 45, 8, f32, "tpu", n=20, v=45)
  # Defaults (with the front end's default chunk/tile sizes) pass for several shapes.
  for backend in ("cpu", "tpu", "gpu"):
    for n, v, h, dt in ((8192, 128256, 4096, bf16), (37, 101, 9, f32), (4096, 32000, 2048, f32)):
      bn, bv, bh = fp.default_block_sizes(n, v, h, dt, backend, chunk_size=512, tile_size=4096,
                                          teacher_h=h)
      fp.check_block_sizes(bn, bv, h, dt, backend, block_h=bh, teacher_h=h)
  # An explicit bad block size through the public API is rejected naming it.
  x_s, w_s, _, x_t, w_t, _, _ = _inputs()
  with fp.override(interpret=True, variant="grid", block_n=0):
    with pytest.raises(ValueError, match="`block_n`"):
      fl.fused_linear_distillation_per_token(x_s, w_s, x_t, w_t, implementation="pallas")


@pytest.mark.parametrize("platform,target", [("tpu", "tpu"), ("cuda", "gpu")])
def test_lowers_for_tpu_mosaic_and_gpu_triton(platform, target):
  """The compiled (non-interpret) kernels pass the Pallas Mosaic / Triton lowering rules: lower
  (no compile, no device needed) for the other platform from this CPU host, with the default
  block sizes, ragged N and V, both teacher kinds, bfloat16 and float32, and gradients."""
  n, v = 300, 1000
  rng = np.random.default_rng(4)
  for divergence, teacher, dtype in (("generalized_jsd", "hidden", jnp.bfloat16),
                                     ("forward_kl", "logits", jnp.float32)):
    x_s = jnp.asarray(rng.standard_normal((n, 64)), dtype)
    w_s = jnp.asarray(rng.standard_normal((v, 64)), dtype)
    t_kw = (dict(teacher_logits=jnp.zeros((n, v), dtype)) if teacher == "logits" else
            dict(teacher_hidden=x_s[:, :48], teacher_weight=w_s[:, :48]))
    labels = jnp.zeros((n,), jnp.int32)

    def loss(x_s, w_s, t):
      return fl.fused_linear_distillation_per_token(
          x_s, w_s, divergence=divergence, temperature=t, labels=labels,
          implementation="pallas", **t_kw).sum()
    with fp.override(interpret=False, target=target):
      text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
          x_s, w_s, 2.0).lower(lowering_platforms=(platform,)).as_text()
    name = "tpu_custom_call" if platform == "tpu" else "triton"
    calls = [ln for ln in text.splitlines() if "custom_call" in ln and name in ln]
    assert len(calls) == (2 if divergence == "generalized_jsd" else 1), len(calls)
