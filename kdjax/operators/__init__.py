r"""Probability operators for (recursive, multi-teacher) distillation — ``kdjax.operators``.

All functions take and return **log-probabilities**, are batched over leading axes, accept zeros
(−inf) and never produce NaN. Modules:

* :mod:`~kdjax.operators.aggregation` — multi-teacher pools A_w (arithmetic, geometric,
  power-mean); :func:`aggregate` is the entry point other kdjax modules reuse.
* :mod:`~kdjax.operators.softening` — softening operators F_T (power/temperature, uniform mixing).
* :mod:`~kdjax.operators.meta` — anchored meta-teacher operators M_α(p0, q).
* :mod:`~kdjax.operators.recursion` — q_t = D(M_α(p0, q_{t−1})) with ``jax.lax.scan`` and
  pluggable projections D onto capacity-limited student families.
* :mod:`~kdjax.operators.axioms` — checkers that test any user operator against the axioms.

References: Flouro & Chadwick, arXiv:2601.13100 (recursive meta-distillation), arXiv:2601.03195
(softening), arXiv:2601.09165 (aggregation) [paper]; formal axioms and families are Design choice
(kdjax) [proposed]; see theory/recursive_meta_distillation.md.
"""

from kdjax.operators.aggregation import AGGREGATION_KINDS, aggregate, log_normalizer
from kdjax.operators.softening import SOFTENING_KINDS, soften
from kdjax.operators.meta import META_KINDS, make_operator, meta_teacher
from kdjax.operators.axioms import (AxiomReport, check_aggregation_axioms, check_meta_axioms,
                                    check_softening_axioms, random_simplex)
from kdjax.operators.recursion import (FixedPointResult, Projection, alpha_schedule, fixed_point,
                                       mixture_family, project_mixture, project_softmax_linear, recurse,
                                       softmax_linear_family)

__all__ = [
    "AGGREGATION_KINDS", "aggregate", "log_normalizer",
    "SOFTENING_KINDS", "soften",
    "META_KINDS", "make_operator", "meta_teacher",
    "Projection", "FixedPointResult", "alpha_schedule", "fixed_point", "recurse", "mixture_family",
    "project_mixture",
    "softmax_linear_family", "project_softmax_linear",
    "AxiomReport", "check_meta_axioms", "check_softening_axioms", "check_aggregation_axioms",
    "random_simplex",
]
