"""Flax NNX models for the experiments, built from config dicts: MLP, small CNN, small Transformer.

These are the one model stack of every experiment task (classifiers, the ADPO policies, the PACED
teacher and student language models). Every model maps inputs to logits (``[batch, num_classes]``
for the classifiers, ``[batch, seq, vocab]`` for the Transformer) and has only ``nnx.Param`` state
(no batch statistics, no dropout; the Transformer adds an ``nnx.Cache`` only while decoding, see
:func:`experiments.decoding.sample`), so a model is fully described by ``nnx.split(model)`` and a
training step is a pure function of the parameters: ``nnx.merge(graphdef, params)(x)`` inside
``jax.jit``/``jax.vmap``/``jax.grad``.

Build from a config (an ``ml_collections.ConfigDict`` or a dict)::

  model = build_model({"kind": "mlp", "hidden": [256, 256]}, input_shape=(8, 8, 1),
                      num_classes=10, seed=0)

Teacher and student are independent configs; see ``experiments/configs/digits_kd.py``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MLP", "CNN", "Transformer", "build_model", "count_params"]

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}


def _activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
  return _ACTIVATIONS[name]


class MLP(nnx.Module):
  """Multi-layer perceptron on flattened inputs: ``in -> hidden[0] -> ... -> num_classes``."""

  def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *,
               activation: str = "relu", rngs: nnx.Rngs):
    self.act = _activation(activation)
    sizes = [int(in_features), *[int(h) for h in hidden]]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], int(num_classes), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = self.act(layer(x))
    return self.head(x)


class CNN(nnx.Module):
  """Small convolutional net: 3x3 conv + activation (+ 2x2 average pool) blocks, then a dense head.

  Inputs are ``[batch, H, W, C]``; pooling is skipped once a side would drop below 2.
  """

  def __init__(self, input_shape: Sequence[int], features: Sequence[int], num_classes: int, *,
               dense: int = 128, activation: str = "relu", rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"`input_shape` of a CNN must be (H, W, C), got {tuple(input_shape)}.")
    self.act = _activation(activation)
    h, w, c = (int(s) for s in input_shape)
    convs, pools = [], []
    for f in features:
      convs.append(nnx.Conv(c, int(f), kernel_size=(3, 3), padding="SAME", rngs=rngs))
      pool = h >= 4 and w >= 4
      pools.append(pool)
      if pool:
        h, w = h // 2, w // 2
      c = int(f)
    self.convs = nnx.List(convs)
    self.pools = tuple(pools)
    self.dense = nnx.Linear(h * w * c, int(dense), rngs=rngs)
    self.head = nnx.Linear(int(dense), int(num_classes), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, pool in zip(self.convs, self.pools):
      x = self.act(conv(x))
      if pool:
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.head(self.act(self.dense(x)))


class _Block(nnx.Module):
  """Pre-LayerNorm decoder block: causal self-attention and an MLP, both residual."""

  def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.fc1 = nnx.Linear(d_model, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, d_model, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, *, decode: bool = False) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask, decode=decode)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


_EMBED_INIT = nnx.initializers.normal(stddev=0.02)


class Transformer(nnx.Module):
  """Small decoder-only Transformer language model: token ids ``[B, L]`` -> logits ``[B, L, V]``.

  Learned positional embeddings (``max_len``), pre-LayerNorm blocks with causal attention, a final
  LayerNorm and an untied output projection; token and position embeddings start at N(0, 0.02²).
  ``padding_mask`` (``[B, L]`` bool, optional) removes padded keys from attention.
  ``num_outputs`` (default ``vocab_size``) sizes the output head separately from the input
  embedding (e.g. an input-only ``<s>`` token that is never predicted); :meth:`hidden` gives the
  final-LayerNorm states ``[B, L, d_model]`` that the head maps to logits (what the fused
  large-vocabulary losses of :mod:`kdjax.losses.fused_linear` take, with ``head.kernel.T``).

  Autoregressive decoding with a key/value cache (``nnx.MultiHeadAttention(decode=True)``):
  :meth:`init_cache` allocates the cache for a batch, then each ``model(token[:, None],
  decode=True)`` call consumes one position (``O(L)`` per token instead of ``O(L²)``) and returns
  the logits ``[B, 1, V]`` the full forward pass gives at that position. Use
  :func:`experiments.decoding.sample` rather than calling this by hand.
  """

  def __init__(self, vocab_size: int, *, d_model: int = 64, num_heads: int = 4,
               num_layers: int = 2, mlp_dim: int = 256, max_len: int = 64,
               num_outputs: int | None = None, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}).")
    self.max_len = int(max_len)
    self.vocab_size = int(vocab_size)
    self.embed = nnx.Embed(int(vocab_size), int(d_model), embedding_init=_EMBED_INIT, rngs=rngs)
    self.pos = nnx.Embed(self.max_len, int(d_model), embedding_init=_EMBED_INIT, rngs=rngs)
    self.blocks = nnx.List([_Block(int(d_model), int(num_heads), int(mlp_dim), rngs=rngs)
                            for _ in range(int(num_layers))])
    self.ln_f = nnx.LayerNorm(int(d_model), rngs=rngs)
    self.head = nnx.Linear(int(d_model), int(num_outputs or vocab_size), rngs=rngs)

  def init_cache(self, batch_size: int, dtype=jnp.float32) -> None:
    """Allocates an empty key/value cache of ``max_len`` positions for ``batch_size`` rows."""
    shape = (int(batch_size), self.max_len, self.embed.features)
    for block in self.blocks:
      block.attn.init_cache(shape, dtype)
    self.cache_pos = nnx.Cache(jnp.array(0, jnp.int32))

  def __call__(self, tokens: jax.Array, padding_mask: jax.Array | None = None, *,
               decode: bool = False) -> jax.Array:
    length = tokens.shape[-1]
    if decode:
      if length != 1:
        raise ValueError(f"decode=True takes one position (`tokens` [B, 1]), got length {length}.")
      if padding_mask is not None:
        raise ValueError("`padding_mask` is not supported with decode=True.")
      if getattr(self, "cache_pos", None) is None:
        raise ValueError("decode=True needs a cache: call `init_cache(batch_size)` first.")
      pos = self.cache_pos[...]
      x = self.embed(tokens) + self.pos(pos)[None, None]
      self.cache_pos[...] = pos + 1
      for block in self.blocks:
        x = block(x, None, decode=True)
      return self.head(self.ln_f(x))
    return self.head(self.hidden(tokens, padding_mask))

  def hidden(self, tokens: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """The final-LayerNorm hidden states ``[B, L, d_model]`` (the head's input; full pass)."""
    length = tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(f"`tokens` length {length} exceeds the model's max_len {self.max_len}.")
    x = self.embed(tokens) + self.pos(jnp.arange(length))[None]
    mask = nnx.make_causal_mask(tokens)
    if padding_mask is not None:
      mask = nnx.combine_masks(mask, nnx.make_attention_mask(padding_mask, padding_mask))
    for block in self.blocks:
      x = block(x, mask)
    return self.ln_f(x)


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
  if hasattr(cfg, "get"):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def build_model(cfg: Mapping[str, Any] | Any, *, input_shape: Sequence[int] = (),
                num_classes: int = 0, seed: int = 0) -> nnx.Module:
  """Builds a model from a config.

  Keys: ``kind`` (``"mlp"``, ``"cnn"`` or ``"transformer"``) and
    * mlp: ``hidden`` (list of widths), ``activation``;
    * cnn: ``features`` (conv channels), ``dense``, ``activation``;
    * transformer: ``vocab_size`` (default ``num_classes``), ``d_model``, ``num_heads``,
      ``num_layers``, ``mlp_dim``, ``max_len``, ``num_outputs`` (default ``vocab_size``).

  Args:
    cfg: the model config (ConfigDict or dict).
    input_shape: the shape of one example (without the batch axis).
    num_classes: number of output classes (vocabulary size for the Transformer by default).
    seed: parameter initialisation seed.
  """
  kind = _get(cfg, "kind", None)
  rngs = nnx.Rngs(params=int(seed))
  if kind == "mlp":
    return MLP(int(np.prod(input_shape)), list(_get(cfg, "hidden", [128])), num_classes,
               activation=_get(cfg, "activation", "relu"), rngs=rngs)
  if kind == "cnn":
    return CNN(tuple(input_shape), list(_get(cfg, "features", [16, 32])), num_classes,
               dense=_get(cfg, "dense", 128), activation=_get(cfg, "activation", "relu"),
               rngs=rngs)
  if kind == "transformer":
    return Transformer(_get(cfg, "vocab_size", num_classes) or num_classes,
                       d_model=_get(cfg, "d_model", 64), num_heads=_get(cfg, "num_heads", 4),
                       num_layers=_get(cfg, "num_layers", 2), mlp_dim=_get(cfg, "mlp_dim", 256),
                       max_len=_get(cfg, "max_len", 64),
                       num_outputs=_get(cfg, "num_outputs", None), rngs=rngs)
  raise ValueError(f"model `kind` must be 'mlp', 'cnn' or 'transformer', got {kind!r}.")


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
