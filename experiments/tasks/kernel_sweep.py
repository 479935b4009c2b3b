r"""Synthetic kernel-regression sweep: test error vs step for an alpha grid, and optimal alpha.

Borup & Andersen, arXiv:2102.13088 [paper] (claims); setting and the comparison of alpha
estimators are [proposed] (spec kernel_self_distillation.md §8.2). One eigendecomposition per
setting (`kdjax.selfdistill.self_distill_predictor`); every (alpha, t) and every schedule is a
diagonal operation.

Three greedy per-step alpha schedules, all starting each step from the previous step's model:
  * oracle:  closed-form alpha* against the noise-free f* on the validation inputs;
  * val:     closed-form alpha* against the noisy validation labels (what a user can do);
  * grid:    the best of the 11-point grid by validation MSE (the grid-search baseline).
Reported: test MSE (vs f*) of the teacher, of each schedule at the last step, of the best fixed
(alpha, t) selected on validation, and the best test MSE over the whole (alpha, t) grid.

Outputs in ``workdir``: ``results.json``, ``test_mse_vs_step.png`` and the printed table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import metrics
from kdjax import kernels
from kdjax import selfdistill as sd

__all__ = ["validate", "run", "f_star", "make_problem", "evaluate_setting"]


def f_star(x):
  return np.sin(2 * np.pi * x) + 0.5 * np.sin(6 * np.pi * x)


def make_problem(n: int, noise: float, *, val_fraction=0.25, n_test=500, seed=0):
  """Train/validation draws with label noise; a noise-free test grid (NumPy float64)."""
  rng = np.random.default_rng(seed)
  n_val = max(int(round(val_fraction * n)), 10)
  x, xv = rng.uniform(size=n), rng.uniform(size=n_val)
  xt = np.linspace(0, 1, n_test)
  return dict(x=x, y=f_star(x) + noise * rng.normal(size=n), xv=xv,
              yv=f_star(xv) + noise * rng.normal(size=n_val), fv=f_star(xv), xt=xt,
              ft=f_star(xt))


def _grid_greedy(pred, steps, alphas, ref, k_eval):
  """Greedy grid search: at each step the grid alpha with the smallest MSE against `ref`."""
  a, lam, d = pred.a, pred.lam, pred.eigenvalues

  def body(b_prev, _):
    # Step-t predictions for each grid alpha (a re-fit on the mixed target, in closed form).
    fits = jax.vmap(lambda al: pred.apply((al + (1 - al) * b_prev) / (d + lam), k_eval))(alphas)
    best = alphas[jnp.argmin(jnp.mean((fits - ref) ** 2, axis=-1))]
    return a * (best + (1 - best) * b_prev), best

  _, chosen = jax.lax.scan(body, a, None, length=steps - 1)
  return chosen


def evaluate_setting(prob, *, kernel: str, gamma: float, lam: float, alphas, steps: int,
                     clip=None) -> dict:
  """All numbers of one (kernel, noise, n) setting (runs in float64)."""
  kfn = kernels.get_kernel(kernel)
  with jax.enable_x64(True):
    x = jnp.asarray(prob["x"])
    k = kfn(x, x, gamma=gamma)
    kv, kt = kfn(jnp.asarray(prob["xv"]), x, gamma=gamma), kfn(jnp.asarray(prob["xt"]), x,
                                                              gamma=gamma)
    t0 = time.perf_counter()
    pred = sd.self_distill_predictor(k, jnp.asarray(prob["y"]), lam=lam, dtype=jnp.float64)
    pred.eigenvalues.block_until_ready()
    t_eigh = time.perf_counter() - t0
    al = jnp.asarray(alphas, jnp.float64)
    ts = jnp.arange(1, steps + 1)
    ft, yv = jnp.asarray(prob["ft"]), jnp.asarray(prob["yv"])

    @jax.jit
    def curves(pred, kk, ref):
      f = jax.vmap(lambda a_: jax.vmap(lambda t: pred.predict(t, a_, kk))(ts))(al)
      return jnp.mean((f - ref) ** 2, axis=-1)                    # [alphas, steps]

    test_curves = np.asarray(curves(pred, kt, ft))
    val_curves = np.asarray(curves(pred, kv, yv))

    def schedule_test_mse(sched):
      return np.asarray(jax.vmap(lambda t: jnp.mean((pred.predict(t, sched, kt) - ft) ** 2))(ts))

    t0 = time.perf_counter()
    oracle = pred.greedy_alpha_schedule(steps, jnp.asarray(prob["fv"]), k_eval_train=kv, clip=clip)
    val = pred.greedy_alpha_schedule(steps, yv, k_eval_train=kv, clip=clip).block_until_ready()
    t_closed = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    grid = jax.jit(_grid_greedy, static_argnums=1)(pred, steps, al, yv, kv).block_until_ready()
    t_grid = time.perf_counter() - t0
    i_a, i_t = np.unravel_index(np.argmin(val_curves), val_curves.shape)
    out = {
        "teacher": float(test_curves[0, 0]),
        "best_fixed_val": float(test_curves[i_a, i_t]),
        "best_fixed_val_alpha": float(alphas[i_a]), "best_fixed_val_step": int(i_t + 1),
        "best_fixed_test": float(test_curves.min()),
        "oracle": schedule_test_mse(oracle).tolist(), "oracle_alpha": np.asarray(oracle).tolist(),
        "val": schedule_test_mse(val).tolist(), "val_alpha": np.asarray(val).tolist(),
        "grid": schedule_test_mse(grid).tolist(), "grid_alpha": np.asarray(grid).tolist(),
        "test_curves": test_curves.tolist(),
        "seconds": {"eigh": t_eigh, "closed_form_schedule": t_closed, "grid_schedule": t_grid},
    }
  return out


def _plot(path, results, config):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in results if r["n"] == config.plot_size]
  if not rows:
    return
  fig, axes = plt.subplots(len(config.kernels), len(config.noises),
                           figsize=(4 * len(config.noises), 3.2 * len(config.kernels)),
                           squeeze=False)
  names = list(config.kernels)
  steps = np.arange(1, config.steps + 1)
  for r in rows:
    ax = axes[names.index(r["kernel"])][list(config.noises).index(r["noise"])]
    curves = np.asarray(r["test_curves"])
    for i, a in enumerate(config.alphas):
      ax.plot(steps, curves[i], color=plt.cm.viridis(i / (len(config.alphas) - 1)), lw=1,
              label=f"α={a}" if i % 2 == 0 else None)
    ax.plot(steps, [r["teacher"]] + r["oracle"][1:], "r--", lw=1.5, label="oracle α*")
    ax.plot(steps, [r["teacher"]] + r["val"][1:], "k:", lw=1.5, label="val α*")
    ax.set_yscale("log")
    ax.set_title(f"{r['kernel']}, σ={r['noise']}, n={r['n']}", fontsize=9)
    ax.set_xlabel("step t")
  axes[0][0].set_ylabel("test MSE vs f*")
  axes[0][0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_KERNELS = ("rbf", "laplace")


def validate(config) -> None:
  """Checks the whole config in its first second (the launcher calls it before any work).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_common(config)
  C.check_numbers(config, "sizes", low=4, integer=True)
  kern = C.get(config, "kernels")
  if not hasattr(kern, "items") or not len(kern):
    C.fail("kernels", kern, f"a non-empty mapping of kernel name ({', '.join(_KERNELS)}) to gamma")
  for name in kern:
    if name not in _KERNELS:
      C.fail(f"kernels.{name}", kern[name], f"a kernel named one of {', '.join(_KERNELS)}")
    C.check_number(config, f"kernels.{name}", low=0, low_open=True)
  C.check_numbers(config, "noises", low=0)
  C.check_number(config, "lam_per_n", low=0, low_open=True)
  C.check_number(config, "val_fraction", low=0, high=1, low_open=True, high_open=True)
  C.check_number(config, "n_test", low=1, integer=True)
  C.check_numbers(config, "alphas")
  C.check_number(config, "plot_size", low=1, integer=True)
  C.check_clip(config, "clip")
  C.check_bool(config, "progress")


def run(config, workdir) -> dict:
  validate(config)
  smoke = bool(config.get("smoke", False))
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("kernel_sweep"), flush=True)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  clip = C.check_clip(config, "clip")
  settings = [(kn, g, s, n) for kn, g in config.kernels.items() for s in config.noises
              for n in config.sizes]
  results = []
  for i, (kn, gamma, noise, n) in enumerate(tqdm(settings, disable=not config.progress,
                                                  desc="kernel sweep")):
    prob = make_problem(n, noise, val_fraction=config.val_fraction, n_test=config.n_test,
                        seed=config.seed * 1000 + i)
    r = evaluate_setting(prob, kernel=kn, gamma=gamma, lam=config.lam_per_n * n,
                         alphas=config.alphas, steps=config.steps, clip=clip)
    r.update(kernel=kn, noise=noise, n=n)
    results.append(r)
  head = (f"{'kernel':8s} {'sigma':>5s} {'n':>5s} | {'teacher':>8s} {'fixed*':>8s} "
          f"{'oracle':>8s} {'val':>8s} {'grid':>8s} | {'a_or(2)':>7s} {'a_val(2)':>8s} "
          f"{'a_grid(2)':>9s} | {'a_or(T)':>7s} {'a_val(T)':>8s}")
  print(f"Test MSE vs f* (teacher = step 1; fixed* = best fixed (alpha, t) chosen on validation; "
        f"oracle/val/grid = greedy schedules at step {config.steps})")
  print(head)
  print("-" * len(head))
  for r in results:
    print(f"{r['kernel']:8s} {r['noise']:5.1f} {r['n']:5d} | {r['teacher']:8.5f} "
          f"{r['best_fixed_val']:8.5f} {r['oracle'][-1]:8.5f} {r['val'][-1]:8.5f} "
          f"{r['grid'][-1]:8.5f} | {r['oracle_alpha'][0]:7.3f} {r['val_alpha'][0]:8.3f} "
          f"{r['grid_alpha'][0]:9.3f} | {r['oracle_alpha'][-1]:7.3f} {r['val_alpha'][-1]:8.3f}")
  _plot(workdir / "test_mse_vs_step.png", results, config)
  out = {"settings": results}
  metrics.write_results(workdir, out, config, smoke=smoke)
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("kernel_sweep", end=True), flush=True)
  return out
