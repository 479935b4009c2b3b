"""Kernel functions as plain, jit-able functions of two point sets.

Every kernel takes `x1` of shape `[n1, dim]` (or `[n1]` for 1-D inputs) and `x2` of shape
`[n2, dim]` (or `[n2]`) and returns the `[n1, n2]` Gram block. Hyper-parameters are
keyword-only. They feed `kdjax.selfdistill.self_distill_predictor` (train-train Gram) and its
predictors (test-train Gram).

Reference: the toy example of Borup & Andersen, arXiv:2102.13088, uses the RBF kernel with
gamma = 80 [paper]. The Laplace and polynomial kernels are the standard definitions (the Laplace
kernel uses the L1 distance, as `sklearn.metrics.pairwise.laplacian_kernel`).

Contract: float inputs of any precision are computed in float32 (float64 kept); a NaN in a point
propagates to the kernel values of that point (to the whole block for squared distances of more
than 16 features, which centre at the mean of all points); hyper-parameters are checked when
concrete (``gamma > 0`` finite, ``degree`` an int >= 1, ``coef0`` finite; array values
elementwise) and unchecked when traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax._checks import check_array, check_int, check_positive, check_range, compute_dtype

__all__ = ["squared_distances", "rbf", "laplace", "linear", "polynomial", "get_kernel", "KERNELS"]


def _points(name: str, x) -> jax.Array:
  x = check_array(name, x, min_rank=1)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f"`{name}` must have shape [n] or [n, dim], got {x.shape}.")
  return x


def _pair(x1, x2):
  a, b = _points("x1", x1), _points("x2", x2)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"`x1` and `x2` must have the same feature dimension, got {a.shape[1]} "
                     f"and {b.shape[1]}.")
  dt = compute_dtype(a, b)
  return a.astype(dt), b.astype(dt)


# Up to this many features the distances are summed feature by feature from exact differences
# (memory n1*n2); above it the Gram expansion |a|^2 + |b|^2 - 2 a.b of the centred inputs is used.
_DIRECT_MAX_DIM = 16


def squared_distances(x1, x2) -> jax.Array:
  r"""Pairwise squared Euclidean distances :math:`\|x_i - x'_j\|_2^2`, shape `[n1, n2]`.

  Independent of a common offset of the inputs (no cancellation for un-centred data such as
  ``x = 1000 + small``): for up to 16 features the squared differences are summed feature by
  feature (memory n1*n2, not n1*n2*dim; exact 0 for coincident points); for more features both
  point sets are first centred at the mean of all n1 + n2 points and
  :math:`|a|^2 + |b|^2 - 2 a^\top b` is used, clipped at 0 (the tiny negative values that
  cancellation leaves for near-coincident points).
  """
  a, b = _pair(x1, x2)
  dim = a.shape[1]
  if dim <= _DIRECT_MAX_DIM:
    sq = jnp.zeros((a.shape[0], b.shape[0]), a.dtype)
    for j in range(dim):
      sq = sq + (a[:, j][:, None] - b[:, j][None, :]) ** 2
    return sq
  # Centre at the mean of both sets (distances are translation invariant): removes the
  # cancellation of |a|^2 + |b|^2 - 2 a.b for inputs far from the origin.
  n = max(a.shape[0] + b.shape[0], 1)
  centre = jax.lax.stop_gradient((jnp.sum(a, 0) + jnp.sum(b, 0)) / n)
  a, b = a - centre, b - centre
  sq = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
        - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(sq, 0.0)


def rbf(x1, x2, *, gamma: float = 1.0) -> jax.Array:
  r"""Gaussian (RBF) kernel :math:`k(x, x') = \exp(-\gamma \|x - x'\|_2^2)`."""
  check_positive("gamma", gamma)
  return jnp.exp(-gamma * squared_distances(x1, x2))


def laplace(x1, x2, *, gamma: float = 1.0) -> jax.Array:
  r"""Laplace kernel :math:`k(x, x') = \exp(-\gamma \|x - x'\|_1)` (L1 distance, as sklearn)."""
  check_positive("gamma", gamma)
  a, b = _pair(x1, x2)
  # Loop over features to keep memory at n1*n2 (dim is small for kernel regression).
  dist = jnp.zeros((a.shape[0], b.shape[0]), a.dtype)
  for j in range(a.shape[1]):
    dist = dist + jnp.abs(a[:, j][:, None] - b[:, j][None, :])
  return jnp.exp(-gamma * dist)


def linear(x1, x2) -> jax.Array:
  r"""Linear kernel :math:`k(x, x') = x^\top x'` (finite rank: its Gram is usually singular)."""
  a, b = _pair(x1, x2)
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def polynomial(x1, x2, *, degree: int = 3, gamma: float = 1.0, coef0: float = 1.0) -> jax.Array:
  r"""Polynomial kernel :math:`k(x, x') = (\gamma x^\top x' + c_0)^{p}`."""
  degree = check_int("degree", degree, low=1)
  check_positive("gamma", gamma)
  check_range("coef0", coef0)
  return (gamma * linear(x1, x2) + coef0) ** degree


KERNELS = {"rbf": rbf, "laplace": laplace, "linear": linear, "polynomial": polynomial}


def get_kernel(name: str):
  """Looks a kernel up by name (`rbf`, `laplace`, `linear`, `polynomial`)."""
  if not isinstance(name, str) or name not in KERNELS:
    raise ValueError(f"`name` must be one of {sorted(KERNELS)}, got {name!r}.")
  return KERNELS[name]
