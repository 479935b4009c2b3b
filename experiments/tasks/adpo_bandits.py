r"""ADPO on noisy contextual bandits (arXiv:2510.18913 §4.1; spec adpo.md §7.1, CPU protocol).

Contexts x ~ N(0, I_d), P items, true reward r*(x, i) = w_iᵀx (w_i ~ N(0, I), one W per seed).
Each step observes noisy rewards r̃ for all P items of a batch of contexts; 12 scenarios = 4
corruption types × 3 severities [proposed parameters, spec §7.1]. The reference policy is an MLP
pre-trained for 30 steps on clean data (SFT on the true best item); every method starts from it.
Metric: WinMass = E_x π(i*(x)|x) on clean test contexts (shifted ones for the shift scenarios).

Methods (all see the same contexts/noise, take ``inner_steps`` AdamW steps per batch):

* ``dpo_hard`` / ``dpo_soft`` — one random pair per context, hard label / Bradley–Terry label
  σ((r̃_i − r̃_j)/β_r) on raw rewards, anchored to the reference, β = 1/τ [paper baselines].
* ``adpo_pairwise`` — soft pairwise ADPO on all pairs, q_ij = σ((A_i − A_j)/β_r), A = z-scored
  group rewards, fixed reference anchor.
* ``adpo_listwise`` — q = softmax(A/β_r) from the raw noisy rewards (Listwise-Raw), fixed anchor.
* ``adpo_dynamic`` — the same with the on-policy anchor π_ref ← π_old at each batch.
* ``ppo_clip`` — the PPO-clip surrogate in expectation over the P items under π_old,
  advantages A (ε = 0.2): ``kdjax.policy.trrd_loss`` with π_mix = π_old (λ = 0).
* ``trpo_kl`` — the unclipped surrogate minus β_kl KL(π_old ‖ π) (TRPO-like penalty).

The policy is the NNX ``experiments.models.MLP`` (tanh), trained functionally on its parameter
pytree (``nnx.merge(graphdef, params)``), vmapped over (scenario, seed) runs and scanned over
steps, so the 12 × 7 × seeds grid runs on a CPU in minutes.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics as metrics_lib
from experiments import models
from experiments.metrics import smoke_banner
from experiments.stats import format_mean_ci, mean_ci
from kdjax import policy as PO
from kdjax import preference as P
from kdjax import reductions

METHODS = ("dpo_hard", "dpo_soft", "adpo_pairwise", "adpo_listwise", "adpo_dynamic",
           "ppo_clip", "trpo_kl")

_SEVERITIES = ("low", "medium", "high")


def scenarios() -> list[dict]:
  """The 12 scenarios [proposed parameters; the paper does not publish them]."""
  out = []
  for i, sev in enumerate(_SEVERITIES):
    base = dict(sigma=0.0, out_frac=0.0, flip_p=0.0, cauchy=0.0, shift=0.0, severity=sev)
    out.append(dict(base, kind="gaussian_outliers", sigma=(0.5, 1.0, 2.0)[i],
                    out_frac=(0.05, 0.1, 0.2)[i]))
    out.append(dict(base, kind="distribution_shift", sigma=0.5, shift=(1.0, 2.0, 3.0)[i]))
    out.append(dict(base, kind="adversarial_flips", flip_p=(0.1, 0.2, 0.3)[i]))
    out.append(dict(base, kind="heavy_tailed_cauchy", cauchy=(0.5, 1.0, 2.0)[i]))
  for s in out:
    s["name"] = f"{s['kind']}/{s['severity']}"
  order = ("gaussian_outliers", "distribution_shift", "adversarial_flips", "heavy_tailed_cauchy")
  return sorted(out, key=lambda s: (order.index(s["kind"]), _SEVERITIES.index(s["severity"])))


def _scenario_arrays(scns):
  keys = ("sigma", "out_frac", "flip_p", "cauchy", "shift")
  return {k: jnp.asarray([s[k] for s in scns], jnp.float32) for k in keys}


# ----------------------------------------------------------------------------- model


def make_policy(cfg, hidden, key=0) -> models.MLP:
  """The policy network: an NNX tanh MLP, contexts ``[B, d]`` -> item logits ``[B, P]``."""
  return models.MLP(cfg.context_dim, (hidden,) * cfg.depth, cfg.num_items, activation="tanh",
                    rngs=nnx.Rngs(params=key))


def log_policy(graphdef, params, x):
  return jax.nn.log_softmax(nnx.merge(graphdef, params)(x), axis=-1)


# ----------------------------------------------------------------------------- environment


def noisy_rewards(key, r_star, sc):
  """Observed rewards r̃ = r* + noise for one scenario (traced parameters; inactive terms are 0)."""
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  shape = r_star.shape
  noise = sc["sigma"] * jax.random.normal(k1, shape)
  outlier = jax.random.uniform(k2, shape) < sc["out_frac"]
  sign = jnp.where(jax.random.uniform(k3, shape) < 0.5, -1.0, 1.0)
  noise = noise + jnp.where(outlier, sign * 10.0 * sc["sigma"], 0.0)
  noise = noise + sc["cauchy"] * jax.random.cauchy(k4, shape)
  r = r_star + noise
  flip = jax.random.uniform(k5, shape[:-1] + (1,)) < sc["flip_p"]
  return jnp.where(flip, -r, r)


def win_mass(graphdef, params, w, x):
  best = jnp.argmax(x @ w.T, axis=-1)
  probs = jnp.exp(log_policy(graphdef, params, x))
  return jnp.mean(jnp.take_along_axis(probs, best[:, None], axis=-1))


# ----------------------------------------------------------------------------- losses


def make_loss(method: str, cfg, graphdef):
  """loss(params, ref_params, old_params, x, r_noisy, key) -> scalar (batch mean)."""
  tau, beta_r = cfg.tau, cfg.beta_r
  log_policy_ = functools.partial(log_policy, graphdef)

  def pair(key, n, p):
    i = jax.random.randint(key, (n,), 0, p)
    j = (i + jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, p)) % p
    return i, j

  def loss(params, ref, old, x, r, key):
    lp = log_policy_(params, x)
    n, p = lp.shape
    if method in ("dpo_hard", "dpo_soft"):
      lr = jax.lax.stop_gradient(log_policy_(ref, x))
      i, j = pair(key, n, p)
      take = lambda a, k: jnp.take_along_axis(a, k[:, None], axis=-1)[:, 0]
      ri, rj = take(r, i), take(r, j)
      if method == "dpo_hard":
        w, l = jnp.where(ri >= rj, i, j), jnp.where(ri >= rj, j, i)
        vals = P.dpo_loss(take(lp, w), take(lp, l), take(lr, w), take(lr, l), beta=1 / tau)
      else:
        qw = jax.nn.sigmoid((ri - rj) / beta_r)
        vals = P.soft_dpo_loss(take(lp, i), take(lp, j), take(lr, i), take(lr, j), qw,
                               beta=1 / tau)
      return reductions.masked_mean(vals)
    adv = P.group_zscore(r)
    if method == "adpo_pairwise":
      lr = jax.lax.stop_gradient(log_policy_(ref, x))
      u = P.anchored_logits(lp, lr, temperature=tau)
      return reductions.masked_mean(P.adpo_soft_pairwise_loss(u, P.pair_labels(adv,
                                                                                beta_r=beta_r)))
    if method in ("adpo_listwise", "adpo_dynamic"):
      anchor = ref if method == "adpo_listwise" else old
      lr = jax.lax.stop_gradient(log_policy_(anchor, x))
      q = jax.lax.stop_gradient(P.target_from_rewards(r, beta_r=beta_r))
      return reductions.masked_mean(P.adpo_loss(lp, lr, q, temperature=tau))
    lo = jax.lax.stop_gradient(log_policy_(old, x))
    po = jnp.exp(lo)
    if method == "ppo_clip":   # the TRRD surrogate with pi_mix = pi_old (lambda = 0) is PPO-clip
      per_item = PO.trrd_loss(lp, lo, adv, clip_eps=cfg.ppo_clip)
      return reductions.masked_mean(jnp.sum(po * per_item, axis=-1))
    ratio = jnp.exp(lp - lo)
    if method == "trpo_kl":
      kl = jnp.sum(po * (lo - lp), axis=-1)
      return -reductions.masked_mean(jnp.sum(po * ratio * adv, axis=-1) - cfg.trpo_beta * kl)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

  return loss


# ----------------------------------------------------------------------------- training


_CFG_KEYS = ("lr", "weight_decay", "context_dim", "depth", "num_items", "batch_size", "ref_steps",
             "steps", "eval_every", "inner_steps", "tau", "beta_r", "ppo_clip", "trpo_beta")


def _frozen(cfg) -> ml_collections.FrozenConfigDict:
  """Hashable view of the config fields the compiled functions depend on (jit cache key)."""
  return ml_collections.FrozenConfigDict({k: cfg[k] for k in _CFG_KEYS})


@functools.lru_cache(maxsize=16)
def _train_fns(cfg, hidden):
  """(pretrain, run) jitted once per (config, width); `run` takes the method index as a traced
  scalar, so lax.switch stays a real branch and all methods share one compilation."""
  tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_policy(cfg, hidden)))

  def pretrain(key, w):
    """Reference: `ref_steps` AdamW steps of SFT on the clean best item (30 in the paper)."""
    params = nnx.state(make_policy(cfg, hidden, key), nnx.Param)
    opt = tx.init(params)

    def step(carry, k):
      params, opt = carry
      x = jax.random.normal(k, (cfg.batch_size, cfg.context_dim))
      y = jnp.argmax(x @ w.T, axis=-1)
      g = jax.grad(lambda p: -jnp.mean(jnp.take_along_axis(
          log_policy(graphdef, p, x), y[:, None], axis=-1)))(params)
      upd, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, upd), opt), None

    (params, _), _ = jax.lax.scan(step, (params, opt), jax.random.split(
        jax.random.fold_in(key, 7), cfg.ref_steps))
    return params

  grads = [jax.grad(make_loss(m, cfg, graphdef)) for m in METHODS]
  n_evals = cfg.steps // cfg.eval_every

  def one_run(key, w, sc, ref, x_test, method_idx):

    def grad_fn(*a):
      return jax.lax.switch(method_idx, grads, *a)

    params, opt = ref, tx.init(ref)

    def step(carry, k):
      params, opt = carry
      kx, kn, kp = jax.random.split(k, 3)
      x = jax.random.normal(kx, (cfg.batch_size, cfg.context_dim))
      r = noisy_rewards(kn, x @ w.T, sc)
      old = params

      def inner(c, ki):
        pr, op = c
        g = grad_fn(pr, ref, old, x, r, ki)
        upd, op = tx.update(g, op, pr)
        return (optax.apply_updates(pr, upd), op), None

      (params, opt), _ = jax.lax.scan(inner, (params, opt),
                                      jax.random.split(kp, cfg.inner_steps))
      return (params, opt), None

    def block(carry, k):
      carry, _ = jax.lax.scan(step, carry, jax.random.split(k, cfg.eval_every))
      return carry, win_mass(graphdef, carry[0], w, x_test)

    (params, _), curve = jax.lax.scan(block, (params, opt), jax.random.split(key, n_evals))
    return curve

  return (graphdef, jax.jit(jax.vmap(pretrain)),
          jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, 0, 0, None))))


def run_grid(cfg, *, methods=METHODS, scenario_list=None, hidden=None, progress=True):
  """Runs every method on every (scenario, seed); returns a dict of numpy arrays.

  ``winmass[m]``: [S, seeds] final WinMass; ``curves[m]``: [S, seeds, n_evals];
  ``ref_winmass``: [S, seeds] WinMass of the 30-step reference.
  """
  scns = scenario_list or scenarios()
  hidden = hidden or cfg.hidden
  n_s, n_seeds = len(scns), cfg.seeds
  sc = _scenario_arrays(scns)
  sc_runs = {k: jnp.repeat(v, n_seeds) for k, v in sc.items()}
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed), n_seeds)
  env_keys = jnp.tile(keys, (n_s, 1))  # the same environment per seed in every scenario
  w = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1),
                                           (cfg.num_items, cfg.context_dim)))(env_keys)
  # Shifted test contexts: a random direction of norm `shift` (0 for the other scenarios).
  def test_x(k, shift):
    x = jax.random.normal(jax.random.fold_in(k, 2), (cfg.test_contexts, cfg.context_dim))
    d = jax.random.normal(jax.random.fold_in(k, 3), (cfg.context_dim,))
    return x + shift * d / jnp.linalg.norm(d)
  x_test = jax.vmap(test_x)(env_keys, sc_runs["shift"])
  graphdef, pretrain, run_fn = _train_fns(_frozen(cfg), hidden)
  ref = pretrain(jax.vmap(lambda k: jax.random.fold_in(k, 4))(env_keys), w)
  ref_wm = jax.vmap(functools.partial(win_mass, graphdef))(ref, w, x_test)
  out = {"winmass": {}, "curves": {}, "seconds": {},
         "ref_winmass": np.asarray(ref_wm).reshape(n_s, n_seeds),
         "scenarios": [s["name"] for s in scns], "hidden": hidden}
  run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 5))(env_keys)
  it = methods
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(methods, desc=f"bandits h={hidden}", leave=False)
  for m in it:
    t0 = time.perf_counter()
    curve = np.asarray(run_fn(run_keys, w, sc_runs, ref, x_test, METHODS.index(m)))
    out["seconds"][m] = time.perf_counter() - t0
    out["curves"][m] = curve.reshape(n_s, n_seeds, -1)
    out["winmass"][m] = out["curves"][m][..., -1]
  return out


# ----------------------------------------------------------------------------- reporting


def table(res, methods=None) -> tuple[str, list[dict]]:
  methods = methods or list(res["winmass"])
  rows, lines = [], []
  header = f"{'scenario':34s} {'ref':>6s} " + " ".join(f"{m:>15s}" for m in methods) + "  best"
  lines += [header, "-" * len(header)]
  ref_m, _ = mean_ci(res["ref_winmass"])
  for s, name in enumerate(res["scenarios"]):
    row = {"scenario": name, "reference": float(ref_m[s])}
    cells = []
    for m in methods:
      mu, ci = mean_ci(res["winmass"][m][s])
      row[m], row[m + "_ci95"] = float(mu), float(ci)
      cells.append(format_mean_ci(mu, ci).rjust(15))
    best = max(methods, key=lambda m: row[m])
    row["best"] = best
    rows.append(row)
    lines.append(f"{name:34s} {ref_m[s]:6.3f} " + " ".join(cells) + f"  {best}")
  return "\n".join(lines), rows


def plot(res, path=None, *, scale=None):
  """WinMass per scenario and method (and the width sweep); saved to ``path`` if given."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  methods = list(res["winmass"])
  n_s = len(res["scenarios"])
  fig = Figure(figsize=(14 if scale else 9, 4.5))    # no pyplot: the caller's backend is kept
  axes = fig.subplots(1, 2 if scale else 1, squeeze=False)
  ax = axes[0, 0]
  width = 0.8 / len(methods)
  for k, m in enumerate(methods):
    mu, ci = mean_ci(res["winmass"][m])
    ax.bar(np.arange(n_s) + k * width, mu, width, yerr=np.nan_to_num(ci), label=m)
  ax.set_xticks(np.arange(n_s) + 0.4)
  ax.set_xticklabels([s.replace("/", "\n") for s in res["scenarios"]], fontsize=6, rotation=90)
  ax.set_ylabel("WinMass (clean test contexts)")
  ax.legend(fontsize=7, ncol=2)
  if scale:
    ax = axes[0, 1]
    hs = sorted(scale)
    for m in methods:
      mu = [mean_ci(scale[h]["winmass"][m][0])[0] for h in hs]
      ax.plot(hs, mu, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width")
    ax.set_ylabel("WinMass")
    ax.set_title(scale[hs[0]]["scenarios"][0])
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def plot_curves(res, path=None, scenario=0):
  """WinMass against step for one scenario (mean and 95% CI band over seeds)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for m, c in res["curves"].items():
    mu, ci = mean_ci(c[scenario], axis=0)
    steps = np.arange(1, mu.size + 1) * res.get("eval_every", 1)
    ax.plot(steps, mu, label=m)
    ax.fill_between(steps, mu - np.nan_to_num(ci), mu + np.nan_to_num(ci), alpha=0.2)
  ax.set_title(res["scenarios"][scenario])
  ax.set_xlabel("step")
  ax.set_ylabel("WinMass")
  ax.legend(fontsize=7)
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  for k in ("context_dim", "hidden", "depth", "test_contexts", "inner_steps", "eval_every"):
    C.check_number(config, k, low=1, integer=True)
  C.check_number(config, "num_items", low=2, integer=True)
  C.check_number(config, "ref_steps", low=0, integer=True)
  C.check_number(config, "lr", low=0, low_open=True)
  C.check_number(config, "weight_decay", low=0)
  for k in ("tau", "beta_r", "ppo_clip", "trpo_beta"):
    C.check_number(config, k, low=0, low_open=True)
  C.check_choice(config, "scale_scenario", [s["name"] for s in scenarios()])
  C.check_numbers(config, "scale_hidden", low=1, integer=True, nonempty=False)
  C.check_bool(config, "progress")


def run(config, workdir):
  validate(config)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  smoke = bool(config.get("smoke", False))
  if smoke:
    print(smoke_banner("adpo_bandits"))
  t0 = time.perf_counter()
  res = run_grid(config, progress=config.progress)
  res["eval_every"] = config.eval_every
  text, rows = table(res)
  if not smoke:
    print(f"\nADPO noisy bandits: final WinMass, mean ± 95% CI over {config.seeds} seeds "
          f"(hidden {config.hidden}, {config.steps} steps)\n{text}")
  scale = {}
  scen = [s for s in scenarios() if s["name"] == config.scale_scenario]
  for h in config.scale_hidden:
    scale[h] = run_grid(config, scenario_list=scen, hidden=h, progress=config.progress)
  if scale:
    print(f"\nModel-scale sweep on {config.scale_scenario}:")
    methods = list(res["winmass"])
    print(f"{'hidden':>6s} " + " ".join(f"{m:>15s}" for m in methods))
    for h in sorted(scale):
      cells = [format_mean_ci(*mean_ci(scale[h]["winmass"][m][0])).rjust(15) for m in methods]
      print(f"{h:6d} " + " ".join(cells))
  # Direction summary (the paper: ADPO beats DPO; listwise best in most scenarios).
  best_counts = {}
  for r in rows:
    best_counts[r["best"]] = best_counts.get(r["best"], 0) + 1
  dpo_best = np.maximum(res["winmass"]["dpo_hard"].mean(-1), res["winmass"]["dpo_soft"].mean(-1))
  adpo_best = np.max(np.stack([res["winmass"][m].mean(-1) for m in
                               ("adpo_pairwise", "adpo_listwise", "adpo_dynamic")]), 0)
  gain = (adpo_best / dpo_best - 1) * 100
  summary = {"best_counts": best_counts,
             "adpo_over_dpo_percent": [float(g) for g in gain],
             "seconds": time.perf_counter() - t0}
  if smoke:
    print(f"adpo_bandits pipeline ran: {len(rows)} scenarios ({rows[0]['scenario']} .. "
          f"{rows[-1]['scenario']}) x {len(res['winmass'])} methods, {config.seeds} seeds, "
          f"{config.steps} steps")
  else:
    print(f"\nbest method counts: {best_counts}")
    print("best ADPO variant vs best DPO, % per scenario: "
          + " ".join(f"{g:+.1f}" for g in gain))
  # metrics.jsonl + TensorBoard: one phase per method, WinMass (mean over seeds) per scenario.
  writer = metrics_lib.MetricWriter(workdir)
  writer.truncate_all()
  for m, c in res["curves"].items():
    for j in range(c.shape[-1]):
      writer.write(m, (j + 1) * config.eval_every,
                   {f"winmass/{s}": float(np.mean(c[i, :, j]))
                    for i, s in enumerate(res["scenarios"])})
  writer.close()
  plot(res, workdir / "winmass.png", scale=scale or None)
  plot_curves(res, workdir / "curves.png", scenario=0)
  metrics = {"table": rows, "summary": summary, "smoke": smoke,
             "scale": {str(h): {m: [float(v) for v in s["winmass"][m][0]] for m in s["winmass"]}
                       for h, s in scale.items()},
             "reference_winmass_mean": float(res["ref_winmass"].mean()),
             "method_seconds": res["seconds"]}
  metrics_lib.write_results(workdir, metrics, config, smoke=smoke)
  print(f"\nwrote {workdir / 'results.json'}, winmass.png, curves.png "
        f"({summary['seconds']:.0f} s)")
  if smoke:
    print(smoke_banner("adpo_bandits", end=True))
  return metrics
