"""The library contract, checked on every public function of kdjax.

Every name in the ``__all__`` of a public kdjax module is either covered by a :class:`Spec` below
or listed in ``EXEMPT`` with the reason (classes, constants, file I/O, meta-functions that take
other functions). A new public function without an entry fails :func:`test_every_public_name_is_covered`.

For each spec the harness checks, with inputs built by the spec:

* ``jit``: ``jax.jit(f)(x) == f(x)`` (all array inputs traced);
* ``bf16``: bfloat16 float inputs give float32 float outputs;
* ``nan``: a NaN in the spec's ``nan_arg`` reaches the output (never silently masked);
* ``grad``: the gradient of the summed output in ``grad_arg`` is finite (at ordinary inputs, and at
  ±1e4 logits where the spec says the input is logits);
* ``where``: a boolean mask broadcastable to the input gives what the same mask broadcast to the
  full shape gives (for logits functions: a batch-shape mask with or without a trailing singleton
  axis), and a non-boolean mask is a ``TypeError``;
* ``bad``: each listed invalid concrete input raises ``ValueError``/``TypeError`` naming the argument.

A property that does not apply is switched off in the spec, with the reason in ``skip``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PUBLIC_MODULES = (
    "kdjax", "kdjax.divergences", "kdjax.reductions", "kdjax.losses", "kdjax.losses.fused_linear",
    "kdjax.losses.onpolicy", "kdjax.operators", "kdjax.policy", "kdjax.preference", "kdjax.pacing",
    "kdjax.selfdistill", "kdjax.kernels", "kdjax.teacher_cache",
)

B, V = 3, 5


def _normal(i, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(i).normal(size=shape) * scale, jnp.float32)


def _log_simplex(i, shape):
  return jax.nn.log_softmax(_normal(i, shape), axis=-1)


def _simplex(i, shape):
  return jax.nn.softmax(_normal(i, shape), axis=-1)


S_LOGITS = _normal(0, (B, V))
T_LOGITS = _normal(1, (B, V))
MASK = jnp.array([True, False, True])


@dataclasses.dataclass
class Spec:
  """How to call one public function, and which contract properties apply."""
  name: str                                   # "module:function"
  arrays: Callable[[], dict]                  # array inputs (traced under jit), by argument name
  positional: tuple = ()                      # which of `arrays` are passed positionally, in order
  static: dict = dataclasses.field(default_factory=dict)   # hyper-parameters (closed over)
  nan_arg: str | None = "first"               # input that gets a NaN ("first" = first float)
  grad_arg: str | None = "first"              # input to differentiate
  logits: bool = False                        # `grad_arg` is logits: also test ±1e4
  where: tuple | None = None                  # (batch-shape mask) to test broadcastable `where`
  bad: tuple = ()                             # ((overrides of static/arrays), argument name)
  jit: bool = True
  bf16: bool = True
  skip: str = ""                              # why a property is switched off

  @property
  def fn(self):
    mod, fname = self.name.split(":")
    return getattr(importlib.import_module(mod), fname)

  def call(self, arrays, **over):
    kw = {k: v for k, v in arrays.items() if k not in self.positional}
    kw.update(self.static)
    kw.update(over)
    return self.fn(*[arrays[k] for k in self.positional], **kw)

  def float_names(self, arrays):
    return [k for k, v in arrays.items()
            if hasattr(v, "dtype") and jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
            and k != "where"]

  def pick(self, which, arrays):
    if which != "first":
      return which
    names = self.float_names(arrays)
    return names[0] if names else None


def _leaves(out):
  return [x for x in jax.tree.leaves(out)
          if hasattr(x, "dtype") and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def logits_spec(name, extra_static=None, *, where=True, bad=(), **kw):
  """A student/teacher logits function of signature f(s, t, *, temperature=, axis=, where=)."""
  static = {"temperature": 2.0}
  static.update(extra_static or {})
  bad = (({"temperature": -1.0}, "temperature"), ({"temperature": "2"}, "temperature"),
         ({"temperature": jnp.array([1.0, -2.0, 1.0])}, "temperature")) + tuple(bad)
  return Spec(name, lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS},
              positional=("student_logits", "teacher_logits"), static=static, logits=True,
              where=(MASK,) if where else None, bad=bad, **kw)


SPECS: list[Spec] = [
    # ---------------------------------------------------------------- divergences
    Spec("kdjax.divergences:log_softmax", lambda: {"logits": S_LOGITS}, positional=("logits",),
         logits=True),
    logits_spec("kdjax.divergences:forward_kl"),
    logits_spec("kdjax.divergences:reverse_kl"),
    logits_spec("kdjax.divergences:skew_forward_kl", {"skew": 0.1},
                bad=(({"skew": 1.5}, "skew"), ({"skew": jnp.array([0.1, 2.0, 0.1])}, "skew"))),
    logits_spec("kdjax.divergences:skew_reverse_kl", {"skew": 0.1}, bad=(({"skew": -0.1}, "skew"),)),
    logits_spec("kdjax.divergences:generalized_jsd", {"beta": 0.3}, bad=(({"beta": 1.5}, "beta"),)),
    logits_spec("kdjax.divergences:generalized_jsd", {"beta": 0.0}),
    logits_spec("kdjax.divergences:total_variation"),
    Spec("kdjax.divergences:kl", lambda: {"p": _simplex(0, (B, V)), "q": _simplex(1, (B, V))},
         where=(MASK,), bad=(({"p": jnp.array([[2.0, 3.0]]), "q": jnp.array([[.5, .5]])}, "p"),)),
    Spec("kdjax.divergences:kl_from_log",
         lambda: {"log_p": _log_simplex(0, (B, V)), "log_q": _log_simplex(1, (B, V))},
         where=(MASK,)),
    Spec("kdjax.divergences:generalized_jsd_from_log",
         lambda: {"log_p": _log_simplex(0, (B, V)), "log_q": _log_simplex(1, (B, V))},
         static={"beta": 0.4}, where=(MASK,), bad=(({"beta": 2.0}, "beta"),)),
    Spec("kdjax.divergences:total_variation_from_probs",
         lambda: {"p": _simplex(0, (B, V)), "q": _simplex(1, (B, V))}, where=(MASK,),
         bad=(({"p": jnp.array([[-1.0, 2.0]]), "q": jnp.array([[.5, .5]])}, "p"),)),
    Spec("kdjax.divergences:entropy_from_log", lambda: {"log_p": _log_simplex(0, (B, V))},
         positional=("log_p",), where=(MASK,)),
    Spec("kdjax.divergences:log_mixture",
         lambda: {"log_a": _log_simplex(0, (B, V)), "log_b": _log_simplex(1, (B, V))},
         static={"weight": 0.3}, positional=(), bad=(({"weight": 2.0}, "weight"),)),
    # ---------------------------------------------------------------- reductions
    Spec("kdjax.reductions:masked_sum_and_count", lambda: {"values": _normal(0, (B, V))},
         positional=("values",), where=(MASK[:, None], jnp.broadcast_to(MASK[:, None], (B, V))),
         bad=(({"weights": jnp.array([-1.0, 1.0, 1.0, 1.0, 1.0])}, "weights"),)),
    Spec("kdjax.reductions:masked_mean", lambda: {"values": _normal(0, (B, V))},
         positional=("values",), where=(MASK[:, None], jnp.broadcast_to(MASK[:, None], (B, V)))),
    Spec("kdjax.reductions:finalize_mean",
         lambda: {"acc": __import__("kdjax.reductions").reductions.SumAndCount(
             jnp.array(3.0), jnp.array(2))},
         positional=("acc",), bf16=False, skip="bf16: takes a SumAndCount"),
]

# ----------------------------------------------------------------------------- losses
_L = "kdjax.losses"
SPECS += [
    logits_spec(f"{_L}:hinton_kd", {"scale_by_t2": True}),
    logits_spec(f"{_L}:logit_standardized_kd"),
    logits_spec(f"{_L}:adaptive_kl", {"mu": 0.5}, bad=(({"mu": 1.5}, "mu"),)),
    Spec(f"{_L}:adaptive_kl_weights",
         lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS},
         positional=("student_logits", "teacher_logits"), static={"mu": 0.5}, logits=True,
         grad_arg=None, skip="grad: the AKL weights are stop-gradient statistics"),
    logits_spec(f"{_L}:plackett_luce_kd"),
    Spec(f"{_L}:plackett_luce_permutation", lambda: {"teacher_logits": T_LOGITS},
         positional=("teacher_logits",), grad_arg=None, bf16=False, nan_arg=None,
         skip="returns an integer permutation"),
    Spec(f"{_L}:softmax_cross_entropy_with_integer_labels",
         lambda: {"logits": S_LOGITS, "labels": jnp.array([0, 4, 2])}, positional=("logits", "labels"),
         logits=True, where=(MASK,),
         bad=(({"labels": jnp.array([0, 5, 2])}, "labels"), ({"labels": jnp.array([0, -1, 2])}, "labels"))),
    Spec(f"{_L}:ce_kd_mixture",
         lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS,
                  "labels": jnp.array([0, 4, 2])},
         positional=("student_logits", "teacher_logits", "labels"),
         static={"kd_weight": 0.9, "ce_weight": 0.1, "temperature": 2.0}, logits=True,
         where=(MASK,), bad=(({"kd_weight": -1.0}, "kd_weight"), ({"temperature": 0.0}, "temperature"))),
    Spec(f"{_L}:standardize_logits", lambda: {"logits": S_LOGITS}, positional=("logits",),
         logits=False),
    Spec(f"{_L}:taid_loss", lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS},
         positional=("student_logits", "teacher_logits"), static={"interpolation": 0.5},
         logits=True, where=(MASK,), bad=(({"interpolation": 1.5}, "interpolation"),)),
    Spec(f"{_L}:taid_target_logits", lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS},
         positional=("student_logits", "teacher_logits"), static={"interpolation": 0.5}, logits=True),
    Spec(f"{_L}:taid_init", lambda: {}, static={"t_start": 0.4}, grad_arg=None, nan_arg=None,
         bf16=False, bad=(({"t_start": 1.5}, "t_start"),), skip="no array input"),
    Spec(f"{_L}:taid_update",
         lambda: {"state": __import__("kdjax.losses").losses.taid_init(), "loss": jnp.array(1.0)},
         positional=("state", "loss"), static={"step": 3, "total_steps": 10}, grad_arg=None,
         nan_arg=None, bf16=False,
         skip="a schedule update: a non-finite loss leaves the state unchanged (tested in test_losses_taid)"),
    Spec(f"{_L}:topk_teacher", lambda: {"teacher_logits": T_LOGITS}, positional=("teacher_logits",),
         static={"k": 2}, grad_arg=None, bad=(({"k": 0}, "k"), ({"k": 2.5}, "k")),
         skip="grad: top-k selection; values are tested in test_losses_sparse"),
    Spec(f"{_L}:topk_tail_kl",
         lambda: {"student_logits": S_LOGITS, "topk_ids": jnp.array([[0, 1]] * B),
                  "topk_log_probs": jnp.log(jnp.array([[.5, .3]] * B))},
         positional=("student_logits", "topk_ids", "topk_log_probs"), logits=True, where=(MASK,),
         bad=(({"topk_ids": jnp.array([[0, 0]] * B)}, "topk_ids"),)),
    Spec(f"{_L}:truncated_topk_kl",
         lambda: {"student_logits": S_LOGITS, "topk_ids": jnp.array([[0, 1]] * B),
                  "topk_log_probs": jnp.log(jnp.array([[.5, .3]] * B))},
         positional=("student_logits", "topk_ids", "topk_log_probs"), logits=True, where=(MASK,)),
    Spec(f"{_L}:sample_sparse_targets",
         lambda: {"key": jax.random.key(0), "teacher_logits": T_LOGITS},
         positional=("key", "teacher_logits"), static={"num_samples": 4}, grad_arg=None,
         bad=(({"num_samples": 0}, "num_samples"),), skip="grad: sampling"),
    Spec(f"{_L}:random_sampling_kd",
         lambda: {"student_logits": S_LOGITS, "target_ids": jnp.array([[0, 1]] * B),
                  "target_weights": jnp.array([[.5, .5]] * B)},
         positional=("student_logits", "target_ids", "target_weights"), logits=True, where=(MASK,),
         bad=(({"target_weights": -jnp.full((B, 2), .5)}, "target_weights"),)),
    Spec(f"{_L}:teacher_weights", lambda: {"teacher_logits": _normal(1, (2, B, V))},
         positional=("teacher_logits",), static={"mode": "confidence"}, grad_arg=None,
         bad=(({"mode": "nope"}, "mode"),), skip="grad: weights are statistics of the teachers"),
    Spec(f"{_L}:multi_teacher_kd",
         lambda: {"student_logits": S_LOGITS, "teacher_logits": _normal(1, (2, B, V))},
         positional=("student_logits", "teacher_logits"), logits=True, where=(MASK,)),
    Spec(f"{_L}:fused_linear_distillation_per_token",
         lambda: {"student_hidden": _normal(0, (4, 6)), "student_weight": _normal(1, (V, 6)),
                  "teacher_hidden": _normal(2, (4, 6)), "teacher_weight": _normal(3, (V, 6))},
         positional=("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"),
         static={"temperature": 2.0}, bad=(({"temperature": -1.0}, "temperature"),)),
]
for _f in ("fused_linear_distillation", "fused_linear_forward_kl", "fused_linear_reverse_kl",
           "fused_linear_generalized_jsd", "fused_linear_skew_forward_kl"):
  SPECS.append(Spec(
      f"{_L}:{_f}",
      lambda: {"student_hidden": _normal(0, (4, 6)), "student_weight": _normal(1, (V, 6)),
               "teacher_hidden": _normal(2, (4, 6)), "teacher_weight": _normal(3, (V, 6))},
      positional=("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"),
      static={"temperature": 2.0}, bad=(({"temperature": 0.0}, "temperature"),)))

# ----------------------------------------------------------------------------- operators
_O = "kdjax.operators"
LP0, LQ = _log_simplex(0, (B, V)), _log_simplex(1, (B, V))
SPECS += [
    Spec(f"{_O}:aggregate", lambda: {"log_probs": _log_simplex(2, (2, B, V))},
         positional=("log_probs",), static={"kind": "power", "power": 0.5},
         bad=(({"kind": "nope"}, "kind"), ({"weights": jnp.array([jnp.nan, .6])}, "weights"))),
    Spec(f"{_O}:log_normalizer", lambda: {"log_probs": _log_simplex(2, (2, B, V))},
         positional=("log_probs",)),
    Spec(f"{_O}:soften", lambda: {"log_p": LP0}, positional=("log_p",), static={"temperature": 2.0},
         bad=(({"temperature": -1.0}, "temperature"),)),
    Spec(f"{_O}:meta_teacher", lambda: {"log_p0": LP0, "log_q": LQ}, positional=("log_p0", "log_q"),
         static={"alpha": 0.3, "kind": "power", "power": 0.5},
         bad=(({"alpha": 1.5}, "alpha"), ({"log_q": jnp.zeros((B, V))}, "log_q"))),
    Spec(f"{_O}:recurse", lambda: {"log_p0": LP0, "log_q0": LQ}, positional=("log_p0", "log_q0"),
         static={"alpha": 0.3, "steps": 3}, bad=(({"alpha": -0.5}, "alpha"),)),
    Spec(f"{_O}:make_operator", lambda: {}, static={"kind": "arithmetic"}, grad_arg=None,
         nan_arg=None, bf16=False, jit=False, bad=(({"kind": "nope"}, "kind"),),
         skip="returns an operator (a function); the operator itself is covered by meta_teacher"),
    Spec(f"{_O}:alpha_schedule", lambda: {}, static={"alpha": 0.3, "steps": 4}, grad_arg=None,
         nan_arg=None, bf16=False, jit=False, bad=(({"alpha": 1.5}, "alpha"),),
         skip="static schedule expansion"),
    Spec(f"{_O}:project_mixture",
         lambda: {"log_m": _log_simplex(0, (V,)), "log_components": _log_simplex(1, (2, V))},
         positional=("log_m", "log_components"), static={"iters": 20}),
    Spec(f"{_O}:project_softmax_linear",
         lambda: {"log_m": _log_simplex(0, (B, V)), "features": _normal(1, (B, 2))},
         positional=("log_m", "features"), static={"iters": 3}),
]

# ----------------------------------------------------------------------------- policy
_P = "kdjax.policy"
TOKENS = jnp.array([0, 3, 1])
TLP = -jnp.abs(_normal(5, (B, 4)))            # per-token log-probs [B, T]
TMASK = (MASK[:, None], jnp.broadcast_to(MASK[:, None], (B, 4)))
SPECS += [
    Spec(f"{_P}:token_log_probs", lambda: {"logits": S_LOGITS, "tokens": TOKENS},
         positional=("logits", "tokens"), logits=True,
         bad=(({"tokens": jnp.array([0, 5, 1])}, "tokens"),)),
    logits_spec(f"{_P}:minillm_token_reverse_kl"),
    Spec(f"{_P}:teacher_mixed_log_probs", lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS},
         positional=("student_logits", "teacher_logits"), static={"alpha": 0.2}, logits=True,
         bad=(({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature"))),
    Spec(f"{_P}:teacher_mixed_importance_weights",
         lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS, "tokens": TOKENS},
         positional=("student_logits", "teacher_logits", "tokens"), logits=True, where=(MASK,),
         bad=(({"tokens": jnp.array([0, -1, 1])}, "tokens"),)),
    Spec(f"{_P}:minillm_long_term_rewards",
         lambda: {"student_token_log_probs": _normal(0, (2, B)) - 2,
                  "teacher_token_log_probs": _normal(1, (2, B)) - 2},
         positional=("student_token_log_probs", "teacher_token_log_probs")),
    Spec(f"{_P}:group_relative_advantages", lambda: {"rewards": _normal(0, (2, 4))},
         positional=("rewards",), where=(jnp.array([True, False]),),
         bad=(({"ddof": -1}, "ddof"),)),
    Spec(f"{_P}:trrd_mix_log_probs",
         lambda: {"teacher_log_probs": _log_simplex(0, (B, V)), "old_log_probs": _log_simplex(1, (B, V))},
         positional=("teacher_log_probs", "old_log_probs"), static={"lam": 0.5},
         bad=(({"lam": 1.5}, "lam"),)),
    Spec(f"{_P}:trrd_loss",
         lambda: {"student_log_probs": TLP, "mix_log_probs": TLP - 0.1, "advantages": _normal(3, (B, 4))},
         positional=("student_log_probs", "mix_log_probs", "advantages"), where=TMASK),
    Spec(f"{_P}:gopd_token_rewards",
         lambda: {"student_token_log_probs": TLP, "teacher_token_log_probs": TLP - .2,
                  "ref_token_log_probs": TLP - .1},
         positional=("student_token_log_probs", "teacher_token_log_probs", "ref_token_log_probs"),
         where=TMASK),
    Spec(f"{_P}:gopd_objective",
         lambda: {"student_logits": S_LOGITS, "teacher_logits": T_LOGITS, "ref_logits": _normal(2, (B, V))},
         positional=("student_logits", "teacher_logits", "ref_logits"), logits=True, where=(MASK,)),
    Spec(f"{_P}:gopd_optimal_logits",
         lambda: {"teacher_logits": T_LOGITS, "ref_logits": _normal(2, (B, V))},
         positional=("teacher_logits", "ref_logits"), logits=True),
    Spec(f"{_P}:aligndistil_teacher_logits",
         lambda: {"dpo_logits": T_LOGITS, "ref_logits": _normal(2, (B, V))},
         positional=("dpo_logits", "ref_logits"), logits=True),
]

# ----------------------------------------------------------------------------- preference
_R = "kdjax.preference"
G = 4
U = _normal(0, (2, G))
SCORES = jnp.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]])
QG = jax.nn.softmax(SCORES, axis=-1)
GMASK = jnp.array([True, False])
SPECS += [
    Spec(f"{_R}:anchored_logits", lambda: {"logp": U, "logp_ref": _normal(1, (2, G))},
         positional=("logp", "logp_ref"), static={"temperature": 0.5},
         bad=(({"temperature": -1.0}, "temperature"),)),
    Spec(f"{_R}:adpo_loss", lambda: {"logp": U, "logp_ref": _normal(1, (2, G)), "q": QG},
         positional=("logp", "logp_ref", "q"), where=(GMASK,),
         bad=(({"q": jnp.array([[1.5, -.5, 0., 0.]] * 2)}, "q"),)),
    Spec(f"{_R}:adpo_kl", lambda: {"logp": U, "logp_ref": _normal(1, (2, G)), "q": QG},
         positional=("logp", "logp_ref", "q"), where=(GMASK,)),
    Spec(f"{_R}:anchored_ce", lambda: {"u": U, "q": QG}, positional=("u", "q"), where=(GMASK,)),
    Spec(f"{_R}:sequence_log_prob", lambda: {"token_logp": -jnp.abs(_normal(0, (2, 6)))},
         positional=("token_logp",), static={"where": jnp.ones((2, 6), bool)},
         bad=(({"where": jnp.ones((2, 6))}, "where"),)),
    Spec(f"{_R}:anchored_scores", lambda: {"seq_logp": U, "seq_logp_ref": _normal(1, (2, G))},
         positional=("seq_logp", "seq_logp_ref")),
    Spec(f"{_R}:mean_abs_logratio", lambda: {"seq_logp": U, "seq_logp_ref": _normal(1, (2, G))},
         positional=("seq_logp", "seq_logp_ref")),
    Spec(f"{_R}:k3_kl_penalty",
         lambda: {"token_logp": -jnp.abs(_normal(0, (2, 6))), "token_logp_ref": -jnp.abs(_normal(1, (2, 6)))},
         positional=("token_logp", "token_logp_ref"), static={"where": jnp.ones((2, 6), bool)}),
    Spec(f"{_R}:group_zscore", lambda: {"rewards": _normal(0, (2, G))}, positional=("rewards",)),
    Spec(f"{_R}:target_from_rewards", lambda: {"rewards": _normal(0, (2, G))}, positional=("rewards",)),
    Spec(f"{_R}:bradley_terry_target", lambda: {"r_w": _normal(0, (B,)), "r_l": _normal(1, (B,))},
         positional=("r_w", "r_l")),
    Spec(f"{_R}:pair_labels", lambda: {"scores": SCORES}, positional=("scores",), grad_arg=None,
         skip="grad: hard pair labels"),
    Spec(f"{_R}:one_hot_winner", lambda: {"scores": SCORES}, positional=("scores",), grad_arg=None,
         skip="grad: a one-hot argmax"),
    Spec(f"{_R}:teacher_target", lambda: {"teacher_logits": _normal(0, (2, G))},
         positional=("teacher_logits",), logits=True),
    Spec(f"{_R}:positive_reward_groups", lambda: {"rewards": _normal(0, (2, G))},
         positional=("rewards",), grad_arg=None, nan_arg=None, bf16=False,
         skip="returns a boolean group mask"),
    Spec(f"{_R}:adpo_direct_loss", lambda: {"u": U, "q": QG}, positional=("u", "q")),
    Spec(f"{_R}:adpo_top1_loss", lambda: {"u": U, "order_scores": SCORES},
         positional=("u", "order_scores")),
    Spec(f"{_R}:adpo_pairwise_loss", lambda: {"u": U, "order_scores": SCORES},
         positional=("u", "order_scores")),
    Spec(f"{_R}:adpo_soft_pairwise_loss",
         lambda: {"u": U, "q_pairs": jax.nn.sigmoid(_normal(3, (2, G, G)))},
         positional=("u", "q_pairs"), bad=(({"q_pairs": jnp.full((2, G, G), 1.5)}, "q_pairs"),)),
    Spec(f"{_R}:adpo_plackett_luce_loss", lambda: {"u": U, "order_scores": SCORES},
         positional=("u", "order_scores"), static={"label_smoothing": 0.1}),
    Spec(f"{_R}:adpo_softmax_variant_loss",
         lambda: {"logp": U, "logp_ref": _normal(1, (2, G)), "q": QG},
         positional=("logp", "logp_ref", "q")),
    Spec(f"{_R}:z_loss", lambda: {"u": U}, positional=("u",)),
    Spec(f"{_R}:ordered_pair_count", lambda: {"order_scores": SCORES}, positional=("order_scores",),
         grad_arg=None, skip="grad: a count"),
    Spec(f"{_R}:dpo_loss",
         lambda: {"logp_w": _normal(0, (B,)), "logp_l": _normal(1, (B,)),
                  "logp_ref_w": _normal(2, (B,)), "logp_ref_l": _normal(3, (B,))},
         positional=("logp_w", "logp_l", "logp_ref_w", "logp_ref_l"), static={"beta": 0.1},
         bad=(({"beta": -1.0}, "beta"),)),
    Spec(f"{_R}:soft_dpo_loss",
         lambda: {"logp_w": _normal(0, (B,)), "logp_l": _normal(1, (B,)),
                  "logp_ref_w": _normal(2, (B,)), "logp_ref_l": _normal(3, (B,)),
                  "q_w": jnp.array([.9, .6, .7])},
         positional=("logp_w", "logp_l", "logp_ref_w", "logp_ref_l", "q_w")),
    Spec(f"{_R}:ema_anchor", lambda: {"params_ref": {"w": _normal(0, (3,))}, "params": {"w": _normal(1, (3,))}},
         positional=("params_ref", "params"), static={"decay": 0.9}, bad=(({"decay": 1.5}, "decay"),)),
    Spec(f"{_R}:tau_entropy_rule", lambda: {"q": QG}, positional=("q",)),
    Spec(f"{_R}:normalized_entropy", lambda: {"logits": _normal(0, (2, G))}, positional=("logits",),
         logits=True),
    Spec(f"{_R}:minmax_normalize", lambda: {"x": _normal(0, (2, G))}, positional=("x",)),
]

# ----------------------------------------------------------------------------- pacing
_A = "kdjax.pacing"
PR = jnp.array([0.5, 0.4, 0.3, 0.6])
REW = jnp.asarray(np.random.default_rng(0).integers(0, 2, (4, 8)), jnp.float32)
SPECS += [
    Spec(f"{_A}:pass_rate", lambda: {"rewards": REW}, positional=("rewards",), grad_arg=None,
         skip="grad: a statistic of 0/1 rewards"),
    Spec(f"{_A}:posterior_pass_rate", lambda: {"rewards": REW}, positional=("rewards",), grad_arg=None,
         skip="grad: a statistic of 0/1 rewards"),
    Spec(f"{_A}:beta_weight", lambda: {"p": PR}, positional=("p",), static={"alpha": 2.0, "beta": 2.0},
         bad=(({"alpha": -1.0}, "alpha"),)),
    Spec(f"{_A}:normalize_weights", lambda: {"weights": jnp.array([1.0, 2.0, 3.0, 0.5])},
         positional=("weights",), bad=(({"weights": jnp.array([-1.0, 2.0])}, "weights"),)),
    Spec(f"{_A}:paced_weights", lambda: {"p": PR}, positional=("p",), static={"alpha": 12.0, "beta": 12.0}),
    Spec(f"{_A}:weighted_sum_and_count",
         lambda: {"losses": _normal(0, (4,)), "weights": jnp.array([1.0, 2.0, 3.0, 0.5])},
         positional=("losses", "weights")),
    Spec(f"{_A}:paced_loss", lambda: {"losses": _normal(0, (4,)), "p": PR}, positional=("losses", "p")),
    Spec(f"{_A}:two_stage_loss",
         lambda: {"forward_loss": _normal(0, (4,)), "reverse_loss": _normal(1, (4,))},
         positional=("forward_loss", "reverse_loss"), static={"step": 5, "switch_step": 3},
         nan_arg="reverse_loss", grad_arg="reverse_loss",
         skip="nan/grad: after switch_step only the reverse loss is used"),
    Spec(f"{_A}:snr_model", lambda: {"p": PR}, positional=("p",)),
    Spec(f"{_A}:snr_optimal_weight", lambda: {"mu": PR, "sigma2": PR + 0.1}, positional=("mu", "sigma2")),
    Spec(f"{_A}:efficiency", lambda: {"w": PR, "mu": PR, "sigma2": PR + 0.1}, positional=("w", "mu", "sigma2"),
         bad=(({"sigma2": -PR}, "sigma2"),)),
    Spec(f"{_A}:one_step_gain", lambda: {"w": PR, "mu": PR, "sigma2": PR + 0.1}, positional=("w", "mu", "sigma2")),
]

# ----------------------------------------------------------------------------- selfdistill, kernels
_S = "kdjax.selfdistill"
_K = "kdjax.kernels"
EIG = jnp.array([3.0, 1.0, 0.5, 0.1])
X1, X2 = _normal(0, (4, 2)), _normal(1, (3, 2))
SPECS += [
    Spec(f"{_S}:a_coefficients", lambda: {"d": EIG}, positional=("d",), static={"lam": 0.2},
         bad=(({"lam": -1.0}, "lam"),)),
    Spec(f"{_S}:b_coefficients", lambda: {"d": EIG}, positional=("d",),
         static={"lam": 0.2, "alpha": 0.25, "t": 3},
         bad=(({"alpha": float("nan")}, "alpha"), ({"alpha": "0.5"}, "alpha"))),  # α ∈ ℝ (Alg. 1)
    Spec(f"{_S}:b_limit", lambda: {"d": EIG}, positional=("d",), static={"lam": 0.2, "alpha": 0.25}),
    Spec(f"{_S}:c_coefficients", lambda: {"d": EIG}, positional=("d",),
         static={"lam": 0.2, "alpha": 0.25, "t": 3}),
    Spec(f"{_S}:sparsification_ratios", lambda: {"b": EIG / 4}, positional=("b",)),
    Spec(f"{_S}:optimal_alpha",
         lambda: {"y1": _normal(0, (6,)), "y0_t": _normal(1, (6,)), "reference": _normal(2, (6,))},
         positional=("y1", "y0_t", "reference")),
    Spec(f"{_S}:mixed_targets", lambda: {"y": _normal(0, (6,)), "y_prev": _normal(1, (6,))},
         positional=("y", "y_prev"), static={"alpha": 0.3},
         bad=(({"alpha": float("nan")}, "alpha"), ({"alpha": "0.5"}, "alpha"))),
    Spec(f"{_S}:ridge",
         lambda: {"k_train_train": jnp.eye(4) + 0.1, "y_train": _normal(0, (4,))},
         positional=("k_train_train", "y_train"), static={"lam": 0.2}, bad=(({"lam": 0.0}, "lam"),)),
    Spec(f"{_S}:explicit_refit",
         lambda: {"k_train_train": jnp.eye(4) + 0.1, "y_train": _normal(0, (4,))},
         positional=("k_train_train", "y_train"), static={"lam": 0.2, "alpha": 0.3, "steps": 2}),
    Spec(f"{_S}:softmax_mse_self_distill",
         lambda: {"student_logits": S_LOGITS, "teacher_probs": _simplex(1, (B, V)),
                  "targets": jax.nn.one_hot(jnp.array([0, 1, 2]), V)},
         positional=("student_logits", "teacher_probs", "targets"), static={"alpha": 0.3}, logits=True),
    Spec(f"{_K}:squared_distances", lambda: {"x1": X1, "x2": X2}, positional=("x1", "x2")),
    Spec(f"{_K}:rbf", lambda: {"x1": X1, "x2": X2}, positional=("x1", "x2"), static={"gamma": 0.5},
         bad=(({"gamma": -1.0}, "gamma"),)),
    Spec(f"{_K}:laplace", lambda: {"x1": X1, "x2": X2 + 3.0}, positional=("x1", "x2"),
         static={"gamma": 0.5}),
    Spec(f"{_K}:linear", lambda: {"x1": X1, "x2": X2}, positional=("x1", "x2")),
    Spec(f"{_K}:polynomial", lambda: {"x1": X1, "x2": X2}, positional=("x1", "x2"),
         static={"degree": 2}, bad=(({"degree": 0}, "degree"),)),
]

# ----------------------------------------------------------------------------- onpolicy
_OP = "kdjax.losses.onpolicy"
_TOK = {"logp": TLP, "logp_ref": TLP - 0.3 * _normal(6, (B, 4))}
_SEQ_LOGITS = _normal(7, (2, 3, V))          # [B, T, V] for DistiLLM-2
_SEQ_T = _normal(8, (2, 3, V))
_SEQ_MASK = jnp.array([[True, True, False], [True, False, False]])
SPECS += [
    *[Spec(f"{_OP}:kl_estimate", lambda: dict(_TOK), positional=("logp", "logp_ref"),
           static={"kind": k}, where=TMASK, bad=(({"kind": "k4"}, "kind"),))
      for k in ("k1", "k2", "k3")],
    Spec(f"{_OP}:discounted_returns", lambda: {"x": _normal(3, (B, 4))}, positional=("x",),
         static={"gamma": 0.5}, where=TMASK,
         bad=(({"gamma": 1.5}, "gamma"), ({"gamma": jnp.array([0.5, 2.0, 0.5])}, "gamma"))),
    *[Spec(f"{_OP}:importance_weights", lambda: {"logp": TLP, "logp_sampler": TLP - 0.1},
           positional=("logp", "logp_sampler"), static={"mode": m}, where=TMASK, grad_arg=None,
           bad=(({"mode": "seq"}, "mode"),), skip="detached weights: no gradient")
      for m in ("token", "prefix")],
    Spec(f"{_OP}:pg_surrogate", lambda: {"logp": TLP, "advantages": _normal(3, (B, 4))},
         positional=("logp", "advantages"), where=TMASK),
    Spec(f"{_OP}:pg_surrogate",
         lambda: {"logp": TLP, "advantages": _normal(3, (B, 4)), "logp_sampler": TLP - 0.1},
         positional=("logp", "advantages"), where=TMASK),
    Spec(f"{_OP}:pg_surrogate",
         lambda: {"logp": TLP, "advantages": _normal(3, (B, 4)), "logp_sampler": TLP - 0.1},
         positional=("logp", "advantages"), static={"clip_eps": 0.2}, where=TMASK,
         bad=(({"clip_eps": -0.2}, "clip_eps"),)),
    Spec(f"{_OP}:rho_k3", lambda: dict(_TOK, logp_sampler=TLP - 0.1),
         positional=("logp", "logp_sampler", "logp_ref"), where=TMASK),
    Spec(f"{_OP}:opd_advantages",
         lambda: {"logp_sampler": TLP, "logp_teacher": TLP - 0.3 * _normal(6, (B, 4))},
         positional=("logp_sampler", "logp_teacher"), static={"discount": 0.5}, where=TMASK,
         grad_arg=None, bad=(({"discount": -0.5}, "discount"), ({"coef": "1"}, "coef")),
         skip="a detached advantage"),
    Spec(f"{_OP}:gkd_source", lambda: {"key": jax.random.key(0)}, positional=("key",),
         static={"lam": 0.5}, nan_arg=None, grad_arg=None, bf16=False,
         bad=(({"lam": 1.5}, "lam"), ({"seq_kd": 1}, "seq_kd")),
         skip="an integer draw from a key: no float input"),
    Spec(f"{_OP}:student_topk", lambda: {"student_logits": S_LOGITS}, positional=("student_logits",),
         static={"k": 2}, nan_arg=None, grad_arg=None, bad=(({"k": 9}, "k"),),
         skip="integer ids (NaN order is XLA's)"),
    *[Spec(f"{_OP}:student_topk_reverse_kl",
           lambda: {"student_logits": S_LOGITS, "teacher_log_probs": jnp.take_along_axis(
               jax.nn.log_softmax(T_LOGITS), jnp.array([[0, 2], [1, 4], [3, 0]]), -1),
               "ids": jnp.array([[0, 2], [1, 4], [3, 0]])},
           positional=("student_logits", "teacher_log_probs", "ids"), static=st, logits=True,
           where=(MASK,), bad=(({"ids": jnp.array([[0, 0], [1, 4], [3, 0]])}, "ids"),
                               ({"tail": 1}, "tail")))
      for st in ({"tail": True}, {"tail": False}, {"tail": False, "clamp": True})],
    Spec(f"{_OP}:topk_renormalized_kl",
         lambda: {"student_logits": S_LOGITS, "topk_ids": jnp.array([[0, 2], [1, 4], [3, 0]]),
                  "topk_log_probs": jnp.take_along_axis(
                      jax.nn.log_softmax(T_LOGITS), jnp.array([[0, 2], [1, 4], [3, 0]]), -1)},
         positional=("student_logits", "topk_ids", "topk_log_probs"), logits=True, where=(MASK,),
         bad=(({"temperature": -1.0}, "temperature"),)),
    logits_spec(f"{_OP}:distillm2_chosen_kl", {"alpha": 0.1}, bad=(({"alpha": 1.5}, "alpha"),)),
    logits_spec(f"{_OP}:distillm2_rejected_kl", {"alpha": 0.1}, bad=(({"alpha": -0.5}, "alpha"),)),
    Spec(f"{_OP}:distillm2_loss",
         lambda: {"student_chosen_logits": _SEQ_LOGITS, "teacher_chosen_logits": _SEQ_T,
                  "student_rejected_logits": _SEQ_T * 0.5, "teacher_rejected_logits": _SEQ_LOGITS,
                  "where_chosen": _SEQ_MASK, "where_rejected": _SEQ_MASK[::-1]},
         positional=("student_chosen_logits", "teacher_chosen_logits", "student_rejected_logits",
                     "teacher_rejected_logits"), static={"alpha_chosen": jnp.array([0.1, 0.05])},
         logits=True, bad=(({"beta": 2.5}, "beta"), ({"alpha_rejected": 1.5}, "alpha_rejected"),
                           ({"alpha_chosen": jnp.array([0.1, 0.1, 0.1])}, "alpha_chosen"))),
    Spec(f"{_OP}:distillm2_gap", lambda: {"token_log_probs_a": TLP, "token_log_probs_b": TLP - 0.2},
         positional=("token_log_probs_a", "token_log_probs_b"), where=TMASK, grad_arg=None,
         skip="detached"),
    Spec(f"{_OP}:distillm2_alpha", lambda: {"gap": _normal(2, (B,))}, positional=("gap",),
         static={"gap0": 0.2}, grad_arg=None, bad=(({"base": 1.5}, "base"), ({"gap0": "x"}, "gap0")),
         skip="detached, piecewise constant"),
    Spec(f"{_OP}:distillm2_beta", lambda: {"step": jnp.array([0.0, 10.0, 60.0])},
         positional=("step",), static={"total_steps": 100, "gradual": True}, nan_arg=None,
         grad_arg=None, bad=(({"total_steps": 0}, "total_steps"), ({"gradual": "yes"}, "gradual")),
         skip="a schedule of the step"),
]

EXEMPT = {
    # classes / containers: their methods are exercised through the functions above and in the
    # module tests.
    "SumAndCount": "a (sum, count) pytree", "TaidState": "state container", "KLWindow": "state container",
    "Projection": "container of two functions", "AxiomReport": "report container",
    "FixedPointResult": "result container of fixed_point(return_residual=True)",
    "BinnedSNR": "result container", "SelfDistillPredictor": "built by self_distill_predictor",
    "TeacherCacheWriter": "file I/O (tests/test_teacher_cache.py)",
    "TeacherCache": "file I/O (tests/test_teacher_cache.py)",
    "write_teacher_cache": "file I/O (tests/test_teacher_cache.py)",
    "recover_teacher_cache": "file I/O: repairs a killed writer's directory (tests/test_teacher_cache.py)",
    # functions of functions / of Python configuration, tested in their module tests.
    "fixed_point": "takes a function (tests/test_operators.py: tolerance, residual, implicit grads)",
    "mixture_family": "returns a Projection (tests/test_operators.py)",
    "softmax_linear_family": "returns a Projection (tests/test_operators.py)",
    "check_meta_axioms": "randomised axiom search over a user operator (tests/test_operators.py)",
    "check_softening_axioms": "randomised axiom search over a user operator (tests/test_operators.py)",
    "check_aggregation_axioms": "randomised axiom search over a user operator (tests/test_operators.py)",
    "random_simplex": "NumPy test-data generator",
    "self_distill_predictor": "a factory (one eigh); its predictions are checked against refits in "
                              "tests/test_selfdistill.py",
    "toy_data": "returns the paper's fixed NumPy toy data",
    "b_recursion": "NumPy float64 oracle for b_coefficients",
    "get_kernel": "name lookup",
    "beta_weight_mode": "closed form of Python floats",
    "two_stage_mix": "a schedule of the integer step (tests/test_pacing.py)",
    "refresh_due": "a boolean schedule of the integer step (tests/test_pacing.py)",
    "gradient_snr_by_bin": "a diagnostic over many gradients (tests/test_pacing.py)",
    "rollout_counts": "integer counts (tests/test_pacing.py)",
    "fixed_anchor": "identity on parameter pytrees", "on_policy_anchor": "identity on parameter pytrees",
    "periodic_anchor": "a pytree schedule (tests/test_preference.py)",
    "kl_window_init": "state constructor", "kl_triggered": "a state update (tests/test_preference.py)",
    "copy_if": "pytree select", "tau_smooth_hybrid": "scalar rule (tests/test_preference.py)",
    "tau_batch_scalar": "scalar rule (tests/test_preference.py)",
    "zeros": "constructor of an empty SumAndCount", "psum": "a collective (needs a mesh axis)",
}


def _public_names():
  out = {}
  for mod_name in PUBLIC_MODULES:
    mod = importlib.import_module(mod_name)
    names = getattr(mod, "__all__", None)
    assert names is not None, f"{mod_name} has no __all__"
    for n in names:
      obj = getattr(mod, n)
      if callable(obj) and not n.isupper():
        out.setdefault(n, mod_name)
  return out


def test_every_public_name_is_covered():
  covered = {s.name.split(":")[1] for s in SPECS}
  missing = sorted(n for n in _public_names() if n not in covered and n not in EXEMPT)
  assert not missing, f"public functions without a contract-harness entry: {missing}"


def test_every_spec_names_a_public_function():
  public = _public_names()
  unknown = [s.name for s in SPECS if s.name.split(":")[1] not in public]
  assert not unknown, unknown


def _ids(specs):
  seen = {}
  out = []
  for s in specs:
    k = s.name.split(":")[1]
    seen[k] = seen.get(k, 0) + 1
    out.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
  return out


def _allclose(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
    else:
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_contract(spec: Spec):
  arrays = spec.arrays()
  eager = spec.call(arrays)

  if spec.jit:
    jitted = jax.jit(lambda a: spec.call(a))(arrays)
    _allclose(eager, jitted)

  if spec.bf16:
    names = spec.float_names(arrays)
    low = {k: (v.astype(jnp.bfloat16) if k in names else v) for k, v in arrays.items()}
    for leaf in _leaves(spec.call(low)):
      assert leaf.dtype == jnp.float32, f"bfloat16 input gave {leaf.dtype} output"

  nan_arg = spec.pick(spec.nan_arg, arrays)
  if nan_arg is not None:
    bad = dict(arrays)
    x = jnp.asarray(arrays[nan_arg])
    bad[nan_arg] = x.reshape(-1).at[0].set(jnp.nan).reshape(x.shape)
    out = _leaves(spec.call(bad))
    assert any(bool(jnp.any(jnp.isnan(o))) for o in out), \
        f"a NaN in `{nan_arg}` was silently dropped"

  grad_arg = spec.pick(spec.grad_arg, arrays)
  if grad_arg is not None:
    def total(x, a=arrays):
      a = dict(a, **{grad_arg: x})
      return sum(jnp.sum(o) for o in _leaves(spec.call(a)))
    g = jax.grad(total)(jnp.asarray(arrays[grad_arg]))
    assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient in `{grad_arg}`"
    if spec.logits:
      x = jnp.asarray(arrays[grad_arg])
      big = jnp.sign(x) * 1e4 + x
      val = sum(jnp.sum(o) for o in _leaves(spec.call(dict(arrays, **{grad_arg: big}))))
      assert bool(jnp.isfinite(val)), "non-finite value at ±1e4 logits"
      g = jax.grad(total)(big)
      assert bool(jnp.all(jnp.isfinite(g))), "non-finite gradient at ±1e4 logits"

  if spec.where is not None:
    if len(spec.where) == 2:      # (a broadcastable mask, the same mask at full shape)
      m, full = spec.where
      _allclose(spec.call(arrays, where=m), spec.call(arrays, where=full))
    else:                         # a batch-shape mask and the same with a trailing singleton
      (m,) = spec.where
      _allclose(spec.call(arrays, where=m), spec.call(arrays, where=m[..., None]))
    with pytest.raises(TypeError, match="where"):
      spec.call(arrays, where=m.astype(jnp.float32))

  for over, arg in spec.bad:
    a = {k: v for k, v in arrays.items()}
    st = {}
    for k, v in over.items():
      (a if k in a else st)[k] = v
    with pytest.raises((ValueError, TypeError), match=arg):
      spec.call(a, **st)


def test_import_kdjax_is_lean():
  """`import kdjax` and every library module load without the experiment stack."""
  import subprocess
  import sys
  code = ("import sys, kdjax\n"
          f"for m in {PUBLIC_MODULES!r}: __import__(m)\n"
          "import kdjax.losses, kdjax.operators\n"
          "assert kdjax.losses.hinton_kd is not None and kdjax.operators.aggregate is not None\n"
          "heavy = [m for m in ('tensorflow_datasets', 'orbax', 'sklearn', 'flax', 'array_record',\n"
          "         'tensorflow', 'matplotlib', 'experiments', 'theory') if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_subpackages():
  import subprocess
  import sys
  code = ("import kdjax\n"
          "for n in ('losses', 'operators', 'policy', 'preference', 'pacing', 'selfdistill',\n"
          "          'kernels', 'teacher_cache', 'divergences', 'reductions'):\n"
          "  getattr(kdjax, n)\n"
          "kdjax.losses.hinton_kd\n")
  subprocess.run([sys.executable, "-c", code], check=True)
