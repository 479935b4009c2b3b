"""Numeric checks of the loss zoo's identities (write-up: kd_losses.md; spec kd_losses.md §13).

Every check draws random instances in float64 with a fixed seed and measures how far the claimed
(in)equality is from holding; counter-example checks (mode="min") pass by *finding* the
violation (biased top-k target, negative truncated top-k "KL", logit averaging ≠ probability
averaging).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from kdjax import divergences as D
from kdjax import losses as L
from kdjax import policy as P
from kdjax.operators import aggregate, log_normalizer
from theory.registry import Result, register

_DOC = "kd_losses.md"


def _logits(seed, shape, lo=0.2, hi=6.0):
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(np.log(lo), np.log(hi), size=shape[:-1] + (1,)))
  return rng.normal(size=shape) * scale


def _lsm(z):
  return scipy.special.log_softmax(z, axis=-1)


def _simplex(seed, m, n):
  return np.random.default_rng(seed).dirichlet(np.ones(m), size=n).T  # [M, n]


# ----------------------------------------------------------------------------- multi-teacher


@register("zoo.multi_teacher_forward_sum", source="[proposed] kd_losses.md §12 (derived)",
          statement="sum_i w_i KL(p_i||q) = KL(pbar||q) + info radius; same gradient in q "
                    "(M in {2,3,5}, per-example weights)",
          doc=f"{_DOC}#multi-teacher")
def _mt_forward():
  worst = 0.0
  for m in (2, 3, 5):
    zt = _logits(m, (m, 300, 9))
    zs = _logits(10 + m, (300, 9))
    w = _simplex(20 + m, m, 300)
    vg = jax.jit(lambda s, t, w: (
        jax.value_and_grad(lambda x: L.multi_teacher_kd(x, t, weights=w,
                                                        aggregation="per_teacher").sum())(s),
        jax.value_and_grad(lambda x: L.multi_teacher_kd(x, t, weights=w).sum())(s),
        L.multi_teacher_kd(s, t, weights=w, aggregation="per_teacher"),
        L.multi_teacher_kd(s, t, weights=w)))
    (_, g1), (_, g2), per, pool = vg(zs, zt, w)
    lp = _lsm(zt)
    pbar = np.log(np.sum(w[..., None] * np.exp(lp), 0))
    radius = -np.sum(np.exp(pbar) * pbar, -1) + np.sum(w * np.sum(np.exp(lp) * lp, -1), 0)
    worst = max(worst, float(np.max(np.abs(np.asarray(per) - np.asarray(pool) - radius))))
    worst = max(worst, float(np.max(np.abs(np.asarray(g1) - np.asarray(g2)))))
  return Result(measured=worst, tolerance=1e-12, detail="max |value gap - radius|, |grad gap|")


@register("zoo.multi_teacher_reverse_geometric", source="[proposed] kd_losses.md §12 (derived)",
          statement="sum_i w_i KL(q||p_i) = KL(q||G) - log Z, and gradient descent on free "
                    "logits converges to the geometric pool G",
          doc=f"{_DOC}#multi-teacher")
def _mt_reverse():
  worst = 0.0
  for m in (2, 3, 5):
    zt = _logits(30 + m, (m, 300, 9))
    zs = _logits(40 + m, (300, 9))
    w = _simplex(50 + m, m, 300)
    f = jax.jit(lambda s, t, w: (
        L.multi_teacher_kd(s, t, weights=w, aggregation="per_teacher", direction="reverse"),
        L.multi_teacher_kd(s, t, weights=w, aggregation="geometric", direction="reverse"),
        log_normalizer(jax.nn.log_softmax(t, -1), weights=w, kind="geometric")))
    per, geo, log_z = (np.asarray(x) for x in f(zs, zt, w))
    worst = max(worst, float(np.max(np.abs(per - (geo - log_z)))))
  # argmin: plain gradient descent on the weighted reverse-KL sum from a random start.
  zt = _logits(60, (3, 7))
  w = np.array([0.2, 0.5, 0.3])
  f = jax.jit(jax.grad(lambda s: L.multi_teacher_kd(s, zt, weights=w, aggregation="per_teacher",
                                                    direction="reverse")))

  def body(s, _):
    return s - 1.0 * f(s), None

  s_final, _ = jax.lax.scan(body, jnp.asarray(_logits(61, (7,))), None, length=3000)
  g = np.asarray(aggregate(jnp.asarray(_lsm(zt)), weights=w, kind="geometric"))
  err = float(np.max(np.abs(np.exp(_lsm(np.asarray(s_final))) - np.exp(g))))
  return Result(measured=max(worst, err), tolerance=1e-9,
                detail=f"identity gap {worst:.2e}, argmin gap {err:.2e}")


@register("zoo.logit_average_is_geometric", source="[proposed] kd_losses.md §12 (derived)",
          statement="softmax(sum_i w_i z_i) equals the geometric pool of softmax(z_i) "
                    "(TextBrewer's logit averaging)",
          doc=f"{_DOC}#multi-teacher")
def _logit_avg():
  zt = _logits(70, (4, 500, 11))
  w = _simplex(71, 4, 500)
  avg = _lsm(np.sum(w[..., None] * zt, 0))
  g = np.asarray(aggregate(jnp.asarray(_lsm(zt)), weights=w, kind="geometric"))
  return Result(measured=float(np.max(np.abs(avg - g))), tolerance=1e-12)


@register("zoo.logit_average_not_arithmetic", source="[proposed] kd_losses.md §12 (derived)",
          statement="counter-example: logit averaging differs from probability averaging "
                    "(total variation > 1e-3 on random instances)",
          doc=f"{_DOC}#multi-teacher")
def _logit_avg_counter():
  zt = _logits(72, (3, 200, 11))
  avg = np.asarray(aggregate(jnp.asarray(_lsm(zt)), kind="geometric"))
  ari = np.asarray(aggregate(jnp.asarray(_lsm(zt)), kind="arithmetic"))
  gap = 0.5 * np.abs(np.exp(avg) - np.exp(ari)).sum(-1)
  return Result(measured=float(np.max(gap)), tolerance=1e-3, mode="min",
                detail=f"largest TV gap {np.max(gap):.3f}")


@register("zoo.multi_teacher_bounds", source="[proposed] kd_losses.md §12 (derived)",
          statement="KL(r||pbar) <= sum_i w_i KL(r||p_i) and KL(r||G) <= sum_i w_i KL(r||p_i)",
          doc=f"{_DOC}#multi-teacher")
def _mt_bounds():
  zt = _logits(80, (3, 1000, 8))
  zr = _logits(81, (1000, 8))
  w = _simplex(82, 3, 1000)
  f = jax.jit(lambda r, t, w: [L.multi_teacher_kd(r, t, weights=w, aggregation=a,
                                                   direction="reverse")
                               for a in ("per_teacher", "arithmetic", "geometric")])
  s, a, g = (np.asarray(x) for x in f(zr, zt, w))
  return Result(measured=float(max(np.max(a - s), np.max(g - s))), tolerance=1e-12)


# ----------------------------------------------------------------------------- sparse / top-k


@register("zoo.tail_bucket_bound", source="[proposed] kd_losses.md §8 (data processing)",
          statement="0 <= KL(pbar||qbar) <= KL(p||q) for k in {1,5,20}, equality at k = V",
          doc=f"{_DOC}#top-k-tail-bucket")
def _tail_bucket():
  zs, zt = _logits(100, (1000, 30)), _logits(101, (1000, 30))
  full = np.asarray(D.forward_kl(zs, zt))
  worst = 0.0
  for k in (1, 5, 20, 30):
    tb = np.asarray(jax.jit(lambda s, t, k=k: L.topk_tail_kl(s, *L.topk_teacher(t, k=k)))(zs, zt))
    worst = max(worst, float(-tb.min()), float(np.max(tb - full)))
    if k == 30:
      worst = max(worst, float(np.max(np.abs(tb - full))))
  return Result(measured=worst, tolerance=1e-12)


@register("zoo.truncated_topk_not_a_divergence",
          source="[paper] verl RFC #7856 (clamp fired in 415/467 steps)",
          statement="counter-example: the truncated top-k sum is negative on random pairs "
                    "(its most negative value over 1000 pairs, k=5) while the tail bucket is >= 0",
          doc=f"{_DOC}#top-k-tail-bucket")
def _truncated_negative():
  zs, zt = _logits(110, (1000, 30)), _logits(111, (1000, 30))
  ids, lp = L.topk_teacher(zt, k=5)
  trunc = np.asarray(L.truncated_topk_kl(zs, ids, lp))
  tb = np.asarray(L.topk_tail_kl(zs, ids, lp))
  found = float(-trunc.min()) if tb.min() >= -1e-12 else -1.0
  return Result(measured=found, tolerance=1e-3, mode="min",
                detail=f"{np.mean(trunc < 0):.0%} of pairs have a negative truncated sum")


@register("zoo.topk_renormalized_bias", source="[paper] arXiv:2503.16870 (Sparse Logit Sampling)",
          statement="counter-example: the renormalised top-5 target differs from p_T by > 1e-2 "
                    "in l1 on a flat-tailed teacher",
          doc=f"{_DOC}#random-sampling-kd")
def _topk_bias():
  p = np.concatenate([[0.3, 0.2, 0.1, 0.05, 0.05], np.full(45, 0.3 / 45)])
  ids, lp = L.topk_teacher(np.log(p), k=5)
  renorm = np.zeros(50)
  renorm[np.asarray(ids)] = scipy.special.softmax(np.asarray(lp))
  return Result(measured=float(np.abs(renorm - p).sum()), tolerance=1e-2, mode="min")


@register("zoo.random_sampling_unbiased", source="[paper] arXiv:2503.16870 (Sparse Logit "
          "Sampling)", statement="Monte-Carlo mean of the sparse target and of its gradient "
          "lie within 5 SE of p_T and of the full-KD gradient (N=64, V=50, tau in {1, 0.5})",
          doc=f"{_DOC}#random-sampling-kd")
def _rs_unbiased():
  zt, zs = _logits(120, (50,), 1.5, 1.5), _logits(121, (50,), 1.5, 1.5)
  p = scipy.special.softmax(zt)
  worst = 0.0
  for tau in (1.0, 0.5):
    @jax.jit
    def reps(key):
      def one(k):
        ids, w = L.sample_sparse_targets(k, zt, num_samples=64, proposal_temperature=tau)
        t_hat = jnp.zeros(50).at[ids].add(w)
        return t_hat, jax.grad(lambda s: L.random_sampling_kd(s, ids, w))(jnp.asarray(zs))
      return jax.vmap(one)(jax.random.split(key, 3000))
    t_hat, g = (np.asarray(a) for a in reps(jax.random.key(int(10 * tau))))
    for x, target in ((t_hat, p), (g, scipy.special.softmax(zs) - p)):
      se = x.std(0, ddof=1) / np.sqrt(x.shape[0])
      worst = max(worst, float(np.max(np.abs(x.mean(0) - target) / se)))
  return Result(measured=worst, tolerance=5.0, detail="max |mean - target| / SE")


# ----------------------------------------------------------------------------- MiniLLM


def _tables(seed, v=3, length=3):
  """Autoregressive conditionals q(.|prefix), p(.|prefix) as logits for every prefix."""
  rng = np.random.default_rng(seed)
  prefixes = [()] + [pre for n in range(1, length) for pre in itertools.product(range(v), repeat=n)]
  return ({pre: rng.normal(size=v) * 1.5 for pre in prefixes},
          {pre: rng.normal(size=v) * 1.5 for pre in prefixes})


@register("zoo.minillm_chain_rule", source="[paper] arXiv:2306.08543 (MiniLLM single-step "
          "decomposition)", statement="KL(q(y)||p(y)) = E_{y~q} sum_t KL(q(.|y<t)||p(.|y<t)), "
          "exhaustive V=3, L=3 (rtol 1e-12)", doc=f"{_DOC}#minillm")
def _chain_rule():
  worst = 0.0
  for seed in range(5):
    zq, zp = _tables(130 + seed)
    seqs = list(itertools.product(range(3), repeat=3))
    pre = [s[:t] for s in seqs for t in range(3)]
    tok_kl = np.asarray(P.minillm_token_reverse_kl(np.stack([zq[x] for x in pre]),
                                                   np.stack([zp[x] for x in pre]))).reshape(27, 3)
    lq = np.array([sum(_lsm(zq[s[:t]])[s[t]] for t in range(3)) for s in seqs])
    lp = np.array([sum(_lsm(zp[s[:t]])[s[t]] for t in range(3)) for s in seqs])
    seq_kl = float(np.sum(np.exp(lq) * (lq - lp)))
    chain = float(np.sum(np.exp(lq) * tok_kl.sum(1)))
    worst = max(worst, abs(seq_kl - chain) / abs(seq_kl))
  return Result(measured=worst, tolerance=1e-12)


@register("zoo.minillm_importance_weights", source="[paper] arXiv:2306.08543 (teacher-mixed "
          "sampling)", statement="E_{y~ptilde}[q(y)/ptilde(y)] = 1 exactly, and weights <= "
          "1/(1-alpha)", doc=f"{_DOC}#minillm")
def _iw():
  zs, zt = _logits(140, (200, 12)), _logits(141, (200, 12))
  worst = 0.0
  for alpha in (0.0, 0.2, 0.7):
    lmix = np.asarray(P.teacher_mixed_log_probs(zs, zt, alpha=alpha))
    w = np.stack([np.asarray(P.teacher_mixed_importance_weights(
        zs, zt, np.full(200, v), alpha=alpha)) for v in range(12)], -1)
    worst = max(worst, float(np.max(np.abs(np.sum(np.exp(lmix) * w, -1) - 1))),
                float(np.max(w - 1 / (1 - alpha))))
  return Result(measured=worst, tolerance=1e-12)


# ----------------------------------------------------------------------------- G-OPD / AlignDistil


@register("zoo.gopd_lambda1_identity", source="[proposed] kd_losses.md §11 (derived)",
          statement="at lambda = 1, J = -KL(pi_theta||pi*) for every pi_ref", doc=f"{_DOC}#g-opd")
def _gopd_identity():
  zs, zt, zr = (_logits(150 + i, (1000, 9)) for i in range(3))
  j = np.asarray(P.gopd_objective(zs, zt, zr, lam=1.0))
  return Result(measured=float(np.max(np.abs(j + np.asarray(D.reverse_kl(zs, zt))))),
                tolerance=1e-12)


@register("zoo.gopd_optimum", source="[proposed] kd_losses.md §11 (derived)",
          statement="gradient ascent on free logits converges to pi ∝ pi_ref (pi*/pi_ref)^lambda "
                    "(|err| < 1e-8) for lambda in {0.5, 1, 1.5}", doc=f"{_DOC}#g-opd")
def _gopd_optimum():
  zt, zr = _logits(160, (8,), 1.0, 1.0), _logits(161, (8,), 1.0, 1.0)
  worst = 0.0
  for lam in (0.5, 1.0, 1.5):
    grad = jax.grad(lambda s: P.gopd_objective(s, zt, zr, lam=lam))

    def body(s, _):
      return s + 1.0 * grad(s), None

    s_final, _ = jax.lax.scan(body, jnp.asarray(_logits(162, (8,), 1.0, 1.0)), None,
                              length=4000)
    opt = np.asarray(P.gopd_optimal_logits(zt, zr, lam=lam))
    worst = max(worst, float(np.max(np.abs(scipy.special.softmax(np.asarray(s_final))
                                           - scipy.special.softmax(opt)))))
  return Result(measured=worst, tolerance=1e-8)


@register("zoo.aligndistil_log_linear", source="[proposed] kd_losses.md §10 (derived)",
          statement="softmax(z*) ∝ pi_ref^(1-alpha) pi_dpo^alpha (alpha in [0, 3]); alpha=0 "
                    "gives the reference, alpha=1 the DPO model", doc=f"{_DOC}#aligndistil")
def _aligndistil():
  zd, zr = _logits(170, (300, 10)), _logits(171, (300, 10))
  alpha = np.random.default_rng(172).uniform(0, 3, size=300)
  got = np.asarray(P.aligndistil_teacher_logits(zd, zr, alpha=alpha))
  want = _lsm((1 - alpha[:, None]) * _lsm(zr) + alpha[:, None] * _lsm(zd))
  e0 = np.asarray(P.aligndistil_teacher_logits(zd, zr, alpha=0.0)) - _lsm(zr)
  e1 = np.asarray(P.aligndistil_teacher_logits(zd, zr, alpha=1.0)) - _lsm(zd)
  return Result(measured=float(max(np.max(np.abs(got - want)), np.max(np.abs(e0)),
                                   np.max(np.abs(e1)))), tolerance=1e-12)


@register("zoo.trrd_grpo_reduction", source="[proposed] kd_losses.md §9",
          statement="TRRD at lambda = 0 equals the GRPO/PPO clipped surrogate; the normalised "
                    "mixture sums to 1", doc=f"{_DOC}#trrd")
def _trrd():
  rng = np.random.default_rng(180)
  lp_new, lp_old, lp_t = (np.log(rng.uniform(0.01, 1.0, size=2000)) for _ in range(3))
  adv = rng.normal(size=2000)
  mix = P.trrd_mix_log_probs(lp_t, lp_old, lam=0.0)
  got = np.asarray(P.trrd_loss(lp_new, mix, adv, clip_eps=0.2))
  ratio = np.exp(lp_new - lp_old)
  want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  full = P.trrd_mix_log_probs(_lsm(_logits(181, (50, 9))), _lsm(_logits(182, (50, 9))), lam=0.4,
                              normalize=True)
  norm_err = np.max(np.abs(np.exp(np.asarray(full)).sum(-1) - 1))
  return Result(measured=float(max(np.max(np.abs(got - want)), norm_err)), tolerance=1e-12)


# ----------------------------------------------------------------------------- AKL / PLD / LS / TAID


@register("zoo.akl_between_fkl_rkl", source="[paper] arXiv:2404.02657 (AKL)",
          statement="min(FKL, RKL) <= AKL <= max(FKL, RKL) (+1e-12), weights in [0,1] summing "
                    "to 1, AKL = 0 at p = q", doc=f"{_DOC}#akl")
def _akl():
  zs, zt = _logits(190, (3000, 12)), _logits(191, (3000, 12))
  a = np.asarray(L.adaptive_kl(zs, zt, mu=0.5))
  f, r = np.asarray(D.forward_kl(zs, zt)), np.asarray(D.reverse_kl(zs, zt))
  wh, wt = (np.asarray(x) for x in L.adaptive_kl_weights(zs, zt))
  viol = max(np.max(np.minimum(f, r) - a), np.max(a - np.maximum(f, r)),
             np.max(np.abs(wh + wt - 1)), -wh.min(), wh.max() - 1,
             np.max(np.abs(np.asarray(L.adaptive_kl(zt, zt)))))
  return Result(measured=float(max(viol, 0.0)), tolerance=1e-12)


@register("zoo.pld_convex_shift_invariant", source="[paper] arXiv:2506.12542 (PLD)",
          statement="PLD is convex in the student logits (min Hessian eigenvalue >= -1e-10 at "
                    "100 random points, C=10) and invariant to s -> s + c",
          doc=f"{_DOC}#pld")
def _pld():
  zt = _logits(200, (100, 10))
  s = _logits(201, (100, 10))
  y = np.random.default_rng(202).integers(0, 10, size=100)
  hess = jax.jit(jax.vmap(jax.hessian(lambda a, b, c: L.plackett_luce_kd(a, b, c))))(s, zt, y)
  min_eig = float(np.min(np.linalg.eigvalsh(np.asarray(hess))))
  shift = float(np.max(np.abs(np.asarray(L.plackett_luce_kd(s + 3.3, zt, y))
                              - np.asarray(L.plackett_luce_kd(s, zt, y)))))
  return Result(measured=max(-min_eig, shift), tolerance=1e-10,
                detail=f"min eigenvalue {min_eig:.2e}, shift gap {shift:.2e}")


@register("zoo.logit_standardization_affine", source="[paper] arXiv:2403.01427",
          statement="logit-standardised KD is invariant to z -> a z + b (a in {0.5,2,10}, b in "
                    "{-3,5}) on either side, relative error < 1e-6 (std >= 1)",
          doc=f"{_DOC}#logit-standardisation")
def _ls():
  zs, zt = np.random.default_rng(210).normal(size=(2, 500, 16)) * 3
  base = np.asarray(L.logit_standardized_kd(zs, zt, temperature=2.0))
  worst = 0.0
  for a in (0.5, 2.0, 10.0):
    for b in (-3.0, 5.0):
      for s2, t2 in ((a * zs + b, zt), (zs, a * zt + b)):
        v = np.asarray(L.logit_standardized_kd(s2, t2, temperature=2.0))
        worst = max(worst, float(np.max(np.abs(v - base) / base)))
  return Result(measured=worst, tolerance=1e-6)


@register("zoo.taid_endpoints", source="[paper] arXiv:2501.16937 (TAID)",
          statement="t=1 is forward KL (value and gradient), t=0 gives value and gradient 0, "
                    "and the student gradient is q - p_t", doc=f"{_DOC}#taid")
def _taid():
  zs, zt = _logits(220, (500, 10)), _logits(221, (500, 10))
  g = lambda t: np.asarray(jax.grad(lambda s: L.taid_loss(s, zt, interpolation=t).sum())(
      jnp.asarray(zs)))
  worst = float(np.max(np.abs(np.asarray(L.taid_loss(zs, zt, interpolation=1.0))
                              - np.asarray(D.forward_kl(zs, zt)))))
  worst = max(worst,
              float(np.max(np.abs(np.asarray(L.taid_loss(zs, zt, interpolation=0.0))))),
              float(np.max(np.abs(g(0.0)))))
  for t in (0.3, 1.0):
    want = scipy.special.softmax(zs, -1) - scipy.special.softmax((1 - t) * zs + t * zt, -1)
    worst = max(worst, float(np.max(np.abs(g(t) - want))))
  return Result(measured=worst, tolerance=1e-12)
