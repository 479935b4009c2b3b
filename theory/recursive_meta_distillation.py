"""Checks of recursive meta-distillation (write-up: recursive_meta_distillation.md).

Spec §10 checklist. Random simplex points: Dirichlet(c·1), c ∈ 10^U[-1,1], K ∈ [2, 12] drawn per
instance and embedded in 12 classes with zero mass on the unused ones (exactly equivalent for
these coordinatewise operators, and it exercises the -inf paths), clipped to >= 1e-9,
α ~ U(0.01, 0.99), fixed seeds, float64 (the runner enables x64).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from kdjax import divergences as D
from kdjax import operators as ops
from theory.registry import Result, register

_N = 1000
_KMAX = 12
_DOC = "recursive_meta_distillation.md"
_FAMILIES = [("arithmetic", None), ("geometric", None)] + [("power", b) for b in
                                                            (0.0, 0.25, 0.5, 0.75, 1.0)]


def _draws(seed: int, n: int = _N, kmax: int = _KMAX, count: int = 3):
  """`count` padded simplex arrays [n, kmax] sharing the per-instance K, and alpha [n]."""
  rng = np.random.default_rng(seed)
  ks = rng.integers(2, kmax + 1, size=n)
  mask = np.arange(kmax)[None, :] < ks[:, None]
  out = []
  for _ in range(count):
    c = 10.0 ** rng.uniform(-1, 1, size=(n, 1))
    g = rng.standard_gamma(np.broadcast_to(c, (n, kmax)))
    p = np.where(mask, np.maximum(g / np.where(mask, g, 0).sum(-1, keepdims=True), 1e-9), 0.0)
    out.append(p / p.sum(-1, keepdims=True))
  alpha = rng.uniform(0.01, 0.99, size=n)
  return out, alpha


def _log(p):
  p = np.asarray(p)
  with np.errstate(divide="ignore"):
    return jnp.asarray(np.log(p))


def _kl(lp, lq):
  lp, lq = jnp.broadcast_arrays(jnp.asarray(lp), jnp.asarray(lq))
  return np.asarray(D.kl_from_log(log_p=lp, log_q=lq))


def _meta(lp0, lq, alpha, kind, beta=None, temperature=None):
  return ops.meta_teacher(lp0, lq, alpha=alpha, kind=kind, power=beta, temperature=temperature)


# ----------------------------------------------------------------------------- M1, M2


@register("meta.m1_validity", source="[proposed] spec §4.2 M1",
          statement="M_a(p0,q) >= 0 and sums to 1 (atol 1e-12): arithmetic, geometric, power "
          "beta in {0,.25,.5,.75,1}, 1000 draws each", doc=f"{_DOC}#axioms")
def _m1():
  (p0, q), a = _draws(1, count=2)
  worst = 0.0
  for kind, beta in _FAMILIES:
    m = np.exp(np.asarray(_meta(_log(p0), _log(q), a, kind, beta)))
    worst = max(worst, np.abs(m.sum(-1) - 1).max(), -m.min(), float(np.isnan(m).any()))
  return Result(measured=float(worst), tolerance=1e-12)


@register("meta.m2_anchor_fixed_point", source="[proposed] spec §4.2 M2",
          statement="M_a(p0,p0) == p0 (atol 1e-12) for arithmetic, geometric, power beta in "
          "{0,.25,.5,.75,1}", doc=f"{_DOC}#axioms")
def _m2():
  (p0,), a = _draws(2, count=1)
  worst = max(np.abs(np.exp(np.asarray(_meta(_log(p0), _log(p0), a, k, b))) - p0).max()
              for k, b in _FAMILIES)
  return Result(measured=float(worst), tolerance=1e-12)


@register("meta.f3_softened_mixture_not_anchor_consistent",
          source="[proposed] spec §8 F3 (counter-example)",
          statement="F_tau(a p0 + c q), tau=2, moves the anchor (finds |M(p0,p0)-p0| >= 1e-2); "
          "iteration converges to q*~(.4224,.3321,.2455) != p0=(.6,.3,.1)", doc=f"{_DOC}#f3")
def _f3():
  (p0,), a = _draws(3, count=1)
  moved = np.abs(np.exp(np.asarray(_meta(_log(p0), _log(p0), a, "softened_mixture",
                                         temperature=2.0))) - p0).max()
  traj = ops.recurse(_log([.6, .3, .1]), _log([.6, .3, .1]), alpha=0.5, steps=200,
                     kind="softened_mixture", temperature=2.0)
  qstar = np.exp(np.asarray(traj[-1]))
  err = np.abs(qstar - np.array([0.4224, 0.3321, 0.2455])).max()
  measured = moved if err < 1e-4 else 0.0
  return Result(measured=float(measured), tolerance=1e-2, mode="min",
                detail=f"q* = {np.round(qstar, 4)}, |q* - spec| = {err:.1e}")


# ----------------------------------------------------------------------------- M4 contraction


def _contraction_excess(kind, betas, seed):
  (p0, q), a = _draws(seed, count=2)
  lp0, lq = _log(p0), _log(q)
  worst, ratio = -np.inf, 0.0
  base = _kl(lp0, lq)
  for b in betas:
    km = _kl(lp0, _meta(lp0, lq, a, kind, b))
    worst = max(worst, np.max(km - (1 - a) * base))
    ratio = max(ratio, np.max(km / ((1 - a) * base)))
  return worst, ratio


@register("meta.contraction_arithmetic", source="[paper] arXiv:2601.13100 C3; [proposed] Thm 1",
          statement="KL(p0||a p0+(1-a)q) <= (1-a) KL(p0||q) + 1e-12 on 1000 random instances",
          doc=f"{_DOC}#theorem-1")
def _contr_ar():
  worst, ratio = _contraction_excess("arithmetic", [None], 10)
  return Result(measured=float(max(worst, 0)), tolerance=1e-12,
                detail=f"max KL ratio / (1-a) = {ratio:.4f}")


@register("meta.contraction_geometric", source="[paper] arXiv:2601.13100 C3; [proposed] Thm 1",
          statement="KL(p0||p0^a q^(1-a)/Z) <= (1-a) KL(p0||q) + 1e-12 on 1000 instances",
          doc=f"{_DOC}#theorem-1")
def _contr_geo():
  worst, ratio = _contraction_excess("geometric", [None], 11)
  return Result(measured=float(max(worst, 0)), tolerance=1e-12,
                detail=f"max KL ratio / (1-a) = {ratio:.4f}")


@register("meta.contraction_power_mean", source="[proposed] spec §4.3 power mean lemma",
          statement="power-mean anchoring, beta in {0,.25,.5,.75,1}: KL contraction <= (1-a) "
          "+ 1e-12 on 1000 instances per beta", doc=f"{_DOC}#power-mean")
def _contr_pow():
  worst, ratio = _contraction_excess("power", [0.0, 0.25, 0.5, 0.75, 1.0], 12)
  return Result(measured=float(max(worst, 0)), tolerance=1e-12,
                detail=f"max KL ratio / (1-a) = {ratio:.4f}")


@register("meta.f4_power_mean_outside_unit_fails", source="[proposed] spec §8 F4 (counter-example)",
          statement="beta=-0.5 and beta=2 violate KL contraction in 1000 draws, and the two F4 "
          "instances reproduce to 4 decimals", doc=f"{_DOC}#f4")
def _f4():
  found = min(_contraction_excess("power", [b], 13)[0] for b in (-0.5, 2.0))
  ref = [(-0.5, [.5, .5], [.99, .01], 0.9022, 0.8072), (2.0, [.001, .999], [.3, .7], 0.2134,
                                                        0.1748)]
  err = 0.0
  for b, p0, q, lhs, rhs in ref:
    lp0, lq = _log(p0), _log(q)
    got_l = float(_kl(lp0, _meta(lp0, lq, 0.5, "power", b)))
    got_r = 0.5 * float(_kl(lp0, lq))
    err = max(err, abs(got_l - lhs), abs(got_r - rhs))
  measured = found if err < 5e-5 else 0.0
  return Result(measured=float(measured), tolerance=1e-6, mode="min",
                detail=f"smallest worst violation over the two betas {found:.3e}; "
                f"F4 instance error {err:.1e}")


# ----------------------------------------------------------------------------- identities


@register("meta.geometric_identity", source="[proposed] spec §4.3 (derived)",
          statement="KL(p0||G) = (1-a)KL(p0||q) + log Z, log Z = -(1-a) D_a(p0||q) (Renyi), "
          "Z <= 1; rtol 1e-10 on 1000 instances", doc=f"{_DOC}#geometric-identity")
def _geo_identity():
  (p0, q), a = _draws(20, count=2)
  lp0, lq = _log(p0), _log(q)
  g = _meta(lp0, lq, a, "geometric")
  log_z = np.asarray(ops.log_normalizer(jnp.stack([lp0, lq]), weights=np.stack([a, 1 - a]),
                                        kind="geometric"))
  lhs = _kl(lp0, g)
  rhs = (1 - a) * _kl(lp0, lq) + log_z
  with np.errstate(divide="ignore", invalid="ignore"):
    renyi = np.log(np.sum(np.where(p0 > 0, p0 ** a[:, None] * q ** (1 - a[:, None]), 0), -1)) / (
        a - 1)
  e1 = np.abs(lhs - rhs) / np.maximum(np.abs(lhs), 1e-300)
  e2 = np.abs(log_z + (1 - a) * renyi) / np.maximum(np.abs(log_z), 1e-300)
  e1 = np.where(np.abs(lhs - rhs) < 1e-15, 0, e1)
  e2 = np.where(np.abs(log_z + (1 - a) * renyi) < 1e-15, 0, e2)
  worst = max(e1.max(), e2.max(), np.max(log_z))  # log Z > 0 would be a violation
  return Result(measured=float(max(worst, 0)), tolerance=1e-10,
                detail=f"max log Z = {np.max(log_z):.3e}")


@register("meta.pairwise_arithmetic", source="[proposed] spec §4.3 M6 (joint convexity)",
          statement="KL(M(p0,p)||M(p0,q)) <= (1-a) KL(p||q) + 1e-12, and the reverse-direction "
          "contraction KL(M||p0) <= (1-a) KL(q||p0), arithmetic, 1000 instances",
          doc=f"{_DOC}#pairwise")
def _pair_ar():
  (p0, p, q), a = _draws(21)
  lp0, lp, lq = _log(p0), _log(p), _log(q)
  mp, mq = _meta(lp0, lp, a, "arithmetic"), _meta(lp0, lq, a, "arithmetic")
  pair = _kl(mp, mq) - (1 - a) * _kl(lp, lq)
  rev = _kl(mq, lp0) - (1 - a) * _kl(lq, lp0)
  return Result(measured=float(max(pair.max(), rev.max(), 0)), tolerance=1e-12)


@register("meta.f5_geometric_not_pairwise_contraction",
          source="[proposed] spec §8 F5 (counter-example)",
          statement="F5 instance: KL(Mp||Mq)/((1-a)KL(p||q)) > 80 for geometric (arithmetic "
          "satisfies it there); random search also finds a violation", doc=f"{_DOC}#f5")
def _f5():
  lp0, lp, lq = _log([.5, .5]), _log([1e-4, 1 - 1e-4]), _log([1e-8, 1 - 1e-8])
  ratio = _kl(_meta(lp0, lp, .5, "geometric"), _meta(lp0, lq, .5, "geometric")) / (
      0.5 * _kl(lp, lq))
  ar = _kl(_meta(lp0, lp, .5, "arithmetic"), _meta(lp0, lq, .5, "arithmetic")) - 0.5 * _kl(lp, lq)
  (p0, p, q), a = _draws(22)
  rnd = _kl(_meta(_log(p0), _log(p), a, "geometric"), _meta(_log(p0), _log(q), a, "geometric")
            ) / ((1 - a) * _kl(_log(p), _log(q)))
  measured = float(ratio) if (rnd.max() > 1 and ar <= 1e-12) else 0.0
  return Result(measured=measured, tolerance=80.0, mode="min",
                detail=f"random-search max ratio {rnd.max():.3g}; arithmetic excess {ar:.2e}")


@register("meta.f5_reverse_geometric_fails", source="[proposed] spec §8 F5' (counter-example)",
          statement="geometric anchoring, p0=(.5,.5), q=(.999,.001), a=.5: KL(M||p0)=0.5561 > "
          "(1-a)KL(q||p0)=0.3426 (finds excess >= 0.2)", doc=f"{_DOC}#f5")
def _f5r():
  lp0, lq = _log([.5, .5]), _log([.999, .001])
  m = _meta(lp0, lq, .5, "geometric")
  lhs, rhs = float(_kl(m, lp0)), 0.5 * float(_kl(lq, lp0))
  ok = abs(lhs - 0.5561) < 5e-5 and abs(rhs - 0.3426) < 5e-5
  return Result(measured=(lhs - rhs) if ok else 0.0, tolerance=0.2, mode="min",
                detail=f"KL(M||p0)={lhs:.4f}, (1-a)KL(q||p0)={rhs:.4f}")


@register("meta.metric_contractions_exact", source="[proposed] spec §4.3 (derived)",
          statement="arithmetic: ||M(p0,p)-M(p0,q)||_1 = (1-a)||p-q||_1 (so TV too); geometric: "
          "Hilbert metric d_H ratio = 1-a; rtol 1e-10, 1000 instances", doc=f"{_DOC}#metrics")
def _metrics():
  (p0, p, q), a = _draws(23)
  lp0, lp, lq = _log(p0), _log(p), _log(q)
  c = 1 - a
  mp, mq = np.exp(np.asarray(_meta(lp0, lp, a, "arithmetic"))), np.exp(np.asarray(
      _meta(lp0, lq, a, "arithmetic")))
  r1 = np.abs(mp - mq).sum(-1) / np.abs(p - q).sum(-1)
  sup = p0 > 0

  def d_h(x, y):
    with np.errstate(invalid="ignore"):
      r = np.where(sup, np.asarray(x) - np.asarray(y), 0.0)
    return np.where(sup, r, -np.inf).max(-1) - np.where(sup, r, np.inf).min(-1)

  rh = d_h(_meta(lp0, lp, a, "geometric"), _meta(lp0, lq, a, "geometric")) / d_h(lp, lq)
  worst = max(np.max(np.abs(r1 / c - 1)), np.max(np.abs(rh / c - 1)))
  return Result(measured=float(worst), tolerance=1e-10)


# ----------------------------------------------------------------------------- recursion


@register("meta.geometric_convergence", source="[paper] arXiv:2601.13100 C4; [proposed] Thm 2",
          statement="T=50 generations: KL(p0||q_t) <= (1-a)^t KL(p0||q0)(1+1e-9) (arithmetic, "
          "geometric, power .5); arithmetic q_t = p0 + c^t(q0-p0) (atol 1e-12); fitted log-KL "
          "slope <= log c + 1e-6; 200 instances", doc=f"{_DOC}#theorem-2")
def _geo_conv():
  (p0, q0), a = _draws(30, n=200, count=2)
  a = np.clip(a, 0.05, 0.95)
  lp0, lq0 = _log(p0), _log(q0)
  t = np.arange(51)
  worst_bound, worst_slope, closed = -np.inf, -np.inf, 0.0
  for kind, beta in (("arithmetic", None), ("geometric", None), ("power", 0.5)):
    run = jax.vmap(lambda x, y, al: ops.recurse(x, y, alpha=al, steps=50, kind=kind,
                                                power=beta))
    traj = run(lp0, lq0, jnp.asarray(a))                               # [n, 51, K]
    kl = _kl(lp0[:, None], traj)                                        # [n, 51]
    c = (1 - a)[:, None]
    worst_bound = max(worst_bound, np.max(kl - c ** t * kl[:, :1] * (1 + 1e-9)))
    for i in range(len(a)):
      ok = kl[i] > 1e-12  # above the float64 rounding floor of KL
      if ok.sum() >= 3:
        slope = np.polyfit(t[ok], np.log(kl[i, ok]), 1)[0]
        worst_slope = max(worst_slope, slope - np.log(1 - a[i]))
    if kind == "arithmetic":
      closed = np.abs(np.exp(np.asarray(traj)) - (p0[:, None] + c[..., None] ** t[:, None] * (
          q0 - p0)[:, None])).max()
  measured = max(worst_bound, 0.0, (closed - 1e-12) * 1e12, (worst_slope - 1e-6) * 1e12)
  return Result(measured=float(measured), tolerance=1e-12,
                detail=f"bound excess {worst_bound:.2e}; closed-form err {closed:.1e}; "
                f"max slope - log c {worst_slope:.2e}")


@register("meta.unique_fixed_point", source="[paper] arXiv:2601.13100 C4; [proposed] Thm 3",
          statement="from 100 full-support q0, T=ceil(log 1e-10/log c) steps give max|q_T-p0| < "
          "1e-8 (arithmetic, geometric); a root finder on M(p0,q)=q from 20 random starts "
          "returns only p0", doc=f"{_DOC}#theorem-3")
def _unique_fp():
  rng = np.random.default_rng(40)
  k = 6
  p0 = rng.dirichlet(np.ones(k))
  q0 = rng.dirichlet(np.full(k, 0.5), size=100)
  alpha = 0.3
  steps = math.ceil(math.log(1e-10) / math.log(1 - alpha))
  err = 0.0
  for kind in ("arithmetic", "geometric"):
    traj = ops.recurse(jnp.broadcast_to(_log(p0), q0.shape), _log(q0), alpha=alpha,
                       steps=steps, kind=kind)
    err = max(err, np.abs(np.exp(np.asarray(traj[-1])) - p0).max())
  root_err = 0.0
  for kind in ("arithmetic", "geometric"):
    def resid(z, kind=kind):
      lq = jax.nn.log_softmax(jnp.concatenate([z, jnp.zeros(1)]))
      return (_meta(_log(p0), lq, alpha, kind) - lq)[:-1]
    f = jax.jit(resid)
    jac = jax.jit(jax.jacfwd(resid))
    for s in range(10):
      z0 = rng.normal(size=k - 1) * 2
      sol = scipy.optimize.root(lambda z: np.asarray(f(z)), z0, jac=lambda z: np.asarray(jac(z)),
                                tol=1e-14)
      q = np.exp(np.asarray(jax.nn.log_softmax(jnp.concatenate([sol.x, jnp.zeros(1)]))))
      # a converged root with full support must be p0 (near-boundary roots are the spurious
      # fixed points of the geometric map on faces, F6)
      if np.abs(np.asarray(f(sol.x))).max() < 1e-9 and q.min() > 1e-6:
        root_err = max(root_err, np.abs(q - p0).max())
  return Result(measured=float(max(err, root_err * 1e-2)), tolerance=1e-8,
                detail=f"iteration err {err:.1e} ({steps} steps); max root distance {root_err:.1e}")


@register("meta.f6_spurious_fixed_point_geometric", source="[proposed] spec §8 F6 (counter-example)",
          statement="q=(.625,.375,0) is a fixed point of geometric anchoring for p0=(.5,.3,.2) "
          "(atol 1e-15, every a); arithmetic from q reaches p0 within 1e-10 (finds TV >= 0.1)",
          doc=f"{_DOC}#f6")
def _f6():
  lp0, lq = _log([.5, .3, .2]), _log([.625, .375, 0.0])
  fp_err = max(np.abs(np.exp(np.asarray(_meta(lp0, lq, a, "geometric"))) - np.exp(
      np.asarray(lq))).max() for a in (0.1, 0.5, 0.9))
  traj = ops.recurse(lp0, lq, alpha=0.5, steps=40)
  ar_err = np.abs(np.exp(np.asarray(traj[-1])) - np.array([.5, .3, .2])).max()
  tv = 0.5 * np.abs(np.array([.625, .375, 0]) - np.array([.5, .3, .2])).sum()
  measured = tv if (fp_err <= 1e-15 and ar_err <= 1e-10) else 0.0
  return Result(measured=float(measured), tolerance=0.1, mode="min",
                detail=f"geometric fixed-point err {fp_err:.1e}; arithmetic err {ar_err:.1e}")


# ----------------------------------------------------------------------------- capacity


def _mixture_instance():
  rng = np.random.default_rng(50)
  comps = rng.dirichlet(np.full(6, 2.0), size=3)
  p0 = np.array([.3, .3, .4]) @ comps * np.exp(rng.normal(size=6) * 0.3)
  return comps, p0 / p0.sum()


@register("meta.realizable_mixture_projection", source="[proposed] spec §5 (R)+(C)",
          statement="Q = mixtures of J=3 fixed distributions on K=6, p0,q0 in Q: EM projection "
          "(5000 iters) of a p0+(1-a)q_{t-1} returns it (atol 1e-8), 10 generations",
          doc=f"{_DOC}#capacity")
def _realizable():
  comps, _ = _mixture_instance()
  lc = _log(comps)
  p0, q0 = np.array([.2, .5, .3]) @ comps, np.array([.6, .1, .3]) @ comps
  proj = lambda lm: ops.project_mixture(lm, lc, iters=5000)[0]  # noqa: E731
  traj = ops.recurse(_log(p0), _log(q0), alpha=0.3, steps=10, project=proj)
  ref = ops.recurse(_log(p0), _log(q0), alpha=0.3, steps=10)
  return Result(measured=float(np.abs(np.exp(np.asarray(traj)) - np.exp(np.asarray(ref))).max()),
                tolerance=1e-8)


@functools.lru_cache(maxsize=1)
def _capacity_runs():
  comps, p0 = _mixture_instance()
  lc = _log(comps)
  run = jax.jit(jax.vmap(lambda al: ops.recurse(
      _log(p0), _log(comps[0]), alpha=al, steps=200,
      project=ops.mixture_family(lc, iters=300, init_iters=2000))))
  traj = run(jnp.asarray([0.1, 0.5, 0.9]))
  target = ops.project_mixture(_log(p0), lc, iters=20000)[0]
  return p0, traj, target


@register("meta.capacity_limit", source="[paper] arXiv:2601.13100 C6; [proposed] Thm 4(b)",
          statement="p0 not in Q (mixtures, J=3, K=6), a in {.1,.5,.9}, 200 generations: limit "
          "= D_Q(p0) (atol 1e-7), the same for all a; floor min_Q KL(p0||q) > 0",
          doc=f"{_DOC}#theorem-4")
def _cap_limit():
  p0, traj, target = _capacity_runs()
  last = np.exp(np.asarray(traj[:, -1]))
  err = np.abs(last - np.exp(np.asarray(target))).max()
  spread = np.abs(last - last[0]).max()
  floor = float(_kl(_log(p0), target))
  measured = max(err, spread) if floor > 1e-4 else np.inf
  return Result(measured=float(measured), tolerance=1e-7,
                detail=f"floor KL(p0||D_Q p0) = {floor:.4f}; spread over alpha {spread:.1e}")


@register("meta.capacity_monotone_descent", source="[proposed] Thm 4(a) (derived)",
          statement="projected arithmetic recursion: KL(p0||q_t) non-increasing and KL(p0||q_t) "
          "+ (c/a) KL(q_{t-1}||q_t) <= KL(p0||q_{t-1}) at every step (+1e-12)",
          doc=f"{_DOC}#theorem-4")
def _cap_descent():
  p0, traj, _ = _capacity_runs()
  lp0 = _log(p0)
  kl = _kl(lp0, traj)                                                   # [3, 201]
  step = _kl(traj[:, :-1], traj[:, 1:])                                  # [3, 200]
  a = np.array([0.1, 0.5, 0.9])[:, None]
  mono = np.max(np.diff(kl, axis=1))
  descent = np.max(kl[:, 1:] + (1 - a) / a * step - kl[:, :-1])
  return Result(measured=float(max(mono, descent, 0)), tolerance=1e-12,
                detail=f"max increase {mono:.1e}; max descent-inequality excess {descent:.1e}")


# ----------------------------------------------------------------------------- stochastic model


_P0 = np.array([.4, .25, .15, .12, .08])


@jax.jit
def _meta_ar_jit(lp0, lq, alpha):
  # One compilation shared by every chain run (alpha traced, fixed [chains, 5] shape).
  return jnp.exp(_meta(lp0, lq, alpha, "arithmetic"))


def _multinomial(rng, n, probs):
  """Exact Mult(n, probs) draws for a batch of rows, as conditional binomials (vectorised)."""
  counts = np.zeros(probs.shape, np.int64)
  left = np.full(probs.shape[0], n, np.int64)
  rest = np.ones(probs.shape[0])
  for k in range(probs.shape[1] - 1):
    pk = np.clip(np.where(rest > 0, probs[:, k] / np.where(rest > 0, rest, 1.0), 0.0), 0.0, 1.0)
    counts[:, k] = rng.binomial(left, pk)
    left -= counts[:, k]
    rest = rest - probs[:, k]
  counts[:, -1] = left
  return counts


def _chains(alpha, *, chains=20000, n=50, steps=300, q0=None, seed=0, keep=()):
  """n q̂_t | m_t ~ Mult(n, m_t), m_t = M^ar_alpha(p0, q̂_{t-1}) (library operator)."""
  rng = np.random.default_rng(seed)
  q = np.broadcast_to(_P0 if q0 is None else q0, (chains, 5)).copy()
  lp0 = jnp.broadcast_to(_log(_P0), q.shape)
  a = jnp.asarray(alpha, jnp.float64)
  kept = {}
  for t in range(1, steps + 1):
    m = np.maximum(np.asarray(_meta_ar_jit(lp0, _log(q), a)), 0)
    q = _multinomial(rng, n, m / m.sum(-1, keepdims=True)) / n
    if t in keep:
      kept[t] = q.copy()
  return q, kept


def _cov_recursion(alpha, q0, n, t_max):
  c = 1 - alpha
  mu, cov, out = q0.copy(), np.zeros((5, 5)), {}
  for t in range(1, t_max + 1):
    mu_prev = mu
    m = alpha * _P0 + c * mu_prev
    cov = (np.diag(m) - np.outer(m, m)) / n + c ** 2 * (1 - 1 / n) * cov
    mu = m
    out[t] = (mu.copy(), cov.copy())
  return out


@register("meta.bias_variance", source="[proposed] spec §7 (derived)",
          statement="multinomial model K=5, n=50, 20k chains, T=300, a in {.1,.3}: mean within "
          "3e-3 of p0, covariance within 3% of Sigma_1/(n a(2-a)+c^2), finite-t C_t recursion "
          "matches Monte Carlo at t=1,2,5 within 5%", doc=f"{_DOC}#bias-variance")
def _bias_var():
  n = 50
  worst_mean, worst_cov, worst_t = 0.0, 0.0, 0.0
  u = np.full(5, 0.2)
  for i, a in enumerate((0.1, 0.3)):
    c = 1 - a
    q, kept = _chains(a, n=n, q0=u, seed=60 + i, keep=(1, 2, 5))
    worst_mean = max(worst_mean, np.abs(q.mean(0) - _P0).max())
    sigma1 = np.diag(_P0) - np.outer(_P0, _P0)
    c_inf = sigma1 / (n * a * (2 - a) + c ** 2)
    worst_cov = max(worst_cov, np.abs(np.cov(q.T) - c_inf).max() / np.abs(c_inf).max())
    rec = _cov_recursion(a, u, n, 5)
    for t in (1, 2, 5):
      worst_t = max(worst_t, np.abs(np.cov(kept[t].T) - rec[t][1]).max() / np.abs(
          rec[t][1]).max())
  measured = max(worst_mean / 3e-3, worst_cov / 0.03, worst_t / 0.05)
  return Result(measured=float(measured), tolerance=1.0,
                detail=f"(normalised by tolerance) mean err {worst_mean:.1e}, stationary cov "
                f"rel err {worst_cov:.3f}, finite-t rel err {worst_t:.3f}")


@register("meta.f1_collapse_without_anchor", source="[proposed] spec §8 F1 (counter-example)",
          statement="a=0, uniform start, n=50, T=300, 20k chains: > 95% of chains at a vertex, "
          "mean entropy < 0.05, Cov = (diag u - uu^T)(1-(1-1/n)^T) within 5%; with a=0.1 no "
          "collapse and mean entropy > 1.0 (finds the collapse fraction)", doc=f"{_DOC}#f1")
def _f1():
  n, steps = 50, 300
  u = np.full(5, 0.2)
  q0, _ = _chains(0.0, n=n, q0=u, seed=70, steps=steps)
  collapsed = np.mean(q0.max(-1) == 1.0)
  ent = np.mean(-np.sum(np.where(q0 > 0, q0 * np.log(np.where(q0 > 0, q0, 1)), 0), -1))
  cov_ref = (np.diag(u) - np.outer(u, u)) * (1 - (1 - 1 / n) ** steps)
  cov_err = np.abs(np.cov(q0.T) - cov_ref).max() / np.abs(cov_ref).max()
  q1, _ = _chains(0.1, n=n, q0=u, seed=71, steps=steps)
  collapsed1 = np.mean(q1.max(-1) == 1.0)
  ent1 = np.mean(-np.sum(np.where(q1 > 0, q1 * np.log(np.where(q1 > 0, q1, 1)), 0), -1))
  ok = ent < 0.05 and cov_err < 0.05 and collapsed1 == 0 and ent1 > 1.0
  return Result(measured=float(collapsed if ok else 0.0), tolerance=0.95, mode="min",
                detail=f"a=0: entropy {ent:.4f}, cov rel err {cov_err:.3f}; a=0.1: collapse "
                f"{collapsed1:.3f}, entropy {ent1:.3f}")


# ----------------------------------------------------------------------------- aggregation


def _teachers(seed, m=3):
  (a_, b_, c_, r), _ = _draws(seed, count=4)
  w = np.random.default_rng(seed + 1).dirichlet(np.ones(m), size=_N)
  return np.stack([a_, b_, c_]), r, w.T


@register("meta.aggregation_bounds", source="[proposed] spec §3 (derived; arXiv:2601.09165)",
          statement="KL(r||A_w) <= sum_i w_i KL(r||p_i) (+1e-12) for arithmetic and geometric; "
          "arithmetic log-loss bound; geometric identity with log Z (rtol 1e-10)",
          doc=f"{_DOC}#aggregation")
def _agg_bounds():
  ps, r, w = _teachers(80)
  lps, lr = _log(ps), _log(r)
  avg = np.sum(w * np.stack([_kl(lr, lps[i]) for i in range(3)]), 0)
  ar = _kl(lr, ops.aggregate(lps, weights=w))
  geo = _kl(lr, ops.aggregate(lps, weights=w, kind="geometric"))
  log_z = np.asarray(ops.log_normalizer(lps, weights=w, kind="geometric"))
  ident = np.abs(geo - (avg + log_z)) / np.maximum(np.abs(geo), 1.0)
  y = np.argmax(r, -1)
  pool = np.exp(np.asarray(ops.aggregate(lps, weights=w)))
  ll = -np.log(pool[np.arange(_N), y]) - np.sum(w * -np.log(ps[:, np.arange(_N), y]), 0)
  worst = max(np.max(ar - avg), np.max(geo - avg), np.max(ll), 0.0)
  return Result(measured=float(max(worst, ident.max() * 1e-2)), tolerance=1e-12,
                detail=f"geometric identity rel err {ident.max():.1e}")


@register("meta.safety_attenuation", source="[proposed] spec §3 (derived; arXiv:2601.09165)",
          statement="only teacher j puts mass eps on S: arithmetic pool puts w_j eps (rtol "
          "1e-12); geometric pool puts exactly 0", doc=f"{_DOC}#aggregation")
def _safety():
  rng = np.random.default_rng(81)
  eps = 10.0 ** rng.uniform(-6, -1, size=200)
  base = rng.dirichlet(np.ones(4), size=(3, 200))
  ps = np.concatenate([base, np.zeros((3, 200, 1))], -1)
  ps[1, :, :4] *= (1 - eps)[:, None]
  ps[1, :, 4] = eps
  w = rng.dirichlet(np.ones(3), size=200).T
  ar = np.exp(np.asarray(ops.aggregate(_log(ps), weights=w)))[:, 4]
  geo = np.exp(np.asarray(ops.aggregate(_log(ps), weights=w, kind="geometric")))[:, 4]
  rel = np.abs(ar - w[1] * eps) / (w[1] * eps)
  return Result(measured=float(max(rel.max(), geo.max())), tolerance=1e-12)


@register("meta.ensemble_variance", source="[paper] arXiv:2601.09165 (variance reduction); "
          "[proposed] formula", statement="uniform arithmetic pool of M in {2,5,10} teachers with "
          "zero-sum noise of pairwise correlation rho in {0,.3,.7}: Cov = Sigma(rho+(1-rho)/M) "
          "within 5%, 1e5 samples", doc=f"{_DOC}#aggregation")
def _ens_var():
  rng = np.random.default_rng(82)
  pbar = np.array([.4, .3, .2, .1])
  proj = np.eye(4) - 0.25
  a_mat = proj @ rng.normal(size=(4, 4)) * 0.01
  sigma = a_mat @ a_mat.T
  worst = 0.0
  for m in (2, 5, 10):
    for rho in (0.0, 0.3, 0.7):
      z0 = rng.normal(size=(100000, 4)) @ a_mat.T
      zi = rng.normal(size=(m, 100000, 4)) @ a_mat.T
      ps = pbar + np.sqrt(rho) * z0 + np.sqrt(1 - rho) * zi
      assert ps.min() > 0
      pool = np.exp(np.asarray(ops.aggregate(_log(ps))))
      ref = sigma * (rho + (1 - rho) / m)
      worst = max(worst, np.abs(np.cov(pool.T) - ref).max() / np.abs(ref).max())
  return Result(measured=float(worst), tolerance=0.05)


@register("meta.temperature_coherence_geometric", source="[proposed] spec §3 G5 (derived)",
          statement="F_T(G_w(p_1..p_M)) = G_w(F_T p_1, .., F_T p_M) for power softening, "
          "atol 1e-12, T in [0.25, 4], 1000 instances", doc=f"{_DOC}#aggregation")
def _coh_geo():
  ps, _, w = _teachers(83)
  t = 2.0 ** np.random.default_rng(84).uniform(-2, 2, size=(_N, 1))
  lhs = ops.soften(ops.aggregate(_log(ps), weights=w, kind="geometric"), temperature=t)
  rhs = ops.aggregate(ops.soften(_log(ps), temperature=t[None]), weights=w, kind="geometric")
  return Result(measured=float(np.abs(np.exp(np.asarray(lhs)) - np.exp(np.asarray(rhs))).max()),
                tolerance=1e-12)


@register("meta.temperature_coherence_arithmetic_fails",
          source="[proposed] spec §3 G5 (counter-example)",
          statement="the arithmetic pool does not commute with power softening: finds "
          "max |F_T(A) - A(F_T)| >= 1e-2", doc=f"{_DOC}#aggregation")
def _coh_ar():
  ps, _, w = _teachers(85)
  lhs = ops.soften(ops.aggregate(_log(ps), weights=w), temperature=2.0)
  rhs = ops.aggregate(ops.soften(_log(ps), temperature=2.0), weights=w)
  return Result(measured=float(np.abs(np.exp(np.asarray(lhs)) - np.exp(np.asarray(rhs))).max()),
                tolerance=1e-2, mode="min")


# ----------------------------------------------------------------------------- softening


def _softening(kind):
  rep = ops.check_softening_axioms(lambda lp, t: ops.soften(lp, temperature=t, kind=kind),
                                   num_draws=1000, num_classes=(2, 12),
                                   low_temperature=1e-3 if kind == "power" else None)
  v = rep.violations
  # spec §10.17 tolerances; S5 includes |F_1e4 - u| (1e-3) and the T=1e-3 one-hot (1e-6)
  norm = max(v["S1"] / 1e-12, v["S3"] / 1e-12, v["S4"] / 1e-14, v["S5"] / 1e-3,
             v["S2"] / 1e-5)
  return Result(measured=float(norm), tolerance=1.0,
                detail="normalised by tolerance; " + ", ".join(f"{k}={x:.1e}"
                                                               for k, x in v.items()))


@register("meta.softening_axioms_power", source="[paper] arXiv:2601.03195 axioms; [proposed] S1-S5",
          statement="power family: ranking, F_1=id (1e-14), H(F_T) non-decreasing on 200 T in "
          "[1,100], F_1e4 ~ u (1e-3), T=1e-3 one-hot on a unique argmax; 1000 draws, K in {2,12}",
          doc=f"{_DOC}#softening")
def _soft_pow():
  return _softening("power")


@register("meta.softening_axioms_mixing", source="[paper] arXiv:2601.03195 axioms; [proposed] S1-S5",
          statement="uniform-mixing family (T >= 1): ranking, F_1=id, entropy monotone, "
          "F_1e4 ~ u; T -> 0 undefined (documented)", doc=f"{_DOC}#softening")
def _soft_mix():
  return _softening("mixing")


# ----------------------------------------------------------------------------- kernel bridge


def _kernel_instance():
  rng = np.random.default_rng(90)
  n = 30
  x = rng.normal(size=(n, 3))
  gram = np.exp(-0.5 * ((x[:, None] - x[None]) ** 2).sum(-1))
  y = rng.normal(size=n)
  return jnp.asarray(gram), jnp.asarray(y), 0.3


def _kernel_map(yp, theta, gram, y, lam):
  a_mat = gram @ jnp.linalg.inv(gram + lam * jnp.eye(gram.shape[0]))
  return a_mat @ (theta * y + (1 - theta) * yp)


@register("meta.kernel_bridge", source="[proposed] Thm 4(d) (kernel_self_distillation.md)",
          statement="y' -> A(a y + c y') is an l2 contraction with factor c max eig(A) on "
          "random pairs, and its fixed point is K(K + lam/a I)^{-1} y (atol 1e-10)",
          doc=f"{_DOC}#theorem-4")
def _kernel():
  gram, y, lam = _kernel_instance()
  eig = np.linalg.eigvalsh(np.asarray(gram))
  amax = np.max(eig / (eig + lam))
  rng = np.random.default_rng(91)
  worst = -np.inf
  for alpha in (0.1, 0.5, 0.9):
    y1, y2 = rng.normal(size=(2, 200, 30))
    d = jax.vmap(lambda u, v: _kernel_map(u, alpha, gram, y, lam) - _kernel_map(
        v, alpha, gram, y, lam))(jnp.asarray(y1), jnp.asarray(y2))
    ratio = np.linalg.norm(d, axis=-1) / np.linalg.norm(y1 - y2, axis=-1)
    worst = max(worst, np.max(ratio - (1 - alpha) * amax))
  fp_err = 0.0
  for alpha in (0.1, 0.5, 0.9):
    fp = ops.fixed_point(lambda v, th: _kernel_map(v, th, gram, y, lam), jnp.zeros(30),
                         jnp.asarray(alpha), iters=2000)
    closed = gram @ jnp.linalg.solve(gram + lam / alpha * jnp.eye(30), y)
    fp_err = max(fp_err, float(jnp.abs(fp - closed).max()))
  return Result(measured=float(max(worst, 0, fp_err)), tolerance=1e-10,
                detail=f"contraction excess {worst:.1e}; fixed point err {fp_err:.1e}")


@register("meta.implicit_vs_unrolled_gradient", source="[proposed] spec §9 (jaxopt pattern)",
          statement="d y_inf / d a from implicit differentiation (kdjax.operators.fixed_point) = "
          "derivative of the closed form = central finite difference (h=1e-6), rtol 1e-6",
          doc=f"{_DOC}#theorem-4")
def _implicit():
  gram, y, lam = _kernel_instance()
  alpha = 0.4
  impl = jax.jacrev(lambda th: ops.fixed_point(
      lambda v, t: _kernel_map(v, t, gram, y, lam), jnp.zeros(30), th, iters=2000))(alpha)
  closed_fn = lambda th: gram @ jnp.linalg.solve(gram + lam / th * jnp.eye(30), y)  # noqa
  closed = jax.jacfwd(closed_fn)(alpha)
  fd = (closed_fn(alpha + 1e-6) - closed_fn(alpha - 1e-6)) / 2e-6
  scale = np.abs(closed).max()
  err = max(np.abs(impl - closed).max(), np.abs(fd - closed).max()) / scale
  return Result(measured=float(err), tolerance=1e-6)
