"""kdjax: knowledge-distillation theory and experiments in JAX.

Pure, jit- and shard-friendly functions. Submodules are imported on demand
(``kdjax.divergences``, ``kdjax.reductions``, ...); the core two are re-exported here.
"""

from kdjax import divergences
from kdjax import reductions
from kdjax.divergences import (forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl,
                               generalized_jsd, total_variation, kl, kl_from_log)
from kdjax.reductions import SumAndCount, masked_sum_and_count, finalize_mean

__version__ = "0.1.0"
