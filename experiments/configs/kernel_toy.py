r"""Borup & Andersen's toy example (arXiv:2102.13088; authors' ``toy_example.ipynb``).

COMMAND:
  python -m experiments.main --config=experiments/configs/kernel_toy.py --workdir=/tmp/kdjax/kernel_toy
  python -m experiments.main --config=experiments/configs/kernel_toy.py:smoke --workdir=/tmp/kdjax/kernel_toy_smoke

11 noisy samples of sin(2 pi x), RBF kernel gamma = 80, lambda = 0.2, six self-distillation steps
and the limit, alpha in {0, 0.25, 0.35}; MSE against sin(2 pi x) on the 101-point grid [paper].
Prints the table from the closed form and from an independent explicit re-fit, the greedy
optimal alpha per step (oracle reference, [proposed]) and writes fits / diag(B^(t)) / R_k plots.

Argument string: ``smoke`` (no plots; the computation is already seconds long).
"""

import ml_collections

from experiments.config_args import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, config="kernel_toy", allowed={"smoke"})
  c = ml_collections.ConfigDict()
  c.task = "kernel_toy"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.gamma = 80.0
  c.lam = 0.2
  c.steps = 6
  c.alphas = (0.0, 0.25, 0.35)
  c.plots = "smoke" not in args
  return c
