"""Vocabulary-parallel ``implementation="streaming"`` of :mod:`kdjax.losses.fused_linear`.

The head weights ``W_S [V, H]``, ``W_T [V, H_T]`` (or ``teacher_logits [N, V]``) are sharded over
one mesh axis (``vocab_axis``), the tokens optionally over another (``token_axis``). Inside
``jax.shard_map`` every device runs the module's streaming sweeps (``_stream_stats``,
``_streaming_bwd_parts``) over its own ``V / P`` rows and the per-token statistics are merged
over the vocabulary shards by :class:`_Combine`:

* pass 1: running maxima by ``pmax``, the sums of exponentials and the KL accumulators
  (``Σ e^{t−m}(t−s)``, ``Σ e^{s−m}(s−t)``) rescaled to the global maximum and ``psum``'d, the
  CE's picked logit ``psum``'d (one shard holds the label, the others add 0);
* pass 2 (JSD, skew KL): each device forms its local mixture terms from the *global*
  log-normalisers, then one ``psum``;
* backward: each device recomputes its tiles from the global statistics; ``dW_S`` stays on its
  vocabulary shard (summed over ``token_axis`` when the tokens are sharded, as the weight is
  replicated over it), ``dx_S`` is ``psum``'d over ``vocab_axis``; the hyper-parameter
  gradients are forward mode over ``hp`` through the same combined statistics.

All cross-device sums are in the compute dtype (float32 for bfloat16 inputs) before the cast.
The global maximum enters with ``stop_gradient``: a log-sum-exp does not depend on its
reference point, so its derivative is exact without differentiating ``pmax``.

Ragged sizes: V is padded to a multiple of the vocab-axis size (zero rows of ``W_S``/``W_T``,
zero columns of ``teacher_logits``; the padding columns are removed from every statistic by a
column mask) and N to a multiple of the token-axis size (masked rows). Each costs one padded
copy of the arrays concerned; none when the sizes divide.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses import fused_linear as fl

P = jax.sharding.PartitionSpec
NS = jax.sharding.NamedSharding


class _VP(NamedTuple):
  """Static vocabulary-parallel layout (hashable: a custom_vjp / jit static argument)."""
  vocab_axis: str
  token_axis: str | None
  vocab: int        # true vocabulary size V (global)
  vocab_local: int  # rows per vocabulary shard (V padded to a multiple of the axis size, / P)
  shards: int       # size of the vocab axis


class _Combine:
  """Merges one device's streaming partial statistics over the vocabulary shards."""

  def __init__(self, axis: str):
    self.axis = axis

  def lse(self, m, l, *accs):
    """(m, l, accs) rescaled to the global maximum and summed over the shards."""
    big = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(m), self.axis))
    ref = jnp.where(jnp.isfinite(big), big, 0.0)
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m - ref), 0.0)
    # An infinite accumulator (reverse KL at a removed word) stays infinite (never inf·0).
    accs = tuple(jnp.where(jnp.isinf(a), a, a * scale) for a in accs)
    return (big,) + tuple(jax.lax.psum((l * scale,) + accs, self.axis))

  def pass1(self, carry, cfg):
    ms, ls, mt, lt, a, b, mc, lc, picked = carry
    ms, ls, b = self.lse(ms, ls, b)
    mt, lt, a = self.lse(mt, lt, a)
    if cfg.has_labels:
      mc, lc = self.lse(mc, lc)
      picked = jax.lax.psum(picked, self.axis)
    return ms, ls, mt, lt, a, b, mc, lc, picked

  def sum(self, *xs):
    return tuple(jax.lax.psum(xs, self.axis))


def _local(labels, vp: _VP):
  """Labels relative to this device's first column, and its real (non-padding) columns."""
  col0 = jax.lax.axis_index(vp.vocab_axis) * vp.vocab_local
  col_ok = None
  if vp.vocab_local * vp.shards != vp.vocab:
    col_ok = col0 + jnp.arange(vp.vocab_local) < vp.vocab
  return labels - col0, col_ok


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _vp_streaming(x_s, w_s, teacher, mask, labels, hp, cfg, vp):
  return _vp_fwd(x_s, w_s, teacher, mask, labels, hp, cfg, vp)[0]


def _vp_fwd(x_s, w_s, teacher, mask, labels, hp, cfg, vp):
  lab, col_ok = _local(labels, vp)
  stats = fl._stream_stats(x_s, w_s, teacher, lab, hp, cfg, col_ok,  # pylint: disable=protected-access
                           _Combine(vp.vocab_axis))
  values = fl._stream_values(stats, mask, hp, cfg)  # pylint: disable=protected-access
  return values, (x_s, w_s, teacher, mask, labels, hp, stats)


def _vp_bwd(cfg, vp, res, g):
  x_s, w_s, teacher, mask, labels, hp, stats = res
  lab, col_ok = _local(labels, vp)
  dx, dw, dhp = fl._streaming_bwd_parts(  # pylint: disable=protected-access
      cfg, (x_s, w_s, teacher, mask, lab, hp, stats), g, col_ok, _Combine(vp.vocab_axis))
  # Sums over devices in the compute dtype, before rounding to the inputs' dtypes: dx over the
  # vocabulary shards, dW and dhp over the token shards (W and hp are replicated over them).
  dx = jax.lax.psum(dx, vp.vocab_axis)
  if vp.token_axis is not None:
    dw, dhp = jax.lax.psum((dw, dhp), vp.token_axis)
  dx, dw, dhp = fl._vjp_like(  # pylint: disable=protected-access
      (dx.astype(x_s.dtype), dw.astype(w_s.dtype), dhp), (x_s, w_s, hp))
  return dx, dw, None, None, None, dhp


_vp_streaming.defvjp(_vp_fwd, _vp_bwd)


def _pad_rows(a, n: int, value=0):
  pad = n - a.shape[0]
  if not pad:
    return a
  return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value)


def _values(x_s, w_s, teacher, mask, labels, hp, cfg, mesh, vocab_axis, token_axis):
  n, v = x_s.shape[0], w_s.shape[0]
  pv = mesh.shape[vocab_axis]
  pt = 1 if token_axis is None else mesh.shape[token_axis]
  v_loc = fl._num_windows(v, pv)  # pylint: disable=protected-access
  n_pad = fl._num_windows(n, pt) * pt  # pylint: disable=protected-access
  vp = _VP(vocab_axis=vocab_axis, token_axis=token_axis, vocab=v, vocab_local=v_loc, shards=pv)
  cfg = cfg._replace(tile_size=min(cfg.tile_size, v_loc))

  # Ragged sizes: padding rows are masked tokens, padding vocabulary rows are masked columns.
  x_s, mask, labels = (_pad_rows(a, n_pad) for a in (x_s, mask, labels))
  w_s = _pad_rows(w_s, v_loc * pv)
  if cfg.teacher_is_logits:
    (tl,) = teacher
    tl = _pad_rows(tl, n_pad)
    if v_loc * pv != v:
      tl = jnp.pad(tl, [(0, 0), (0, v_loc * pv - v)])
    teacher = (tl,)
    t_specs = (P(token_axis, vocab_axis),)
  else:
    x_t, w_t = teacher
    teacher = (_pad_rows(x_t, n_pad), _pad_rows(w_t, v_loc * pv))
    t_specs = (P(token_axis, None), P(vocab_axis, None))

  tok = P(token_axis)
  in_specs = (P(token_axis, None), P(vocab_axis, None), t_specs, tok, tok, P())
  args = (x_s, w_s, teacher, mask, labels, hp)
  # jax.make_mesh's default axes are Explicit: there even unsharded (or differently sharded)
  # inputs must be laid out as in_specs first.
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types) or any(
      fl._explicit_sharding(a) is not None  # pylint: disable=protected-access
      for a in jax.tree.leaves(args))
  if explicit:  # an Explicit mesh's shard_map takes inputs laid out as in_specs only
    args = jax.tree.map(lambda a, s: jax.reshard(a, NS(mesh, s)), args, in_specs)
  fn = jax.shard_map(lambda *a: _vp_streaming(*a, cfg, vp), mesh=mesh, in_specs=in_specs,
                     out_specs=tok)
  out = fn(*args)
  if n_pad != n:
    if explicit:  # ragged N cannot be token-sharded: return the values replicated
      out = jax.reshard(out, NS(mesh, P()))
    out = out[:n]
  return out


# Compiled once per shape/config for eager calls (as fused_linear._IMPLS); inlined under jit.
_values_jit = jax.jit(_values, static_argnums=(6, 7, 8, 9))


def vocab_parallel_values(x_s, w_s, teacher, mask, labels, hp, cfg, *, mesh, vocab_axis,
                          token_axis):
  """Per-token streaming values with the vocabulary sharded over ``mesh``'s ``vocab_axis``."""
  return _values_jit(x_s, w_s, teacher, mask, labels, hp, cfg, mesh, vocab_axis, token_axis)


def check_args(mesh, vocab_axis, token_axis, implementation) -> None:
  """ValueError/TypeError naming the argument for an invalid vocabulary-parallel setup."""
  if mesh is None:
    for name, val in (("vocab_axis", vocab_axis), ("token_axis", token_axis)):
      if val is not None:
        raise ValueError(f"`{name}`={val!r} needs `mesh` (a jax.sharding.Mesh), got mesh=None.")
    return
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  names = tuple(mesh.axis_names)
  if vocab_axis is None:
    raise ValueError(f"`vocab_axis` must name the mesh axis that shards the vocabulary (one of "
                     f"{names}) when `mesh` is given.")
  for name, val in (("vocab_axis", vocab_axis), ("token_axis", token_axis)):
    if val is not None and (not isinstance(val, str) or val not in names):
      raise ValueError(f"`{name}` must be one of the mesh axis names {names}, got {val!r}.")
  if token_axis == vocab_axis:
    raise ValueError(f"`token_axis` and `vocab_axis` must be different mesh axes, both are "
                     f"{vocab_axis!r}.")
  if implementation != "streaming":
    raise ValueError(f"`implementation` must be 'streaming' with `mesh`/`vocab_axis` "
                     f"(vocabulary parallelism), got {implementation!r}.")
