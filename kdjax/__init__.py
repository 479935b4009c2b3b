"""kdjax: knowledge-distillation theory and experiments in JAX.

Pure, jit- and shard-friendly functions. The core two modules are imported with the package and
their main functions re-exported here (``kdjax.forward_kl``, ``kdjax.masked_sum_and_count``, ...).
The other submodules are imported on first attribute access, so ``import kdjax`` stays light
(JAX and NumPy only) and ``kdjax.losses.hinton_kd`` works without a separate import:
``losses``, ``operators``, ``policy``, ``preference``, ``pacing``, ``selfdistill``, ``kernels``,
``teacher_cache`` (the last needs the ``cache`` extra).

The contract of every public function:

* student first, teacher second, direction in the name; keyword-only hyper-parameters;
  per-position outputs (means via :mod:`kdjax.reductions` (sum, count), once per step);
* ``where`` is always a **boolean mask broadcastable to the input** (a non-boolean mask is a
  ``TypeError``). For logits functions a mask of the batch shape or with size 1 on the class axis
  masks positions (value 0, gradient 0); a mask that varies along the class axis removes
  vocabulary entries;
* the CE + KD mixture is ``ce_weight · CE + kd_weight · (T² if scale_by_t2 else 1) · D``
  (:func:`kdjax.losses.ce_kd_mixture`; defaults 1, 1, False) everywhere;
* ``jax.jit(f)(x) == f(x)``; bfloat16 in, float32 out (float64 kept); ``-inf`` entries removed,
  empty rows give 0 with zero gradient; NaN is never created, but NaN input propagates; a concrete
  ``+inf`` logit is an error;
* bad concrete input raises ``ValueError``/``TypeError`` naming the argument; traced values are
  unchecked.
"""

import importlib as _importlib

from kdjax import divergences
from kdjax import reductions
from kdjax.divergences import (forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl,
                               generalized_jsd, total_variation, kl, kl_from_log)
from kdjax.reductions import SumAndCount, masked_sum_and_count, masked_mean, finalize_mean

__version__ = "0.1.0"

__all__ = [
    "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd",
    "total_variation", "kl", "kl_from_log",
    "SumAndCount", "masked_sum_and_count", "masked_mean", "finalize_mean",
]

_SUBMODULES = ("losses", "operators", "policy", "preference", "pacing", "selfdistill",
               "kernels", "teacher_cache", "divergences", "reductions")


def __getattr__(name):
  if name in _SUBMODULES:
    module = _importlib.import_module(f"kdjax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'kdjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
