"""Numeric checks of ADPO (arXiv:2510.18913): reductions, closed form, trust region, variants,
adaptive temperature, anchors. Write-up: theory/adpo.md; spec: adpo.md §9 (verification
checklist). Defaults: float64, P in {2, 4, 8}, batch 16, logits ~ N(0, 4), fixed seeds.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as D
from kdjax import preference as P
from theory.registry import Result, register

_B = 16
_PS = (2, 4, 8)
_DOC = "adpo.md"


def _rng(seed):
  return np.random.default_rng(seed)


def _logits(rng, *shape, std=2.0):
  return rng.normal(size=shape) * std


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _maxabs(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------- reductions

# One jitted call per check (eager dispatch of many small ops dominates otherwise).
_loss = jax.jit(lambda lp, lr, q, tau: P.adpo_loss(lp, lr, q, temperature=tau))
_loss_grads = jax.jit(jax.grad(lambda lp, lr, q, tau: P.adpo_loss(lp, lr, q, temperature=tau).sum(),
                               (0, 1)))
_dpo = jax.jit(jax.value_and_grad(
    lambda lp, lr, beta: P.dpo_loss(lp[:, 0], lp[:, 1], lr[:, 0], lr[:, 1], beta=beta).sum(),
    (0, 1)))
_soft_dpo = jax.jit(jax.grad(lambda lp, lr, qw, beta: P.soft_dpo_loss(
    lp[:, 0], lp[:, 1], lr[:, 0], lr[:, 1], qw, beta=beta).sum()))


def _per_group(values, n):
  """Repeats each hyper-parameter value over n groups: a per-group tau/beta vector."""
  return np.repeat(np.asarray(values, dtype=np.float64), n)


@register("adpo.dpo_reduction", source="[paper] arXiv:2510.18913 Table 1",
          statement="P=2, q=(1,0), tau=1/beta: adpo_loss = -log sigmoid(beta*[(lw-rw)-(ll-rl)]) "
          "in value and gradient (beta in {0.1,0.5,2})", doc=f"{_DOC}#special-cases")
def _dpo_reduction():
  rng = _rng(0)
  beta = _per_group((0.1, 0.5, 2.0), _B)
  n = beta.size
  lp, lr = _logits(rng, n, 2), _logits(rng, n, 2)
  q = np.tile([1.0, 0.0], (n, 1))
  # closed form written out here as the oracle: -log sigma(x) = log(1 + e^{-x})
  delta = beta * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))
  oracle = np.logaddexp(0.0, -delta)
  dpo_val = P.dpo_loss(lp[:, 0], lp[:, 1], lr[:, 0], lr[:, 1], beta=beta)
  _, dpo_grads = _dpo(lp, lr, beta)
  adpo_grads = _loss_grads(lp, lr, q, 1 / beta)
  worst = max(_maxabs(_loss(lp, lr, q, 1 / beta), oracle), _maxabs(dpo_val, oracle),
              *(_maxabs(a, b) for a, b in zip(adpo_grads, dpo_grads)))
  return Result(measured=worst, tolerance=1e-8, detail="max abs error, value and gradient")


@register("adpo.soft_dpo_reduction", source="[paper] arXiv:2510.18913 Table 1",
          statement="P=2, q=(q_w,1-q_w): adpo_loss = -q_w log s(D) - (1-q_w) log s(-D), "
          "D = u_w - u_l, value and gradient; Bradley-Terry q_w = s((r_w-r_l)/beta_r)",
          doc=f"{_DOC}#special-cases")
def _soft_dpo_reduction():
  rng = _rng(1)
  beta = _per_group((0.1, 0.5, 2.0), _B)
  n = beta.size
  lp, lr = _logits(rng, n, 2), _logits(rng, n, 2)
  qw = rng.uniform(size=n)
  q = np.stack([qw, 1 - qw], -1)
  d = beta * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))
  oracle = qw * np.logaddexp(0, -d) + (1 - qw) * np.logaddexp(0, d)
  worst = max(_maxabs(_loss(lp, lr, q, 1 / beta), oracle),
              _maxabs(_loss_grads(lp, lr, q, 1 / beta)[0], _soft_dpo(lp, lr, qw, beta)))
  rw, rl = rng.normal(size=n), rng.normal(size=n)
  qbt = P.bradley_terry_target(rw, rl, beta_r=0.7)
  worst = max(worst, _maxabs(qbt[:, 0], 1 / (1 + np.exp(-(rw - rl) / 0.7))))
  return Result(measured=worst, tolerance=1e-8)


@register("adpo.kd_reduction", source="[paper] arXiv:2510.18913 Table 1",
          statement="l=log softmax(z_S), uniform anchor, tau=T in {1,2,4}, q=softmax(z_T/T), "
          "V=32: value = CE(softmax(z_T/T), softmax(z_S/T)); grad in z_S = grad of forward KL",
          doc=f"{_DOC}#special-cases")
def _kd_reduction():
  rng = _rng(2)
  t = _per_group((1.0, 2.0, 4.0), _B)
  n = t.size
  zs, zt = _logits(rng, n, 32), _logits(rng, n, 32)
  q = _softmax(zt / t[:, None])
  ce = -(q * np.log(_softmax(zs / t[:, None]))).sum(-1)
  f = lambda z: P.adpo_loss(jax.nn.log_softmax(z), jnp.zeros_like(z), q, temperature=t)
  g_adpo = jax.jit(jax.grad(lambda z: f(z).sum()))(zs)
  g_kd = jax.jit(jax.grad(lambda z: D.forward_kl(z, zt, temperature=t).sum()))(zs)
  worst = max(_maxabs(jax.jit(f)(zs), ce), _maxabs(g_adpo, g_kd))
  return Result(measured=worst, tolerance=1e-8, detail="Hinton KD without the T^2 factor")


@register("adpo.sft_reduction", source="[paper] arXiv:2510.18913 Table 1",
          statement="q=e_y, constant anchor, tau=1, full support: adpo_loss = -log pi(y)",
          doc=f"{_DOC}#special-cases")
def _sft_reduction():
  rng = _rng(3)
  worst = 0.0
  for p in _PS:
    z = _logits(rng, _B, p)
    logpi = z - np.log(np.exp(z).sum(-1, keepdims=True))
    y = rng.integers(0, p, size=_B)
    const = rng.normal(size=(_B, 1)) * np.ones((1, p))
    loss = _loss(logpi, const, P.one_hot_winner(np.eye(p)[y]), 1.0)
    worst = max(worst, _maxabs(loss, -logpi[np.arange(_B), y]))
  return Result(measured=worst, tolerance=1e-8)


@jax.jit
def _optimise_free_logits(q, lref, tau):
  """Minimises adpo_loss over free logits l: 300 gradient-descent steps (step 2 tau^2, stable
  since the Hessian is <= 1/(2 tau^2)), then 20 Newton steps on the autodiff Hessian (+ 1 1^T
  on the null direction, which leaves the step in 1-perp unchanged)."""
  def loss1(l, lr_, q_, t_):
    return P.adpo_loss(l, lr_, q_, temperature=t_)

  grad1 = jax.grad(loss1)
  hess1 = jax.hessian(loss1)
  p = q.shape[-1]

  def gd(_, l):
    return l - 2 * tau[:, None] ** 2 * jax.vmap(grad1)(l, lref, q, tau)

  def newton(_, l):
    g = jax.vmap(grad1)(l, lref, q, tau)
    h = jax.vmap(hess1)(l, lref, q, tau) + jnp.ones((p, p)) / p
    return l - jnp.linalg.solve(h, g[..., None])[..., 0]

  l = jax.lax.fori_loop(0, 300, gd, jnp.zeros_like(lref))
  return jax.lax.fori_loop(0, 20, newton, l)


@register("adpo.maxent_reduction", source="[paper] arXiv:2510.18913 Table 1",
          statement="optimising free logits with q=softmax(Q/alpha), uniform anchor, tau=1 "
          "converges to the Boltzmann policy softmax(Q/alpha) (max-abs error < 1e-8)",
          doc=f"{_DOC}#special-cases")
def _maxent_reduction():
  rng = _rng(4)
  worst = 0.0
  alpha = _per_group((0.5, 1.0, 2.0), _B)
  for p in _PS:
    qv = rng.normal(size=(alpha.size, p)) * 2
    q = P.teacher_target(qv, temperature=alpha[:, None])
    l = _optimise_free_logits(q, np.zeros_like(qv), np.ones_like(alpha))
    worst = max(worst, _maxabs(jax.nn.softmax(l), _softmax(qv / alpha[:, None])))
  return Result(measured=worst, tolerance=1e-8, detail="300 GD steps + 20 Newton steps")


@register("adpo.closed_form_optimum", source="[paper] arXiv:2510.18913 Prop. 3.1",
          statement="optimising free logits reaches pi* = pi_ref q^tau / Z within 1e-8 "
          "(tau in {0.5,1,2}, P in {2,4,8}); uniform q gives back pi_ref",
          doc=f"{_DOC}#closed-form")
def _closed_form():
  rng = _rng(5)
  worst = 0.0
  tau = _per_group((0.5, 1.0, 2.0), _B)
  for p in _PS:
    lref = _logits(rng, tau.size, p)
    lref = lref - np.log(np.exp(lref).sum(-1, keepdims=True))  # log pi_ref
    q = _softmax(rng.normal(size=(tau.size, p)))
    q[:4] = 1.0 / p  # uniform targets: the optimum is pi_ref itself
    l = _optimise_free_logits(q, lref, tau)
    star = np.exp(lref) * q ** tau[:, None]
    star /= star.sum(-1, keepdims=True)
    worst = max(worst, _maxabs(jax.nn.softmax(l), star))
  return Result(measured=worst, tolerance=1e-8, detail="300 GD steps + 20 Newton steps")


_ce_grad_u = jax.jit(jax.grad(lambda u, q: P.anchored_ce(u, q).sum()))


@register("adpo.shift_invariance", source="[paper] arXiv:2510.18913 Sec. 3",
          statement="loss unchanged under l -> l + c1 and l_ref -> l_ref + c1; "
          "1^T grad_u L = 0 (atol 1e-12)", doc=f"{_DOC}#gradient")
def _shift():
  rng = _rng(6)
  worst = 0.0
  for p in _PS:
    lp, lr = _logits(rng, _B, p), _logits(rng, _B, p)
    q = _softmax(rng.normal(size=(_B, p)))
    c1, c2 = rng.normal(size=(_B, 1)) * 10, rng.normal(size=(_B, 1)) * 10
    base = _loss(lp, lr, q, 0.7)
    worst = max(worst, _maxabs(_loss(lp + c1, lr, q, 0.7), base),
                _maxabs(_loss(lp, lr + c2, q, 0.7), base))
    gu = _ce_grad_u((lp - lr) / 0.7, q)
    worst = max(worst, float(np.max(np.abs(np.sum(gu, -1)))))
  return Result(measured=worst, tolerance=1e-12)


@register("adpo.gradient_formula", source="[paper] arXiv:2510.18913 Eq. (2)",
          statement="autodiff grad_l L = (p_tilde - q)/tau and grad_{l_ref} L = -(p_tilde - q)/tau",
          doc=f"{_DOC}#gradient")
def _grad_formula():
  rng = _rng(7)
  worst = 0.0
  tau = _per_group((0.3, 1.0, 3.0), _B)
  for p in _PS:
    lp, lr = _logits(rng, tau.size, p), _logits(rng, tau.size, p)
    q = _softmax(rng.normal(size=(tau.size, p)))
    pt = _softmax((lp - lr) / tau[:, None])
    g, gr = _loss_grads(lp, lr, q, tau)
    expect = (pt - q) / tau[:, None]
    worst = max(worst, _maxabs(g, expect), _maxabs(gr, -expect))
  return Result(measured=worst, tolerance=1e-8)


# ----------------------------------------------------------------------------- trust region


# Batched Hessian in l of the per-group loss: [n, P] inputs, per-group tau [n] -> [n, P, P].
_hess_batch = jax.jit(jax.vmap(jax.hessian(
    lambda l, lr, q, t: P.adpo_loss(l, lr, q, temperature=t))))


def _fisher(pt):
  return np.einsum("bi,ij->bij", pt, np.eye(pt.shape[-1])) - np.einsum("bi,bj->bij", pt, pt)


@register("adpo.hessian_random_points", source="[proposed] exact form of the paper's trust region",
          statement="jax.hessian in l = (Diag(p~) - p~p~^T)/tau^2 at random (non-optimal) points,"
          " for soft and one-hot q (independent of q)", doc=f"{_DOC}#trust-region")
def _hessian():
  rng = _rng(8)
  worst = 0.0
  tau = _per_group((0.3, 1.0, 3.0), _B)
  for p in _PS:
    lp, lr = _logits(rng, tau.size, p), _logits(rng, tau.size, p)
    pt = _softmax((lp - lr) / tau[:, None])
    f = _fisher(pt) / tau[:, None, None] ** 2
    q = _softmax(rng.normal(size=(tau.size, p)))
    q[::2] = np.eye(p)[rng.integers(0, p, size=q[::2].shape[0])]
    worst = max(worst, _maxabs(_hess_batch(lp, lr, q, tau), f))
  return Result(measured=worst, tolerance=1e-8)


@register("adpo.hessian_null_psd", source="[paper] arXiv:2510.18913 Sec. 3.5 (Fisher on 1-perp)",
          statement="the Hessian in l has null vector 1 and is PSD (min eigenvalue >= -1e-12)",
          doc=f"{_DOC}#trust-region")
def _null_psd():
  rng = _rng(9)
  worst_null, min_eig = 0.0, np.inf
  for p in _PS:
    lp, lr = _logits(rng, _B, p), _logits(rng, _B, p)
    h = np.asarray(_hess_batch(lp, lr, _softmax(rng.normal(size=(_B, p))),
                               rng.uniform(0.2, 3, size=_B)))
    worst_null = max(worst_null, float(np.max(np.abs(h @ np.ones(p)))))
    min_eig = min(min_eig, float(np.linalg.eigvalsh(h).min()))
  return Result(measured=max(worst_null, -min_eig), tolerance=1e-12,
                detail=f"max |H 1| = {worst_null:.1e}, min eigenvalue {min_eig:.1e}")


@register("adpo.curvature_ratio", source="[paper] arXiv:2510.18913 Sec. 3.5 (curvature ~ 1/tau^2)",
          statement="at equal p~ (l - l_ref = tau u), H(tau1)/H(tau2) = (tau2/tau1)^2",
          doc=f"{_DOC}#trust-region")
def _curv_ratio():
  rng = _rng(10)
  worst = 0.0
  t1 = _per_group((0.5, 1.0, 0.2), _B)
  t2 = _per_group((1.0, 3.0, 2.0), _B)
  for p in _PS:
    u = rng.normal(size=(t1.size, p)) * 2
    lr = _logits(rng, t1.size, p)
    q = _softmax(rng.normal(size=(t1.size, p)))
    h1 = np.asarray(_hess_batch(lr + t1[:, None] * u, lr, q, t1))
    h2 = np.asarray(_hess_batch(lr + t2[:, None] * u, lr, q, t2))
    ratio = np.broadcast_to(((t2 / t1) ** 2)[:, None, None], h1.shape)
    nz = np.abs(h2) > 1e-6
    worst = max(worst, float(np.max(np.abs(h1[nz] / h2[nz] - ratio[nz]) / ratio[nz])))
  return Result(measured=worst, tolerance=1e-8, detail="relative error of the ratio")


@register("adpo.kl_quadratic_model", source="[proposed] exact form of the paper's trust region",
          statement="KL(p~(l) || p~(l+d)) - d^T F d/(2 tau^2) = O(|d|^3): log-log slope in "
          "[2.8, 3.2] over |d| in [1e-4, 1e-2]", doc=f"{_DOC}#trust-region")
def _kl_cubic():
  rng = _rng(11)
  kl_fn = jax.jit(lambda lp, lr, q, t: P.adpo_kl(lp, lr, q, temperature=t))
  scales = np.logspace(-4, -2, 7)
  slopes = []
  for p in (4, 8):
    tau = np.repeat([0.5, 2.0, 1.0], scales.size)
    n = tau.size // scales.size
    lp, lr = np.repeat(_logits(rng, n, p), scales.size, 0), np.repeat(_logits(rng, n, p),
                                                                      scales.size, 0)
    d0 = rng.normal(size=(n, p))
    d0 /= np.linalg.norm(d0, axis=-1, keepdims=True)
    d = np.repeat(d0, scales.size, 0) * np.tile(scales, n)[:, None]
    pt = _softmax((lp - lr) / tau[:, None])
    quad = np.einsum("bi,bij,bj->b", d, _fisher(pt), d) / (2 * tau**2)
    kl = np.asarray(kl_fn(lp + d, lr, pt, tau))  # KL(p~(l) || p~(l + d))
    errs = np.abs(kl - quad).reshape(n, scales.size)
    slopes += [np.polyfit(np.log(scales), np.log(e), 1)[0] for e in errs]
  worst = float(np.max(np.abs(np.asarray(slopes) - 3.0)))
  return Result(measured=worst, tolerance=0.2, detail=f"slopes {np.round(slopes, 3).tolist()}")


@register("adpo.paper_local_model_counterexample",
          source="[proposed] counter-example to the paper's local model as written",
          statement="the paper's L ~ delta^T(Diag q - qq^T)delta/(2 tau^2) with delta = u - u* is "
          "off by tau^2 (in u the curvature has no 1/tau^2): relative error >= 0.5 at tau=0.5",
          doc=f"{_DOC}#trust-region")
def _paper_form_counter():
  rng = _rng(12)
  p, tau = 6, 0.5
  q = _softmax(rng.normal(size=p))
  ustar = np.log(q)
  d = rng.normal(size=p) * 1e-3
  f = np.diag(q) - np.outer(q, q)
  ce = np.asarray(jax.jit(P.anchored_ce)(np.stack([ustar + d, ustar]), np.stack([q, q])))
  exact = float(ce[0] - ce[1])
  paper = d @ f @ d / (2 * tau**2)
  correct = d @ f @ d / 2
  rel_paper = abs(paper - exact) / abs(exact)
  rel_ok = abs(correct - exact) / abs(exact)
  return Result(measured=rel_paper if rel_ok < 1e-2 else 0.0, tolerance=0.5, mode="min",
                detail=f"paper form rel. error {rel_paper:.3f} vs u-form {rel_ok:.1e}")


@register("adpo.anchor_dependence_counterexample",
          source="[proposed] counter-example to v5 'trust region independent of the anchor'",
          statement="at fixed l, changing l_ref changes the Hessian in l (it enters through p~): "
          "relative change >= 0.1 found", doc=f"{_DOC}#trust-region")
def _anchor_dep():
  rng = _rng(13)
  p = 8
  lp, lr = _logits(rng, 1, p), _logits(rng, 2, p)
  q = _softmax(rng.normal(size=(2, p)))
  h = np.asarray(_hess_batch(np.repeat(lp, 2, 0), lr, q, np.ones(2)))
  return Result(measured=float(np.linalg.norm(h[0] - h[1]) / np.linalg.norm(h[0])), tolerance=0.1,
                mode="min", detail="only the form (Diag p~ - p~p~^T)/tau^2 is anchor-free")


@register("adpo.on_policy_identity", source="[proposed] derived from the code's on-policy mode",
          statement="l_ref = sg(l): grad_l L = (1/G - q)/tau (REINFORCE with centred advantage)",
          doc=f"{_DOC}#on-policy")
def _on_policy():
  rng = _rng(14)
  worst = 0.0
  tau = _per_group((0.5, 1.0, 2.0), _B)
  grad_fn = jax.jit(jax.grad(
      lambda l, q, t: P.adpo_loss(l, jax.lax.stop_gradient(l), q, temperature=t).sum()))
  for g in _PS:
    lp = _logits(rng, tau.size, g)
    q = np.asarray(P.target_from_rewards(rng.normal(size=(tau.size, g)), beta_r=0.3))
    worst = max(worst, _maxabs(grad_fn(lp, q, tau), (1.0 / g - q) / tau[:, None]))
  return Result(measured=worst, tolerance=1e-8)


# ----------------------------------------------------------------------------- code variants

_direct_vg = jax.jit(lambda u, q: (P.adpo_direct_loss(u, q), jax.grad(
    lambda x: P.adpo_direct_loss(x, q).sum())(u)))
_top1_vg = jax.jit(lambda u, a: (P.adpo_top1_loss(u, a), jax.grad(
    lambda x: P.adpo_top1_loss(x, a).sum())(u)))
_pl = jax.jit(lambda u, a, top_k=None: P.adpo_plackett_luce_loss(u, a, top_k=top_k),
              static_argnames="top_k")
_pair_vg = jax.jit(lambda u, a: (P.adpo_pairwise_loss(u, a), jax.grad(
    lambda x: P.adpo_pairwise_loss(x, a).sum())(u)))
_soft_pair_vg = jax.jit(lambda u, qp: (P.adpo_soft_pairwise_loss(u, qp), jax.grad(
    lambda x: P.adpo_soft_pairwise_loss(x, qp).sum())(u)))


@register("adpo.variant_direct", source="[paper] author code core_algos.py 'direct'/'softmax'",
          statement="'direct' (with sg q-centring) = softmax CE in value and gradient; 'softmax' "
          "variant with A_c=1, B_c=C_c=0 = adpo_loss", doc=f"{_DOC}#variants")
def _variant_direct():
  rng = _rng(15)
  worst = 0.0
  for p in _PS:
    u = _logits(rng, _B, p)
    q = _softmax(rng.normal(size=(_B, p)))
    ce = -(q * np.log(_softmax(u))).sum(-1)
    val, grad = _direct_vg(u, q)
    worst = max(worst, _maxabs(val, ce), _maxabs(grad, _softmax(u) - q))
    lp, lr = _logits(rng, _B, p), _logits(rng, _B, p)
    worst = max(worst, _maxabs(P.adpo_softmax_variant_loss(lp, lr, q, temperature=0.8),
                               P.adpo_loss(lp, lr, q, temperature=0.8)))
  return Result(measured=worst, tolerance=1e-8)


@register("adpo.variant_infonce", source="[paper] author code 'infonce'; Table 1 Top-1-vs-rest",
          statement="top-1 loss = CE with one-hot on argmax A, value and gradient",
          doc=f"{_DOC}#variants")
def _variant_infonce():
  rng = _rng(16)
  worst = 0.0
  for p in _PS:
    u, a = _logits(rng, _B, p), rng.normal(size=(_B, p))
    oh = np.eye(p)[np.argmax(a, -1)]
    ce = -(oh * np.log(_softmax(u))).sum(-1)
    val, grad = _top1_vg(u, a)
    worst = max(worst, _maxabs(val, ce), _maxabs(grad, _softmax(u) - oh))
  return Result(measured=worst, tolerance=1e-8)


def _pl_top(u, order, k):
  """Plackett-Luce negative log-likelihood of the first k choices of a ranking, from its
  definition (k = len(order) - 1 is the full ranking: the last choice has probability 1)."""
  nll, rest = 0.0, list(order)
  for kk in order[:k]:
    nll -= u[kk] - np.log(np.sum(np.exp(u[rest])))
    rest.remove(kk)
  return nll


@register("adpo.variant_plackett_luce", source="[paper] author code 'plackett_luce' (ListMLE)",
          statement="PL variant without extras = PL NLL of the A-sorted order / (G-1); "
          "invariant to u -> u + c", doc=f"{_DOC}#variants")
def _variant_pl():
  rng = _rng(17)
  worst = 0.0
  for p in _PS:
    u, a = _logits(rng, _B, p), rng.normal(size=(_B, p))
    oracle = np.array([_pl_top(u[b], list(np.argsort(-a[b])), p - 1) / (p - 1) for b in range(_B)])
    c = rng.normal(size=(_B, 1)) * 5
    worst = max(worst, _maxabs(_pl(u, a), oracle), _maxabs(_pl(u + c, a), oracle))
    # top-k truncation = the first k terms of the same sum
    if p > 2:
      k = 2
      ok = np.array([_pl_top(u[b], list(np.argsort(-a[b])), k) / k for b in range(_B)])
      worst = max(worst, _maxabs(_pl(u, a, top_k=k), ok))
  return Result(measured=worst, tolerance=1e-8)


@register("adpo.variant_pairwise", source="[paper] author code 'pairwise'",
          statement="hard pairwise = mean DPO-style loss softplus(-(u_i-u_j)) over strictly "
          "ordered pairs A_i > A_j, ties excluded", doc=f"{_DOC}#variants")
def _variant_pairwise():
  rng = _rng(18)
  worst = 0.0
  for p in _PS:
    u = _logits(rng, _B, p)
    a = rng.integers(0, 3, size=(_B, p)).astype(float)  # many ties
    oracle = []
    for b in range(_B):
      terms = [np.logaddexp(0, -(u[b, i] - u[b, j]))
               for i, j in itertools.permutations(range(p), 2) if a[b, i] > a[b, j]]
      oracle.append(np.mean(terms) if terms else 0.0)
    worst = max(worst, _maxabs(_pair_vg(u, a)[0], oracle))
  return Result(measured=worst, tolerance=1e-8)


@register("adpo.variant_soft_pairwise_hard_labels",
          source="[proposed] soft pairwise instantiation (spec Sec. 3)",
          statement="soft pairwise with q_ij in {0,1} (no ties) = hard pairwise, value and grad; "
          "P=2 soft pairwise = soft DPO", doc=f"{_DOC}#variants")
def _variant_soft_pairwise():
  rng = _rng(19)
  worst = 0.0
  for p in _PS:
    u, a = _logits(rng, _B, p), rng.normal(size=(_B, p))
    qh = P.pair_labels(a)
    (vs, gs), (vh, gh) = _soft_pair_vg(u, qh), _pair_vg(u, a)
    worst = max(worst, _maxabs(vs, vh), _maxabs(gs, gh))
  u = _logits(rng, _B, 2)
  r = rng.normal(size=(_B, 2))
  qs = P.pair_labels(r, beta_r=0.5)
  soft = P.soft_dpo_loss(u[:, 0], u[:, 1], 0.0, 0.0, qs[:, 0, 1], beta=1.0)
  worst = max(worst, _maxabs(_soft_pair_vg(u, qs)[0], soft))
  return Result(measured=worst, tolerance=1e-8)


# ----------------------------------------------------------------------------- adaptive tau


_rule1 = jax.jit(lambda q, tb, a, tm: P.tau_entropy_rule(q, tau_base=tb, a=a, tau_min=tm))


@register("adpo.tau_entropy_rule", source="[paper] author code (first verl commit), rule 1",
          statement="tau(q) = max(tau_min, tau_base(1 - a H(q)/log G)) is non-increasing in H(q) "
          "and >= tau_min", doc=f"{_DOC}#adaptive-temperature")
def _tau_rule1():
  rng = _rng(20)
  worst = 0.0
  for g in _PS:
    z = rng.normal(size=(400, g)) * np.exp(rng.uniform(-3, 3, size=(400, 1)))
    q = _softmax(z)
    for tau_base, a, tmin in ((0.8, 0.5, 0.05), (1.0, 1.5, 0.2)):
      t = np.asarray(_rule1(q, tau_base, a, tmin))
      h = -(q * np.log(np.maximum(q, 1e-300))).sum(-1)
      order = np.argsort(h)
      worst = max(worst, float(np.max(np.diff(t[order]), initial=0.0)), tmin - t.min())
  return Result(measured=max(worst, 0.0), tolerance=1e-12,
                detail="max increase of tau along increasing H, and tau_min - min tau")


@register("adpo.tau_smooth_hybrid", source="[paper] LaTeX Eq. 8 (Smooth Hybrid), rule 2",
          statement="tau(0,1) = tau_base; unclamped max over [0,1]^2 = tau_base(1+max(a,b)) at "
          "R=0; clamps respected", doc=f"{_DOC}#adaptive-temperature")
def _tau_rule2():
  grid = np.linspace(0, 1, 101)
  hh, rr = np.meshgrid(grid, grid, indexing="ij")
  worst = 0.0
  for tb, a, b in ((0.8, 0.5, 0.5), (0.8, 1.0, 0.5), (1.0, 0.2, 0.9)):
    t = np.asarray(P.tau_smooth_hybrid(hh, rr, tau_base=tb, a=a, b=b, tau_min=0.0,
                                       tau_max=1e9))
    worst = max(worst, abs(float(P.tau_smooth_hybrid(0.0, 1.0, tau_base=tb, a=a, b=b)) - tb),
                abs(t.max() - tb * (1 + max(a, b))),
                float(np.min(rr[t >= t.max() - 1e-12])))  # argmax has R = 0
    tc = np.asarray(P.tau_smooth_hybrid(hh, rr, tau_base=tb, a=a, b=b, tau_min=0.9,
                                        tau_max=1.0))
    worst = max(worst, 0.9 - tc.min(), tc.max() - 1.0)
  return Result(measured=max(worst, 0.0), tolerance=1e-12)


@register("adpo.smooth_hybrid_regime_counterexample",
          source="[proposed] counter-example to the paper's regime ordering",
          statement="'low entropy, low reward: tau up most' fails for the LLM run's a=1.0 > b=0.5:"
          " tau(H=1,R=0) - tau(H=0,R=0) >= 0.1 found", doc=f"{_DOC}#adaptive-temperature")
def _rule2_counter():
  kw = dict(tau_base=0.8, a=1.0, b=0.5, tau_min=0.1, tau_max=5.0)
  confused = float(P.tau_smooth_hybrid(1.0, 0.0, **kw))
  arrogant = float(P.tau_smooth_hybrid(0.0, 0.0, **kw))
  return Result(measured=confused - arrogant, tolerance=0.1, mode="min",
                detail=f"confused beginner {confused:.2f} > arrogant idiot {arrogant:.2f}")


@register("adpo.tau_batch_scalar", source="[paper] author code (verl HEAD), rule 3",
          statement="tau_eff stays in [0.2, 1.5] on random batches (including extreme inputs)",
          doc=f"{_DOC}#adaptive-temperature")
def _tau_rule3():
  rng = _rng(21)
  nb, n = 400, 32
  scale = np.exp(rng.uniform(-2, 4, size=(nb, 1)))
  s = -np.abs(rng.normal(size=(nb, n))) * scale
  sr = -np.abs(rng.normal(size=(nb, n))) * scale
  adv = rng.normal(size=(nb, n)) * scale
  keep = np.arange(n)[None] < rng.integers(1, n + 1, size=(nb, 1))  # batch sizes 1..32
  tau = np.exp(rng.uniform(-3, 3, size=nb))
  fn = jax.jit(jax.vmap(lambda s_, sr_, a_, t_, w_: P.tau_batch_scalar(
      s_, sr_, a_, temperature=t_, a=0.2, b=0.5, log_vocab=float(np.log(32000)), where=w_)))
  t = np.asarray(fn(s, sr, adv, tau, keep))
  lo, hi = float(t.min()), float(t.max())
  return Result(measured=max(0.2 - lo, hi - 1.5, 0.0), tolerance=0.0,
                detail=f"range [{lo:.3f}, {hi:.3f}] over {nb} batches")


@register("adpo.tau_stop_gradient", source="[paper] author code (tau under no_grad)",
          statement="jax.grad through each of the three tau rules is exactly zero, and the loss "
          "gradient with an adaptive tau equals the one with tau held constant",
          doc=f"{_DOC}#adaptive-temperature")
def _tau_sg():
  rng = _rng(22)
  lp, lr = _logits(rng, _B, 8), _logits(rng, _B, 8)
  q = _softmax(rng.normal(size=(_B, 8)))

  def rules(x):
    t1 = P.tau_entropy_rule(jax.nn.softmax(x)).sum()
    t2 = P.tau_smooth_hybrid(P.normalized_entropy(x), P.minmax_normalize(x.mean(-1))).sum()
    t3 = P.tau_batch_scalar(x.mean(-1), lr.mean(-1), x[:, 0], log_vocab=3.0)
    return jnp.stack([t1, t2, t3])

  jac = np.asarray(jax.jit(jax.jacrev(rules))(lp))
  worst = float(np.max(np.abs(jac)))

  @jax.jit
  def grads(x, tau_const):
    adaptive = jax.grad(lambda y: P.adpo_loss(
        y, lr, q, temperature=P.tau_entropy_rule(jax.nn.softmax(y))).sum())(x)
    const = jax.grad(lambda y: P.adpo_loss(y, lr, q, temperature=tau_const).sum())(x)
    return adaptive, const

  ga, gc = grads(lp, np.asarray(P.tau_entropy_rule(jax.nn.softmax(lp))))
  # the Jacobian of the rules must be exactly 0; the two loss gradients agree to rounding
  measured = worst if worst > 0 else _maxabs(ga, gc)
  return Result(measured=measured, tolerance=1e-14,
                detail=f"max |d tau / d x| = {worst:.1e} (exact zero required)")


# ----------------------------------------------------------------------------- anchors


@register("adpo.ema_anchor", source="[paper] author code (EMA anchor, a = 0.99)",
          statement="EMA with constant theta: theta_ref^(n) = theta + 0.99^n (theta_ref^(0) - "
          "theta) (rtol 1e-12)", doc=f"{_DOC}#anchors")
def _ema():
  rng = _rng(23)
  theta = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
  ref0 = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
  ref = ref0
  worst = 0.0
  for n in range(1, 301):
    ref = P.ema_anchor(ref, theta, decay=0.99)
    if n in (1, 10, 100, 300):
      for k in theta:
        expect = theta[k] + 0.99**n * (ref0[k] - theta[k])
        worst = max(worst, float(np.max(np.abs(np.asarray(ref[k]) - expect) / np.abs(expect))))
  return Result(measured=worst, tolerance=1e-12, detail="max relative error")


@register("adpo.kl_triggered", source="[paper] author code (window 10, threshold 0.1)",
          statement="the hard copy fires iff the window is full (10 values) and its mean exceeds "
          "0.1; compared with a plain-Python reference on 2000 random KL streams",
          doc=f"{_DOC}#anchors")
def _kl_trig():
  rng = _rng(24)
  step = jax.jit(lambda w, k: P.kl_triggered(w, k, threshold=0.1))
  mismatches = 0
  fired = 0
  for _ in range(20):
    w = P.kl_window_init(10, jnp.float64)
    buf = []
    for k in rng.exponential(0.1, size=100):
      w, fire = step(w, k)
      buf.append(k)
      buf = buf[-10:]
      ref = len(buf) == 10 and np.mean(buf) > 0.1
      if ref:
        buf = []
      mismatches += bool(fire) != ref
      fired += ref
  return Result(measured=mismatches, tolerance=0, detail=f"{fired} copies fired in 2000 steps")
