"""Vocabulary-parallel streaming (``mesh=``, ``vocab_axis=``, ``token_axis=``) against the
single-device ``implementation="reference"``.

Runs on the suite's 8 fake CPU devices (tests/conftest.py). Tolerances as in
tests/test_fused_linear.py: float32 rtol 1e-5 (atol 1e-6 of the array's scale); bfloat16 values
rtol 1e-4, gradients rtol 5e-2 / atol 2e-2 of the scale (the fast path rounds the logit gradient
to bf16 before the backward matmuls, autodiff of the reference does not). The test programs are
compiled with XLA's backend optimisations off: the numbers are the same, the compile is ~2x
faster on a loaded machine.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import fused_linear as fl

P = jax.sharding.PartitionSpec
NS = jax.sharding.NamedSharding
OPTS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
H, HT = 8, 12


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(OPTS)


def _inputs(n, v, seed=0, dtype=np.float32):
  """NumPy-made (no per-shape compiles of random ops) x_S, W_S, x_T, W_T, labels, mask, b_S."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  labels = rng.integers(0, v, n).astype(np.int32)
  labels[3] = -100  # one ignore_index token
  mask = rng.random(n) < 0.75
  return (normal(n, H), normal(v, H), 1.5 * normal(n, HT), normal(v, HT), labels, mask,
          normal(v))


def _assert_close(got, want, rtol=1e-5, atol_scale=1e-6):
  errs = []
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    assert np.all(np.isfinite(g))
    scale = np.abs(w).max() + 1e-30
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale)
    errs.append(np.abs(g - w).max() / scale)
  return max(errs)


def _loss_fn(divergences, vp_kw, **kw):
  """value_and_grad w.r.t. (x_S, W_S, b_S, hp) of the mean loss, for each divergence; hp =
  (temperature, beta/skew, kd_weight, ce_weight)."""
  def f(x_s, w_s, b, hp, *data):
    x_t, w_t, labels, mask = data
    out = []
    for div in divergences:
      def loss(x_s, w_s, b, hp, div=div):
        return fl.fused_linear_distillation(
            x_s, w_s, x_t, w_t, student_bias=b, divergence=div, temperature=hp[0], beta=hp[1],
            skew=hp[1], kd_weight=hp[2], ce_weight=hp[3], labels=labels, where=mask,
            tile_size=5, **vp_kw, **kw).mean()
      out.append(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x_s, w_s, b, hp))
    return out
  return f


def test_all_divergences_ragged_data_and_model_axes():
  """(data=2, model=4), N = 37 and V = 101 (neither divides): value and gradients w.r.t. x_S,
  W_S, the student bias and the four hyper-parameters for all four divergences, with a token
  mask, labels (CE) and an ignore_index token; teacher hidden states + weight."""
  mesh = _mesh((2, 4), ("data", "model"))
  x_s, w_s, x_t, w_t, labels, mask, bias = _inputs(37, 101)
  hp = np.array([2.0, 0.3, 1.3, 0.7], np.float32)
  args = (x_s, w_s, bias, hp, x_t, w_t, labels, mask)
  vp = dict(implementation="streaming", mesh=mesh, vocab_axis="model", token_axis="data")
  got = _compile(_loss_fn(fl.DIVERGENCES, vp), *args)(*args)
  want = _compile(_loss_fn(fl.DIVERGENCES, dict(implementation="reference")), *args)(*args)
  for g, w in zip(got, want):
    _assert_close(g, w)


def test_replicated_tokens_teacher_logits_removed_word_and_jsd_endpoints():
  """(model=8) with the tokens replicated, teacher logits, V = 50 (the last shard holds one
  word, 7 padding columns): generalized JSD at β = 0.4 and at the endpoints β = 0 (forward KL)
  and β = 1 (reverse KL), one compiled program with β traced; a -inf teacher logit (removed
  word) at β ∈ {0, 0.4} gives the reference's finite value and gradients."""
  mesh = _mesh((8,), ("model",))
  n, v = 24, 50
  x_s, w_s, x_t, w_t, labels, mask, _ = _inputs(n, v, seed=1)
  tl = x_t @ w_t.T
  removed = tl.copy()
  removed[0, 3] = removed[5, 49] = -np.inf

  def f(impl, **vp):
    def loss(x_s, w_s, hp, tl):
      return fl.fused_linear_distillation(
          x_s, w_s, teacher_logits=tl, divergence="generalized_jsd", temperature=hp[0],
          beta=hp[1], kd_weight=hp[2], ce_weight=hp[3], labels=labels, where=mask, tile_size=3,
          implementation=impl, **vp).mean()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  hp0 = np.zeros(4, np.float32)
  vp = _compile(f("streaming", mesh=mesh, vocab_axis="model"), x_s, w_s, hp0, tl)
  ref = _compile(f("reference"), x_s, w_s, hp0, tl)
  for beta, t in ((0.4, removed), (0.0, removed), (1.0, tl)):
    hp = np.array([1.5, beta, 0.9, 0.4], np.float32)
    got, want = vp(x_s, w_s, hp, t), ref(x_s, w_s, hp, t)
    _assert_close(got, want)


def _full_vocab_arrays(hlo, ns, vs):
  """Lines of an HLO module with an f32/bf16 array whose shape has a token dim in `ns` and a
  vocabulary dim in `vs` (the materialised logits the streaming path must not hold)."""
  bad = []
  for ln in hlo.splitlines():
    for dims in re.findall(r"(?:f32|bf16)\[([0-9,]+)\]", ln):
      d = [int(x) for x in dims.split(",")]
      if any(a in ns for a in d) and any(b in vs for b in d):
        bad.append(ln.strip()[:200])
  return bad


def _weight_gathers(hlo, vs):
  """all-gather ops (sync or async) whose output has a full-vocabulary dim."""
  bad = []
  for ln in hlo.splitlines():
    m = re.search(r"=\s*\(?\s*(?:f32|bf16)\[([0-9,]+)\].*\ball-gather(?:-start)?\(", ln)
    if m and any(int(x) in vs for x in m.group(1).split(",")):
      bad.append(ln.strip()[:200])
  return bad


@pytest.mark.parametrize("teacher,axis_type", [("hidden", "Explicit"), ("logits", "Auto")])
def test_sharded_inputs_bf16_stay_vocab_parallel(teacher, axis_type):
  """(data=2, model=4) with W sharded over "model" and the tokens over "data", bfloat16
  inputs, on an Explicit mesh (``jax.make_mesh``'s default) and on an Auto one: matches the
  bf16 reference, dW_S comes out sharded over "model", and the compiled value-and-grad holds no
  [N, V] array and all-gathers no head weight."""
  at = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(at, at))
  n, v = 32, 96
  x_s, w_s, x_t, w_t, labels, mask, _ = _inputs(n, v, seed=2, dtype=jnp.bfloat16)
  tl = (x_t.astype(np.float32) @ w_t.astype(np.float32).T).astype(jnp.bfloat16)
  hp = np.array([2.0, 0.2, 1.0, 0.5], np.float32)
  host = (x_s, w_s, hp, labels, mask) + ((x_t, w_t) if teacher == "hidden" else (tl,))
  specs = ((P("data"), P("model"), P(), P("data"), P("data")) +
           ((P("data"), P("model")) if teacher == "hidden" else (P("data", "model"),)))
  args = tuple(jax.device_put(a, NS(mesh, s)) for a, s in zip(host, specs))

  def f(impl, **vp):
    def loss(x_s, w_s, hp, labels, mask, *t):
      t_kw = (dict(teacher_hidden=t[0], teacher_weight=t[1]) if teacher == "hidden" else
              dict(teacher_logits=t[0]))
      return fl.fused_linear_distillation(
          x_s, w_s, **t_kw, divergence="skew_forward_kl", temperature=hp[0], skew=hp[1],
          kd_weight=hp[2], ce_weight=hp[3], labels=labels, where=mask, tile_size=5,
          implementation=impl, **vp).mean()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  vp = _compile(f("streaming", mesh=mesh, vocab_axis="model", token_axis="data"), *args)
  hlo = vp.as_text()
  assert not _full_vocab_arrays(hlo, {n, n // 2}, {v}), _full_vocab_arrays(hlo, {n, n // 2}, {v})
  assert not _weight_gathers(hlo, {v}), _weight_gathers(hlo, {v})
  got = vp(*args)
  dw = got[1][1]
  assert dw.dtype == jnp.bfloat16
  assert dw.sharding.is_equivalent_to(NS(mesh, P("model", None)), 2), dw.sharding
  want = _compile(f("reference"), *host)(*host)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-4)
  _assert_close(got[1], want[1], rtol=5e-2, atol_scale=2e-2)


def test_eager_named_wrapper_and_argument_errors():
  """Eager calls (data=1, model=8) of the per-token function and of a named wrapper equal the
  reference; invalid vocabulary-parallel arguments raise errors naming the argument."""
  mesh = _mesh((1, 8), ("data", "model"))
  x_s, w_s, x_t, w_t, labels, mask, _ = _inputs(29, 64, seed=3)
  vp = dict(implementation="streaming", mesh=mesh, vocab_axis="model", token_axis="data")
  kw = dict(temperature=1.7, labels=labels, where=mask, tile_size=3)
  got = fl.fused_linear_distillation_per_token(x_s, w_s, x_t, w_t, divergence="reverse_kl",
                                               **vp, **kw)
  want = fl.fused_linear_distillation_per_token(x_s, w_s, x_t, w_t, divergence="reverse_kl",
                                                implementation="reference", **kw)
  _assert_close(got, want)
  acc = fl.fused_linear_reverse_kl(x_s, w_s, x_t, w_t, **vp, **kw)  # same compiled program
  _assert_close(acc.sum, want.sum())
  assert int(acc.count) == int(mask.sum()) - int(mask[3])  # label 3 is ignore_index

  call = lambda **a: fl.fused_linear_distillation(x_s, w_s, x_t, w_t, **a)
  for bad, name, err in (
      (dict(implementation="streaming", vocab_axis="model"), "vocab_axis", ValueError),
      (dict(implementation="streaming", token_axis="data"), "token_axis", ValueError),
      (dict(implementation="streaming", mesh="model"), "mesh", TypeError),
      (dict(implementation="streaming", mesh=mesh), "vocab_axis", ValueError),
      (dict(implementation="streaming", mesh=mesh, vocab_axis="vocab"), "vocab_axis", ValueError),
      (dict(vp, token_axis="tokens"), "token_axis", ValueError),
      (dict(vp, token_axis="model"), "token_axis", ValueError),
      (dict(vp, implementation="chunked"), "implementation", ValueError),
      (dict(vp, implementation="reference"), "implementation", ValueError)):
    with pytest.raises(err, match=name):
      call(**bad)


def test_default_explicit_mesh_with_unsharded_inputs():
  """``jax.make_mesh``'s default (Explicit) axes with plain single-device inputs, eagerly and
  under jit: the inputs are laid out for shard_map first (a shard_map in_specs error before).
  Eager autodiff of Explicit-typed values needs ``jax.set_mesh`` (JAX's rule, not ours)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  x_s, w_s, x_t, w_t, labels, mask, _ = _inputs(24, 40, seed=3)

  def loss(x_s, w_s, **kw):
    return fl.fused_linear_distillation(x_s, w_s, x_t, w_t, divergence="reverse_kl",
                                        labels=labels, where=mask, tile_size=4, **kw).mean()

  want = jax.value_and_grad(loss, argnums=(0, 1))(x_s, w_s, implementation="reference")
  vp = dict(implementation="streaming", mesh=mesh, vocab_axis="model", token_axis="data")
  _assert_close(loss(x_s, w_s, **vp), want[0])
  _assert_close(jax.jit(lambda a, b: loss(a, b, **vp))(x_s, w_s), want[0])
  with jax.set_mesh(mesh):
    _assert_close(jax.value_and_grad(loss, argnums=(0, 1))(x_s, w_s, **vp), want)
