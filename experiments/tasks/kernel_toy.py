r"""The authors' toy example: MSE table for steps 1..6 and infinity, fits, diag(B^(t)), R_k.

Borup & Andersen, arXiv:2102.13088 (setup: spec kernel_self_distillation.md §7) [paper].
Two independent routes: the closed form of `kdjax.selfdistill` (one eigendecomposition) and an
explicit kernel-ridge re-fit per step on the mixed targets (one linear solve per step). Their
largest disagreement is printed and stored (``max_route_gap``).

Outputs in ``workdir``: ``results.json`` (both tables, the gap, greedy optimal alphas),
``fits.png``, ``coefficients.png`` (diag(B^(t)) and B^(inf)), ``ratios.png`` (R_k per step).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics
from kdjax import kernels
from kdjax import selfdistill as sd

__all__ = ["validate", "run", "toy_setup", "mse_table", "refit_mse_table", "format_mse_table",
           "toy_figures"]


def toy_setup(gamma: float = sd.TOY_GAMMA, lam: float = sd.TOY_LAM):
  """(predictor, test-train kernel, f* on the grid, data dict); call inside jax.enable_x64."""
  toy = sd.toy_data()
  x = jnp.asarray(toy["x"])
  k = kernels.rbf(x, x, gamma=gamma)
  kt = kernels.rbf(jnp.asarray(toy["grid"]), x, gamma=gamma)
  pred = sd.self_distill_predictor(k, jnp.asarray(toy["y"]), lam=lam, dtype=jnp.float64)
  return pred, kt, jnp.asarray(toy["f_star"]), toy


def mse_table(alphas=sd.TOY_ALPHAS, steps: int = sd.TOY_STEPS, *, gamma=sd.TOY_GAMMA,
              lam=sd.TOY_LAM) -> dict[float, list[float]]:
  """Closed form: {alpha: [MSE(step 1), ..., MSE(step `steps`), MSE(limit)]} (float64)."""
  with jax.enable_x64(True):
    pred, kt, fs, _ = toy_setup(gamma, lam)
    ts = jnp.append(jnp.arange(1, steps + 1, dtype=jnp.float64), jnp.inf)
    out = {}
    for al in alphas:
      fits = jax.vmap(lambda t: pred.predict(t, al, kt))(ts)
      out[float(al)] = [float(v) for v in jnp.mean((fits - fs) ** 2, axis=-1)]
  return out


def refit_mse_table(alphas=sd.TOY_ALPHAS, steps: int = sd.TOY_STEPS, *, gamma=sd.TOY_GAMMA,
                    lam=sd.TOY_LAM) -> dict[float, list[float]]:
  """Independent route: NumPy re-fit per step; the limit by a direct ridge fit with lam/alpha
  (alpha = 0: the zero function)."""
  toy = sd.toy_data()
  x, y, grid, fs = toy["x"], toy["y"], toy["grid"], toy["f_star"]
  k = np.exp(-gamma * (x[:, None] - x[None]) ** 2)
  kt = np.exp(-gamma * (grid[:, None] - x[None]) ** 2)
  reg = k + lam * np.eye(len(x))
  out = {}
  for al in alphas:
    prev, row = y, []
    for s in range(1, steps + 1):
      w = np.linalg.solve(reg, (y if s == 1 else al * y + (1 - al) * prev))
      prev = k @ w
      row.append(float(np.mean((kt @ w - fs) ** 2)))
    lim = (kt @ np.linalg.solve(k + lam / al * np.eye(len(x)), y)) if al > 0 else 0 * fs
    row.append(float(np.mean((lim - fs) ** 2)))
    out[float(al)] = row
  return out


def format_mse_table(table: dict[float, list[float]]) -> str:
  steps = len(next(iter(table.values()))) - 1
  head = "alpha   " + "  ".join(f"t={t:<5d}" for t in range(1, steps + 1)) + "  t=inf"
  lines = [head, "-" * len(head)]
  for al, row in table.items():
    lines.append(f"{al:<6.2f}  " + "  ".join(f"{v:.5f}" for v in row))
  return "\n".join(lines)


def toy_figures(alphas=sd.TOY_ALPHAS, steps: int = sd.TOY_STEPS, *, gamma=sd.TOY_GAMMA,
                lam=sd.TOY_LAM) -> dict:
  """The three figures of the toy example as matplotlib figures: {"fits", "coefficients",
  "ratios"} (fits f_1..f_T and f_inf; bars of diag(B^(t)) and B^(inf); R_k per step)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    pred, kt, fs, toy = toy_setup(gamma, lam)
    ts = list(range(1, steps + 1))
    # Fits.
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.4 * len(alphas), 3.4), squeeze=False)
    for ax, al in zip(axes[0], alphas):
      ax.plot(toy["grid"], fs, "k--", lw=1, label="sin(2πx)")
      ax.scatter(toy["x"], toy["y"], c="k", s=14, zorder=3, label="data")
      for i, t in enumerate(ts):
        ax.plot(toy["grid"], pred.predict(t, al, kt), color=plt.cm.viridis(i / len(ts)),
                label=f"f{t}")
      ax.plot(toy["grid"], pred.limit(al, kt), "r", lw=2, label="f∞")
      ax.set_title(f"alpha = {al}")
      ax.set_ylim(-1.5, 1.6)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figs = {"fits": fig}
    # diag(B^(t)) bars and R_k lines.
    k_idx = np.arange(1, len(toy["x"]) + 1)
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.4 * len(alphas), 3.4), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(alphas), figsize=(4.4 * len(alphas), 3.4), squeeze=False)
    width = 0.8 / (len(ts) + 1)
    for ax, ax2, al in zip(axes[0], axes2[0], alphas):
      for i, t in enumerate(ts + [jnp.inf]):
        b = np.asarray(pred.coefficients(t, al))
        lab = "∞" if i == len(ts) else str(t)
        col = "r" if i == len(ts) else plt.cm.viridis(i / len(ts))
        ax.bar(k_idx + (i - len(ts) / 2) * width, b, width, color=col, label=f"t={lab}")
        keep = b[1:] > 1e-12
        ax2.plot(k_idx[:-1][keep], sd.sparsification_ratios(b)[keep], marker=".", color=col,
                 label=f"t={lab}")
      ax.set_title(f"diag(B^(t)), alpha = {al}")
      ax.set_xlabel("k (eigenvalues decreasing)")
      ax2.set_title(f"R_k = b_k / b_k+1, alpha = {al}")
      ax2.set_yscale("log")
      ax2.set_xlabel("k")
    axes[0][0].legend(fontsize=7)
    axes2[0][0].legend(fontsize=7)
    for f, name in ((fig, "coefficients"), (fig2, "ratios")):
      f.tight_layout()
      figs[name] = f
  return figs


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  C.check_number(config, "gamma", low=0, low_open=True)
  C.check_number(config, "lam", low=0, low_open=True)
  C.check_number(config, "steps", low=1, integer=True)
  C.check_numbers(config, "alphas")
  C.check_bool(config, "plots")


def run(config, workdir) -> dict:
  validate(config)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  alphas, steps = tuple(float(a) for a in config.alphas), int(config.steps)
  closed = mse_table(alphas, steps, gamma=config.gamma, lam=config.lam)
  refit = refit_mse_table(alphas, steps, gamma=config.gamma, lam=config.lam)
  gap = max(abs(a - b) for al in closed for a, b in zip(closed[al], refit[al]))
  with jax.enable_x64(True):
    pred, kt, fs, _ = toy_setup(config.gamma, config.lam)
    greedy = [float(a) for a in pred.greedy_alpha_schedule(steps, fs, k_eval_train=kt)]
  print("Toy example (Borup & Andersen): MSE vs sin(2πx) on the 101-point grid, closed form")
  print(format_mse_table(closed))
  print(f"explicit re-fit route agrees: max |difference| = {gap:.2e}")
  print("greedy oracle alpha*(t), t = 2..%d: %s" % (steps, ", ".join(f"{a:.4f}" for a in greedy)))
  if config.plots:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    for name, fig in toy_figures(alphas, steps, gamma=config.gamma, lam=config.lam).items():
      fig.savefig(workdir / f"{name}.png", dpi=110)
      plt.close(fig)
  results = {"closed_form": {str(k): v for k, v in closed.items()},
             "refit": {str(k): v for k, v in refit.items()}, "max_route_gap": gap,
             "greedy_alpha_star": greedy, "steps": steps}
  # ':smoke' only skips the plots: the tables are the full computation, not a smoke result.
  metrics.write_results(workdir, results, config)
  return results
