"""Distillation losses built on :mod:`kdjax.divergences` (optax-style: per-position values,
keyword-only hyper-parameters, ``where`` masks, no hidden reduction)."""

from kdjax.losses._akl import adaptive_kl
from kdjax.losses._akl import adaptive_kl_weights
from kdjax.losses._hinton import ce_kd_mixture
from kdjax.losses._hinton import hinton_kd
from kdjax.losses._hinton import softmax_cross_entropy
from kdjax.losses._standardized import logit_standardized_kd
from kdjax.losses._standardized import standardize_logits
from kdjax.losses._taid import TaidState
from kdjax.losses._taid import taid_init
from kdjax.losses._taid import taid_loss
from kdjax.losses._taid import taid_target_logits
from kdjax.losses._taid import taid_update
from kdjax.losses._pld import plackett_luce_kd
from kdjax.losses._pld import plackett_luce_permutation
from kdjax.losses._sparse import random_sampling_kd
from kdjax.losses._sparse import sample_sparse_targets
from kdjax.losses._sparse import topk_tail_kl
from kdjax.losses._sparse import topk_teacher
from kdjax.losses._sparse import truncated_topk_kl
from kdjax.losses._multi_teacher import multi_teacher_kd
from kdjax.losses._multi_teacher import teacher_weights
from kdjax.losses import fused_linear
from kdjax.losses.fused_linear import DIVERGENCES as FUSED_DIVERGENCES
from kdjax.losses.fused_linear import IMPLEMENTATIONS as FUSED_IMPLEMENTATIONS
from kdjax.losses.fused_linear import fused_linear_distillation
from kdjax.losses.fused_linear import fused_linear_distillation_per_token
from kdjax.losses.fused_linear import fused_linear_forward_kl
from kdjax.losses.fused_linear import fused_linear_generalized_jsd
from kdjax.losses.fused_linear import fused_linear_reverse_kl
from kdjax.losses.fused_linear import fused_linear_skew_forward_kl
