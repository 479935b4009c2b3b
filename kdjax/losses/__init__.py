"""Distillation losses built on :mod:`kdjax.divergences` (optax-style: per-position values,
keyword-only hyper-parameters, ``where`` masks, no hidden reduction)."""

from kdjax.losses._akl import adaptive_kl
from kdjax.losses._akl import adaptive_kl_weights
