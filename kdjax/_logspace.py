"""Log-space primitives shared by every kdjax module (private; the one copy of each).

Validity rule (the library contract): an entry is *removed* only when it is exactly ``-inf`` or
masked out by ``where``. NaN is never treated as masked: it propagates to the output so that a
training loop's non-finite guard fires. ``+inf`` logits are outside the domain: a concrete
``+inf`` is rejected by :func:`kdjax._checks.check_no_posinf`; a traced one yields NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


def valid_entries(x: Array, where: Array | None = None) -> Array:
  """True for every entry that takes part: not exactly -inf (NaN counts as present) and kept."""
  valid = x != NEG_INF
  if where is not None:
    valid = valid & where
  return valid


def masked_logsumexp(x: Array, *, axis: int = -1, where: Array | None = None,
                     keepdims: bool = False) -> Array:
  """log Σ exp(x) over the valid entries of `axis`.

  -inf and masked entries are dropped; an empty slice gives -inf with zero gradient; NaN in a
  valid entry propagates (the result is NaN).
  """
  valid = valid_entries(x, where)
  nonempty = jnp.any(valid, axis=axis, keepdims=True)
  safe = jnp.where(valid, x, 0.0)
  m = jnp.max(jnp.where(valid, safe, NEG_INF), axis=axis, keepdims=True)
  # The shift only needs to be finite; NaN must still reach the sum below.
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, safe - m, 0.0)), 0.0), axis=axis,
              keepdims=True)
  out = jnp.where(nonempty, jnp.log(jnp.where(nonempty, s, 1.0)) + m, NEG_INF)
  return out if keepdims else jnp.squeeze(out, axis=axis)


def masked_log_softmax(x: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Log-softmax over the valid entries; removed entries (and empty rows) get -inf. No NaN
  is created; NaN input propagates to its row."""
  valid = valid_entries(x, where)
  lse = masked_logsumexp(x, axis=axis, where=where, keepdims=True)
  nonempty = jnp.any(valid, axis=axis, keepdims=True)
  lse_safe = jnp.where(nonempty, lse, 0.0)
  return jnp.where(valid, jnp.where(valid, x, 0.0) - lse_safe, NEG_INF)


def log_normalize(log_x: Array, *, axis: int = -1, where: Array | None = None) -> Array:
  """Normalises unnormalised log-masses along `axis` (same as :func:`masked_log_softmax`)."""
  return masked_log_softmax(log_x, axis=axis, where=where)


def safe_log(x: Array) -> Array:
  """log x with log 0 = -inf and a zero (not NaN/inf) gradient at 0; NaN propagates."""
  zero = x == 0
  return jnp.where(zero, NEG_INF, jnp.log(jnp.where(zero, 1.0, x)))


def row_nonempty(log_p: Array, axis: int) -> Array:
  """True where a row of log-probabilities has at least one entry that is not -inf."""
  return jnp.any(log_p != NEG_INF, axis=axis)


def plogratio(log_p: Array, log_q: Array, axis: int) -> Array:
  """Σ_k p_k (log p_k − log q_k) with 0·log 0 = 0 and +inf where q_k = 0 < p_k.

  The +inf branch is a constant, so a support violation never sends NaN into a gradient; NaN in
  either input propagates.
  """
  p_pos = log_p != NEG_INF
  q_pos = log_q != NEG_INF
  both = p_pos & q_pos
  lp = jnp.where(both, log_p, 0.0)
  lq = jnp.where(both, log_q, 0.0)
  # NaN in log_p where log_q = -inf must stay NaN, not become +inf.
  violation = jnp.where(jnp.isnan(log_p), jnp.nan, jnp.inf)
  terms = jnp.where(both, jnp.exp(lp) * (lp - lq), jnp.where(p_pos, violation, 0.0))
  return jnp.sum(terms, axis=axis)


def log_mixture(weight: Any, log_a: Array, log_b: Array) -> Array:
  """log(w·a + (1 − w)·b) from log a and log b; safe at w ∈ {0, 1} and for zeros.

  `weight` broadcasts against the inputs (a per-position weight must already carry a trailing
  singleton class axis). NaN in an input propagates.
  """
  w = jnp.asarray(weight).astype(log_a.dtype)
  a_pos = log_a != NEG_INF
  b_pos = log_b != NEG_INF
  use_a = a_pos & (w > 0)
  use_b = b_pos & (w < 1)
  la = jnp.where(use_a, log_a, 0.0)
  lb = jnp.where(use_b, log_b, 0.0)
  log_w = jnp.log(jnp.where(w > 0, w, 1.0))
  log_1mw = jnp.log1p(-jnp.where(w < 1, w, 0.0))
  ta = la + log_w
  tb = lb + log_1mw
  both = use_a & use_b
  mixed = jnp.logaddexp(jnp.where(both, ta, 0.0), jnp.where(both, tb, 0.0))
  out = jnp.where(both, mixed, jnp.where(use_a, ta, tb))
  return jnp.where(use_a | use_b, out, NEG_INF)
