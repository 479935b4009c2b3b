r"""The distillation loss zoo on sklearn's bundled digits: every kdjax loss, same teacher, same
student, same data and batches, several seeds; test accuracy and teacher agreement per loss.

COMMAND:
  python -m experiments.main --config=experiments/configs/loss_zoo.py --workdir=/tmp/kdjax/loss_zoo
  python -m experiments.main --config=experiments/configs/loss_zoo.py:smoke --workdir=/tmp/kdjax/loss_zoo_smoke
  python -m experiments.main --config=experiments/configs/loss_zoo.py:seeds=5,losses=hinton+akl --workdir=...

Per seed: a teacher (MLP 256-256 on all 1347 training images; plus two more teachers with other
seeds for the multi-teacher row), then the labels-only baseline and one student per loss, each of
the student's size, from the same initialisation, on the same `student_train_size` examples and
batches (experiments/tasks/digits_kd.py's phases). Every KD loss is mixed with 0.1 x the
hard-label CE so that rows differ only in the distillation term.

Argument string (comma separated): ``smoke`` (seconds-long run for tests), ``seeds=<int>``,
``losses=<name>+<name>...`` (a subset of LOSSES in experiments/tasks/loss_zoo.py).
"""

import ml_collections

from experiments.config_args import parse_arg



def get_config(arg=None):
  args = parse_arg(arg, config="loss_zoo", allowed={"smoke", "seeds", "losses"})
  c = ml_collections.ConfigDict()
  c.task = "loss_zoo"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.smoke = bool(args.get("smoke", False))   # a seconds-long test run: its numbers are no result
  c.seed = 0                        # seeds are seed, seed+1, ..., seed+num_seeds-1
  c.num_seeds = int(args.get("seeds", 3))
  c.losses = str(args.get("losses", "all"))   # "all" or names joined by "+"
  c.dataset = "digits"
  c.data_dir = ""
  c.teacher_workdir = ""
  c.student_train_size = 200
  c.batch_size = 64
  c.num_devices = 0
  c.fsdp = False
  c.distributed = False

  c.teacher = ml_collections.ConfigDict({"kind": "mlp", "hidden": (256, 256),
                                         "activation": "relu"})
  c.student = ml_collections.ConfigDict({"kind": "mlp", "hidden": (32,), "activation": "relu"})
  c.teacher_steps = 1500
  c.student_steps = 1500
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
      "weight_decay": 1e-4, "grad_clip": 0.0})

  c.ce_weight = 0.1                 # hard-label CE weight mixed into every KD loss
  c.temperature = 4.0               # KD temperature of the temperature-based losses (T² applied)
  c.num_teachers = 3                # for the multi-teacher row
  c.topk = 3                        # top-k of the tail-bucket row (10 classes)
  c.num_samples = 12                # sampled ids per example for random-sampling KD
  c.taid_t_start = 0.4

  c.log_every = 250
  c.eval_every = 0
  c.checkpoint_every = 0
  c.progress = False

  if args.get("smoke"):
    c.num_seeds = int(args.get("seeds", 1))
    c.losses = str(args.get("losses", "hinton+akl+topk_tail"))
    c.teacher.hidden = (32,)
    c.num_teachers = 2
    c.teacher_steps = 100
    c.student_steps = 100
    c.student_train_size = 128
    c.log_every = 50
  return c
