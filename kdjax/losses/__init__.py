"""Distillation losses built on :mod:`kdjax.divergences` (optax-style: per-position values,
keyword-only hyper-parameters, ``where`` masks, no hidden reduction)."""
