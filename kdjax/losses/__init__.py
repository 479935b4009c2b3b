"""Distillation losses built on :mod:`kdjax.divergences` (optax-style: per-position values,
keyword-only hyper-parameters, ``where`` masks, no hidden reduction).

Conventions shared by every loss here:

* **Student first, teacher second.** Hyper-parameters are keyword-only; values are per position
  (reduce with :mod:`kdjax.reductions`).
* **Stop-gradient rule (one rule).** No loss stops the *teacher's* gradient: if the teacher is
  a trainable model (or a function of the student), wrap it in ``jax.lax.stop_gradient``
  yourself. What a loss detaches is part of its definition and documented on the function:
  TAID's interpolated target uses the detached *student* (sg(z_S)) [paper], AKL's mixing weights
  and :func:`teacher_weights` carry no gradient, and PLD's permutation is piecewise constant.
  (The fused linear-head losses take teacher *activations* and never differentiate the teacher.)
* **Temperature hand-off.** ``temperature`` is applied to the logits a function receives, never
  to precomputed log-probabilities: :func:`topk_teacher` returns log-probs already at its T, and
  :func:`topk_tail_kl` / :func:`truncated_topk_kl` apply their ``temperature`` to the student
  only. Pass ``teacher_temperature=`` (the T recorded with the cached targets) to have it
  checked against ``temperature``.
* ``where`` is one boolean mask (position or vocabulary mask, see :mod:`kdjax.divergences`).
* NaN inputs propagate; only ``-inf`` entries and ``where=False`` remove entries.
"""

from kdjax.losses._akl import adaptive_kl
from kdjax.losses._akl import adaptive_kl_weights
from kdjax.losses._hinton import MIXTURE_DIVERGENCES
from kdjax.losses._hinton import ce_kd_mixture
from kdjax.losses._hinton import hinton_kd
from kdjax.losses._hinton import softmax_cross_entropy_with_integer_labels
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
from kdjax.losses._multi_teacher import WEIGHT_MODES
from kdjax.losses._multi_teacher import multi_teacher_kd
from kdjax.losses._multi_teacher import teacher_weights
from kdjax.losses import fused_linear
from kdjax.losses import onpolicy
from kdjax.losses.fused_linear import DIVERGENCES as FUSED_DIVERGENCES
from kdjax.losses.fused_linear import IMPLEMENTATIONS as FUSED_IMPLEMENTATIONS
from kdjax.losses.fused_linear import fused_linear_distillation
from kdjax.losses.fused_linear import fused_linear_distillation_per_token
from kdjax.losses.fused_linear import fused_linear_forward_kl
from kdjax.losses.fused_linear import fused_linear_generalized_jsd
from kdjax.losses.fused_linear import fused_linear_reverse_kl
from kdjax.losses.fused_linear import fused_linear_skew_forward_kl

__all__ = [
    "adaptive_kl",
    "adaptive_kl_weights",
    "ce_kd_mixture",
    "hinton_kd",
    "softmax_cross_entropy_with_integer_labels",
    "logit_standardized_kd",
    "standardize_logits",
    "TaidState",
    "taid_init",
    "taid_loss",
    "taid_target_logits",
    "taid_update",
    "plackett_luce_kd",
    "plackett_luce_permutation",
    "random_sampling_kd",
    "sample_sparse_targets",
    "topk_tail_kl",
    "topk_teacher",
    "truncated_topk_kl",
    "multi_teacher_kd",
    "teacher_weights",
    "fused_linear_distillation",
    "fused_linear_distillation_per_token",
    "fused_linear_forward_kl",
    "fused_linear_generalized_jsd",
    "fused_linear_reverse_kl",
    "fused_linear_skew_forward_kl",
]
