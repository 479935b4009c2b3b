r"""Exact-enumeration oracle and checks of the on-policy distillation estimators
(:mod:`kdjax.losses.onpolicy`; write-up: onpolicy.md).

The oracle is a pair of *tabular* autoregressive policies over a vocabulary of V tokens and a
horizon of T steps: the student's logits at step t after the prefix y_{<t} are a free vector
``theta[t][idx(y_{<t})] in R^V`` (the prefix index in base V), and likewise the teacher's. All
N = V^T sequences are enumerated, so every expectation is an exact finite sum:

* exact targets (computed here, independently of kdjax, from sums over sequences or over the
  prefix tree): the sequence-level reverse and forward KL K_R = KL(pi||r), K_F = KL(r||pi) and
  their gradients; g_0 (per-token reverse KL on student prefixes held fixed) and g_0^F (its
  forward-KL analogue); g_fut from the continuation values V_{t+1} by grouping sequences by
  prefix; the prefix-fixed objectives on other samplers (stale, tempered, data);
* estimators: the per-sequence surrogate of every estimator is built from the **kdjax**
  functions (``kl_estimate``, ``discounted_returns``, ``importance_weights``, ``pg_surrogate``,
  ``rho_k3``, ``opd_advantages``, ``reverse_kl``, ``forward_kl``, ``generalized_jsd``,
  ``total_variation``, the top-k losses) and differentiated with ``jax.grad`` on each fixed
  sequence (``jax.jit(jax.vmap(jax.grad(.)))`` over the N sequences); its expectation under the
  sampler mu is sum_y mu(y) g(y), its bias E g - target, its trace variance
  sum_y mu(y) |g(y)|^2 - |E g|^2.

Sizes (V, T) in {(3, 3), (4, 3), (5, 4)}; student logits ~ N(0, 1), teacher ~ N(0, 1.5^2),
stale sampler theta_old = theta + 0.4 eps, fixed seeds. Everything runs in float64 (the oracle
enables x64 itself, so it can be used from a notebook). ``report()`` returns the bias / variance
table at (5, 4); ``python -m theory --only onpolicy`` prints it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as D
from kdjax import policy as P
from kdjax.losses import onpolicy as O
from kdjax.losses import topk_teacher, topk_tail_kl
from kdjax.losses import random_sampling_kd
from theory.registry import Result, register

_DOC = "onpolicy.md"
SIZES = ((3, 3), (4, 3), (5, 4))
REPORT_SIZE = (5, 4)
UNBIASED_SIZES = ((3, 3), (5, 4))
# estimators the checks use at the other size, (4, 3)
_SMALL_SET = ("full forward KL, teacher samples", "full reverse KL, tempered prefixes",
              "full reverse KL, tempered + prefix weights")
ATOL = 1e-12          # unbiasedness: max-abs coordinate error
BIAS_MIN = 1e-2       # a "bias present" check: relative error at least this
STALE = 0.4           # theta_old = theta + STALE * eps
TAU = 0.9             # tempered sampler (TRL's GKD default temperature)
GAMMA_MID = 0.5
TOPK = 2
CLIP = 0.2
JSD_BETA = 0.5


# ----------------------------------------------------------------------------- the oracle


def _tok_logp(z, y):
  """log softmax(z)[t, y_t] for one sequence: z [T, V], y [T] (kdjax.policy.token_log_probs)."""
  return P.token_log_probs(z, y)


def _sg(x):
  return jax.lax.stop_gradient(x)


# Tree-form divergences for the exact targets: own formulas, not kdjax's.
def _rkl_rows(lq, lo):
  return jnp.sum(jnp.exp(lq) * (lq - lo), axis=-1)


def _fkl_rows(lq, lo):
  return jnp.sum(jnp.exp(lo) * (lo - lq), axis=-1)


def _jsd_rows(lq, lo, beta=JSD_BETA):
  p, q = jnp.exp(lo), jnp.exp(lq)
  lm = jnp.log(beta * p + (1.0 - beta) * q)
  return beta * jnp.sum(p * (lo - lm), -1) + (1.0 - beta) * jnp.sum(q * (lq - lm), -1)


_ROW_DIVS = {"rkl": _rkl_rows, "fkl": _fkl_rows, "jsd": _jsd_rows}


@dataclasses.dataclass(frozen=True)
class Estimator:
  """One gradient estimator: its sampler, its per-sequence surrogate and what it estimates."""
  name: str
  sampler: str            # "student" | "teacher" | "stale" | "tempered" | "data"
  fn: Callable            # (zs [T,V] differentiable, y [T], zt [T,V], zm [T,V]) -> scalar
  target: str | None      # name of the exact target it is unbiased for, None if biased
  label: str              # "[paper]" / "[proposed]" and where it comes from
  group: str = ""


def _k_loss(kind):
  def f(zs, y, zt, zm):
    return O.kl_estimate(_tok_logp(zs, y), _sg(_tok_logp(zt, y)), kind=kind).sum()
  return f


def _k_reward(kind, gamma, with_loss=False):
  def f(zs, y, zt, zm):
    lp, lr = _tok_logp(zs, y), _tok_logp(zt, y)
    k = O.kl_estimate(lp, lr, kind=kind)
    adv = -O.discounted_returns(_sg(k), gamma=gamma)
    out = O.pg_surrogate(lp, adv).sum()
    return out + k.sum() if with_loss else out
  return f


def _rho_k3(zs, y, zt, zm):
  return O.rho_k3(_tok_logp(zs, y), _tok_logp(zm, y), _sg(_tok_logp(zt, y))).sum()


def _opd(gamma):
  """Tinker recipe: sampler log-probs in the advantage, importance-sampling loss."""
  def f(zs, y, zt, zm):
    lm = _tok_logp(zm, y)
    adv = O.opd_advantages(lm, _tok_logp(zt, y), coef=1.0, discount=gamma)
    return O.pg_surrogate(_tok_logp(zs, y), adv, logp_sampler=lm).sum()
  return f


def _per_decision(gamma, sampler_logp=False):
  """sum_t grad log pi_t sum_{t'>=t} gamma^(t'-t) w_t' x_t', x = k1 (or log mu - log r)."""
  def f(zs, y, zt, zm):
    lp, lm, lr = _tok_logp(zs, y), _tok_logp(zm, y), _tok_logp(zt, y)
    w = O.importance_weights(lp, lm, mode="prefix")
    x = O.kl_estimate(lm if sampler_logp else lp, lr, kind="k1")
    adv = -O.discounted_returns(w * _sg(x), gamma=gamma)
    return O.pg_surrogate(lp, adv).sum()
  return f


def _token_ratio(zs, y, zt, zm):
  lp, lm, lr = _tok_logp(zs, y), _tok_logp(zm, y), _tok_logp(zt, y)
  adv = -O.kl_estimate(_sg(lp), lr, kind="k1")
  return O.pg_surrogate(lp, adv, logp_sampler=lm).sum()


def _ppo_clip(zs, y, zt, zm):
  lp, lm, lr = _tok_logp(zs, y), _tok_logp(zm, y), _tok_logp(zt, y)
  adv = -O.kl_estimate(_sg(lp), lr, kind="k1")
  return O.pg_surrogate(lp, adv, logp_sampler=lm, clip_eps=CLIP).sum()


def _full(div):
  def f(zs, y, zt, zm):
    zt = _sg(zt)
    if div == "rkl":
      return D.reverse_kl(zs, zt).sum()
    if div == "fkl":
      return D.forward_kl(zs, zt).sum()
    if div == "jsd":
      return D.generalized_jsd(zs, zt, beta=JSD_BETA).sum()
    if div == "tv":
      return D.total_variation(zs, zt).sum()
    raise ValueError(div)
  return f


def _nll(zs, y, zt, zm):
  """SeqKD: NLL of teacher samples, written as REINFORCE with advantage 1."""
  return O.pg_surrogate(_tok_logp(zs, y), 1.0).sum()


def _prefix_weighted_rkl(zs, y, zt, zm):
  """Full reverse KL on tempered prefixes, reweighted by prod_{s<t} pi(y_s)/mu(y_s)."""
  w = O.importance_weights(_tok_logp(zs, y), _tok_logp(zm, y), mode="prefix")
  w_excl = jnp.concatenate([jnp.ones((1,), w.dtype), w[:-1]])   # the current token excluded
  return jnp.sum(w_excl * D.reverse_kl(zs, _sg(zt)))


def _teacher_topk(tail):
  def f(zs, y, zt, zm):
    ids, lp = topk_teacher(_sg(zt), k=TOPK)
    if tail:
      return topk_tail_kl(zs, ids, lp).sum()
    return O.topk_renormalized_kl(zs, ids, lp).sum()
  return f


def _student_topk(tail, clamp=False):
  def f(zs, y, zt, zm):
    ids = O.student_topk(zs, k=TOPK)
    lp_t = jnp.take_along_axis(jax.nn.log_softmax(_sg(zt), -1), ids, axis=-1)
    return O.student_topk_reverse_kl(zs, lp_t, ids, tail=tail, clamp=clamp).sum()
  return f


def _estimators():
  E = Estimator
  on, st, te = "student", "stale", "teacher"
  return [
      E("k1 loss", on, _k_loss("k1"), "zero", "[proposed] Tunix KL term", "k-loss"),
      E("k2 loss", on, _k_loss("k2"), "g0", "[proposed]", "k-loss"),
      E("k3 loss", on, _k_loss("k3"), "g0F", "[proposed] OpenRLHF #1309", "k-loss"),
      E("rho*k3 loss", on, _rho_k3, "g0", "[paper] DeepSeek-V3.2 / TRL #6503", "k-loss"),
      E("k1 reward g=0", on, _k_reward("k1", 0.0), "g0", "[proposed]", "k-reward"),
      E("k1 reward g=0.5", on, _k_reward("k1", GAMMA_MID), None, "[proposed]", "k-reward"),
      E("k1 reward g=1", on, _k_reward("k1", 1.0), "gradKR", "[proposed]", "k-reward"),
      E("k2 reward g=0", on, _k_reward("k2", 0.0), None, "[proposed]", "k-reward"),
      E("k2 reward g=1", on, _k_reward("k2", 1.0), None, "[proposed]", "k-reward"),
      E("k3 reward g=0", on, _k_reward("k3", 0.0), "g0-g0F", "[proposed]", "k-reward"),
      E("k3 reward g=1", on, _k_reward("k3", 1.0), "gradKR-g0F", "[proposed]", "k-reward"),
      E("k3 reward g=1 + k3 loss", on, _k_reward("k3", 1.0, True), "gradKR", "[proposed]",
        "k-reward"),
      E("Tinker OPD g=0 (on-policy)", on, _opd(0.0), "g0", "[paper] tinker-cookbook", "tinker"),
      E("Tinker OPD g=1 (on-policy)", on, _opd(1.0), "gradKR", "[paper] tinker-cookbook",
        "tinker"),
      E("full reverse KL", on, _full("rkl"), "g0", "[paper] GKD / MiniLLM single-step",
        "full"),
      E("full forward KL, student prefixes", on, _full("fkl"), "g0F", "[paper] GKD", "full"),
      E("JSD_0.5, student prefixes", on, _full("jsd"), None, "[paper] GKD", "full"),
      E("TV, student prefixes", on, _full("tv"), None, "[paper] GKD", "full"),
      E("teacher top-2, both renormalised", on, _teacher_topk(False), None,
        "[paper] Tunix #991 / MaxText", "top-k"),
      E("teacher top-2 + tail", on, _teacher_topk(True), None, "[proposed] verl RFC #7856",
        "top-k"),
      E("student top-2, truncated", on, _student_topk(False), None,
        "[paper] arXiv:2604.13016 / verl #7425", "top-k"),
      E("student top-2, clamped", on, _student_topk(False, True), None, "[paper] verl #7806",
        "top-k"),
      E("student top-2 + tail", on, _student_topk(True), None, "[proposed]", "top-k"),
      E("full forward KL, teacher samples", te, _full("fkl"), "gradKF", "[paper] SeqKD / GKD",
        "full"),
      E("NLL of teacher samples (SeqKD)", te, _nll, "gradKF", "[paper] SeqKD", "full"),
      E("per-decision k1 g=0 (stale)", st, _per_decision(0.0), "g0", "[proposed]", "stale"),
      E("per-decision k1 g=1 (stale)", st, _per_decision(1.0), "gradKR", "[proposed]", "stale"),
      E("token-ratio k1 (stale)", st, _token_ratio, "g0_stale", "[paper] Tinker IS loss",
        "stale"),
      E("rho*k3 loss (stale)", st, _rho_k3, "g0_stale", "[paper] DeepSeek-V3.2", "stale"),
      E("per-decision, sampler log-probs g=0", st, _per_decision(0.0, True), "g0-klmu0",
        "[proposed]", "stale"),
      E("per-decision, sampler log-probs g=1", st, _per_decision(1.0, True), "gradKR-klmu",
        "[proposed]", "stale"),
      E("Tinker OPD g=0 (stale)", st, _opd(0.0), None, "[paper] tinker-cookbook", "stale"),
      E("PPO clip 0.2, k1 (stale)", st, _ppo_clip, None, "[paper] PPO", "stale"),
      E("full reverse KL, tempered prefixes", "tempered", _full("rkl"), "g0_tempered",
        "[paper] TRL GKD tau=0.9", "tempered"),
      E("full reverse KL, tempered + prefix weights", "tempered", _prefix_weighted_rkl, "g0",
        "[proposed]", "tempered"),
      E("JSD_0.5, data prefixes (GKD)", "data", _full("jsd"), "jsd_data", "[paper] GKD",
        "gkd"),
      E("JSD_0.5, student prefixes (GKD)", on, _full("jsd"), "jsd_student", "[paper] GKD",
        "gkd"),
      E("JSD_0.5, teacher samples (GKD seq_kd)", te, _full("jsd"), "jsd_teacher",
        "[paper] GKD", "gkd"),
  ]


ESTIMATORS = {e.name: e for e in _estimators()}

TARGET_NAMES = {
    "zero": "0", "g0": "g_0", "g0F": "g_0^F", "gradKR": "grad K_R", "gradKF": "grad K_F",
    "g0-g0F": "g_0 - g_0^F", "gradKR-g0F": "grad K_R - g_0^F", "g0_stale": "g_0 on mu prefixes",
    "g0-klmu0": "g_0 - grad J^{KL(pi||mu)}", "gradKR-klmu": "grad K_R - grad KL(pi||mu)",
    "g0_tempered": "g_0 on tempered prefixes", "jsd_data": "grad J^JSD_data",
    "jsd_student": "g_0^JSD", "jsd_teacher": "grad J^JSD_teacher",
}


class Oracle:
  """Exact enumeration of all V^T sequences of two tabular autoregressive models."""

  def __init__(self, V: int, T: int, seed: int = 0):
    self.V, self.T, self.seed = V, T, seed
    rng = np.random.default_rng([seed, V, T])
    self.shapes = [(V ** t, V) for t in range(T)]
    self.P = sum(a * b for a, b in self.shapes)
    self.offsets = np.cumsum([0] + [a * b for a, b in self.shapes])[:-1]
    self.theta = rng.normal(size=self.P)
    self.teacher = 1.5 * rng.normal(size=self.P)
    self.stale = self.theta + STALE * rng.normal(size=self.P)
    self.data = rng.normal(size=self.P)
    self.tempered = self.theta / TAU
    y = np.array(list(itertools.product(range(V), repeat=T)), dtype=np.int32)   # [N, T]
    self.y = y
    self.N = y.shape[0]
    idx = np.zeros_like(y)
    for t in range(1, T):
      idx[:, t] = idx[:, t - 1] * V + y[:, t - 1]
    self.gi = (self.offsets[None, :, None] + idx[..., None] * V
               + np.arange(V)[None, None, :])                                      # [N, T, V]
    self._grads: dict[str, np.ndarray] = {}
    self._targets: dict[str, np.ndarray] | None = None
    self._probs: dict[str, np.ndarray] = {}

  # --- tree (prefix) computations: exact targets, independent of kdjax ---------------------

  def tables(self, flat):
    return [flat[o:o + a * b].reshape(a, b) for o, (a, b) in zip(self.offsets, self.shapes)]

  def seq_logprob(self, flat):
    """log p(y) of every enumerated sequence [N] (the enumeration order is base V)."""
    lw = jnp.zeros((1,), flat.dtype)
    for tab in self.tables(flat):
      lw = (lw[:, None] + jax.nn.log_softmax(tab, -1)).reshape(-1)
    return lw

  def prefix_objective(self, flat, other, weights, div):
    """sum_t sum_{s_t} w(s_t) D(pi_t(s_t), o_t(s_t)), prefix weights from `weights` (fixed)."""
    total = 0.0
    lw = jnp.zeros((1,), jnp.float64)
    for tq, to, tw in zip(self.tables(flat), self.tables(other), self.tables(weights)):
      d = _ROW_DIVS[div](jax.nn.log_softmax(tq, -1), jax.nn.log_softmax(to, -1))
      total = total + jnp.sum(jnp.exp(lw) * d)
      lw = (lw[:, None] + jax.nn.log_softmax(tw, -1)).reshape(-1)
    return total

  def seq_kl(self, flat_a, flat_b, diff="a"):
    """Sequence-level KL(a||b) = sum_y a(y) log(a(y)/b(y)) by the sum over all sequences."""
    la, lb = self.seq_logprob(flat_a), self.seq_logprob(flat_b)
    return jnp.sum(jnp.exp(la) * (la - lb))

  def future_term(self, flat):
    """g_fut = E_pi[sum_t grad log pi_t(y_t) V_{t+1}(s_{t+1})] with V from the prefix tree."""
    tq = [jax.nn.log_softmax(t, -1) for t in self.tables(flat)]
    tr = [jax.nn.log_softmax(t, -1) for t in self.tables(self.teacher)]
    vals = [None] * (self.T + 1)
    vals[self.T] = jnp.zeros((self.V ** self.T,))
    for t in range(self.T - 1, -1, -1):
      kl = _rkl_rows(tq[t], tr[t])
      vals[t] = kl + jnp.sum(jnp.exp(tq[t]) * vals[t + 1].reshape(self.V ** t, self.V), -1)
    vals = [_sg(v) for v in vals]
    lw, total = jnp.zeros((1,)), 0.0
    for t in range(self.T):
      total = total + jnp.sum(_sg(jnp.exp(lw))[:, None] * jnp.exp(tq[t])
                              * vals[t + 1].reshape(self.V ** t, self.V))
      lw = (lw[:, None] + tq[t]).reshape(-1)
    return total, vals[0]

  def _target_values(self, th, te, st, tp, da):
    """Every exact target as a traced function of the five parameter vectors."""
    objectives = {
        "gradKR": lambda x: self.seq_kl(x, te),                       # K_R
        "gradKF": lambda x: self.seq_kl(te, x),                       # K_F
        "g0": lambda x: self.prefix_objective(x, te, th, "rkl"),      # J^RKL, sg(pi) prefixes
        "g0F": lambda x: self.prefix_objective(x, te, th, "fkl"),     # J^FKL, sg(pi) prefixes
        "g0_stale": lambda x: self.prefix_objective(x, te, st, "rkl"),
        "g0_tempered": lambda x: self.prefix_objective(x, te, tp, "rkl"),
        "klmu0": lambda x: self.prefix_objective(x, st, th, "rkl"),   # J^{KL(pi||mu)}
        "klmu": lambda x: self.seq_kl(x, st),                         # KL(pi||mu), sequences
        "jsd_data": lambda x: self.prefix_objective(x, te, da, "jsd"),
        "jsd_student": lambda x: self.prefix_objective(x, te, th, "jsd"),
        "jsd_teacher": lambda x: self.prefix_objective(x, te, te, "jsd"),
        "g_fut": lambda x: self.future_term(x)[0],
    }
    out = {k: jax.grad(f)(th) for k, f in objectives.items()}
    out.update({
        "KR": self.seq_kl(th, te),
        "KF": self.seq_kl(te, th),
        "V0": self.future_term(th)[1][0],
        "ER_tokens": self.prefix_objective(th, te, th, "rkl"),
        "EF_tokens": self.prefix_objective(th, te, te, "fkl"),
    })
    return out

  def targets(self) -> dict[str, np.ndarray]:
    """Exact gradients (flat, [P]) and values, from sums over sequences / prefixes."""
    if self._targets is not None:
      return self._targets
    with jax.enable_x64(True):
      args = [jnp.asarray(x) for x in (self.theta, self.teacher, self.stale, self.tempered,
                                       self.data)]
      fn = jax.jit(self._target_values, compiler_options=_JIT_OPTS)
      out = {k: np.asarray(v) for k, v in fn(*args).items()}
    for k in ("KR", "KF", "V0", "ER_tokens", "EF_tokens"):
      out[k] = float(out[k])
    out["zero"] = np.zeros(self.P)
    out["g0-g0F"] = out["g0"] - out["g0F"]
    out["gradKR-g0F"] = out["gradKR"] - out["g0F"]
    out["g0-klmu0"] = out["g0"] - out["klmu0"]
    out["gradKR-klmu"] = out["gradKR"] - out["klmu"]
    self._targets = out
    return out

  def probs(self, sampler: str) -> np.ndarray:
    """mu(y) of every enumerated sequence under a sampler."""
    if sampler not in self._probs:
      flat = {"student": self.theta, "teacher": self.teacher, "stale": self.stale,
              "tempered": self.tempered, "data": self.data}[sampler]
      with jax.enable_x64(True):
        self._probs[sampler] = np.exp(np.asarray(self.seq_logprob(jnp.asarray(flat))))
    return self._probs[sampler]

  def sampler_logits(self, sampler: str) -> np.ndarray:
    flat = {"student": self.theta, "teacher": self.teacher, "stale": self.stale,
            "tempered": self.tempered, "data": self.data}[sampler]
    return flat[self.gi]

  # --- per-sequence estimator gradients (kdjax surrogates) ---------------------------------

  def prepare(self, names=None) -> None:
    """Per-sequence gradients of the named estimators (default: all), in one jitted program."""
    names = tuple(n for n in (ESTIMATORS if names is None else names) if n not in self._grads)
    if not names:
      return
    samplers = tuple(sorted({ESTIMATORS[n].sampler for n in names}))
    with jax.enable_x64(True):
      zm = {s: jnp.asarray(self.sampler_logits(s)) for s in samplers}
      gz = _vgrad_many(names)(jnp.asarray(self.theta[self.gi]), jnp.asarray(self.y),
                              jnp.asarray(self.teacher[self.gi]), zm)
    flat_idx = self.gi.reshape(self.N, -1)
    for n, g in zip(names, gz):
      out = np.zeros((self.N, self.P))
      # One parameter per (position, token) of a sequence: the indices are distinct.
      np.put_along_axis(out, flat_idx, np.asarray(g).reshape(self.N, -1), axis=1)
      self._grads[n] = out

  def grads(self, name: str) -> np.ndarray:
    """Per-sequence gradients [N, P] of an estimator's surrogate in the student's parameters."""
    if name not in self._grads:
      # One program per size: every estimator at the report size, the unbiased ones at the
      # other unbiasedness size, a few at (4, 3) (each program costs seconds to compile).
      if (self.V, self.T) == REPORT_SIZE:
        self.prepare()
      elif (self.V, self.T) in UNBIASED_SIZES:
        self.prepare(tuple(dict.fromkeys([name] + _unbiased_names())))
      else:
        self.prepare(tuple(dict.fromkeys((name,) + _SMALL_SET)))
    return self._grads[name]

  def stats(self, name: str):
    """(E_mu g [P], trace variance) of an estimator under its sampler, by exact enumeration."""
    g = self.grads(name)
    mu = self.probs(ESTIMATORS[name].sampler)
    mean = mu @ g
    return mean, float(mu @ np.sum(g * g, axis=1) - mean @ mean)


# Compile at XLA's lowest backend optimisation level: these programs run once, and compiling is
# most of their cost on a CPU (float64 results are unchanged to ~1e-16).
_JIT_OPTS = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
  """jax.jit at the lowest backend optimisation level (eager op-by-op dispatch compiles every
  primitive separately and is slower still for these one-shot checks)."""
  return jax.jit(f, compiler_options=_JIT_OPTS, **kw)


@functools.lru_cache(maxsize=None)
def _vgrad_many(names: tuple):
  """jit(vmap(grad)) of several surrogates: (zs, y, zt, {sampler: zm}) -> per-sequence grads."""
  fns = [(ESTIMATORS[n].fn, ESTIMATORS[n].sampler) for n in names]

  def run(zs, y, zt, zm):
    return [jax.vmap(jax.grad(f))(zs, y, zt, zm[s]) for f, s in fns]

  return jax.jit(run, compiler_options=_JIT_OPTS)


@functools.lru_cache(maxsize=None)
def oracle(V: int, T: int, seed: int = 0) -> Oracle:
  """The cached oracle instance of size (V, T) (shared by all checks and the notebook)."""
  return Oracle(V, T, seed)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def rel_err(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def cosine(a, b) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def unbiased_error(names, sizes=UNBIASED_SIZES) -> tuple[float, str]:
  """Worst max-abs |E g - target| over estimators and sizes, with a per-estimator detail."""
  worst, parts = 0.0, []
  for name in names:
    e = ESTIMATORS[name]
    err = max(max_err(oracle(V, T).stats(name)[0], oracle(V, T).targets()[e.target])
              for V, T in sizes)
    worst = max(worst, err)
    parts.append(f"{name}: {err:.1e}")
  return worst, "; ".join(parts)


def bias_present(pairs, size=REPORT_SIZE) -> tuple[float, str]:
  """Smallest relative error |E g - target| / |target| over (estimator, target) pairs."""
  o = oracle(*size)
  worst, parts = np.inf, []
  for name, target in pairs:
    r = rel_err(o.stats(name)[0], o.targets()[target])
    worst = min(worst, r)
    parts.append(f"{name} vs {TARGET_NAMES[target]}: {r:.3f}")
  return worst, "; ".join(parts)


def table_rows(size=REPORT_SIZE):
  """One row per estimator: bias against its own target and against grad K_R and g_0, trace
  variance and cosine with g_0 (numbers at `size`, seed 0)."""
  o = oracle(*size)
  o.prepare()          # every estimator, in one program
  tg = o.targets()
  rows = []
  for name, e in ESTIMATORS.items():
    mean, var = o.stats(name)
    own = max_err(mean, tg[e.target]) if e.target else float("nan")
    rows.append({
        "estimator": name, "sampler": e.sampler,
        "unbiased for": TARGET_NAMES[e.target] if e.target else "(biased)",
        "max|bias| own": own, "rel. bias vs grad K_R": rel_err(mean, tg["gradKR"]),
        "rel. bias vs g_0": rel_err(mean, tg["g0"]), "cos(E g, g_0)": cosine(mean, tg["g0"]),
        "trace var": var, "label": e.label,
    })
  return rows


def report(size=REPORT_SIZE) -> str:
  """The bias / trace-variance table of every estimator at `size` (default (5, 4)), as text."""
  rows = table_rows(size)
  tg = oracle(*size).targets()
  head = (f"{'estimator':45s} {'sampler':8s} {'unbiased for':26s} {'|bias|own':>9s} "
          f"{'rel vs dK_R':>11s} {'rel vs g_0':>10s} {'cos g_0':>7s} {'tr var':>8s}")
  lines = [f"on-policy estimators at (V, T) = {size}, seed 0: K_R = {tg['KR']:.4f}, "
           f"K_F = {tg['KF']:.4f}, |g_fut|/|grad K_R| = "
           f"{np.linalg.norm(tg['g_fut']) / np.linalg.norm(tg['gradKR']):.3f}", head,
           "-" * len(head)]
  for r in rows:
    own = "-" if np.isnan(r["max|bias| own"]) else f"{r['max|bias| own']:.1e}"
    lines.append(f"{r['estimator']:45s} {r['sampler']:8s} {r['unbiased for']:26s} {own:>9s} "
                 f"{r['rel. bias vs grad K_R']:11.3f} {r['rel. bias vs g_0']:10.3f} "
                 f"{r['cos(E g, g_0)']:7.3f} {r['trace var']:8.3f}")
  return "\n".join(lines)


MC_MIN_HITS = 50   # a coordinate enters the z-test when n * P(g_c != 0) >= this (CLT regime)


def monte_carlo_z(name, size, n=20_000, seed=0) -> tuple[float, int]:
  """Largest |mean of n draws - exact mean| / SE over the coordinates, SE from the exact
  variance, and the number of coordinates tested.

  Only coordinates that n draws are expected to hit at least MC_MIN_HITS times are z-tested:
  a parameter of a rare prefix is nonzero in a handful of draws, and its sample mean is not
  close to normal (the exact enumeration checks those coordinates).
  """
  o = oracle(*size)
  e = ESTIMATORS[name]
  mu = o.probs(e.sampler)
  g = o.grads(name)
  counts = np.bincount(np.random.default_rng([seed, size[0], size[1]]).choice(
      o.N, size=n, p=mu / mu.sum()), minlength=o.N)
  return _z(counts @ g / n, mu, g, n)


def _z(mc, mu, g, n):
  """z-scores of a sample mean `mc` of n draws against the exact mean under weights `mu`."""
  mean = mu @ g
  se = np.sqrt(np.maximum(mu @ (g * g) - mean * mean, 0.0) / n)
  hit = mu @ (g != 0)
  live = (n * hit >= MC_MIN_HITS) & (se > 1e-14)
  return float(np.max(np.abs(mc - mean)[live] / se[live], initial=0.0)), int(live.sum())


def _unbiased_names(group=None):
  return [n for n, e in ESTIMATORS.items() if e.target and (group is None or e.group == group)]


def _rng_logits(seed, shape, scale=1.5):
  return np.random.default_rng(seed).normal(size=shape) * scale


# ============================================================================== checks
# 1. chain rule


@register("onpolicy.chain_rule", source="[paper] chain rule (MiniLLM arXiv:2306.08543)",
          statement="K_R = E_pi sum_t reverse_kl(pi_t, r_t) and K_F = E_r sum_t forward_kl "
                    "(kdjax values, 1e-12); grad K_F = E_r grad sum_t forward_kl (exact "
                    "enumeration, all three sizes)",
          doc=f"{_DOC}#setting")
def _chain_rule():
  worst, parts = 0.0, []
  for V, T in SIZES:
    o = oracle(V, T)
    tg = o.targets()
    rkl, fkl = _jit(lambda a, b: (D.reverse_kl(a, b).sum(-1), D.forward_kl(a, b).sum(-1)))(
        jnp.asarray(o.theta[o.gi]), jnp.asarray(o.teacher[o.gi]))
    er = o.probs("student") @ np.asarray(rkl)
    ef = o.probs("teacher") @ np.asarray(fkl)
    gerr = max_err(o.stats("full forward KL, teacher samples")[0], tg["gradKF"])
    err = max(abs(er - tg["KR"]), abs(ef - tg["KF"]), gerr)
    worst = max(worst, err)
    parts.append(f"({V},{T}) K_R={tg['KR']:.4f} err {err:.1e}")
  return Result(measured=worst, tolerance=ATOL, detail="; ".join(parts))


# 2. decomposition


@register("onpolicy.decomposition", source="[proposed] derived (g_0 + g_fut)",
          statement="grad K_R = g_0 + g_fut with g_fut from the continuation values V_{t+1} by "
                    "prefix grouping, and V_0 = K_R (1e-12, all three sizes)",
          doc=f"{_DOC}#decomposition")
def _decomposition():
  worst = 0.0
  for V, T in SIZES:
    tg = oracle(V, T).targets()
    worst = max(worst, max_err(tg["gradKR"], tg["g0"] + tg["g_fut"]), abs(tg["V0"] - tg["KR"]))
  return Result(measured=worst, tolerance=ATOL)


@register("onpolicy.future_term_present", source="[proposed] derived (g_0 + g_fut)",
          statement="counter-example to 'token-local losses follow grad K_R': "
                    "|g_fut| / |grad K_R| >= 1e-2 on the random instances",
          doc=f"{_DOC}#decomposition")
def _future_present():
  ratios = {s: np.linalg.norm(oracle(*s).targets()["g_fut"])
            / np.linalg.norm(oracle(*s).targets()["gradKR"]) for s in SIZES}
  return Result(measured=min(ratios.values()), tolerance=BIAS_MIN, mode="min",
                detail=", ".join(f"{s}: {r:.3f}" for s, r in ratios.items()))


# 3. loss-side k's


@register("onpolicy.k_loss_unbiased", source="[proposed] derived; kl_estimate, rho_k3",
          statement="on-policy, E grad sum k1 = 0, E grad sum k2 = g_0, E grad sum k3 = g_0^F, "
                    "E grad sum rho*k3 = g_0 (exact enumeration, (3,3) and (5,4), 1e-12)",
          doc=f"{_DOC}#k-in-the-loss")
def _k_loss_unbiased():
  worst, detail = unbiased_error(["k1 loss", "k2 loss", "k3 loss", "rho*k3 loss"])
  return Result(measured=worst, tolerance=ATOL, detail=detail)


@register("onpolicy.rho_k3_equals_k2_per_sample", source="[proposed] derived; rho_k3",
          statement="on-policy, per sequence, grad(rho*k3) = grad(k2 loss) = l_t grad log pi_t "
                    "(the k1-reward gamma=0 gradient), 1e-12",
          doc=f"{_DOC}#k-in-the-loss")
def _rho_k3_per_sample():
  worst = 0.0
  for s in UNBIASED_SIZES:
    o = oracle(*s)
    a, b, c = (o.grads(n) for n in ("rho*k3 loss", "k2 loss", "k1 reward g=0"))
    worst = max(worst, max_err(a, b), max_err(a, c))
  return Result(measured=worst, tolerance=ATOL)


@register("onpolicy.k_loss_bias_present", source="[proposed] derived; kl_estimate",
          statement="bias present: k2 loss vs grad K_R and k3 loss vs g_0 (relative error "
                    ">= 1e-2 at (5,4))",
          doc=f"{_DOC}#k-in-the-loss")
def _k_loss_bias():
  worst, detail = bias_present([("k2 loss", "gradKR"), ("k3 loss", "g0")])
  return Result(measured=worst, tolerance=BIAS_MIN, mode="min", detail=detail)


# 4. reward-side k's


@register("onpolicy.k_reward_unbiased",
          source="[proposed] derived (loss/reward lemma); pg_surrogate",
          statement="k1 reward: gamma=0 -> g_0, gamma=1 -> grad K_R; k3 reward: gamma=0 -> "
                    "g_0 - g_0^F, gamma=1 -> grad K_R - g_0^F; k3 reward (gamma=1) + k3 loss -> "
                    "grad K_R (1e-12)",
          doc=f"{_DOC}#k-as-a-reward")
def _k_reward_unbiased():
  worst, detail = unbiased_error(_unbiased_names("k-reward"))
  return Result(measured=worst, tolerance=ATOL, detail=detail)


@register("onpolicy.k_reward_bias_present", source="[proposed] derived; discounted_returns",
          statement="bias present: k2 reward (gamma=0 vs g_0, gamma=1 vs grad K_R) and k1 reward "
                    "at gamma=0.5 vs grad K_R and vs g_0 (relative >= 1e-2 at (5,4))",
          doc=f"{_DOC}#k-as-a-reward")
def _k_reward_bias():
  worst, detail = bias_present([("k2 reward g=0", "g0"), ("k2 reward g=0", "gradKR"),
                                ("k2 reward g=1", "gradKR"), ("k2 reward g=1", "g0"),
                                ("k1 reward g=0.5", "gradKR"), ("k1 reward g=0.5", "g0")])
  return Result(measured=worst, tolerance=BIAS_MIN, mode="min", detail=detail)


# 5. discounted returns


def _loop_returns(x, m, gamma):
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    g = gamma[b] if np.ndim(gamma) else gamma
    for t in range(x.shape[1]):
      if m[b, t]:
        out[b, t] = sum(g ** (s - t) * x[b, s] * m[b, s] for s in range(t, x.shape[1]))
  return out


@register("onpolicy.discounted_returns_loop", source="[paper] tinker-cookbook "
          "discounted_future_sum_vectorized",
          statement="discounted_returns equals a Python loop G_t = sum_{t'>=t} gamma^(t'-t) "
                    "m_t' x_t' (current token included, 0 at masked tokens) for gamma in "
                    "{0, 0.5, 1} and per-sequence gamma, with prompt and padding masks (1e-12)",
          doc=f"{_DOC}#k-as-a-reward")
def _returns_loop():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 9))
  m = np.ones(x.shape, bool)
  m[:, :2] = False                      # prompt
  for b, n in enumerate([9, 7, 5, 9, 3, 8]):
    m[b, n:] = False                    # padding
  m[3, 5] = False                       # a hole
  gammas = (0.0, 0.5, 1.0, rng.uniform(size=6))
  got, g0, g1 = _jit(lambda x, m, gs: ([O.discounted_returns(x, gamma=g, where=m) for g in gs],
                                       O.discounted_returns(x, gamma=0.0),
                                       O.discounted_returns(x, gamma=1.0)))(x, m, gammas)
  worst = max(max_err(g0, x), max_err(g1, np.cumsum(x[:, ::-1], 1)[:, ::-1]))
  for gamma, r in zip(gammas, got):
    worst = max(worst, max_err(r, _loop_returns(x, m, gamma)))
  return Result(measured=worst, tolerance=ATOL)


# 6. off-policy


@register("onpolicy.off_policy_per_decision", source="[proposed] derived; importance_weights",
          statement="stale samples (mu = pi_old): per-decision weights w_t' = prod_{s<=t'} rho_s "
                    "inside the return are unbiased for g_0 (gamma=0) and grad K_R (gamma=1), "
                    "1e-12",
          doc=f"{_DOC}#stale-rollouts")
def _per_decision_check():
  worst, detail = unbiased_error(["per-decision k1 g=0 (stale)", "per-decision k1 g=1 (stale)"])
  return Result(measured=worst, tolerance=ATOL, detail=detail)


@register("onpolicy.off_policy_token_ratio", source="[proposed] derived; pg_surrogate, rho_k3",
          statement="stale samples: the per-token-ratio loss -rho_t sg(l_t) (Tinker's "
                    "importance_sampling, PPO without clip) and rho*k3 both estimate the "
                    "per-token reverse-KL gradient on mu's prefixes exactly (1e-12)",
          doc=f"{_DOC}#stale-rollouts")
def _token_ratio_check():
  worst, detail = unbiased_error(["token-ratio k1 (stale)", "rho*k3 loss (stale)"])
  return Result(measured=worst, tolerance=ATOL, detail=detail)


@register("onpolicy.off_policy_bias_present",
          source="[proposed] derived; pg_surrogate, opd_advantages",
          statement="bias present with stale samples: token ratio only, rho*k3 and the exact "
                    "Tinker recipe vs g_0; PPO clip (eps=0.2) vs its unclipped target "
                    "(relative >= 1e-2 at (5,4))",
          doc=f"{_DOC}#stale-rollouts")
def _off_bias():
  worst, detail = bias_present([("token-ratio k1 (stale)", "g0"), ("rho*k3 loss (stale)", "g0"),
                                ("Tinker OPD g=0 (stale)", "g0"),
                                ("PPO clip 0.2, k1 (stale)", "g0_stale")])
  return Result(measured=worst, tolerance=BIAS_MIN, mode="min", detail=detail)


@register("onpolicy.sampler_reward_bias", source="[proposed] derived; importance_weights",
          statement="per-decision weights with the sampler's log-probs in the reward: the bias "
                    "is exactly -grad KL(pi||mu) (gamma=1, sequence level) and -grad of the "
                    "per-token KL(pi_t||mu_t) on pi's prefixes (gamma=0), 1e-12",
          doc=f"{_DOC}#stale-rollouts")
def _sampler_reward():
  worst, detail = unbiased_error(["per-decision, sampler log-probs g=0",
                                  "per-decision, sampler log-probs g=1"])
  return Result(measured=worst, tolerance=ATOL, detail=detail)


# 7. Monte Carlo


@register("onpolicy.monte_carlo", source="[proposed] oracle protocol",
          statement="2e4 samples from each estimator's sampler: every unbiased estimator's "
                    "sample mean is within 4 SE of the exact mean on every coordinate hit >= 50 "
                    "times in expectation (SE from the exact variance), (3,3) and (5,4); GKD with a gkd_source draw per step "
                    "matches the lambda-mixture",
          doc=f"{_DOC}#oracle")
def _monte_carlo():
  n = 20_000
  worst, where, tested = 0.0, "", 0
  for size in UNBIASED_SIZES:
    for name in _unbiased_names():
      z, k = monte_carlo_z(name, size, n)
      tested += k
      if z > worst:
        worst, where = z, f"{name} at {size}"
  # GKD: one source per step (lambda = 0.5), one sequence from that source.
  o = oracle(3, 3)
  src = np.asarray(_jit(jax.vmap(lambda k: O.gkd_source(k, lam=0.5)))(
      jax.random.split(jax.random.PRNGKey(3), n)))
  rng = np.random.default_rng(4)
  ga, gb = o.grads("JSD_0.5, data prefixes (GKD)"), o.grads("JSD_0.5, student prefixes (GKD)")
  pa, pb = o.probs("data"), o.probs("student")
  ca = np.bincount(rng.choice(o.N, size=n, p=pa / pa.sum())[src == 0], minlength=o.N)
  cb = np.bincount(rng.choice(o.N, size=n, p=pb / pb.sum())[src == 1], minlength=o.N)
  zg, k = _z((ca @ ga + cb @ gb) / n, np.concatenate([0.5 * pa, 0.5 * pb]),
             np.concatenate([ga, gb]), n)
  tested += k
  if zg > worst:
    worst, where = zg, "GKD mixture"
  # 4 SE as the issue asks, on every one of ~1e4 coordinates (fixed seeds; measured max 3.66).
  return Result(measured=worst, tolerance=4.0,
                detail=f"max z {worst:.2f} ({where}) over {tested} coordinate tests")


# 8. full-vocabulary per-token losses


@register("onpolicy.full_vocab_unbiased", source="[paper] GKD arXiv:2306.13649; SeqKD",
          statement="reverse_kl summed on student prefixes -> g_0; forward_kl on student "
                    "prefixes -> g_0^F; forward_kl and NLL on teacher samples -> grad K_F "
                    "exactly (1e-12)",
          doc=f"{_DOC}#full-vocabulary")
def _full_unbiased():
  worst, detail = unbiased_error(_unbiased_names("full"))
  return Result(measured=worst, tolerance=ATOL, detail=detail)


@register("onpolicy.full_vocab_variance", source="[proposed] Rao-Blackwellisation",
          statement="trace variance of the full-vocabulary reverse KL < that of k1 as a reward "
                    "at gamma=0 (same mean g_0): the ratio is < 1",
          doc=f"{_DOC}#full-vocabulary")
def _full_variance():
  ratios = {}
  for s in UNBIASED_SIZES:
    o = oracle(*s)
    ratios[s] = o.stats("full reverse KL")[1] / o.stats("k1 reward g=0")[1]
  return Result(measured=max(ratios.values()), tolerance=1.0,
                detail=", ".join(f"{s}: {r:.3f}" for s, r in ratios.items()))


@register("onpolicy.tv_gradient_formula", source="[proposed] derived; total_variation",
          statement="logit gradient of TV = (1/2) q * (s - <q, s>), s = sign(q - p), equals "
                    "autodiff away from ties (1000 random pairs, V = 7, 1e-12)",
          doc=f"{_DOC}#full-vocabulary")
def _tv_grad():
  zs, zt = _rng_logits(11, (1000, 7)), _rng_logits(12, (1000, 7))
  g = np.asarray(_jit(jax.grad(lambda z, t: D.total_variation(z, t).sum()))(zs, zt))
  q = scipy_softmax(zs)
  p = scipy_softmax(zt)
  s = np.sign(q - p)
  formula = 0.5 * q * (s - np.sum(q * s, -1, keepdims=True))
  assert np.min(np.abs(q - p)) > 1e-9
  return Result(measured=max_err(g, formula), tolerance=ATOL)


def scipy_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@register("onpolicy.jsd_tv_bias_present", source="[proposed] derived; generalized_jsd, "
          "total_variation",
          statement="bias present: JSD_0.5 and TV on student prefixes vs g_0 and vs grad K_R "
                    "(relative >= 1e-2 at (5,4))",
          doc=f"{_DOC}#full-vocabulary")
def _jsd_tv_bias():
  worst, detail = bias_present([("JSD_0.5, student prefixes", "g0"),
                                ("JSD_0.5, student prefixes", "gradKR"),
                                ("TV, student prefixes", "g0"), ("TV, student prefixes", "gradKR")])
  return Result(measured=worst, tolerance=BIAS_MIN, mode="min", detail=detail)


# 9. GKD


@register("onpolicy.gkd_mixture", source="[paper] GKD arXiv:2306.13649 (GKD objective)",
          statement="the lambda-mixture of per-token JSD_0.5 gradients on data (or teacher, "
                    "seq_kd) and on student prefixes equals (1-lambda) grad J_D + lambda g_0^JSD "
                    "for lambda in {0, 0.5, 1} (1e-12)",
          doc=f"{_DOC}#gkd")
def _gkd_mixture():
  worst = 0.0
  for s in UNBIASED_SIZES:
    o = oracle(*s)
    tg = o.targets()
    stu = o.stats("JSD_0.5, student prefixes (GKD)")[0]
    for other, target in (("JSD_0.5, data prefixes (GKD)", "jsd_data"),
                          ("JSD_0.5, teacher samples (GKD seq_kd)", "jsd_teacher")):
      oth = o.stats(other)[0]
      for lam in (0.0, 0.5, 1.0):
        worst = max(worst, max_err((1 - lam) * oth + lam * stu,
                                   (1 - lam) * tg[target] + lam * tg["jsd_student"]))
  return Result(measured=worst, tolerance=ATOL)


@register("onpolicy.gkd_source_frequency", source="[paper] TRL GKDTrainer.training_step",
          statement="gkd_source over 1e5 keys: the student source has frequency within 5 SE of "
                    "lambda (0.1, 0.5, 0.9); lambda=0/1 never/always; the other source is the "
                    "teacher iff seq_kd",
          doc=f"{_DOC}#gkd")
def _gkd_source():
  n = 100_000
  lams = np.array([0.0, 0.1, 0.5, 0.9, 1.0])

  @_jit
  def counts(keys, lams):
    out = []
    for seq_kd in (False, True):
      s = jax.vmap(lambda lam: jax.vmap(lambda k: O.gkd_source(k, lam=lam, seq_kd=seq_kd))(
          keys))(lams)
      out.append(jnp.stack([jnp.sum(s == i, axis=1) for i in range(3)], 1))   # [lams, 3]
    return out

  worst, parts = 0.0, []
  for seq_kd, c in zip((False, True), counts(jax.random.split(jax.random.PRNGKey(0), n), lams)):
    c = np.asarray(c)
    if np.any(c[:, 0 if seq_kd else 2] != 0):
      return Result(measured=np.inf, tolerance=5.0, detail=f"wrong other source, seq_kd={seq_kd}")
    for lam, f in zip(lams, c[:, 1] / n):
      if lam in (0.0, 1.0):
        z = 0.0 if f == lam else np.inf
      else:
        z = abs(f - lam) / np.sqrt(lam * (1 - lam) / n)
        parts.append(f"lam={lam}{' seq_kd' if seq_kd else ''}: {f:.4f}")
      worst = max(worst, z)
  return Result(measured=worst, tolerance=5.0, detail="; ".join(parts))


# 10. Tinker recipe


@register("onpolicy.opd_advantages_formula", source="[paper] tinker-cookbook "
          "incorporate_kl_penalty",
          statement="opd_advantages: discount 0 gives -c m_t (log mu - log r), discount 1 its "
                    "reverse cumulative sum, discount 0.5 the discounted future sum (1e-12)",
          doc=f"{_DOC}#tinker")
def _opd_formula():
  rng = np.random.default_rng(21)
  lm, lr = -rng.exponential(size=(5, 8)), -rng.exponential(size=(5, 8))
  m = rng.uniform(size=(5, 8)) > 0.2
  c = 0.7
  x = -c * m * (lm - lr)
  a0, a1, a5 = _jit(lambda lm, lr, m: [O.opd_advantages(lm, lr, coef=c, discount=d, where=m)
                                         for d in (0.0, 1.0, 0.5)])(lm, lr, m)
  worst = max(max_err(a0, x), max_err(a1, np.where(m, np.cumsum(x[:, ::-1], 1)[:, ::-1], 0.0)),
              max_err(a5, _loop_returns(x, m, 0.5)))
  return Result(measured=worst, tolerance=ATOL)


@register("onpolicy.opd_on_policy_unbiased", source="[proposed] derived; opd_advantages",
          statement="on-policy, the Tinker recipe (sampler log-probs = sg(pi), importance-"
                    "sampling loss) is unbiased for g_0 at discount 0 and grad K_R at discount 1 "
                    "(1e-12)",
          doc=f"{_DOC}#tinker")
def _opd_unbiased():
  worst, detail = unbiased_error(_unbiased_names("tinker"))
  return Result(measured=worst, tolerance=ATOL, detail=detail)


# 11. DistiLLM-2


@register("onpolicy.distillm2_terms", source="[paper] distillm-2 src/distillm_trainer.py",
          statement="p=(0.9,0.1), q=(0.5,0.5), alpha=0.1: rejected 0.365321, grad (-0.453822, "
                    "+0.453822), non-detached (-0.379072, +0.379072); chosen 0.307137, grad "
                    "(-0.326087, +0.326087) (6 decimals); closed-form values and gradients on "
                    "200 random pairs (1e-12)",
          doc=f"{_DOC}#distillm-2")
def _distillm2_terms():
  alpha = 0.1
  terms = {"rejected": lambda z, p: O.distillm2_rejected_kl(z, p, alpha=alpha),
           "non-detached": lambda z, p: D.skew_reverse_kl(z, p, skew=alpha),
           "chosen": lambda z, p: O.distillm2_chosen_kl(z, p, alpha=alpha)}

  @_jit
  def run(zq, zp, zs, zt):
    vg = {k: jax.value_and_grad(lambda z, f=f: f(z, zp))(zq) for k, f in terms.items()}
    rand = {k: (terms[k](zs, zt), jax.grad(lambda z, f=terms[k]: f(z, zt).sum())(zs))
            for k in ("rejected", "chosen")}
    return vg, rand

  zs, zt = _rng_logits(31, (200, 6)), _rng_logits(32, (200, 6))
  vg, rand = run(np.log([0.5, 0.5]), np.log([0.9, 0.1]), zs, zt)
  got = {k: [float(v), *np.asarray(g).tolist()] for k, (v, g) in vg.items()}
  want = {"rejected": [0.365321, -0.453822, 0.453822],
          "non-detached": [0.365321, -0.379072, 0.379072],
          "chosen": [0.307137, -0.326087, 0.326087]}
  worst = max(abs(round(a, 6) - b) for k in want for a, b in zip(got[k], want[k]))
  # closed forms: rejected q*(a - <q,a>), a = log(q/m2); chosen -(1-alpha) q*(w - <q,w>), w = p/m1
  q, p = scipy_softmax(zs), scipy_softmax(zt)
  m2 = (1 - alpha) * p + alpha * q
  a = np.log(q / m2)
  m1 = alpha * p + (1 - alpha) * q
  w = p / m1
  closed = {"rejected": (np.sum(q * a, -1), q * (a - np.sum(q * a, -1, keepdims=True))),
            "chosen": (np.sum(p * np.log(p / m1), -1),
                       -(1 - alpha) * q * (w - np.sum(q * w, -1, keepdims=True)))}
  for k, (val, grad) in closed.items():
    worst = max(worst, max_err(rand[k][0], val), max_err(rand[k][1], grad))
  return Result(measured=worst, tolerance=ATOL,
                detail=", ".join(f"{k}: {np.round(v, 6).tolist()}" for k, v in got.items()))


@register("onpolicy.distillm2_schedules", source="[paper] distillm-2 src/distillm_trainer.py "
          "L1145-1187",
          statement="beta = 1.0, 1.25, 1.5, 1.5 at step/total = 0, .25, .5, 1 (gradual), 1 "
                    "otherwise; alpha(gap, gap0=0.2) = 0.1, 0.1, 0.01, 0.01, 0.1 at gap = 0.3, "
                    "0.2, 0.15, 0.05, -0.1; the default loss = fixed alpha 0.1, beta 1",
          doc=f"{_DOC}#distillm-2")
def _distillm2_sched():
  steps = np.array([0, 25, 50, 100])
  beta = np.asarray(O.distillm2_beta(steps, 100, gradual=True)).tolist()
  flat = np.asarray(O.distillm2_beta(steps, 100)).tolist()
  alpha = np.asarray(O.distillm2_alpha(np.array([0.3, 0.2, 0.15, 0.05, -0.1]), 0.2))
  worst = max(max_err(beta, [1.0, 1.25, 1.5, 1.5]), max_err(flat, [1.0] * 4),
              max_err(alpha, [0.1, 0.1, 0.01, 0.01, 0.1]))
  gaps = np.random.default_rng(41).uniform(-0.5, 1.0, 500)
  worst = max(worst, max_err(O.distillm2_alpha(gaps, 0.3),
                             np.clip(1 - 0.9 * 0.3 / (gaps + 1e-5), 0.01, 0.1)))
  a = [_rng_logits(42 + i, (3, 4, 5)) for i in range(4)]
  default, fixed = _jit(lambda *a: (O.distillm2_loss(*a), O.distillm2_loss(
      *a, alpha_chosen=0.1, alpha_rejected=0.1, beta=1.0)))(*a)
  worst = max(worst, max_err(default, fixed))
  return Result(measured=worst, tolerance=ATOL, detail=f"beta {beta}, alpha {alpha.tolist()}")


@register("onpolicy.distillm2_loss_reduction", source="[paper] distillm-2 loss_type="
          "'distillm_v2'",
          statement="distillm2_loss = (2-beta) token-mean chosen KL(p||a1 p+(1-a1) q) + beta "
                    "token-mean rejected KL(q||(1-a2) p + a2 q), per-sequence alpha, beta and "
                    "masks; distillm2_gap = exp(mean log a) - exp(mean log b) (1e-12)",
          doc=f"{_DOC}#distillm-2")
def _distillm2_loss():
  rng = np.random.default_rng(51)
  sc, tc = _rng_logits(52, (4, 6, 7)), _rng_logits(53, (4, 6, 7))
  sr, tr = _rng_logits(54, (4, 5, 7)), _rng_logits(55, (4, 5, 7))
  mc, mr = rng.uniform(size=(4, 6)) > 0.3, rng.uniform(size=(4, 5)) > 0.3
  mc[:, 0] = mr[:, 0] = True
  a1, a2, beta = rng.uniform(0.05, 0.5, 4), rng.uniform(0.05, 0.5, 4), rng.uniform(0, 2, 4)
  got = np.asarray(_jit(lambda *x: O.distillm2_loss(*x[:4], alpha_chosen=x[4], alpha_rejected=x[5],
                                                    beta=x[6], where_chosen=x[7],
                                                    where_rejected=x[8]))(
      sc, tc, sr, tr, a1, a2, beta, mc, mr))
  q, p = scipy_softmax(sc), scipy_softmax(tc)
  m1 = a1[:, None, None] * p + (1 - a1[:, None, None]) * q
  kc = np.sum(p * np.log(p / m1), -1)
  q, p = scipy_softmax(sr), scipy_softmax(tr)
  m2 = (1 - a2[:, None, None]) * p + a2[:, None, None] * q
  kr = np.sum(q * np.log(q / m2), -1)
  want = ((2 - beta) * (kc * mc).sum(1) / mc.sum(1) + beta * (kr * mr).sum(1) / mr.sum(1))
  worst = max_err(got, want)
  la, lb = -rng.exponential(size=(4, 6)), -rng.exponential(size=(4, 6))
  gap = np.exp((la * mc).sum(1) / mc.sum(1)) - np.exp((lb * mc).sum(1) / mc.sum(1))
  worst = max(worst, max_err(O.distillm2_gap(la, lb, where=mc), gap))
  return Result(measured=worst, tolerance=ATOL)


# 12. top-k


@register("onpolicy.student_topk_counterexample", source="[paper] verl #7806 review; "
          "arXiv:2604.13016",
          statement="q=(0.6,0.4), p=(0.9,0.1), k=1: truncated L_1 = -0.243279 with logit grad "
                    "(+0.142688,-0.142688), full reverse KL 0.311239 with (-0.430022,+0.430022) "
                    "(6 decimals); clamp gives 0 and zero gradient; with the tail it equals the "
                    "full KL; the truncated gradient formula holds on random pairs (1e-12)",
          doc=f"{_DOC}#top-k")
def _topk_counter():

  @_jit
  def run(zq, lp, zs, lpt):
    ids = O.student_topk(zq, k=1)
    lpi = lp[ids]
    kws = {"trunc": (False, False), "clamp": (False, True), "tail": (True, False)}
    out = {k: jax.value_and_grad(
        lambda z, kw=kw: O.student_topk_reverse_kl(z, lpi, ids, tail=kw[0], clamp=kw[1]))(zq)
           for k, kw in kws.items()}
    out["full"] = jax.value_and_grad(lambda z: D.reverse_kl(z, lp))(zq)
    ids3 = O.student_topk(zs, k=3)
    lpi3 = jnp.take_along_axis(lpt, ids3, -1)
    g3 = jax.grad(lambda z: O.student_topk_reverse_kl(z, lpi3, ids3, tail=False).sum())(zs)
    return out, ids3, g3

  zs, zt = _rng_logits(61, (300, 6)), _rng_logits(62, (300, 6))
  lpt = np.log(scipy_softmax(zt))
  out, ids, g = run(np.log([0.6, 0.4]), np.log([0.9, 0.1]), zs, lpt)
  vg = {k: np.array([float(v), *np.asarray(gr).tolist()]) for k, (v, gr) in out.items()}
  trunc, clamp, tail, full = (vg[k] for k in ("trunc", "clamp", "tail", "full"))
  worst = max(max_err(np.round(trunc, 6), [-0.243279, 0.142688, -0.142688]),
              max_err(np.round(full, 6), [0.311239, -0.430022, 0.430022]),
              max_err(clamp, [0.0, 0.0, 0.0]), max_err(tail, full))
  # gradient formula q_j [1_{j in S}(a_j + 1) - sum_S q_v (a_v + 1)], a = log(q/p)
  q = scipy_softmax(zs)
  a = np.log(q) - lpt
  ins = np.zeros_like(q, bool)
  np.put_along_axis(ins, np.asarray(ids), True, -1)
  formula = q * (ins * (a + 1) - np.sum(ins * q * (a + 1), -1, keepdims=True))
  worst = max(worst, max_err(g, formula))
  return Result(measured=worst, tolerance=ATOL,
                detail=f"truncated {np.round(trunc, 6).tolist()}, full {np.round(full, 6).tolist()}")


@register("onpolicy.topk_tail_bounds", source="[proposed] data processing (verl RFC #7856)",
          statement="student top-k + tail and teacher top-k + tail: 0 <= value <= full KL "
                    "(+1e-12) on 1000 random pairs, k in {1, 3, V-1}, equal at k = V-1 (V = 8)",
          doc=f"{_DOC}#top-k")
def _topk_bounds():
  V = 8

  @_jit
  def run(zs, zt):
    lpt = jax.nn.log_softmax(zt, -1)
    out = [D.reverse_kl(zs, zt), D.forward_kl(zs, zt)]
    for k in (1, 3, V - 1):
      ids = O.student_topk(zs, k=k)
      tids, tlp = topk_teacher(zt, k=k)
      out += [O.student_topk_reverse_kl(zs, jnp.take_along_axis(lpt, ids, -1), ids),
              topk_tail_kl(zs, tids, tlp)]
    return out

  rkl, fkl, *vals = (np.asarray(x) for x in run(_rng_logits(71, (1000, V)),
                                                 _rng_logits(72, (1000, V))))
  worst = 0.0
  for i, k in enumerate((1, 3, V - 1)):
    s, t = vals[2 * i], vals[2 * i + 1]
    worst = max(worst, float(np.max(-s)), float(np.max(s - rkl)), float(np.max(-t)),
                float(np.max(t - fkl)))
    if k == V - 1:
      worst = max(worst, max_err(s, rkl), max_err(t, fkl))
  return Result(measured=worst, tolerance=ATOL)


@register("onpolicy.topk_renormalized_tail_gradient", source="[paper] Tunix PR #991 / MaxText "
          "sparse distillation",
          statement="teacher top-k with both sides renormalised: value = KL(p_S/P || q_S/Q) "
                    "(1e-12) and the gradient on every tail (non-S) logit is exactly 0",
          doc=f"{_DOC}#top-k")
def _renorm_tail():
  zs, zt = _rng_logits(81, (500, 9)), _rng_logits(82, (500, 9))

  @_jit
  def run(zs, zt):
    ids, lp = topk_teacher(zt, k=3)
    f = lambda z: O.topk_renormalized_kl(z, ids, lp)
    return ids, lp, f(zs), jax.grad(lambda z: f(z).sum())(zs)

  ids, lp, v, g = (np.asarray(x) for x in run(zs, zt))
  ins = np.zeros(zs.shape, bool)
  np.put_along_axis(ins, ids, True, -1)
  qs = np.take_along_axis(scipy_softmax(zs), ids, -1)
  ps = np.exp(lp)
  qs, ps = qs / qs.sum(-1, keepdims=True), ps / ps.sum(-1, keepdims=True)
  val = np.sum(ps * np.log(ps / qs), -1)
  tail = float(np.max(np.abs(g[~ins])))
  err = max_err(v, val)
  return Result(measured=max(tail, err), tolerance=ATOL,
                detail=f"max |tail grad| {tail:.1e} (exact zero expected), value err {err:.1e}")


@register("onpolicy.renormalized_target_kills_tail", source="[proposed] derived (kd_losses.md "
          "§8)",
          statement="counter-example: CE on the renormalised teacher top-2 target (student not "
                    "renormalised), p = (0.5, 0.3, 0.2), drives the tail probability q_3 below "
                    "1e-3 by gradient descent from uniform",
          doc=f"{_DOC}#top-k")
def _renorm_target():
  p = np.array([0.5, 0.3, 0.2])
  ids = np.array([0, 1])
  w = p[ids] / p[ids].sum()
  grad = jax.grad(lambda z: random_sampling_kd(z, ids, w))

  def body(z, _):
    return z - 1.0 * grad(z), None

  z, _ = _jit(lambda z0: jax.lax.scan(body, z0, None, length=5000))(jnp.zeros(3))
  q = scipy_softmax(np.asarray(z))
  return Result(measured=float(q[2]), tolerance=1e-3,
                detail=f"q after 5000 steps (lr 1): {np.round(q, 6).tolist()}")


@register("onpolicy.topk_bias_present", source="[proposed] oracle (arXiv:2604.13016, verl "
          "#7425/#7806/#7855)",
          statement="bias present at (5,4), k=2: teacher top-2 (renormalised, + tail) vs g_0^F; "
                    "student top-2 (truncated, clamped, + tail) vs g_0 (relative >= 1e-2)",
          doc=f"{_DOC}#top-k")
def _topk_bias():
  worst, detail = bias_present([("teacher top-2, both renormalised", "g0F"),
                                ("teacher top-2 + tail", "g0F"),
                                ("student top-2, truncated", "g0"),
                                ("student top-2, clamped", "g0"),
                                ("student top-2 + tail", "g0")])
  return Result(measured=worst, tolerance=BIAS_MIN, mode="min", detail=detail)


# 13. tempered sampling


_TEMPERED = ("full reverse KL, tempered prefixes", "full reverse KL, tempered + prefix weights")


@register("onpolicy.tempered_bias_present", source="[paper] TRL GKD temperature 0.9; "
          "[proposed] bias",
          statement="tau = 0.9: the full-vocabulary reverse KL on tempered prefixes is biased "
                    "for g_0 (relative >= 1e-3 at (4,3) and (5,4)) and exact for the same "
                    "objective on tempered prefixes (1e-12)",
          doc=f"{_DOC}#tempered-sampling")
def _tempered_bias():
  rel, err = {}, 0.0
  for s in ((4, 3), (5, 4)):
    o = oracle(*s)
    o.prepare(_TEMPERED)
    mean = o.stats(_TEMPERED[0])[0]
    rel[s] = rel_err(mean, o.targets()["g0"])
    err = max(err, max_err(mean, o.targets()["g0_tempered"]))
  if err > ATOL:
    return Result(measured=0.0, tolerance=1e-3, mode="min", detail=f"not exact: {err:.1e}")
  return Result(measured=min(rel.values()), tolerance=1e-3, mode="min",
                detail=", ".join(f"{s}: {r:.4f}" for s, r in rel.items()))


@register("onpolicy.tempered_prefix_weights", source="[proposed] derived; importance_weights",
          statement="tau = 0.9: prefix weights prod_{s<t} pi(y_s)/mu_tau(y_s) (current token "
                    "excluded) make the tempered reverse KL unbiased for g_0 (1e-12, all sizes)",
          doc=f"{_DOC}#tempered-sampling")
def _tempered_weights():
  worst = 0.0
  for s in SIZES:
    o = oracle(*s)
    o.prepare(_TEMPERED)
    worst = max(worst, max_err(o.stats(_TEMPERED[1])[0], o.targets()["g0"]))
  return Result(measured=worst, tolerance=ATOL)


# 14. plumbing


def _raises(fn, arg):
  try:
    fn()
  except ValueError as e:
    return arg in str(e)
  return False


@register("onpolicy.plumbing", source="[proposed] kdjax conventions",
          statement="masked padding changes nothing (values equal the unpadded ones), jit = "
                    "eager, float32 within rtol 1e-5 of float64, bad input raises ValueError "
                    "naming the argument",
          doc=f"{_DOC}#plumbing")
def _plumbing():
  rng = np.random.default_rng(91)
  B, T0, T1, V = 3, 5, 8, 6
  lp, lm, lr = (-rng.exponential(size=(B, T1)) for _ in range(3))
  adv = rng.normal(size=(B, T1))
  m = np.zeros((B, T1), bool)
  m[:, :T0] = True
  garbage = lambda a: np.where(m, a, rng.normal(size=a.shape) * 50 - 20)

  fns = {
      "k1": lambda a, b, c, d, w: O.kl_estimate(a, b, kind="k1", where=w),
      "k3": lambda a, b, c, d, w: O.kl_estimate(a, b, kind="k3", where=w),
      "returns": lambda a, b, c, d, w: O.discounted_returns(a - b, gamma=0.7, where=w),
      "weights": lambda a, b, c, d, w: O.importance_weights(a, c, mode="prefix", where=w),
      "pg": lambda a, b, c, d, w: O.pg_surrogate(a, d, logp_sampler=c, where=w),
      "rho_k3": lambda a, b, c, d, w: O.rho_k3(a, c, b, where=w),
      "opd": lambda a, b, c, d, w: O.opd_advantages(c, b, discount=0.5, where=w),
  }
  G = [garbage(x) for x in (lp, lr, lm, adv)]
  S = [x[:, :T0] for x in (lp, lr, lm, adv)]

  def run(full, padded, short, mask):
    out = {}
    for name, f in fns.items():
      g = jax.grad(lambda a, f=f: jnp.sum(f(a, *padded[1:], mask)))(padded[0])
      out[name] = (f(*full, mask), f(*padded, mask), f(*short, None), g)
    return out

  run = _jit(run)
  r64 = run([lp, lr, lm, adv], G, S, m)
  r32 = run([np.float32(x) for x in (lp, lr, lm, adv)], [np.float32(x) for x in G],
            [np.float32(x) for x in S], m)
  worst, bad = 0.0, []
  for name, f in fns.items():
    full, padded, short, g = (np.asarray(x) for x in r64[name])
    if name != "weights" and np.any(padded[:, T0:] != 0):
      bad.append(f"{name}: padded value")
    worst = max(worst, max_err(padded[:, :T0], short), float(np.max(np.abs(g[:, T0:]))))
    eager = np.asarray(f(lp, lr, lm, adv, m))           # eager vs the jitted `full`
    worst = max(worst, max_err(eager, full))
    f32 = np.asarray(r32[name][0])
    if f32.dtype != np.float32:
      bad.append(f"{name}: float32 in, {f32.dtype} out")
    scale = max(1.0, float(np.max(np.abs(full))))
    if max_err(f32, full) > 1e-5 * scale:
      bad.append(f"{name}: float32 error {max_err(f32, full):.1e}")
  zs, zt = _rng_logits(92, (B, T1, V)), _rng_logits(93, (B, T1, V))
  ids = np.asarray(O.student_topk(zs, k=2))
  lpi = np.take_along_axis(np.log(scipy_softmax(zt)), ids, -1)
  masked = _jit(lambda zs, zt, lpi, ids, m: [
      (O.student_topk_reverse_kl(zs, lpi, ids, where=w), O.distillm2_rejected_kl(zs, zt, where=w))
      for w in (m, None)])(zs, zt, lpi, ids, m)
  for a, b in zip(*masked):
    a, b = np.asarray(a), np.asarray(b)
    worst = max(worst, float(np.max(np.abs(a[:, T0:]))), max_err(a[:, :T0], b[:, :T0]))
  cases = [
      (lambda: O.kl_estimate(lp, lr, kind="k4"), "kind"),
      (lambda: O.kl_estimate(lp, lr[:, :3]), "logp_ref"),
      (lambda: O.discounted_returns(lp, gamma=1.5), "gamma"),
      (lambda: O.importance_weights(lp, lm, mode="seq"), "mode"),
      (lambda: O.pg_surrogate(lp, adv[:, :3]), "advantages"),
      (lambda: O.pg_surrogate(lp, adv, clip_eps=0.2), "clip_eps"),
      (lambda: O.rho_k3(lp, lm[:, :2], lr), "logp_sampler"),
      (lambda: O.opd_advantages(lm, lr, discount=1.5), "discount"),
      (lambda: O.gkd_source(jax.random.PRNGKey(0), lam=1.5), "lam"),
      (lambda: O.student_topk(zs, k=0), "k"),
      (lambda: O.distillm2_loss(zs, zt, zs, zt, beta=3.0), "beta"),
      (lambda: O.distillm2_alpha(jnp.ones(3), 0.2, base=2.0), "base"),
      (lambda: O.distillm2_beta(1, 0, gradual=True), "total_steps"),
  ]
  for fn, arg in cases:
    if not _raises(fn, arg):
      bad.append(f"no ValueError naming `{arg}`")
  if bad:
    return Result(measured=np.inf, tolerance=ATOL, detail="; ".join(bad))
  return Result(measured=worst, tolerance=ATOL, detail=f"{len(cases)} bad inputs raise")


# 15. report


@register("onpolicy.report", source="[proposed] oracle report (5,4)",
          statement="report-only: prints the bias / trace-variance table of every estimator at "
                    "(V,T) = (5,4); measured: the worst error of the estimators that are "
                    "unbiased for a target (1e-12)",
          doc=f"{_DOC}#estimator-table")
def _report():
  rows = table_rows(REPORT_SIZE)
  print("\n" + report(REPORT_SIZE) + "\n", flush=True)
  own = [r["max|bias| own"] for r in rows if not np.isnan(r["max|bias| own"])]
  short = ", ".join(f"{r['estimator']}: {r['rel. bias vs g_0']:.2f}/{r['rel. bias vs grad K_R']:.2f}"
                    for r in rows[:6])
  return Result(measured=max(own), tolerance=ATOL,
                detail=f"{len(rows)} estimators; rel. bias vs g_0 / grad K_R: {short}, ... "
                       f"(theory.onpolicy.report())")
