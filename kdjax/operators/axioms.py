r"""Axiom checkers: test any user operator against the axioms on random draws.

Each checker draws many random instances (Dirichlet(c·1) with c ∈ 10^U[−1, 1], clipped to
≥ 1e-9 and renormalised, several class counts K; spec §10 defaults), evaluates the operator with
``jax.vmap`` and returns an :class:`AxiomReport` with the **worst violation per axiom** (0 means
no violation found; larger is worse) and the instance that produced it.

The axioms are Design choice (kdjax) [proposed] formalisations (spec §2, §3, §4.2) of the axioms
named in arXiv:2601.03195 (softening, S1–S5), arXiv:2601.09165 (aggregation, G1–G5) and
arXiv:2601.13100 (meta-teachers, M1–M7) [paper]. Run them in float64
(``with jax.enable_x64(True):``) for meaningful tolerances.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _logspace as LS
from kdjax import divergences as D
from kdjax.operators.softening import soften

Array = jax.Array

__all__ = ["AxiomReport", "random_simplex", "check_meta_axioms", "check_softening_axioms",
           "check_aggregation_axioms"]


@dataclasses.dataclass
class AxiomReport:
  """Worst violation found per axiom, with the witnessing instance."""
  violations: dict[str, float]
  witnesses: dict[str, dict[str, Any]]
  descriptions: dict[str, str]

  def satisfied(self, tol: float = 1e-9) -> dict[str, bool]:
    return {k: bool(v <= tol) for k, v in self.violations.items()}

  def failed(self, tol: float = 1e-9) -> list[str]:
    return [k for k, ok in self.satisfied(tol).items() if not ok]

  def __str__(self) -> str:
    lines = [f"{'axiom':6s} {'worst violation':>16s}  description"]
    for k, v in self.violations.items():
      lines.append(f"{k:6s} {v:16.3e}  {self.descriptions.get(k, '')}")
    return "\n".join(lines)


def random_simplex(key: Any, n: int, k: int, *, conc_range=(-1.0, 1.0),
                   floor: float = 1e-9) -> np.ndarray:
  """n points of Δ^{k−1} from Dirichlet(c·1), c = 10^U(conc_range), clipped to ≥ floor.

  Sampled on the host with NumPy (``key``: an int seed or a ``numpy.random.Generator``), which
  avoids compiling JAX's gamma sampler; float64.
  """
  rng = key if isinstance(key, np.random.Generator) else np.random.default_rng(key)
  c = 10.0 ** rng.uniform(conc_range[0], conc_range[1], size=(n, 1))
  g = rng.standard_gamma(np.broadcast_to(c, (n, k)))
  p = g / g.sum(-1, keepdims=True)
  p = np.where(np.isfinite(p), p, 1.0 / k)
  p = np.maximum(p, floor)
  return p / p.sum(-1, keepdims=True)


def _kl(lp, lq):
  return D.kl_from_log(log_p=lp, log_q=lq)


def _worst(values: Array, instances: dict[str, Array]) -> tuple[float, dict[str, Any]]:
  v = np.asarray(values, dtype=np.float64)
  v = np.where(np.isnan(v), np.inf, v)
  i = int(np.argmax(v))
  return float(max(v[i], 0.0)), {name: np.asarray(x[i]) for name, x in instances.items()}


def _merge(results: list[tuple[float, dict]]) -> tuple[float, dict]:
  return max(results, key=lambda r: r[0])


_META_DESC = {
    "M1": "validity: output on the simplex (max |sum-1|, max negativity)",
    "M2": "anchor consistency: max |M(p0,p0) - p0|",
    "M3": "support: a class with p0_k>0 and q_k>0 lost by M (1 = violated)",
    "M4": "forward contraction: max KL(p0||M) - (1-a) KL(p0||q)",
    "M5": "non-triviality: fraction of (p0, a<1) where M ignores q",
    "M6": "pairwise contraction (optional): max KL(Mp||Mq) - (1-a) KL(p||q)",
    "M7": "temperature coherence (optional): max |F_T(M(p0,q)) - M(F_T p0, F_T q)|",
}


def check_meta_axioms(operator: Callable[[Array, Array, Any], Array], *,
                      num_draws: int = 1000, num_classes: Sequence[int] = (2, 3, 5, 8, 12),
                      alpha_range=(0.01, 0.99), seed: int = 0) -> AxiomReport:
  """Tests ``operator(log_p0, log_q, alpha) -> log_m`` (one ``[K]`` instance) against M1–M7.

  ``num_draws`` instances per class count. Violations are absolute (probability or nats).
  """
  op = jax.vmap(operator, in_axes=(0, 0, 0))
  per_axiom: dict[str, list] = {k: [] for k in _META_DESC}
  for i, k in enumerate(num_classes):
    rng = np.random.default_rng(seed * 1000 + i)
    draws = dict(p0=random_simplex(rng, num_draws, k), q=random_simplex(rng, num_draws, k),
                 p=random_simplex(rng, num_draws, k),
                 a=rng.uniform(*alpha_range, size=num_draws),
                 j1=rng.integers(0, k, size=num_draws),
                 t=2.0 ** rng.uniform(-2, 2, size=(num_draws, 1)))
    draws = {n: jnp.asarray(v) for n, v in draws.items()}
    out = jax.jit(_meta_block, static_argnums=0)(op, draws)
    for name, (values, inst) in out.items():
      per_axiom[name].append(_worst(values, inst) if name != "M5"
                             else (float(jnp.mean(values)), {}))
  out = {k: _merge(v) for k, v in per_axiom.items()}
  return AxiomReport({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                     dict(_META_DESC))


def _meta_block(op, draws):
  per_axiom = {}
  p0, q, p, a = draws["p0"], draws["q"], draws["p"], draws["a"]
  k = p0.shape[-1]
  lp0, lq, lp = jnp.log(p0), jnp.log(q), jnp.log(p)
  c = 1.0 - a
  lm = op(lp0, lq, a)
  m = jnp.exp(lm)
  inst = {"p0": p0, "q": q, "alpha": a}
  # M1
  m1 = jnp.maximum(jnp.abs(jnp.sum(m, -1) - 1.0), -jnp.min(m, -1))
  m1 = jnp.where(jnp.all(jnp.isfinite(m) | (lm == -jnp.inf), -1), m1, jnp.inf)
  per_axiom["M1"] = (m1, inst)
  # M2
  per_axiom["M2"] = (jnp.max(jnp.abs(jnp.exp(op(lp0, lp0, a)) - p0), -1), inst)
  # M3: zero out one class of q (p0 keeps it) and another of p0 (q keeps it); every class
  # positive under both must stay positive.
  j1 = draws["j1"]
  zq = jnp.where(jax.nn.one_hot(j1, k, dtype=bool), 0.0, q)
  zq = zq / jnp.sum(zq, -1, keepdims=True)
  mz = jnp.exp(op(lp0, LS.safe_log(zq), a))
  lost = jnp.any((p0 > 0) & (zq > 0) & (mz <= 0), -1).astype(p0.dtype)
  per_axiom["M3"] = (lost, {"p0": p0, "q": zq, "alpha": a})
  # M4
  m4 = _kl(lp0, lm) - c * _kl(lp0, lq)
  per_axiom["M4"] = (m4, inst)
  # M5: does M depend on q at all (alpha < 1)?
  m_other = jnp.exp(op(lp0, lp, a))
  tv = 0.5 * jnp.sum(jnp.abs(m - m_other), -1)
  const = ((tv <= 1e-12) & (0.5 * jnp.sum(jnp.abs(q - p), -1) > 1e-3)).astype(p0.dtype)
  per_axiom["M5"] = (const, {})
  # M6
  m6 = _kl(jnp.log(m_other), lm) - c * _kl(lp, lq)
  per_axiom["M6"] = (m6, {"p0": p0, "p": p, "q": q, "alpha": a})
  # M7 with power softening at T ∈ [0.25, 4]
  t = draws["t"]
  lhs = jnp.exp(soften(lm, temperature=t))
  rhs = jnp.exp(op(soften(lp0, temperature=t), soften(lq, temperature=t), a))
  per_axiom["M7"] = (jnp.max(jnp.abs(lhs - rhs), -1), {**inst, "temperature": t[:, 0]})
  return per_axiom


_SOFT_DESC = {
    "S1": "ranking preservation: max (F_j - F_i)+ over p_i > p_j",
    "S2": "continuity: max |F| change under a 1e-7 relative perturbation of (p, T)",
    "S3": "entropy monotonicity: max decrease of H(F_T(p)) along the T grid",
    "S4": "identity: max |F_1(p) - p|",
    "S5": "boundary: max |F_T(p) - u| at T=1e4 (and |F_T - onehot(argmax)| at the low T)",
}


def check_softening_axioms(operator: Callable[[Array, Any], Array], *, num_draws: int = 1000,
                           num_classes: Sequence[int] = (2, 3, 5, 8, 12),
                           temperatures: Array | None = None,
                           low_temperature: float | None = 1e-3,
                           seed: int = 0) -> AxiomReport:
  """Tests ``operator(log_p, temperature) -> log_p`` (one ``[K]`` instance) against S1–S5.

  ``temperatures``: the grid for S3 (default 200 points log-spaced in [1, 100]; use a grid
  inside the operator's domain). ``low_temperature=None`` skips the T → 0 half of S5 (the
  uniform-mixing family is undefined there).
  """
  grid = jnp.geomspace(1.0, 100.0, 200) if temperatures is None else jnp.asarray(temperatures)
  op = jax.vmap(operator, in_axes=(0, None))
  op_t = jax.vmap(jax.vmap(operator, in_axes=(0, None)), in_axes=(None, 0))  # [T, n, K]

  def block(p):
    res = {}
    k = p.shape[-1]
    lp = jnp.log(p)
    inst = {"p": p}
    t_mid = grid[len(grid) // 2]
    f = jnp.exp(op(lp, t_mid))
    higher = p[:, :, None] > p[:, None, :]
    s1 = jnp.max(jnp.where(higher, f[:, None, :] - f[:, :, None], 0.0), axis=(1, 2))
    res["S1"] = (s1, inst)
    pert = p * (1 + 1e-7 * jnp.sin(jnp.arange(k) + 1.0))
    pert = pert / jnp.sum(pert, -1, keepdims=True)
    s2 = jnp.maximum(jnp.max(jnp.abs(jnp.exp(op(jnp.log(pert), t_mid)) - f), -1),
                     jnp.max(jnp.abs(jnp.exp(op(lp, t_mid * (1 + 1e-7))) - f), -1))
    res["S2"] = (s2, inst)
    ft = op_t(lp, grid)
    h = jax.vmap(D.entropy_from_log)(ft)                                   # [T, n]
    res["S3"] = (jnp.max(jnp.maximum(h[:-1] - h[1:], 0.0), 0), inst)
    res["S4"] = (jnp.max(jnp.abs(jnp.exp(op(lp, 1.0)) - p), -1), inst)
    s5 = jnp.max(jnp.abs(jnp.exp(op(lp, 1e4)) - 1.0 / k), -1)
    if low_temperature is not None:
      srt = jnp.sort(p, -1)
      unique = (srt[:, -1] - srt[:, -2]) > 2e-2 * srt[:, -1]   # well-separated argmax
      onehot = jax.nn.one_hot(jnp.argmax(p, -1), k, dtype=p.dtype)
      low = jnp.max(jnp.abs(jnp.exp(op(lp, low_temperature)) - onehot), -1)
      s5 = jnp.maximum(s5, jnp.where(unique, low, 0.0))
    res["S5"] = (s5, inst)
    return res

  res: dict[str, list] = {k: [] for k in _SOFT_DESC}
  for i, k in enumerate(num_classes):
    blk = jax.jit(block)(jnp.asarray(random_simplex(seed * 1000 + 17 + i, num_draws, k)))
    for name, (values, inst) in blk.items():
      res[name].append(_worst(values, inst))
  out = {k: _merge(v) for k, v in res.items()}
  return AxiomReport({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                     dict(_SOFT_DESC))


_AGG_DESC = {
    "G1": "validity + unanimity: max |A(p,..,p) - p| and |sum-1|",
    "G2": "positivity inheritance: a class positive for all weighted teachers lost (1 = yes)",
    "G3": "weight monotonicity: max increase of KL(p_i||A) when w_i grows",
    "G4": "continuity: max |A| change under a 1e-7 perturbation of (p, w)",
    "G5": "temperature coherence: max |F_T(A(p)) - A(F_T p)| (exact only for geometric)",
}


def check_aggregation_axioms(operator: Callable[[Array, Array], Array], *, num_teachers: int = 3,
                             num_draws: int = 1000,
                             num_classes: Sequence[int] = (2, 3, 5, 8, 12),
                             seed: int = 0) -> AxiomReport:
  """Tests ``operator(log_probs [M, K], weights [M]) -> log_p [K]`` against G1–G5."""
  op = jax.vmap(operator, in_axes=(0, 0))
  mt = num_teachers
  res: dict[str, list] = {k: [] for k in _AGG_DESC}

  def block(d):
    res = {}
    ps, w = d["ps"], d["w"]
    k = ps.shape[-1]
    lps = jnp.log(ps)
    inst = {"teachers": ps, "weights": w}
    la = op(lps, w)
    a = jnp.exp(la)
    same = jnp.broadcast_to(lps[:, :1], lps.shape)
    g1 = jnp.maximum(jnp.max(jnp.abs(jnp.exp(op(same, w)) - ps[:, 0]), -1),
                     jnp.abs(jnp.sum(a, -1) - 1.0))
    res["G1"] = (g1, inst)
    j1 = d["j1"]
    zeroed = ps.at[:, 0].set(jnp.where(jax.nn.one_hot(j1, k, dtype=bool), 0.0, ps[:, 0]))
    zeroed = zeroed / jnp.sum(zeroed, -1, keepdims=True)
    az = jnp.exp(op(LS.safe_log(zeroed), w))
    lost = jnp.any(jnp.all(zeroed > 0, axis=1) & (az <= 0), -1).astype(ps.dtype)
    res["G2"] = (lost, {"teachers": zeroed, "weights": w})
    idx = d["idx"]
    e = jax.nn.one_hot(idx, mt, dtype=w.dtype)
    w_up = (w + 0.2 * e) / 1.2
    pi = jnp.take_along_axis(lps, idx[:, None, None], axis=1)[:, 0]
    g3 = _kl(pi, op(lps, w_up)) - _kl(pi, la)
    res["G3"] = (g3, inst)
    lps_pert = lps + 1e-7 * jnp.sin(jnp.arange(k) + 1.0)
    lps_pert = lps_pert - jax.nn.logsumexp(lps_pert, -1, keepdims=True)
    w_pert = w * (1 + 1e-7 * jnp.cos(jnp.arange(mt) + 1.0))
    w_pert = w_pert / jnp.sum(w_pert, -1, keepdims=True)
    g4 = jnp.max(jnp.abs(jnp.exp(op(lps_pert, w_pert)) - a), -1)
    res["G4"] = (g4, inst)
    t = d["t"]
    lhs = jnp.exp(soften(la, temperature=t[:, 0]))
    rhs = jnp.exp(op(soften(lps, temperature=t), w))
    res["G5"] = (jnp.max(jnp.abs(lhs - rhs), -1), {**inst, "temperature": t[:, 0, 0]})
    return res

  for i, k in enumerate(num_classes):
    rng = np.random.default_rng(seed * 1000 + 31 + i)
    d = dict(ps=random_simplex(rng, num_draws * mt, k).reshape(num_draws, mt, k),
             w=random_simplex(rng, num_draws, mt, conc_range=(0.0, 1.0), floor=1e-3),
             j1=rng.integers(0, k, size=num_draws), idx=rng.integers(0, mt, size=num_draws),
             t=2.0 ** rng.uniform(-2, 2, size=(num_draws, 1, 1)))
    blk = jax.jit(block)({n: jnp.asarray(v) for n, v in d.items()})
    for name, (values, inst) in blk.items():
      res[name].append(_worst(values, inst))
  out = {k: _merge(v) for k, v in res.items()}
  return AxiomReport({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                     dict(_AGG_DESC))
