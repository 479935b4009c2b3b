r"""PACED (arXiv:2603.11178) headline on CPU: reasoning distillation with real student rollouts.

COMMAND:
  python -m experiments.main --config=experiments/configs/paced_reasoning.py --workdir=/tmp/kdjax/paced_reasoning
  python -m experiments.main --config=experiments/configs/paced_reasoning.py:smoke --workdir=/tmp/kdjax/paced_reasoning_smoke
  python -m experiments.main --config=experiments/configs/paced_reasoning.py:seeds=3,steps=200 --workdir=...

n-digit addition (n = 1..4) distilled from a teacher Transformer into a smaller student with
partial competence; K = 8 KV-cache student rollouts per problem give p̂; arms uniform / PACED /
AKL / two-stage FKL->RKL and self-distillation (reverse KL) uniform / PACED; forgetting on a copy
family. See experiments/tasks/paced_reasoning.py.

Argument string (comma separated): ``smoke``, ``seeds=<int>``, ``steps=<int>``, ``seed=<int>``,
``teacher_steps=<int>``, ``pretrain_steps=<int>`` (student pre-training: more steps, more
competence), ``pool=<int>`` (training and held-out problems).
"""

import ml_collections

from experiments.config_args import parse_arg

_KEYS = {"smoke", "seeds", "steps", "seed", "teacher_steps", "pretrain_steps", "pool"}



def get_config(arg=None):
  args = parse_arg(arg, config="paced_reasoning", allowed=_KEYS)
  smoke = bool(args.get("smoke", False))
  c = ml_collections.ConfigDict()
  c.task = "paced_reasoning"
  c.smoke = bool(args.get("smoke", False))   # tasks label smoke output "SMOKE RUN"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.seed = int(args.get("seed", 0))
  c.num_seeds = int(args.get("seeds", 1 if smoke else 3))
  c.teacher = ml_collections.ConfigDict(
      {"d_model": 64, "num_heads": 4, "num_layers": 2, "mlp_dim": 256})
  c.student = ml_collections.ConfigDict(
      {"d_model": 32, "num_heads": 4, "num_layers": 2, "mlp_dim": 64})
  if smoke:  # tiny and identical specs: teacher and student share their compiled functions
    c.teacher = ml_collections.ConfigDict(
        {"d_model": 16, "num_heads": 2, "num_layers": 1, "mlp_dim": 32})
    c.student = ml_collections.ConfigDict(dict(c.teacher))
  c.batch = 32 if smoke else 128
  c.teacher_steps = int(args.get("teacher_steps", 10 if smoke else 2000))
  c.teacher_lr = 3e-3
  c.student_pretrain_steps = int(args.get("pretrain_steps", 10 if smoke else 400))
  # Student pre-training sees mostly 1-2 digit additions: partial competence on 3-4 digits.
  c.student_ndig_probs = (0.4, 0.4, 0.1, 0.1)
  c.pretrain_lr = 3e-3
  c.pool = int(args.get("pool", 64 if smoke else 1024))   # training problems (p_hat on all)
  c.test = c.pool            # held-out addition / copy problems
  c.k = 8
  c.steps = int(args.get("steps", 4 if smoke else 400))
  c.refresh_every = 2 if smoke else 50      # p_hat refresh; also at the two-stage switch
  c.lr = 1e-3
  c.snr_problems = 64 if smoke else 512
  # The teacher's Orbax checkpoint directory, reused when it holds a finished teacher (default:
  # <workdir>/checkpoints/teacher_<spec>_<steps>_<seed>).
  c.teacher_cache = ""
  c.progress = True          # tqdm bars (the launcher turns them off on a non-TTY stderr)
  return c
