r"""Algorithm 1 of Borup & Andersen (arXiv:2102.13088) on a small network: closed-form alpha per
distillation step vs an 11-point alpha grid, MSE-on-softmax distillation (the authors' deep-net
loss, ``self_distiller.py``).

COMMAND:
  python -m experiments.main --config=experiments/configs/selfdistill_nn.py --workdir=/tmp/kdjax/selfdistill_nn
  python -m experiments.main --config=experiments/configs/selfdistill_nn.py:smoke --workdir=/tmp/kdjax/selfdistill_nn_smoke
  python -m experiments.main --config=experiments/configs/selfdistill_nn.py:dataset=mnist1d,seeds=3 --workdir=...

Per distillation step, from the same previous-step model: Algorithm 1 trains 2 models (the
alpha = 0 student, then the student with the closed-form alpha* computed on a separate validation
split against one-hot labels) and the grid trains one model per grid alpha. Reports validation
MSE-on-softmax, test accuracy per step and wall-clock of both. Report-only check (spec §10 item
10): Algorithm 1 within 2% of the best grid validation loss in >= 3 of 5 seeds.

Argument string: ``smoke``, ``seeds=<int>``, ``dataset=digits|mnist1d``.
"""

import ml_collections

from experiments.config_args import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, config="selfdistill_nn", allowed={"smoke", "seeds", "dataset"})
  c = ml_collections.ConfigDict()
  c.task = "selfdistill_nn"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.smoke = bool(args.get("smoke", False))   # a seconds-long test run: its numbers are no result
  c.dataset = args.get("dataset", "digits")
  c.data_dir = ""                   # "" -> $KDJAX_DATA_DIR or ~/.cache/kdjax/tfds
  c.seeds = int(args.get("seeds", 5))
  c.train_size = 300                # labelled training examples (low-data: the teacher overfits)
  c.val_size = 300                  # separate validation split for alpha selection (spec §6)
  c.steps = 4                       # model 1 (teacher) + distillation steps 2..steps
  c.grid = tuple(round(0.1 * i, 1) for i in range(11))
  c.clip = ""                       # "" (alpha in R, Algorithm 1) or "0,1"
  c.train_steps = 400
  c.batch_size = 64
  c.model = ml_collections.ConfigDict({"kind": "mlp", "hidden": (64,), "activation": "relu"})
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 40,
      "weight_decay": 1e-4})
  c.progress = True
  if args.get("smoke"):
    c.seeds = 1
    c.steps = 2
    c.grid = (0.0, 0.5, 1.0)
    c.train_steps = 40
    c.train_size = 128
    c.val_size = 128
    c.optimizer.warmup_steps = 5
    c.progress = False
  return c
