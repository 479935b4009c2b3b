r"""PACED on tabular problems (paced.md §8 [proposed]): fast ablations over arms, (α, β) and K.

Problems: contexts x with 32-dim Gaussian features φ(x) and 16 candidate answers, one correct:
y(x) = argmax(M φ(x) + η ε_x) — a linear rule plus per-context noise, so some contexts are easy
for a linear model and some are not. Two families share the student's parameters: family A
(distilled) and family B (features with another mean; learned before distillation, used to
measure forgetting).

* teacher: a fixed softmax policy t(·|x) = softmax(τ_x · onehot(y) + noise) with τ_x spread so
  that its pass rates cover [0, 1] (mostly high);
* student: linear softmax model W φ(x) + b (capacity-limited), pre-trained for a few steps on
  the labels of family B and of an eighth of family A, so that its pass rates on family A cover (0, 1) with mass at both
  ends;
* distillation on family A's 512 training contexts, teacher-forced on the teacher's full
  distribution, for an equal number of Adam steps per arm; p̂ from K student samples per
  context, refreshed every ``refresh_every`` steps (and at the two-stage switch);
* arms: uniform / PACED forward KL, uniform / PACED reverse KL, two-stage FKL→RKL (PACED), AKL;
  ablations: PACED FKL over (α, β) and K;
* metrics: held-out accuracy on family A (new contexts), expected pass rate, forgetting
  (accuracy drop on held-out family-B contexts); the cross-problem gradient SNR per p̂ bin.

Seeds run in parallel (``jax.vmap``); everything is a handful of jitted calls.
"""

from __future__ import annotations

import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics as metrics_lib
from experiments.metrics import smoke_banner
from experiments.stats import format_mean_ci, mean_ci
from kdjax import divergences as D
from kdjax import pacing as P
from kdjax.losses import adaptive_kl

ARMS = ("uniform_fkl", "paced_fkl", "uniform_rkl", "paced_rkl", "two_stage", "akl")


# ----------------------------------------------------------------------------- problems


def make_problems(key, cfg):
  """One seed's data: features, labels and teacher logits for both families and splits."""
  d, v = cfg.feature_dim, cfg.num_answers
  km, kb, *ks = jax.random.split(key, 8)
  m_a = jax.random.normal(km, (d, v)) / jnp.sqrt(d)
  shift_b = jax.random.normal(kb, (d,))

  def family(k, n, shift):
    k1, k2, k3, k4 = jax.random.split(k, 4)
    phi = jax.random.normal(k1, (n, d)) + shift
    y = jnp.argmax(phi @ m_a + cfg.label_noise * jax.random.normal(k2, (n, v)), -1)
    # Teacher confidence τ_x: log-uniform, so teacher pass rates spread (mostly high).
    tau = jnp.exp(jax.random.uniform(k3, (n,), minval=jnp.log(1.0), maxval=jnp.log(10.0)))
    t_logits = tau[:, None] * jax.nn.one_hot(y, v) + 0.5 * jax.random.normal(k4, (n, v))
    return {"phi": phi, "y": y, "t": t_logits}

  n = cfg.num_contexts
  return {"a_train": family(ks[0], n, 0.0), "a_test": family(ks[1], 4 * n, 0.0),
          "b_train": family(ks[2], n, shift_b), "b_test": family(ks[3], 4 * n, shift_b)}


def logits_fn(params, phi):
  return phi @ params["w"] + params["b"]


def accuracy(params, fam):
  lg = logits_fn(params, fam["phi"])
  return jnp.mean(jnp.argmax(lg, -1) == fam["y"])


def expected_pass(params, fam):
  lg = logits_fn(params, fam["phi"])
  return jnp.mean(jnp.take_along_axis(jax.nn.softmax(lg), fam["y"][:, None], 1))


def pretrain_student(key, data, cfg):
  """Labels (family B, 1/8 of family A), a few Adam steps: partial competence on A."""
  d, v = cfg.feature_dim, cfg.num_answers
  params = {"w": 0.01 * jax.random.normal(key, (d, v)), "b": jnp.zeros(v)}
  tx = optax.adam(cfg.pretrain_lr)
  # All of family B, an eighth of family A's labels: the distilled family is partly learned.
  n_a = max(1, data["a_train"]["y"].shape[0] // 8)
  phi = jnp.concatenate([data["a_train"]["phi"][:n_a], data["b_train"]["phi"]])
  y = jnp.concatenate([data["a_train"]["y"][:n_a], data["b_train"]["y"]])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, phi), y).mean()

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, cfg.pretrain_steps)
  return params


def student_pass_rates(key, params, phi, y, k):
  """p̂ from K samples of the student per context (the raw estimator)."""
  lg = logits_fn(params, phi)
  samples = jax.random.categorical(key, lg[:, None, :], shape=(lg.shape[0], k))
  return P.pass_rate((samples == y[:, None]).astype(jnp.float32))


# ----------------------------------------------------------------------------- training


def distill(key, params, data, cfg, *, arm_id, alpha, beta, k, k_max):
  """One arm from the pre-trained student; returns final params and the accuracy curves.

  Every argument but ``cfg``/``k_max`` may be traced, so all variants share one compilation:
  ``arm_id`` indexes ``ARMS``; K ≤ k_max rollouts are drawn as k_max samples with a mask.
  """
  fam = data["a_train"]
  arm_id = jnp.asarray(arm_id)
  weighted = (arm_id == 1) | (arm_id == 3) | (arm_id == 4)
  steps, every = cfg.steps, cfg.refresh_every
  switch = steps // 2
  tx = optax.adam(cfg.lr)
  t = jax.lax.stop_gradient(fam["t"])
  rollout_mask = jnp.broadcast_to(jnp.arange(k_max) < k, (fam["y"].shape[0], k_max))

  def loss_fn(p, w, step):
    lg = logits_fn(p, fam["phi"])
    fkl, rkl, akl = D.forward_kl(lg, t), D.reverse_kl(lg, t), adaptive_kl(lg, t)
    per_ex = jnp.select([arm_id <= 1, arm_id <= 3, arm_id == 4],
                        [fkl, rkl, P.two_stage_loss(fkl, rkl, step, switch_step=switch)], akl)
    return P.weighted_sum_and_count(per_ex, w).mean()

  def body(carry, step):
    p, s, w, key = carry
    key, sub = jax.random.split(key)
    due = P.refresh_due(step, every=every) | ((arm_id == 4) & (step == switch))
    lg = logits_fn(p, fam["phi"])
    samples = jax.random.categorical(sub, lg[:, None, :], shape=(lg.shape[0], k_max))
    p_hat = P.pass_rate((samples == fam["y"][:, None]).astype(jnp.float32), where=rollout_mask)
    new_w = jnp.where(weighted, P.paced_weights(p_hat, alpha=alpha, beta=beta),
                      jnp.ones_like(p_hat))
    w = jnp.where(due, new_w, w)
    g = jax.grad(loss_fn)(p, w, step)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s, w, key), (accuracy(p, data["a_test"]), accuracy(p, data["b_test"]))

  w0 = jnp.ones(fam["y"].shape[0])
  (p, _, _, _), (curve_a, curve_b) = jax.lax.scan(body, (params, tx.init(params), w0, key),
                                                  jnp.arange(steps))
  return p, curve_a, curve_b


def per_problem_grads(params, fam):
  """Per-context gradients of the forward-KL loss wrt W (flattened), for the SNR diagnostic."""
  def one(phi, t):
    return jax.grad(lambda p: D.forward_kl(logits_fn(p, phi[None]), t[None])[0])(params)["w"]
  return jax.vmap(one)(fam["phi"], fam["t"]).reshape(fam["phi"].shape[0], -1)


def run_seed(seed, cfg, variants):
  """All variants for one seed (vmapped over seeds by the caller)."""
  key = jax.random.PRNGKey(seed)
  kd, kp, kr, ks = jax.random.split(key, 4)
  data = make_problems(kd, cfg)
  params = pretrain_student(kp, data, cfg)
  out = {"pre_acc_a": accuracy(params, data["a_test"]),
         "pre_acc_b": accuracy(params, data["b_test"]),
         "p_hat0": student_pass_rates(kr, params, data["a_train"]["phi"], data["a_train"]["y"],
                                      cfg.k)}
  grads = per_problem_grads(params, data["a_train"])
  snr = P.gradient_snr_by_bin(grads, out["p_hat0"], bins=(jnp.arange(cfg.k + 2) - 0.5) / cfg.k)
  out["snr"] = snr.snr
  out["snr_counts"] = snr.counts
  arm_ids = jnp.asarray([ARMS.index(kw["arm"]) for _, kw in variants])
  alphas = jnp.asarray([kw.get("alpha", 1.0) for _, kw in variants])
  betas = jnp.asarray([kw.get("beta", 1.0) for _, kw in variants])
  ks_ = jnp.asarray([kw["k"] for _, kw in variants])
  k_max = max(kw["k"] for _, kw in variants)
  one = lambda a, al, be, kk: distill(ks, params, data, cfg, arm_id=a, alpha=al, beta=be,  # noqa
                                      k=kk, k_max=k_max)
  p, ca, cb = jax.vmap(one)(arm_ids, alphas, betas, ks_)
  for i, (name, _) in enumerate(variants):
    pi = jax.tree.map(lambda x: x[i], p)  # pylint: disable=cell-var-from-loop
    out[name] = {"acc_a": accuracy(pi, data["a_test"]), "pass_a": expected_pass(pi, data["a_test"]),
                 "acc_b": accuracy(pi, data["b_test"]), "curve_a": ca[i], "curve_b": cb[i]}
  return out


def variants_from_config(cfg):
  v = [(arm, {"arm": arm, "k": cfg.k}) for arm in cfg.arms]
  for a, b in cfg.ablate_alpha_beta:
    v.append((f"paced_fkl[a={a:g},b={b:g}]", {"arm": "paced_fkl", "alpha": a, "beta": b,
                                               "k": cfg.k}))
  for k in cfg.ablate_k:
    v.append((f"paced_fkl[K={k}]", {"arm": "paced_fkl", "k": int(k)}))
  return v


def run_experiment(cfg):
  """Runs every variant on every seed; returns (rows, raw outputs)."""
  variants = variants_from_config(cfg)
  seeds = jnp.arange(cfg.seed, cfg.seed + cfg.num_seeds)
  fn = jax.jit(jax.vmap(lambda s: run_seed(s, cfg, variants)))
  out = jax.device_get(fn(seeds))
  rows = []
  for name, _ in variants:
    r = out[name]
    acc, acc_ci = (float(v) for v in mean_ci(r["acc_a"]))
    pas, pas_ci = (float(v) for v in mean_ci(r["pass_a"]))
    forg, forg_ci = (float(v) for v in mean_ci(out["pre_acc_b"] - r["acc_b"]))
    rows.append({"variant": name, "heldout_acc": acc, "acc_ci95": acc_ci, "pass_rate": pas,
                 "pass_ci95": pas_ci, "forgetting": forg, "forg_ci95": forg_ci})
  return rows, out


def format_rows(rows):
  head = f"{'variant':24s} {'held-out acc':>18s} {'E pass rate':>18s} {'forgetting (B)':>18s}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['variant']:24s} {format_mean_ci(r['heldout_acc'], r['acc_ci95'], '.4f'):>18s} "
                 f"{format_mean_ci(r['pass_rate'], r['pass_ci95'], '.4f'):>18s} "
                 f"{format_mean_ci(r['forgetting'], r['forg_ci95'], '+.4f'):>18s}")
  return "\n".join(lines)


def plot(out, rows, cfg, path=None):
  """Accuracy curves, the pass-rate spread and the measured SNR; saved to ``path`` if given."""
  del rows
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(15, 4))          # no pyplot: leaves the caller's backend alone
  ax = fig.subplots(1, 3)
  for arm in cfg.arms:
    c = np.asarray(out[arm]["curve_a"]).mean(0)
    ax[0].plot(np.arange(1, c.shape[0] + 1), c, label=arm)
  ax[0].set(xlabel="step", ylabel="held-out accuracy (family A)", title="accuracy vs step")
  ax[0].legend(fontsize=7)
  ph = np.asarray(out["p_hat0"]).ravel()
  ax[1].hist(ph, bins=cfg.k + 1, range=(-0.5 / cfg.k, 1 + 0.5 / cfg.k))
  ax[1].set(xlabel="student pass rate p̂ (before distillation)", ylabel="contexts",
            title="pass-rate spread")
  centers = np.arange(cfg.k + 1) / cfg.k
  snr = np.asarray(out["snr"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    ax[2].errorbar(centers, np.nanmean(snr, 0), yerr=np.nanstd(snr, 0), marker="o")
  ax[2].set(xlabel="p̂ bin", ylabel="cross-problem gradient SNR", title="measured SNR vs p̂")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  for k in ("num_contexts", "feature_dim", "pretrain_steps", "refresh_every", "k"):
    C.check_number(config, k, low=1, integer=True)
  C.check_number(config, "num_answers", low=2, integer=True)
  C.check_number(config, "label_noise", low=0)
  for k in ("pretrain_lr", "lr"):
    C.check_number(config, k, low=0, low_open=True)
  arms = C.get(config, "arms")
  if not isinstance(arms, (tuple, list)) or not arms or any(a not in ARMS for a in arms):
    C.fail("arms", arms, f"a non-empty tuple of arms from {', '.join(ARMS)}")
  ab = C.get(config, "ablate_alpha_beta")
  if not isinstance(ab, (tuple, list)) or any(
      not isinstance(x, (tuple, list)) or len(x) != 2 or any(
          isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in x)
      for x in ab):
    C.fail("ablate_alpha_beta", ab, "a tuple of (alpha, beta) pairs of positive numbers")
  C.check_numbers(config, "ablate_k", low=1, integer=True, nonempty=False)
  C.check_bool(config, "plot")


def run(config, workdir):
  validate(config)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  smoke = bool(config.get("smoke", False))
  if smoke:
    print(smoke_banner("paced_tabular"))
  start = time.time()
  rows, out = run_experiment(config)
  table = format_rows(rows)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)   # empty p̂ bins are NaN
    snr = np.nanmean(np.asarray(out["snr"]), 0)
  if smoke:
    print(f"paced_tabular pipeline ran: {len(rows)} variants, {config.num_seeds} seeds, "
          f"{config.steps} steps ({time.time() - start:.1f} s); table.txt written")
  else:
    print(f"PACED tabular: {config.num_seeds} seeds, {config.steps} steps, K={config.k}, "
          f"{config.num_contexts} contexts ({time.time() - start:.1f} s)")
    print(table)
    print("measured SNR per p̂ bin (0..1 step 1/K):", np.array2string(snr, precision=4))
  result = {"rows": rows, "snr_by_bin": snr.tolist(),
            "pre_acc_a": float(np.mean(out["pre_acc_a"])),
            "pre_acc_b": float(np.mean(out["pre_acc_b"])),
            "seconds": time.time() - start, "smoke": smoke}
  metrics_lib.write_results(workdir, result, config, smoke=smoke)
  # metrics.jsonl + TensorBoard: one phase per arm, held-out accuracy (mean over seeds) per step.
  writer = metrics_lib.MetricWriter(workdir)
  writer.truncate_all()
  for arm in config.arms:
    ca, cb = (np.asarray(out[arm][k]).mean(0) for k in ("curve_a", "curve_b"))
    for j in range(ca.shape[0]):
      writer.write(arm, j + 1, {"heldout/accuracy_a": float(ca[j]),
                                "heldout/accuracy_b": float(cb[j])})
  writer.close()
  header = smoke_banner("paced_tabular") + "\n" if smoke else ""
  (workdir / "table.txt").write_text(header + table + "\n")
  if config.get("plot", True):
    plot(out, rows, config, os.fspath(workdir / "paced_tabular.png"))
  if smoke:
    print(smoke_banner("paced_tabular", end=True))
  return result
