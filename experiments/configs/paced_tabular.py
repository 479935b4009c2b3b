r"""PACED (arXiv:2603.11178) on tabular problems: arms and (alpha, beta) / K ablations (paced.md §8).

COMMAND:
  python -m experiments.main --config=experiments/configs/paced_tabular.py --workdir=/tmp/kdjax/paced_tabular
  python -m experiments.main --config=experiments/configs/paced_tabular.py:smoke --workdir=/tmp/kdjax/paced_tabular_smoke
  python -m experiments.main --config=experiments/configs/paced_tabular.py:seeds=3,steps=100 --workdir=...

Argument string (comma separated): ``smoke`` (seconds-long, for tests), ``seeds=<int>``,
``steps=<int>``, ``k=<int>``, ``seed=<int>`` (first seed), ``noablate`` (arms only).
"""

import ml_collections

from experiments.config_args import parse_arg

_KEYS = {"smoke", "seeds", "steps", "k", "seed", "noablate"}



def get_config(arg=None):
  args = parse_arg(arg, config="paced_tabular", allowed=_KEYS)
  smoke = bool(args.get("smoke", False))
  c = ml_collections.ConfigDict()
  c.task = "paced_tabular"
  c.smoke = bool(args.get("smoke", False))   # tasks label smoke output "SMOKE RUN"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.seed = int(args.get("seed", 0))
  c.num_seeds = int(args.get("seeds", 2 if smoke else 10))
  c.num_contexts = 128 if smoke else 512   # training contexts of family A (and of family B)
  c.num_answers = 16
  c.feature_dim = 32
  c.label_noise = 0.5                      # per-context noise on the linear rule (hard contexts)
  c.pretrain_steps = 30
  c.pretrain_lr = 0.05
  c.steps = int(args.get("steps", 40 if smoke else 300))
  c.lr = 0.01
  c.refresh_every = 25                     # p_hat re-estimated every 25 steps and at the switch
  c.k = int(args.get("k", 8))
  c.arms = ("uniform_fkl", "paced_fkl", "uniform_rkl", "paced_rkl", "two_stage", "akl")
  noab = smoke or bool(args.get("noablate", False))
  c.ablate_alpha_beta = () if noab else ((1.0, 3.0), (3.0, 1.0), (0.5, 0.5), (2.0, 2.0))
  c.ablate_k = (4,) if smoke else ((2, 4, 16, 32) if not noab else ())
  c.plot = True
  return c
