"""Fused linear-head losses: chunked and streaming against the materialising reference.

Tolerances: float32 inputs rtol 1e-5 (values and gradients; the fast paths differ from the
reference only in summation order). bfloat16 inputs: the matmuls read bf16 and accumulate in
f32 in every implementation, but the fast paths round the logit gradient to bf16 before the two
backward matmuls (as fused GPU kernels do) while autodiff of the reference does not, so
gradients agree to rtol 5e-2 / atol 2e-2 of the gradient's scale (Liger's bf16 test tolerance is
atol 5e-2 / rtol 5e-1) and values to rtol 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import fused_linear as fl

N, H, HT, V = 37, 8, 12, 101   # N not a multiple of 7 or 16, V not a multiple of 16
FAST = ("chunked", "streaming")


def _inputs(n=N, v=V, dtype=jnp.float32, scale=1.0, seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  x_s = (scale * jax.random.normal(k[0], (n, H))).astype(dtype)
  w_s = jax.random.normal(k[1], (v, H)).astype(dtype)
  x_t = (scale * jax.random.normal(k[2], (n, HT))).astype(dtype)
  w_t = jax.random.normal(k[3], (v, HT)).astype(dtype)
  labels = jax.random.randint(k[4], (n,), 0, v)
  mask = jax.random.bernoulli(k[5], 0.7, (n,))
  return x_s, w_s, x_t, w_t, labels, mask


def _value_and_grads(implementation, x_s, w_s, x_t, w_t, **kw):
  def loss(x_s, w_s):
    return fl.fused_linear_distillation(x_s, w_s, x_t, w_t, implementation=implementation,
                                        **kw).mean()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x_s, w_s)


def _jit(fn, *args, **kw):
  """Calls fn under jit (eager dispatch would compile every small op separately)."""
  return jax.jit(lambda *a: fn(*a, **kw))(*args)


def _assert_close(got, want, rtol=1e-5, atol_scale=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * (np.abs(w).max() + 1e-30))


@pytest.mark.parametrize("divergence", fl.DIVERGENCES)
def test_matches_reference_f32(divergence):
  x_s, w_s, x_t, w_t, labels, mask = _inputs()
  kw = dict(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2, labels=labels,
            ce_weight=0.7, kd_weight=1.3, where=mask, chunk_size=7, tile_size=16)
  want = _value_and_grads("reference", x_s, w_s, x_t, w_t, **kw)
  for implementation in FAST:
    _assert_close(_value_and_grads(implementation, x_s, w_s, x_t, w_t, **kw), want)


def test_per_token_values_and_general_cotangent():
  """Per-token values, and a VJP with a non-uniform per-token cotangent."""
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=15, v=30)
  ct = jax.random.normal(jax.random.key(9), (15,))
  kw = dict(divergence="reverse_kl", temperature=0.7, labels=labels, where=mask, chunk_size=4,
            tile_size=8)

  @jax.jit
  def vjp_ref(a, b):
    return vjp("reference", a, b)

  def vjp(impl, a, b):
    f = lambda a, b: fl.fused_linear_distillation_per_token(a, b, x_t, w_t, implementation=impl,
                                                            **kw)
    out, pullback = jax.vjp(f, a, b)
    return out, pullback(ct)

  want = vjp_ref(x_s, w_s)
  assert np.all(np.asarray(want[0])[~np.asarray(mask)] == 0)
  for implementation in FAST:
    _assert_close(jax.jit(lambda a, b, i=implementation: vjp(i, a, b))(x_s, w_s), want)


def test_window_sizes():
  """Chunk/tile 1 and windows larger than N or V (clipped); 7 and 16 are covered above."""
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=13, v=23)
  kw = dict(divergence="forward_kl", temperature=1.5, where=mask)
  want = _value_and_grads("reference", x_s, w_s, x_t, w_t, **kw)
  for implementation, size in [("chunked", 1), ("chunked", 64), ("streaming", 1),
                               ("streaming", 128)]:
    got = _value_and_grads(implementation, x_s, w_s, x_t, w_t, chunk_size=size, tile_size=size,
                           **kw)
    _assert_close(got, want)


def test_reference_is_the_divergence_of_materialised_logits(x64):
  """The oracle itself against a NumPy forward KL + cross-entropy, in float64."""
  x_s, w_s, x_t, w_t, labels, mask = (np.asarray(a) for a in _inputs())
  x_s, w_s, x_t, w_t = (a.astype(np.float64) for a in (x_s, w_s, x_t, w_t))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  zs, zt = x_s @ w_s.T, x_t @ w_t.T
  ls, lt = log_softmax(zs / 3.0), log_softmax(zt / 3.0)
  kl = np.sum(np.exp(lt) * (lt - ls), -1)
  ce = -log_softmax(zs)[np.arange(N), labels]
  per = _jit(fl.fused_linear_distillation_per_token, x_s, w_s, x_t, w_t, divergence="forward_kl",
             temperature=3.0, labels=labels, ce_weight=0.5, where=mask,
             implementation="reference")
  assert per.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(per), np.where(mask, kl + 0.5 * ce, 0.0), rtol=1e-10,
                             atol=1e-12)


def test_bfloat16_inputs():
  x_s, w_s, x_t, w_t, labels, mask = _inputs(dtype=jnp.bfloat16)
  kw = dict(divergence="generalized_jsd", beta=0.4, temperature=2.0, labels=labels, where=mask,
            chunk_size=7, tile_size=16)
  (v_ref, g_ref) = _value_and_grads("reference", x_s, w_s, x_t, w_t, **kw)
  for implementation in FAST:
    (v, g) = _value_and_grads(implementation, x_s, w_s, x_t, w_t, **kw)
    assert v.dtype == jnp.float32 and g[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-4)
    _assert_close(g, g_ref, rtol=5e-2, atol_scale=2e-2)


@pytest.mark.parametrize("implementation", ("reference",) + FAST)
def test_all_tokens_masked(implementation):
  x_s, w_s, x_t, w_t, labels, _ = _inputs(n=9, v=23)
  none = jnp.zeros((9,), bool)

  def loss(x_s, w_s):
    acc = fl.fused_linear_distillation(x_s, w_s, x_t, w_t, where=none, labels=labels,
                                       divergence="reverse_kl", implementation=implementation,
                                       chunk_size=4, tile_size=8)
    return acc.mean(), acc

  (value, acc), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x_s, w_s)
  assert float(acc.sum) == 0.0 and float(acc.count) == 0.0 and float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("implementation", FAST)
def test_masked_equals_sliced_and_ignore_index(implementation):
  """Masked tokens are excluded from the sum and the count: the mean equals the kept slice's."""
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=20, v=30)
  keep = np.asarray(mask)
  kw = dict(divergence="skew_forward_kl", skew=0.3, implementation=implementation,
            chunk_size=6, tile_size=8)
  masked = _jit(fl.fused_linear_distillation, x_s, w_s, x_t, w_t, where=mask, labels=labels, **kw)
  sliced = _jit(fl.fused_linear_distillation, x_s[keep], w_s, x_t[keep], w_t, labels=labels[keep],
                                        **kw)
  assert float(masked.count) == keep.sum() == float(sliced.count)
  np.testing.assert_allclose(float(masked.mean()), float(sliced.mean()), rtol=1e-5)
  ignored = _jit(fl.fused_linear_distillation, x_s, w_s, x_t, w_t,
                                         labels=jnp.where(mask, labels, -100), **kw)
  np.testing.assert_allclose(float(ignored.mean()), float(sliced.mean()), rtol=1e-5)


@pytest.mark.parametrize("implementation", FAST)
def test_teacher_logits_and_batch_dims(implementation):
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=12, v=30)
  kw = dict(divergence="generalized_jsd", beta=0.7, where=mask, implementation=implementation,
            chunk_size=5, tile_size=8)
  from_hidden = _jit(fl.fused_linear_distillation_per_token, x_s, w_s, x_t, w_t, **kw)
  kw["where"] = mask.reshape(3, 4)
  from_logits = _jit(fl.fused_linear_distillation_per_token,
      x_s.reshape(3, 4, H), w_s, teacher_logits=(x_t @ w_t.T).reshape(3, 4, 30), **kw)
  assert from_logits.shape == (3, 4)
  np.testing.assert_allclose(np.asarray(from_logits).ravel(), np.asarray(from_hidden),
                             rtol=1e-5, atol=1e-6)


def test_large_logits_finite():
  """Logits of order ±1e4 (T = 1): finite and equal to the reference."""
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=10, v=23, scale=3e3)
  kw = dict(divergence="reverse_kl", labels=labels, where=mask, chunk_size=4, tile_size=8)
  want = _value_and_grads("reference", x_s, w_s, x_t, w_t, **kw)
  for implementation in FAST:
    # Reverse KL's gradient holds (log p_S − log p_T) − KL with both terms ~1e4, where a
    # float32 ulp is 1e-3: the two summation orders agree to that conditioning, not to 1e-5.
    _assert_close(_value_and_grads(implementation, x_s, w_s, x_t, w_t, **kw), want, rtol=3e-3,
                  atol_scale=1e-3)


def test_jsd_endpoints_are_the_kls():
  x_s, w_s, x_t, w_t, _, _ = _inputs(n=6, v=11)
  for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
    a = _jit(fl.fused_linear_generalized_jsd, x_s, w_s, x_t, w_t, beta=beta,
             implementation="streaming")
    b = _jit(fl.fused_linear_distillation, x_s, w_s, x_t, w_t, divergence=div,
             implementation="streaming")
    np.testing.assert_allclose(float(a.mean()), float(b.mean()), rtol=1e-5)
  assert fl.fused_linear_reverse_kl.__name__ == "fused_linear_reverse_kl"


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("implementation", FAST)
def test_mesh_equals_single_device(implementation, axis_type):
  """Token-sharded inputs on an Auto mesh and on an Explicit one (``jax.make_mesh``'s default
  axis type, where the dW product over sharded tokens needs its output sharding and the scan
  carries need the token sharding: both raised before)."""
  at = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(at,))
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=32, v=30)
  div = "forward_kl" if axis_type == "Auto" else "generalized_jsd"
  kw = dict(divergence=div, temperature=2.0, labels=labels, where=mask,
            chunk_size=8, tile_size=8)
  want = _value_and_grads(implementation, x_s, w_s, x_t, w_t, **kw)
  tok = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_s_d, x_t_d = jax.device_put(x_s, tok), jax.device_put(x_t, tok)
  w_s_d, w_t_d = jax.device_put(w_s, rep), jax.device_put(w_t, rep)
  kw.update(labels=jax.device_put(labels, tok), where=jax.device_put(mask, tok))
  with jax.set_mesh(mesh):
    got = _value_and_grads(implementation, x_s_d, w_s_d, x_t_d, w_t_d, **kw)
  assert len(got[1][0].sharding.device_set) == 8
  _assert_close(got, want)


def test_bad_input():
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=6, v=11)
  f = fl.fused_linear_distillation
  with pytest.raises(ValueError, match="student_weight"):
    f(x_s, w_s[:, :5], x_t, w_t)
  with pytest.raises(ValueError, match="teacher_weight"):
    f(x_s, w_s, x_t, w_t[:10])
  with pytest.raises(ValueError, match="teacher_hidden"):
    f(x_s, w_s, x_t[:5], w_t)
  with pytest.raises(ValueError, match="teacher_logits"):
    f(x_s, w_s, teacher_logits=jnp.zeros((6, 10)))
  with pytest.raises(ValueError, match="not both"):
    f(x_s, w_s, x_t, w_t, teacher_logits=jnp.zeros((6, 11)))
  with pytest.raises(ValueError, match="teacher_hidden"):
    f(x_s, w_s)
  for t in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="temperature"):
      f(x_s, w_s, x_t, w_t, temperature=t)
  with pytest.raises(ValueError, match="beta"):
    f(x_s, w_s, x_t, w_t, divergence="generalized_jsd", beta=1.5)
  with pytest.raises(ValueError, match="skew"):
    f(x_s, w_s, x_t, w_t, divergence="skew_forward_kl", skew=-0.1)
  for c in (0, -3):
    with pytest.raises(ValueError, match="chunk_size"):
      f(x_s, w_s, x_t, w_t, chunk_size=c)
  for c in (2.5, True):
    with pytest.raises(TypeError, match="chunk_size"):
      f(x_s, w_s, x_t, w_t, chunk_size=c)
  with pytest.raises(ValueError, match="tile_size"):
    f(x_s, w_s, x_t, w_t, tile_size=0)
  with pytest.raises(ValueError, match="implementation"):
    f(x_s, w_s, x_t, w_t, implementation="triton")
  with pytest.raises(ValueError, match="divergence"):
    f(x_s, w_s, x_t, w_t, divergence="kl")
  with pytest.raises(ValueError, match="labels"):
    f(x_s, w_s, x_t, w_t, labels=labels.at[0].set(11))
  with pytest.raises(TypeError, match="labels"):
    f(x_s, w_s, x_t, w_t, labels=labels.astype(jnp.float32))
  with pytest.raises(ValueError, match="where"):
    f(x_s, w_s, x_t, w_t, where=mask[:5])
  with pytest.raises(TypeError, match="where"):
    f(x_s, w_s, x_t, w_t, where=mask.astype(jnp.float32))
  with pytest.raises(TypeError, match="student_hidden"):
    f(jnp.ones((6, H), jnp.int32), w_s, x_t, w_t)
  with pytest.raises(TypeError, match="divergence"):
    fl.fused_linear_forward_kl(x_s, w_s, x_t, w_t, divergence="reverse_kl")


@pytest.mark.parametrize("divergence", fl.DIVERGENCES)
def test_hyperparameter_gradients_match_reference(divergence):
  """N5: d/dT, d/dβ (or λ), d/dkd_weight and d/dce_weight equal the reference's (were 0)."""
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=11, v=23)

  def grads(impl):
    def f(t, c, kw, cw):
      coef = dict(beta=c) if divergence == "generalized_jsd" else dict(skew=c)
      return fl.fused_linear_distillation(
          x_s, w_s, x_t, w_t, divergence=divergence, temperature=t, kd_weight=kw, ce_weight=cw,
          labels=labels, where=mask, implementation=impl, chunk_size=4, tile_size=8,
          **coef).mean()
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(2.0, 0.3, 0.5, 0.7)

  want = grads("reference")
  assert abs(float(want[0])) > 1e-4 and abs(float(want[2])) > 1e-4
  for implementation in FAST:
    _assert_close(grads(implementation), want, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("implementation", ("reference",) + FAST)
def test_jsd_endpoints_same_eager_and_jit(implementation):
  """N6: β = 0 / 1 give forward / reverse KL whether β is concrete or traced."""
  x_s, w_s, x_t, w_t, _, _ = _inputs(n=6, v=11)
  kw = dict(implementation=implementation, chunk_size=4, tile_size=4)
  for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
    want = _jit(fl.fused_linear_distillation_per_token, x_s, w_s, x_t, w_t, divergence=div, **kw)
    traced = jax.jit(lambda b: fl.fused_linear_distillation_per_token(
        x_s, w_s, x_t, w_t, divergence="generalized_jsd", beta=b, **kw))(beta)
    eager = fl.fused_linear_distillation_per_token(x_s, w_s, x_t, w_t,
                                                   divergence="generalized_jsd", beta=beta, **kw)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(traced), np.asarray(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), rtol=1e-5, atol=1e-7)
    gw = jax.jit(jax.grad(lambda a: fl.fused_linear_distillation(
        a, w_s, x_t, w_t, divergence=div, **kw).mean()))(x_s)
    gt = jax.jit(jax.grad(lambda a, b: fl.fused_linear_distillation(
        a, w_s, x_t, w_t, divergence="generalized_jsd", beta=b, **kw).mean()))(x_s, beta)
    _assert_close(gt, gw, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("implementation", FAST)
def test_inside_shard_map(implementation):
  """N22: the documented recipe (shard_map over tokens + R.psum) runs with check_vma=True."""
  from kdjax import reductions as R
  PS = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=32, v=30)
  kw = dict(divergence="generalized_jsd", beta=0.3, temperature=2.0, implementation=implementation,
            chunk_size=2, tile_size=8)

  def local(a, b, c, d, lab, m):
    return R.psum(fl.fused_linear_distillation(a, b, c, d, labels=lab, where=m, **kw), "data")

  sm = jax.shard_map(local, mesh=mesh, in_specs=(PS("data"), PS(), PS("data"), PS(),
                                                 PS("data"), PS("data")), out_specs=PS())
  loss = lambda a, b: sm(a, b, x_t, w_t, labels, mask).mean()
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x_s, w_s)
  kw.pop("implementation")
  want = _value_and_grads("reference", x_s, w_s, x_t, w_t, labels=labels, where=mask, **kw)
  _assert_close(got, want, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("divergence", ("forward_kl", "generalized_jsd", "skew_forward_kl"))
def test_neg_inf_and_nan_teacher_logit(divergence):
  """N21: a -inf teacher logit gives the reference value in streaming (was NaN); N1: a NaN
  teacher logit gives NaN for that token in every implementation."""
  k = jax.random.split(jax.random.key(3), 3)
  x, w, tl = (jax.random.normal(kk, s) for kk, s in zip(k, [(4, 8), (16, 8), (4, 16)]))
  kw = dict(divergence=divergence, beta=0.4, skew=0.2, chunk_size=2, tile_size=5)
  f = lambda t, impl: _jit(fl.fused_linear_distillation_per_token, x, w, teacher_logits=t,
                           implementation=impl, **kw)
  ninf = tl.at[0, 3].set(-jnp.inf)
  want = np.asarray(f(ninf, "reference"))
  assert np.all(np.isfinite(want))
  nan = tl.at[1, 3].set(jnp.nan)
  for impl in ("reference",) + FAST:
    np.testing.assert_allclose(np.asarray(f(ninf, impl)), want, rtol=1e-5, atol=1e-6)
    got = np.asarray(f(nan, impl))
    assert np.isnan(got[1]) and np.all(np.isfinite(np.delete(got, 1)))


def test_array_hyperparameter_and_empty_vocabulary_errors():
  """N24: a per-token temperature is rejected naming the argument; V = 0 is a clear error."""
  x_s, w_s, x_t, w_t, _, _ = _inputs(n=4, v=11)
  for name in ("temperature", "kd_weight", "ce_weight"):
    with pytest.raises(ValueError, match=name):
      fl.fused_linear_distillation(x_s, w_s, x_t, w_t, **{name: jnp.ones(4)})
  with pytest.raises(TypeError, match="temperature"):
    fl.fused_linear_distillation(x_s, w_s, x_t, w_t, temperature="2")
  with pytest.raises(ValueError, match="student_weight"):
    fl.fused_linear_distillation(x_s, w_s[:0], x_t, w_t[:0])


def test_layout_error_says_transpose():
  """A10 (partial): an nnx.Linear-layout [H, V] kernel gets an error that says to transpose it."""
  x_s, w_s, x_t, w_t, _, _ = _inputs(n=4, v=11)
  with pytest.raises(ValueError, match="transpose an nnx.Linear kernel"):
    fl.fused_linear_distillation(x_s, w_s.T, x_t, w_t)
  with pytest.raises(ValueError, match="transpose an nnx.Linear kernel"):
    fl.fused_linear_distillation(x_s, w_s, x_t, w_t.T)


@pytest.mark.parametrize("impl", ["reference", "chunked", "streaming"])
def test_scale_by_t2_is_the_mixtures_t2_factor_in_value_and_gradients(impl):
  """scale_by_t2=True equals kd_weight·T² (the ce_kd_mixture convention), d/dT included."""
  k = jax.random.split(jax.random.key(3), 5)
  xs, xt = jax.random.normal(k[0], (2, 6, 8)), jax.random.normal(k[1], (2, 6, 5))
  ws, wt = jax.random.normal(k[2], (19, 8)), jax.random.normal(k[3], (19, 5))
  y = jax.random.randint(k[4], (2, 6), 0, 19)

  def f(t, x, scaled):
    kw = dict(scale_by_t2=True, kd_weight=0.7) if scaled else dict(kd_weight=0.7 * t ** 2)
    return jax.jit(lambda t, x: fl.fused_linear_distillation(
        x, ws, xt, wt, temperature=t, labels=y, ce_weight=0.3, chunk_size=5, tile_size=7,
        implementation=impl if scaled else "reference", **kw).mean())(t, x)

  (va, ga), (vb, gb) = [jax.value_and_grad(lambda t, x: f(t, x, s), argnums=(0, 1))(2.5, xs)
                        for s in (True, False)]
  np.testing.assert_allclose(va, vb, rtol=1e-5)
  np.testing.assert_allclose(ga[0], gb[0], rtol=1e-4)
  np.testing.assert_allclose(ga[1], gb[1], rtol=1e-4, atol=1e-6)
  with pytest.raises(TypeError, match="scale_by_t2"):
    fl.fused_linear_distillation(xs, ws, xt, wt, scale_by_t2=1)


def test_eager_calls_compile_once_per_shape_and_config():
  """P4: eager calls reuse one compiled implementation instead of retracing scan closures."""
  k = jax.random.split(jax.random.key(5), 4)
  xs, xt = jax.random.normal(k[0], (9, 4)), jax.random.normal(k[1], (9, 3))
  ws, wt = jax.random.normal(k[2], (11, 4)), jax.random.normal(k[3], (11, 3))
  for impl in fl.IMPLEMENTATIONS:
    jitted = fl._IMPLS[impl]  # pylint: disable=protected-access
    jitted.clear_cache()
    for t in (1.0, 2.0, 3.0):  # hyper-parameter values are data, not static
      fl.fused_linear_distillation(xs, ws, xt, wt, temperature=t, implementation=impl,
                                   chunk_size=4, tile_size=5)
    assert jitted._cache_size() == 1, impl  # pylint: disable=protected-access


@pytest.mark.parametrize("implementation", ["chunked", "streaming"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_token_sharded_inputs_stay_data_parallel(implementation, teacher):
  """P2: under jit with token-sharded inputs the compiled value-and-grad gathers no hidden states
  (or teacher logits): every device computes only its own tokens."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  n, h, v = 256, 16, 40
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=n, v=v)
  tok = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_s, x_t, labels, mask = (jax.device_put(a, tok) for a in (x_s, x_t, labels, mask))
  w_s, w_t = jax.device_put(w_s, rep), jax.device_put(w_t, rep)
  t_kw = (dict(teacher_hidden=x_t, teacher_weight=w_t) if teacher == "hidden" else
          dict(teacher_logits=jax.device_put(x_t @ w_t.T, tok)))

  def loss(x, w):
    return fl.fused_linear_distillation(x, w, **t_kw, labels=labels, where=mask, chunk_size=8,
                                        tile_size=16, implementation=implementation).mean()

  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x_s, w_s).compile().as_text()
  gathers = [ln for ln in hlo.splitlines() if "all-gather(" in ln and f"[{n}," in ln]
  assert not gathers, gathers[:3]


@pytest.mark.parametrize("implementation", ["reference", "chunked", "streaming"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_output_biases_equal_explicit_logits(implementation, teacher):
  """A10: student_bias / teacher_bias give x W^T + b logits, with d/db_S, in every implementation."""
  from kdjax import divergences
  from kdjax.losses import softmax_cross_entropy_with_integer_labels as ce
  x_s, w_s, x_t, w_t, labels, mask = _inputs(n=13, v=17)
  k = jax.random.split(jax.random.key(9), 2)
  b_s, b_t = jax.random.normal(k[0], (17,)), 3.0 * jax.random.normal(k[1], (17,))
  t_kw = (dict(teacher_hidden=x_t, teacher_weight=w_t) if teacher == "hidden" else
          dict(teacher_logits=x_t @ w_t.T))

  def fused(x, w, b):
    return fl.fused_linear_distillation_per_token(
        x, w, **t_kw, student_bias=b, teacher_bias=b_t, temperature=2.0, labels=labels,
        ce_weight=0.4, kd_weight=0.6, where=mask, chunk_size=4, tile_size=5,
        implementation=implementation).sum()

  def explicit(x, w, b):
    zs, zt = x @ w.T + b, x_t @ w_t.T + b_t
    v = 0.6 * divergences.forward_kl(zs, zt, temperature=2.0) + 0.4 * ce(zs, labels)
    return jnp.where(mask, v, 0.0).sum()

  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x_s, w_s, b_s)
  want = jax.value_and_grad(explicit, argnums=(0, 1, 2))(x_s, w_s, b_s)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="student_bias"):
    fl.fused_linear_distillation(x_s, w_s, **t_kw, student_bias=b_s[:5])
