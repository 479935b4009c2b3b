r"""Offline policy distillation with ADPO on a linear-Gaussian control task (spec adpo.md §7.2).

CPU substitute for the paper's MuJoCo runs [proposed]: dynamics s' = A s + B a + w,
w ~ N(0, σ_w² I), cost sᵀQs + aᵀRa (return = −Σ cost over H steps). The teacher is the LQR
controller with Gaussian exploration, π_T(a|s) = N(−K s, σ_T² I), an analytic Gaussian. A data set
of states is collected with the teacher; for every state P candidate actions are drawn from the
teacher, and the target is q = softmax(log π_T(a_i|s)/T). The student is an MLP mean with a
learned state-independent log-std (the NNX ``experiments.models.MLP``, tanh, trained
functionally on its parameter pytree), so every metric has a closed form or is exact:

* KL(π_T ‖ π_S) between the two Gaussians, averaged over held-out teacher states;
* NDCG@P of the student's candidate ranking (by log π_S) against the teacher's relevance q;
* episodic return of the student's mean action (teacher's mean for reference).

Methods (same data, same initialisation, same batches):

* ``kd`` — uniform anchor, τ = T: CE(softmax(log π_T/T), softmax(log π_S/T)) [paper, Table 1];
* ``adpo_self`` — anchor = the student at initialisation (frozen), τ = T;
* ``adpo_ema`` — anchor = EMA (0.99) of the student's parameters, τ = T.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.linalg
from flax import nnx

from experiments import models
from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics as metrics_lib
from experiments.metrics import smoke_banner
from experiments.stats import format_mean_ci, mean_ci
from kdjax import preference as P
from kdjax import reductions

METHODS = ("kd", "adpo_self", "adpo_ema")


# ----------------------------------------------------------------------------- environment


def make_system(seed, state_dim, action_dim):
  """A random controllable linear system (spectral radius 1.05: unstable without control) and
  its LQR gain K (discrete algebraic Riccati equation)."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(state_dim, state_dim))
  a *= 1.05 / np.max(np.abs(np.linalg.eigvals(a)))
  b = rng.normal(size=(state_dim, action_dim)) / math.sqrt(state_dim)
  q, r = np.eye(state_dim), 0.1 * np.eye(action_dim)
  x = scipy.linalg.solve_discrete_are(a, b, q, r)
  k = np.linalg.solve(r + b.T @ x @ b, b.T @ x @ a)
  return {k_: jnp.asarray(v, jnp.float32) for k_, v in
          dict(A=a, B=b, Q=q, R=r, K=k).items()}


def gaussian_logpdf(a, mean, log_std):
  z = (a - mean) * jnp.exp(-log_std)
  return jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
  """KL(N(mean_p, diag σ_p²) ‖ N(mean_q, diag σ_q²)) over the last axis."""
  vp, vq = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
  return jnp.sum(log_std_q - log_std_p + (vp + (mean_p - mean_q) ** 2) / (2 * vq) - 0.5, -1)


def rollout_states(key, sysm, cfg, policy_mean, *, n_episodes, noise_std):
  """States visited by a Gaussian policy (mean ``policy_mean``), [n_episodes * H, state_dim]."""
  def episode(k):
    k0, kr = jax.random.split(k)
    s0 = jax.random.normal(k0, (cfg.state_dim,))

    def step(s, kk):
      ka, kw = jax.random.split(kk)
      a = policy_mean(s) + noise_std * jax.random.normal(ka, (cfg.action_dim,))
      s_next = sysm["A"] @ s + sysm["B"] @ a + cfg.process_noise * jax.random.normal(
          kw, (cfg.state_dim,))
      return s_next, s

    _, ss = jax.lax.scan(step, s0, jax.random.split(kr, cfg.horizon))
    return ss

  return jax.vmap(episode)(jax.random.split(key, n_episodes)).reshape(-1, cfg.state_dim)


def episodic_return(key, sysm, cfg, policy_mean, n_episodes):
  """Mean return −Σ_t (sᵀQs + aᵀRa) of a deterministic policy over ``n_episodes``."""
  def episode(k):
    s0 = jax.random.normal(k, (cfg.state_dim,))

    def step(s, kw):
      a = policy_mean(s)
      cost = s @ sysm["Q"] @ s + a @ sysm["R"] @ a
      s_next = sysm["A"] @ s + sysm["B"] @ a + cfg.process_noise * jax.random.normal(
          kw, (cfg.state_dim,))
      return s_next, cost

    _, costs = jax.lax.scan(step, s0, jax.random.split(jax.random.fold_in(k, 1), cfg.horizon))
    return -jnp.sum(costs)

  # Divergent students are clipped so one blow-up cannot produce inf/NaN in the table.
  return jnp.mean(jnp.maximum(jax.vmap(episode)(jax.random.split(key, n_episodes)), -1e6))


def ndcg(scores, relevance):
  """NDCG@P of ranking by ``scores`` with graded ``relevance`` (gains = relevance), per row."""
  p = scores.shape[-1]
  disc = 1.0 / jnp.log2(jnp.arange(p) + 2.0)
  order = jnp.argsort(-scores, axis=-1)
  dcg = jnp.sum(jnp.take_along_axis(relevance, order, -1) * disc, -1)
  ideal = jnp.sum(-jnp.sort(-relevance, axis=-1) * disc, -1)
  return dcg / jnp.maximum(ideal, 1e-12)


# ----------------------------------------------------------------------------- student


def _mean_net(cfg, key=0) -> models.MLP:
  return models.MLP(cfg.state_dim, (cfg.hidden, cfg.hidden), cfg.action_dim, activation="tanh",
                    rngs=nnx.Rngs(params=key))


def student_init(key, cfg):
  """Student parameters: the mean network's NNX state and the log-std."""
  return {"mlp": nnx.state(_mean_net(cfg, key), nnx.Param),
          "log_std": jnp.full((cfg.action_dim,), math.log(cfg.student_init_std))}


@functools.lru_cache(maxsize=8)
def _mean_graphdef(state_dim, hidden, action_dim):
  cfg = ml_collections.ConfigDict(dict(state_dim=state_dim, hidden=hidden, action_dim=action_dim))
  return nnx.graphdef(nnx.eval_shape(lambda: _mean_net(cfg)))


def student_mean(cfg, params, s):
  """The student's mean action for states ``s`` (``[..., state_dim]``)."""
  flat = s.reshape(-1, s.shape[-1])
  gd = _mean_graphdef(int(cfg.state_dim), int(cfg.hidden), int(cfg.action_dim))
  out = nnx.merge(gd, params["mlp"])(flat)
  return out.reshape(*s.shape[:-1], out.shape[-1])


def student_dist(cfg, params, s):
  return student_mean(cfg, params, s), jnp.broadcast_to(params["log_std"], s.shape[:-1] +
                                                        params["log_std"].shape)


_RUN_INDEPENDENT = ("progress", "seeds", "seed", "smoke")


def _frozen(cfg) -> ml_collections.FrozenConfigDict:
  """Hashable view of the config fields the compiled functions depend on (jit cache key)."""
  return ml_collections.FrozenConfigDict(
      {k: cfg[k] for k in cfg.keys() if k not in _RUN_INDEPENDENT})


@functools.lru_cache(maxsize=8)
def _train_fn(cfg):
  tx = optax.adam(cfg.lr)
  losses = {}

  def loss(params, anchor, s, acts, q, method):
    mean, log_std = student_dist(cfg, params, s)
    lp = gaussian_logpdf(acts, mean[:, None], log_std[:, None])       # [B, P]
    if method == "kd":
      lr = jnp.zeros_like(lp)
    else:
      am, als = student_dist(cfg, anchor, s)
      lr = jax.lax.stop_gradient(gaussian_logpdf(acts, am[:, None], als[:, None]))
    return reductions.masked_mean(P.adpo_loss(lp, lr, q, temperature=cfg.temperature))

  for m in METHODS:
    losses[m] = jax.grad(functools.partial(loss, method=m))

  def one_run(key, sysm_k, states, test_states, method_idx):
    k_init, k_data, k_eval = jax.random.split(key, 3)
    params = student_init(k_init, cfg)
    anchor = params
    opt = tx.init(params)
    n = states.shape[0]

    def step(carry, k):
      params, anchor, opt = carry
      ki, ka = jax.random.split(k)
      idx = jax.random.randint(ki, (cfg.batch_size,), 0, n)
      s = states[idx]
      t_mean = -s @ sysm_k.T
      acts = t_mean[:, None] + cfg.teacher_std * jax.random.normal(
          ka, (cfg.batch_size, cfg.num_candidates, cfg.action_dim))
      t_lp = gaussian_logpdf(acts, t_mean[:, None], jnp.log(cfg.teacher_std))
      q = P.teacher_target(t_lp, temperature=cfg.temperature)
      g = jax.lax.switch(method_idx, [losses[m] for m in METHODS], params, anchor, s, acts, q)
      upd, opt = tx.update(g, opt, params)
      params = optax.apply_updates(params, upd)
      # adpo_self keeps its initial anchor; adpo_ema tracks the student; kd ignores it.
      new_anchor = P.ema_anchor(anchor, params, decay=cfg.ema_decay)
      anchor = jax.tree.map(lambda a, b: jnp.where(method_idx == 2, b, a), anchor, new_anchor)
      return (params, anchor, opt), None

    (params, _, _), _ = jax.lax.scan(step, (params, anchor, opt),
                                     jax.random.split(k_data, cfg.steps))
    # metrics on held-out teacher states
    mean, log_std = student_dist(cfg, params, test_states)
    t_mean = -test_states @ sysm_k.T
    t_ls = jnp.full_like(t_mean, math.log(cfg.teacher_std))
    kl = jnp.mean(gaussian_kl(t_mean, t_ls, mean, log_std))
    acts = t_mean[:, None] + cfg.teacher_std * jax.random.normal(
        k_eval, (test_states.shape[0], cfg.num_candidates, cfg.action_dim))
    rel = P.teacher_target(gaussian_logpdf(acts, t_mean[:, None], t_ls[:, None]),
                           temperature=cfg.temperature)
    nd = jnp.mean(ndcg(gaussian_logpdf(acts, mean[:, None], log_std[:, None]), rel))
    return {"kl": kl, "ndcg": nd, "params": params,
            "std": jnp.mean(jnp.exp(log_std)), "mean_err": jnp.mean(
                jnp.linalg.norm(mean - t_mean, axis=-1))}

  return jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, 0, None)))


def run_methods(cfg, progress=False):
  """Trains every method on every seed; returns per-method dicts of per-seed metrics."""
  fcfg = _frozen(cfg)
  systems, states, tests, teacher_ret = [], [], [], []
  for s in range(cfg.seeds):
    sysm = make_system(cfg.seed + s, cfg.state_dim, cfg.action_dim)
    k = jax.random.PRNGKey(cfg.seed + 1000 + s)
    teacher = lambda x, kk=sysm["K"]: -kk @ x
    states.append(rollout_states(jax.random.fold_in(k, 1), sysm, fcfg, teacher,
                                 n_episodes=cfg.episodes, noise_std=cfg.teacher_std))
    tests.append(rollout_states(jax.random.fold_in(k, 2), sysm, fcfg, teacher,
                                n_episodes=8, noise_std=cfg.teacher_std)[:cfg.test_states])
    teacher_ret.append(float(episodic_return(jax.random.fold_in(k, 3), sysm, fcfg, teacher,
                                             cfg.eval_episodes)))
    systems.append(sysm)
  gains = jnp.stack([s["K"] for s in systems])
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
  fn = _train_fn(fcfg)
  out = {"teacher_return": teacher_ret}
  it = METHODS
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(METHODS, desc="offline distillation", leave=False)
  for m in it:
    t0 = time.perf_counter()
    res = fn(keys, gains, jnp.stack(states), jnp.stack(tests), METHODS.index(m))
    rets = []
    for s, sysm in enumerate(systems):
      p_s = jax.tree.map(lambda x, s=s: x[s], res["params"])
      pol = lambda x, p_s=p_s: student_mean(fcfg, p_s, x)
      rets.append(float(episodic_return(jax.random.fold_in(jax.random.PRNGKey(
          cfg.seed + 1000 + s), 3), sysm, fcfg, pol, cfg.eval_episodes)))
    out[m] = {"kl": np.asarray(res["kl"]), "ndcg": np.asarray(res["ndcg"]),
              "return": np.asarray(rets), "std": np.asarray(res["std"]),
              "mean_err": np.asarray(res["mean_err"]), "seconds": time.perf_counter() - t0}
  return out


def table(res) -> tuple[str, list[dict]]:
  cols = ("kl", "ndcg", "return", "mean_err", "std")
  lines = [f"{'method':12s} " + " ".join(f"{c:>20s}" for c in
                                           ("KL(teacher||student)", "NDCG", "return",
                                            "|mean - teacher|", "student std"))]
  lines.append("-" * len(lines[0]))
  rows = []
  for m in METHODS:
    row = {"method": m}
    cells = []
    for c in cols:
      mu, ci = mean_ci(res[m][c])
      row[c], row[c + "_ci95"] = float(mu), float(ci)
      cells.append(format_mean_ci(mu, ci).rjust(20))
    rows.append(row)
    lines.append(f"{m:12s} " + " ".join(cells))
  tr = mean_ci(np.asarray(res["teacher_return"]))
  lines.append(f"{'teacher':12s} {'0':>20s} {'1':>20s} {format_mean_ci(*tr):>20s}")
  return "\n".join(lines), rows


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  for k in ("state_dim", "action_dim", "horizon", "episodes", "test_states", "eval_episodes",
            "hidden"):
    C.check_number(config, k, low=1, integer=True)
  C.check_number(config, "num_candidates", low=2, integer=True)
  for k in ("temperature", "lr"):
    C.check_number(config, k, low=0, low_open=True)
  for k in ("process_noise", "teacher_std", "student_init_std"):
    C.check_number(config, k, low=0)
  C.check_number(config, "ema_decay", low=0, high=1, high_open=True)
  C.check_bool(config, "progress")


def run(config, workdir):
  validate(config)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  smoke = bool(config.get("smoke", False))
  if smoke:
    print(smoke_banner("adpo_offline"))
  t0 = time.perf_counter()
  res = run_methods(config, progress=config.progress)
  text, rows = table(res)
  if smoke:   # a 100-step student can still diverge: its table is not a result
    print(f"adpo_offline pipeline ran: methods {', '.join(METHODS)}, {config.seeds} seeds, "
          f"{config.steps} steps; columns KL(teacher||student), NDCG, return in results.json")
  else:
    print(f"\nADPO offline distillation (linear-Gaussian control, {config.seeds} seeds, "
          f"{config.steps} steps, P={config.num_candidates}, T={config.temperature}): "
          f"mean ± 95% CI\n{text}")
  metrics = {"table": rows, "teacher_return": res["teacher_return"],
             "seconds": time.perf_counter() - t0, "smoke": smoke}
  metrics_lib.write_results(workdir, metrics, config, smoke=smoke)
  print(f"\nwrote {workdir / 'results.json'} ({metrics['seconds']:.0f} s)")
  if smoke:
    print(smoke_banner("adpo_offline", end=True))
  return metrics
