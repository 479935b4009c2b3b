"""Numeric checks of the divergence facts kdjax.divergences relies on (write-up: divergences.md).

Every check draws many random instances in float64 with a fixed seed, evaluates the library
functions and measures how far the claimed (in)equality is from holding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as D
from theory.registry import Result, register

_N = 2000   # random instances per check
_V = 12     # classes


def _random_logits(seed: int, n: int = _N, v: int = _V, *, spread=(0.1, 8.0)) -> np.ndarray:
  """Logits with per-row scales from nearly uniform to nearly one-hot."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(np.log(spread[0]), np.log(spread[1]), size=(n, 1)))
  return rng.normal(size=(n, v)) * scale


def _probs(z):
  return jax.nn.softmax(jnp.asarray(z), axis=-1)


def _binary_entropy(b):
  b = np.asarray(b, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -(b * np.log(b) + (1 - b) * np.log1p(-b))
  return np.nan_to_num(h)


@register("divergences.gibbs", source="[paper] Gibbs' inequality (Cover & Thomas Thm 2.6.3)",
          statement="KL(p||q) >= 0 with equality iff p = q (forward_kl, reverse_kl)",
          doc="divergences.md#gibbs")
def _gibbs():
  zs, zt = _random_logits(0), _random_logits(1)
  fkl = np.asarray(D.forward_kl(zs, zt))
  rkl = np.asarray(D.reverse_kl(zs, zt))
  self_kl = np.asarray(D.forward_kl(zt, zt))
  shifted = np.asarray(D.forward_kl(zt + 3.7, zt))  # same distribution, shifted logits
  # "= 0 only if equal": strictly positive for distinct pairs, quantified by Pinsker's floor.
  tv = np.asarray(D.total_variation(zs, zt))
  floor_gap = np.maximum(2 * tv**2 - np.minimum(fkl, rkl), 0)
  worst = max(-fkl.min(), -rkl.min(), np.abs(self_kl).max(), np.abs(shifted).max(),
              floor_gap.max())
  return Result(measured=float(max(worst, 0.0)), tolerance=1e-12,
                detail=f"min KL over distinct pairs {min(fkl.min(), rkl.min()):.3e}")


@register("divergences.pinsker", source="[paper] Pinsker's inequality",
          statement="TV(p, q) <= sqrt(KL(p||q)/2) in both directions",
          doc="divergences.md#pinsker")
def _pinsker():
  zs, zt = _random_logits(2), _random_logits(3)
  tv = np.asarray(D.total_variation(zs, zt))
  bound = np.sqrt(np.minimum(np.asarray(D.forward_kl(zs, zt)),
                             np.asarray(D.reverse_kl(zs, zt))) / 2)
  return Result(measured=float(np.max(tv - bound)), tolerance=1e-12,
                detail="max of TV - sqrt(KL/2) (negative means the bound holds everywhere)")


@register("divergences.gjsd_bounds", source="[paper] arXiv:2306.13649 (GKD); bound derived",
          statement="0 <= JSD_beta <= H_b(beta) <= log 2 for beta in (0, 1)",
          doc="divergences.md#generalized-jsd")
def _gjsd_bounds():
  zs, zt = _random_logits(4), _random_logits(5, spread=(0.1, 30.0))
  betas = np.random.default_rng(6).uniform(1e-3, 1 - 1e-3, size=(_N,))
  jsd = np.asarray(jax.vmap(lambda s, t, b: D.generalized_jsd(s, t, beta=b))(
      jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(betas)))
  hb = _binary_entropy(betas)
  worst = max(-jsd.min(), np.max(jsd - hb), hb.max() - np.log(2))
  return Result(measured=float(max(worst, 0.0)), tolerance=1e-12,
                detail=f"max JSD/H_b = {np.max(jsd / hb):.4f}")


@register("divergences.gjsd_rescaled_limits",
          source="[proposed] kd_losses.md §4 endpoint convention",
          statement="JSD_b/b -> KL(T||S) as b->0 and JSD_b/(1-b) -> KL(S||T) as b->1 (b=1e-6, "
                    "logit scales <= 1: the error is ~ b chi2(p||q) / (2 KL), not uniform in max p/q)",
          doc="divergences.md#generalized-jsd")
def _gjsd_limits():
  zs, zt = _random_logits(7, n=500, spread=(0.1, 1.0)), _random_logits(8, n=500,
                                                                       spread=(0.1, 1.0))
  b = 1e-6
  lo = np.asarray(D.generalized_jsd(zs, zt, beta=b)) / b
  hi = np.asarray(D.generalized_jsd(zs, zt, beta=1 - b)) / b
  fkl, rkl = np.asarray(D.forward_kl(zs, zt)), np.asarray(D.reverse_kl(zs, zt))
  rel = max(np.max(np.abs(lo - fkl) / fkl), np.max(np.abs(hi - rkl) / rkl))
  return Result(measured=float(rel), tolerance=1e-4)


@register("divergences.skew_kl_bound", source="[proposed] kd_losses.md §2 (derived)",
          statement="0 <= SKL_l, SRKL_l <= log(1/l) for l in {0.05, 0.1, 0.5}, incl. one-hot-like",
          doc="divergences.md#skew-kl")
def _skew_bound():
  zs = _random_logits(9)
  zt = _random_logits(10, spread=(0.1, 200.0))  # includes near-one-hot teachers
  worst = 0.0
  for lam in (0.05, 0.1, 0.5):
    for fn in (D.skew_forward_kl, D.skew_reverse_kl):
      v = np.asarray(fn(zs, zt, skew=lam))
      worst = max(worst, -v.min(), np.max(v - np.log(1 / lam)))
  return Result(measured=float(worst), tolerance=1e-12)


@register("divergences.skew_kl_bound_is_tight", source="[proposed] kd_losses.md §2 (derived)",
          statement="counter-example to a smaller bound: SKL_l reaches log(1/l) - 1e-3 "
                    "(teacher one-hot where the student has ~no mass)",
          doc="divergences.md#skew-kl")
def _skew_tight():
  lam = 0.1
  zt = np.array([[60.0, 0.0, 0.0, 0.0]])
  zs = np.array([[-60.0, 0.0, 0.0, 0.0]])
  v = float(np.asarray(D.skew_forward_kl(zs, zt, skew=lam))[0])
  return Result(measured=v, tolerance=float(np.log(1 / lam) - 1e-3), mode="min",
                detail=f"SKL = {v:.6f}, log(1/l) = {np.log(1 / lam):.6f}")


@register("divergences.forward_kl_gradient", source="[paper] arXiv:1503.02531 (Hinton et al.)",
          statement="d KL(p_T||p_S) / d z_S = (p_S - p_T) / T for T in {0.5, 1, 4}",
          doc="divergences.md#gradient")
def _fkl_grad():
  zs, zt = _random_logits(11, n=500), _random_logits(12, n=500)
  worst = 0.0
  for temp in (0.5, 1.0, 4.0):
    g = jax.grad(lambda s: jnp.sum(D.forward_kl(s, jnp.asarray(zt), temperature=temp)))(
        jnp.asarray(zs))
    expected = (_probs(zs / temp) - _probs(zt / temp)) / temp
    worst = max(worst, float(jnp.max(jnp.abs(g - expected))))
  return Result(measured=worst, tolerance=1e-12)


@register("divergences.reverse_kl_gradient", source="[paper] arXiv:2306.08543 (MiniLLM)",
          statement="d KL(p_S||p_T) / d z_S = p_S (log p_S - log p_T - KL) / T",
          doc="divergences.md#gradient")
def _rkl_grad():
  zs, zt = _random_logits(13, n=500), _random_logits(14, n=500)
  temp = 2.0
  g = jax.grad(lambda s: jnp.sum(D.reverse_kl(s, jnp.asarray(zt), temperature=temp)))(
      jnp.asarray(zs))
  ls = jax.nn.log_softmax(zs / temp, axis=-1)
  lt = jax.nn.log_softmax(zt / temp, axis=-1)
  kl = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1, keepdims=True)
  expected = jnp.exp(ls) * (ls - lt - kl) / temp
  return Result(measured=float(jnp.max(jnp.abs(g - expected))), tolerance=1e-12)


@register("divergences.high_temperature_limit", source="[paper] arXiv:1503.02531 §2.1",
          statement="for zero-mean logits, T^2 * grad KD -> (z_S - z_T)/C as T -> inf "
                    "(error O(1/T): checked at T = 1e2, 1e3, 1e4)",
          doc="divergences.md#high-temperature")
def _high_temp():
  zs, zt = _random_logits(15, n=500, spread=(0.5, 3.0)), _random_logits(16, n=500,
                                                                         spread=(0.5, 3.0))
  zs = zs - zs.mean(-1, keepdims=True)
  zt = zt - zt.mean(-1, keepdims=True)
  target = (zs - zt) / zs.shape[-1]
  errs = []
  for temp in (1e2, 1e3, 1e4):
    g = jax.grad(lambda s: temp**2 * jnp.sum(D.forward_kl(s, jnp.asarray(zt),
                                                          temperature=temp)))(jnp.asarray(zs))
    errs.append(float(jnp.max(jnp.abs(g - target)) / np.max(np.abs(target))))
  # The error must shrink ~10x per decade of T and be small at T = 1e4.
  rates = [errs[i] / errs[i + 1] for i in range(2)]
  ok_rate = min(rates) > 5.0
  return Result(measured=errs[-1] if ok_rate else float("inf"), tolerance=1e-3,
                detail=f"relative errors {errs}, ratios {rates}")


@register("divergences.multi_teacher_forward_identity",
          source="[proposed] kd_losses.md §12 (derived)",
          statement="sum_i KL(p_i||q) = M KL(pbar||q) + M (H(pbar) - mean_i H(p_i)) "
                    "for every q (M in {2, 3, 5})",
          doc="divergences.md#multi-teacher")
def _multi_teacher():
  worst = 0.0
  for m, seed in ((2, 20), (3, 21), (5, 22)):
    zp = _random_logits(seed, n=300 * m).reshape(m, 300, _V)
    zq = _random_logits(seed + 100, n=300)
    lp = jax.nn.log_softmax(jnp.asarray(zp), axis=-1)
    lq = jax.nn.log_softmax(jnp.asarray(zq), axis=-1)
    lhs = jnp.sum(D.kl_from_log(log_p=lp, log_q=jnp.broadcast_to(lq, lp.shape)), axis=0)
    pbar = jnp.mean(jnp.exp(lp), axis=0)
    radius = D.entropy_from_log(jnp.log(pbar)) - jnp.mean(D.entropy_from_log(lp), axis=0)
    rhs = m * D.kl(p=pbar, q=jnp.exp(lq)) + m * radius
    worst = max(worst, float(jnp.max(jnp.abs(lhs - rhs))))
  return Result(measured=worst, tolerance=1e-10)


@register("divergences.kl_asymmetry", source="[paper] KL is not symmetric (counter-example)",
          statement="counter-example: forward and reverse KL differ by >= 0.1 on some pair, so "
                    "the direction in the name matters",
          doc="divergences.md#direction")
def _asymmetry():
  zs, zt = _random_logits(30, n=200), _random_logits(31, n=200)
  gap = np.abs(np.asarray(D.forward_kl(zs, zt)) - np.asarray(D.reverse_kl(zs, zt)))
  return Result(measured=float(gap.max()), tolerance=0.1, mode="min")


@register("divergences.jsd_endpoint_raw_vanishes",
          source="[proposed] kd_losses.md §4 (why the endpoint convention exists)",
          statement="counter-example: the raw JSD formula is 0 at beta = 0 and 1 although "
                    "p_T != p_S, while endpoint='kl' returns forward/reverse KL there",
          doc="divergences.md#generalized-jsd")
def _jsd_raw():
  zs, zt = _random_logits(32, n=200), _random_logits(33, n=200)
  raw0 = np.abs(np.asarray(D.generalized_jsd(zs, zt, beta=0.0, endpoint="raw"))).max()
  raw1 = np.abs(np.asarray(D.generalized_jsd(zs, zt, beta=1.0, endpoint="raw"))).max()
  kl0 = np.asarray(D.generalized_jsd(zs, zt, beta=0.0))
  kl1 = np.asarray(D.generalized_jsd(zs, zt, beta=1.0))
  conv_err = max(np.abs(kl0 - np.asarray(D.forward_kl(zs, zt))).max(),
                 np.abs(kl1 - np.asarray(D.reverse_kl(zs, zt))).max())
  # Found: the divergence is clearly positive, yet the raw formula returns 0.
  found = min(kl0.min(), kl1.min()) if max(raw0, raw1, conv_err) < 1e-12 else 0.0
  return Result(measured=float(found), tolerance=1e-3, mode="min",
                detail=f"raw endpoint values {raw0:.1e}, {raw1:.1e}")
