r"""Synthetic kernel-regression self-distillation sweep (Borup & Andersen, arXiv:2102.13088).

COMMAND:
  python -m experiments.main --config=experiments/configs/kernel_sweep.py --workdir=/tmp/kdjax/kernel_sweep
  python -m experiments.main --config=experiments/configs/kernel_sweep.py:smoke --workdir=/tmp/kdjax/kernel_sweep_smoke

[proposed] plan of the spec (§8.2), extended to n up to 2000: 1-D inputs, f*(x) = sin(2 pi x) +
0.5 sin(6 pi x), Gaussian label noise sigma in {0.1, 0.3, 1.0}, RBF and Laplace kernels, ridge
lambda = lam_per_n * n (deliberately small, so that the teacher under-regularises). For every
setting: test MSE against f* for alpha in {0, 0.1, ..., 1} and t <= 20 (one eigendecomposition,
vmap over alpha and t); greedy optimal alpha per step with the oracle reference (f* on the
validation inputs), with the validation labels (a separate split), and a greedy 11-point grid
search on the validation labels.

Argument string: ``smoke`` (one small setting, few steps), ``seed=<int>``.
"""

import ml_collections

from experiments.config_args import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, config="kernel_sweep", allowed={"smoke", "seed"})
  c = ml_collections.ConfigDict()
  c.task = "kernel_sweep"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.smoke = bool(args.get("smoke", False))   # a seconds-long test run: its numbers are no result
  c.seed = int(args.get("seed", 0))
  c.sizes = (50, 200, 1000, 2000)
  c.kernels = ml_collections.ConfigDict({"rbf": 30.0, "laplace": 5.0})   # name -> gamma
  c.noises = (0.1, 0.3, 1.0)
  c.lam_per_n = 1e-3
  c.val_fraction = 0.25           # validation split size relative to n (separate draws)
  c.n_test = 500
  c.alphas = tuple(round(0.1 * i, 1) for i in range(11))
  c.steps = 20
  c.clip = ""                     # "" (alpha in R, as Algorithm 1) or "0,1"
  c.plot_size = 200               # n of the test-MSE-vs-step figure
  c.progress = True
  if args.get("smoke"):
    c.sizes = (40,)
    c.kernels = ml_collections.ConfigDict({"rbf": 30.0})
    c.noises = (0.3,)
    c.n_test = 50
    c.steps = 5
    c.plot_size = 40
    c.progress = False
  return c
