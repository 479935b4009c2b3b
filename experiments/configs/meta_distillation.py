r"""Recursive meta-distillation (Flouro & Chadwick, arXiv:2601.13100): anchored born-again chains.

COMMAND:
  python -m experiments.main --config=experiments/configs/meta_distillation.py --workdir=/tmp/kdjax/meta_distillation
  python -m experiments.main --config=experiments/configs/meta_distillation.py:smoke --workdir=/tmp/kdjax/meta_distillation_smoke
  python -m experiments.main --config=experiments/configs/meta_distillation.py:kind=geometric,q0=teacher --workdir=...

A base teacher p0 (MLP 256-256 on all 1347 digits training images), then `generations` student
generations for every anchor weight α in `alphas`. Generation t trains a fresh capacity-limited
student (MLP with one hidden layer of 8 units) on `student_train_size` training inputs with forward
KL to the target M_α(p0, q_{t−1}) built by ``kdjax.operators.meta_teacher`` from the
log-probabilities of the teacher and of generation t−1. Generation 0 (q0): the uniform
distribution (``uniform``: far from p0, so the approach to p0 is visible), the teacher itself
(``teacher``: the classic born-again chain, where α = 0 drifts) or a labels-only student
(``labels``); the default runs the first two. Every generation re-initialises the student from the
same seed with the same batch order, so the target is the only thing that changes.

Argument string (comma separated): ``smoke`` (seconds, for tests), ``seed=<int>``,
``kind=<arithmetic|geometric|power>``, ``q0=<uniform|teacher|labels>`` (one start; the default runs
uniform and teacher; ``--config.q0=uniform,teacher,labels`` runs all three), ``generations=<int>``.
"""

import ml_collections

from experiments.config_args import parse_arg

_KEYS = {"smoke", "seed", "kind", "q0", "generations"}



def get_config(arg=None):
  args = parse_arg(arg, config="meta_distillation", allowed=_KEYS)
  c = ml_collections.ConfigDict()
  c.task = "meta_distillation"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.smoke = bool(args.get("smoke", False))   # a seconds-long test run: its numbers are no result
  c.seed = int(args.get("seed", 0))
  c.dataset = "digits"
  c.data_dir = ""                  # "" -> $KDJAX_DATA_DIR or ~/.cache/kdjax/tfds
  c.teacher_workdir = ""           # restore the teacher from this workdir instead of training it
  c.student_train_size = 300       # finite data: the inputs every generation is distilled on
  c.batch_size = 64
  c.num_devices = 0                # 0: all devices; batch is sharded over them
  c.fsdp = False
  c.distributed = False

  c.alphas = (0.0, 0.1, 0.3, 1.0)  # anchor weight on the base teacher
  c.generations = int(args.get("generations", 8))
  c.kind = args.get("kind", "arithmetic")   # kdjax.operators.meta_teacher kind
  c.beta = 0.5                     # power-mean exponent (kind=power only)
  # generation-0 students, one set of chains each: "uniform" (far from p0: shows the geometric
  # approach), "teacher" (classic born-again chain: shows drift), "labels" (a CE-trained student)
  c.q0 = args.get("q0", "uniform,teacher")

  c.teacher = ml_collections.ConfigDict({"kind": "mlp", "hidden": (256, 256),
                                         "activation": "relu"})
  c.student = ml_collections.ConfigDict({"kind": "mlp", "hidden": (8,), "activation": "relu"})
  c.teacher_steps = 1500
  c.generation_steps = 800         # optimizer steps per student generation (and for q0)
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 50,
      "weight_decay": 1e-4, "grad_clip": 0.0})

  c.log_every = 200
  c.eval_every = 0
  c.checkpoint_every = 0           # teacher: save at the end only
  c.progress = True

  if args.get("smoke"):
    c.teacher.hidden = (64,)
    c.teacher_steps = 200
    c.generation_steps = 100
    c.generations = int(args.get("generations", 2))
    c.log_every = 50
  return c
