"""Sampling from the decoder-only :class:`experiments.models.Transformer` with its KV cache.

One function serves every task and notebook::

  tokens, log_probs = sample(model, prompt, max_new_tokens=5, temperature=1.0, top_k=None,
                             top_p=None, key=jax.random.key(0))

``prompt`` is ``[B, P]`` token ids; the prompt is fed through the cache position by position
(prefill) and then ``max_new_tokens`` tokens are drawn, all inside one ``lax.scan`` with the
model's key/value cache (``nnx.MultiHeadAttention(decode=True)``), so each step costs ``O(L)``
instead of the ``O(L²)`` of re-running the full forward pass. The cached logits equal the full
forward pass's (``tests/test_paced_experiments.py`` checks it).

Logit processing (:func:`process_logits`), in this order: divide by ``temperature``; keep the
``top_k`` largest logits; keep the smallest set of most-likely tokens whose probability reaches
``top_p`` (nucleus); removed entries become ``-inf``. ``log_probs`` are
``log_softmax(processed logits)`` at the sampled tokens, i.e. the log-probabilities of the
distribution the tokens were drawn from. ``temperature=0`` is greedy decoding (argmax, no key
needed); its ``log_probs`` are those of the filtered distribution at temperature 1.

``sample`` works eagerly (it compiles once per model structure, shapes and settings) and inside
``jax.jit``/``jax.vmap`` on a model rebuilt there with ``nnx.merge(graphdef, params)``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["process_logits", "sample"]


def _check_settings(temperature, top_k, top_p, vocab):
  if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
      or not temperature >= 0 or temperature == float("inf"):
    raise ValueError(f"`temperature` must be a finite real number >= 0 (0 = greedy), "
                     f"got {temperature!r}.")
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1 \
        or (vocab is not None and top_k > vocab):
      raise ValueError(f"`top_k` must be None or an integer in [1, {vocab}], got {top_k!r}.")
  if top_p is not None:
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
      raise ValueError(f"`top_p` must be None or a real number in (0, 1], got {top_p!r}.")


def process_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> jax.Array:
  """Temperature, top-k and top-p (nucleus) filtering of ``logits [..., V]`` (float32 out).

  ``temperature=0`` leaves the scale at 1 (greedy decoding takes the argmax of the result).
  Removed entries are ``-inf``; the most likely token is always kept. Ties at the top-k
  threshold are all kept.
  """
  _check_settings(temperature, top_k, top_p, logits.shape[-1])
  x = jnp.asarray(logits).astype(jnp.promote_types(logits.dtype, jnp.float32))
  if temperature > 0:
    x = x / temperature
  if top_k is not None and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, int(top_k))[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p is not None and top_p < 1:
    sorted_x = -jnp.sort(-x, axis=-1)                                   # descending
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p                                   # the first is always kept
    threshold = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= threshold, x, -jnp.inf)
  return x


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _sample(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  b, plen = prompt.shape
  model.init_cache(b)
  gd, cache, rest = nnx.split(model, nnx.Cache, ...)
  total = plen + max_new_tokens
  keys = jax.random.split(key, total - 1)

  def body(carry, i):
    cache, tok = carry
    m = nnx.merge(gd, cache, rest)
    logits = m(tok[:, None], decode=True)[:, 0]
    cache = nnx.state(m, nnx.Cache)
    proc = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
      nxt = jnp.argmax(proc, axis=-1)
    else:
      nxt = jax.random.categorical(keys[i], proc, axis=-1)
    lp = jnp.take_along_axis(jax.nn.log_softmax(proc, axis=-1), nxt[:, None], axis=-1)[:, 0]
    # Inside the prompt the next input is the prompt's own next token (prefill).
    nxt = jnp.where(i + 1 < plen, prompt[:, jnp.minimum(i + 1, plen - 1)], nxt)
    return (cache, nxt.astype(prompt.dtype)), (nxt.astype(prompt.dtype), lp)

  _, (toks, lps) = jax.lax.scan(body, (cache, prompt[:, 0]), jnp.arange(total - 1))
  return toks.T[:, plen - 1:], lps.T[:, plen - 1:]


def sample(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues ``prompt [B, P]`` by ``max_new_tokens`` tokens with the model's KV cache.

  Args:
    model: an :class:`experiments.models.Transformer` (not modified: the cache lives in a copy).
    prompt: ``[B, P]`` integer token ids, ``P >= 1``; ``P + max_new_tokens <= model.max_len``.
    max_new_tokens: number of generated tokens (>= 1).
    temperature: softmax temperature (> 0), or 0 for greedy decoding.
    top_k: keep only the ``top_k`` most likely tokens (None: all).
    top_p: nucleus sampling: keep the most likely tokens up to probability mass ``top_p``
      (None or 1: all).
    key: PRNG key; required unless ``temperature == 0``.

  Returns:
    ``(tokens [B, max_new_tokens], log_probs [B, max_new_tokens])``: the generated tokens and
    their log-probabilities under the processed (sampling) distribution, float32.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"`prompt` must be integer token ids [B, P] with P >= 1, got "
                     f"{prompt.dtype}{list(prompt.shape)}.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
      or max_new_tokens < 1:
    raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
  # top_k ranges over the head's outputs (an LM with <s> as an input-only token has one fewer).
  n_out = getattr(getattr(model, "head", None), "out_features", None)
  _check_settings(temperature, top_k, top_p, n_out or getattr(model, "vocab_size", None))
  max_len = model.max_len
  if prompt.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                     f"exceeds the model's max_len {max_len}.")
  if key is None:
    if temperature > 0:
      raise ValueError("`key` is required when temperature > 0.")
    key = jax.random.PRNGKey(0)
  graphdef, state = nnx.split(model)
  return _sample(graphdef, state, prompt, key, max_new_tokens=int(max_new_tokens),
                 temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                 top_p=None if top_p is None or top_p == 1 else float(top_p))
