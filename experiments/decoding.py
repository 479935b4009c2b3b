"""A small functional decoder-only Transformer with a KV-cache sampler (for student rollouts).

The launcher's ``experiments.models.Transformer`` has no decode cache, and PACED needs K sampled
rollouts per problem at every pass-rate refresh, so this module keeps the model as a plain
parameter pytree with two entry points that compute the same function:

* :func:`apply` — the full causal forward pass ``tokens [B, L] -> logits [B, L, V]`` (training,
  teacher forcing, per-example gradients via ``jax.vmap(jax.grad(...))``);
* :func:`decode_step` — one position with a key/value cache (``O(L)`` per token instead of
  ``O(L²)``), used by :func:`sample` inside one ``lax.scan`` (prefill and generation alike).

``tests/test_paced_experiments.py`` checks that the cached path reproduces :func:`apply`.
Architecture: learned positions, pre-LayerNorm blocks (causal multi-head attention + GELU MLP),
final LayerNorm, untied output projection.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Spec(NamedTuple):
  vocab: int
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 256
  max_len: int = 32


def init_params(key: Array, spec: Spec) -> dict[str, Any]:
  """Parameters with scaled normal initialisation."""
  if spec.d_model % spec.num_heads:
    raise ValueError(f"`d_model` ({spec.d_model}) must be divisible by `num_heads` "
                     f"({spec.num_heads}).")
  d, m = spec.d_model, spec.mlp_dim
  keys = iter(jax.random.split(key, 4 + 4 * spec.num_layers))
  norm = lambda k, shape, fan: jax.random.normal(k, shape) / math.sqrt(fan)  # noqa: E731
  blocks = []
  for _ in range(spec.num_layers):
    blocks.append({
        "ln1": {"s": jnp.ones(d), "b": jnp.zeros(d)},
        "qkv": norm(next(keys), (d, 3 * d), d),
        "out": norm(next(keys), (d, d), d) / math.sqrt(2 * spec.num_layers),
        "ln2": {"s": jnp.ones(d), "b": jnp.zeros(d)},
        "w1": norm(next(keys), (d, m), d), "b1": jnp.zeros(m),
        "w2": norm(next(keys), (m, d), m) / math.sqrt(2 * spec.num_layers), "b2": jnp.zeros(d),
    })
  return {"embed": 0.02 * jax.random.normal(next(keys), (spec.vocab, d)),
          "pos": 0.02 * jax.random.normal(next(keys), (spec.max_len, d)),
          "blocks": blocks, "lnf": {"s": jnp.ones(d), "b": jnp.zeros(d)},
          "head": norm(next(keys), (d, spec.vocab), d)}


def _ln(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["s"] + p["b"]


def _split_heads(x, h):
  return x.reshape(*x.shape[:-1], h, x.shape[-1] // h)


def _mlp(blk, x):
  return jax.nn.gelu(x @ blk["w1"] + blk["b1"]) @ blk["w2"] + blk["b2"]


def apply(params, tokens: Array, spec: Spec) -> Array:
  """Causal forward pass: ``tokens [B, L]`` (int) -> ``logits [B, L, V]``."""
  length = tokens.shape[-1]
  if length > spec.max_len:
    raise ValueError(f"`tokens` length {length} exceeds max_len {spec.max_len}.")
  x = params["embed"][tokens] + params["pos"][:length]
  causal = jnp.tril(jnp.ones((length, length), bool))
  for blk in params["blocks"]:
    q, k, v = jnp.split(_ln(blk["ln1"], x) @ blk["qkv"], 3, axis=-1)
    q, k, v = (_split_heads(t, spec.num_heads) for t in (q, k, v))     # [B, L, H, dh]
    s = jnp.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(causal, s, -1e30)
    a = jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(s, -1), v).reshape(x.shape)
    x = x + a @ blk["out"]
    x = x + _mlp(blk, _ln(blk["ln2"], x))
  return _ln(params["lnf"], x) @ params["head"]


def init_cache(batch: int, spec: Spec, dtype=jnp.float32) -> list[dict[str, Array]]:
  dh = spec.d_model // spec.num_heads
  shape = (batch, spec.max_len, spec.num_heads, dh)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(spec.num_layers)]


def decode_step(params, cache, token: Array, pos: Array, spec: Spec):
  """One position: ``token [B]`` at index ``pos`` -> (logits ``[B, V]``, updated cache)."""
  x = params["embed"][token] + params["pos"][pos]                     # [B, d]
  valid = jnp.arange(spec.max_len) <= pos                              # keys seen so far
  new_cache = []
  for blk, c in zip(params["blocks"], cache):
    q, k, v = jnp.split(_ln(blk["ln1"], x) @ blk["qkv"], 3, axis=-1)
    q, k, v = (_split_heads(t, spec.num_heads) for t in (q, k, v))     # [B, H, dh]
    ck = jax.lax.dynamic_update_slice_in_dim(c["k"], k[:, None], pos, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(c["v"], v[:, None], pos, axis=1)
    s = jnp.einsum("bhd,blhd->bhl", q, ck) / math.sqrt(q.shape[-1])
    s = jnp.where(valid, s, -1e30)
    a = jnp.einsum("bhl,blhd->bhd", jax.nn.softmax(s, -1), cv).reshape(x.shape)
    x = x + a @ blk["out"]
    x = x + _mlp(blk, _ln(blk["ln2"], x))
    new_cache.append({"k": ck, "v": cv})
  return _ln(params["lnf"], x) @ params["head"], new_cache


def sample(params, key: Array, prompt: Array, num_new: int, spec: Spec, *,
           temperature: float = 1.0, greedy: bool = False) -> Array:
  """Continues ``prompt [B, P]`` by ``num_new`` tokens with the KV cache (one ``lax.scan``).

  Returns the generated tokens ``[B, num_new]``. ``greedy=True`` takes the argmax.
  """
  b, plen = prompt.shape
  if plen + num_new > spec.max_len:
    raise ValueError(f"prompt length {plen} + num_new {num_new} exceeds max_len {spec.max_len}.")
  total = plen + num_new
  keys = jax.random.split(key, total)

  def body(carry, i):
    cache, tok = carry
    logits, cache = decode_step(params, cache, tok, i, spec)
    if greedy:
      nxt = jnp.argmax(logits, -1)
    else:
      nxt = jax.random.categorical(keys[i], logits / temperature, -1)
    # Inside the prompt the next input is the prompt's own next token (prefill).
    nxt = jnp.where(i + 1 < plen, prompt[:, jnp.minimum(i + 1, plen - 1)], nxt)
    return (cache, nxt.astype(prompt.dtype)), nxt

  _, out = jax.lax.scan(body, (init_cache(b, spec), prompt[:, 0]), jnp.arange(total - 1))
  return out.T[:, plen - 1:]
