r"""Language-model distillation from an exact oracle: CMU's trigram LM -> Transformer teacher -> student.

COMMAND:
  python -m experiments.main --config=experiments/configs/lm_distill.py --workdir=/tmp/kdjax/lm_distill
  python -m experiments.main --config=experiments/configs/lm_distill.py:smoke --workdir=/tmp/kdjax/lm_smoke
  python -m experiments.main --config=experiments/configs/lm_distill.py:mode=onpolicy,objective=k1_reward,teacher=oracle --workdir=...

The oracle is :mod:`experiments.ngram` (V' = ``vocab`` words + ``<other>``; a Markov chain of
order 2, so every golden metric is exact). Stage 1 (``teacher=transformer``) trains a Transformer
teacher with cross-entropy on fresh oracle samples; ``teacher=oracle`` uses the oracle itself as
the teacher (golden = proxy). Stage 2 distils a smaller Transformer student, one run per *arm*
``"mode:objective"`` (same initialisation, optimiser and step count for every arm):

* modes: ``offline`` (a fixed dataset of ``offline_size`` teacher samples reused every epoch),
  ``online`` (fresh teacher samples every step), ``seqkd`` (cross-entropy on fresh teacher
  samples), ``onpolicy`` (student samples, KV-cache decoding, scored by the teacher), ``gkd``
  (per step with probability ``lam`` student samples, else the offline dataset);
  ``data=oracle`` draws the offline/online/seqkd/gkd data from the oracle instead of the teacher.
* objectives (per token, full vocabulary): ``forward_kl``, ``reverse_kl``, ``jsd`` (β = ``beta``),
  ``tv``; ``ce`` (seqkd only); on-policy only: ``k1_reward`` (k1 as a reward, discount
  ``gamma``, REINFORCE) and ``k3_loss`` (k3 in the loss).

Argument string (comma separated): ``smoke`` (every mode in one short run, tiny models: its
numbers are no result), ``seed=<int>``, ``mode=<mode>[+<mode>...]``, ``objective=<name>``
(applied to every mode given; default forward_kl, ce for seqkd, jsd for gkd),
``teacher=oracle|transformer``, ``vocab=<int>`` (V', default 2047); ``hacking`` (the teacher-hacking
protocol: one regime per run, default ``mode=offline``, 1000 student steps, golden and proxy
metrics every 50 steps; summarise seeds with ``python -m experiments.lm_summary hacking``),
``compare`` (the objective comparison: forward KL, reverse KL and JSD on fresh teacher samples,
on-policy reverse KL, SeqKD, 400 steps each, with the oracle as the teacher unless
``teacher=transformer``; ``python -m experiments.lm_summary compare``),
``accel`` (one TPU/GPU host, no code change: V' = 16,383, 64 tokens, batch 256 sharded over the
mesh's ``data`` axis, teacher d = 512 / 6 layers, student d = 256 / 4 layers, 10k steps each; add
``--config.fsdp=True`` to shard parameters over ``model``). Point ``--config.teacher_workdir`` at
a finished run to reuse its teacher.
Timing (2-core CPU, other jobs running): the smoke run (teacher + 7 arms covering every mode and
objective, one shared student compilation) 65 s; the default run (teacher 1000 steps, three arms
of 400 steps, V' = 2047) 564 s. Measured default results (seed 0), golden KL(O||model) per token:
teacher 0.595, offline 0.692, online 0.629, on-policy 0.628 (proxy KL(T||S): 0.093 / 0.029 /
0.030).
"""

import ml_collections

from experiments.config_args import parse_arg

DEFAULT_OBJECTIVE = {"offline": "forward_kl", "online": "forward_kl", "seqkd": "ce",
                     "onpolicy": "forward_kl", "gkd": "jsd"}
SMOKE_ARMS = ("offline:forward_kl", "online:reverse_kl", "seqkd:ce", "onpolicy:k1_reward",
              "gkd:jsd", "online:tv", "onpolicy:k3_loss")   # every mode and objective
COMPARE_ARMS = ("online:forward_kl", "online:reverse_kl", "online:jsd", "onpolicy:reverse_kl",
                "seqkd:ce")


def get_config(arg=None):
  args = parse_arg(arg, config="lm_distill",
                   allowed={"smoke", "seed", "mode", "objective", "teacher", "vocab",
                            "hacking", "compare", "accel"})
  c = ml_collections.ConfigDict()
  c.task = "lm_distill"
  c.resume = "strict"
  c.seed = int(args.get("seed", 0))
  c.vocab = int(args.get("vocab", 2047))   # V': top words; outputs V'+1 (with <other>)
  c.seq_len = 32                           # tokens per sentence after <s> (longer ones cut)
  c.teacher = str(args.get("teacher", "transformer"))   # "transformer" | "oracle"
  c.teacher_workdir = ""                   # restore the teacher from this lm_distill workdir
  c.data = "teacher"                       # offline/online/seqkd/gkd data: "teacher" | "oracle"
  c.batch_size = 16                        # sentences per step (a multiple of the devices)
  c.num_devices = 0                        # 0: all devices (the batch is sharded over them)
  c.fsdp = False
  c.distributed = False

  c.teacher_model = ml_collections.ConfigDict(
      {"kind": "transformer", "d_model": 128, "num_heads": 4, "num_layers": 2, "mlp_dim": 512})
  c.student = ml_collections.ConfigDict(
      {"kind": "transformer", "d_model": 64, "num_heads": 2, "num_layers": 2, "mlp_dim": 256})
  c.teacher_steps = 1000
  c.student_steps = 400
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 50,
      "weight_decay": 1e-4, "grad_clip": 1.0})

  modes = str(args.get("mode", "offline+online+onpolicy")).split("+")
  objective = args.get("objective")
  c.arms = tuple(f"{m}:{objective or DEFAULT_OBJECTIVE.get(m, 'forward_kl')}" for m in modes)
  c.offline_size = 256                     # N_p sentences of the offline dataset
  c.beta = 0.5                             # generalized JSD
  c.gamma = 0.0                            # discount of the k1 reward
  c.lam = 0.5                              # GKD: probability of a student-sampled batch
  c.tile_size = 512                        # vocabulary tile of the streaming fused loss
  c.loss_implementation = "streaming"      # fused KL/JSD: "streaming" | "reference" | "chunked"

  c.eval_size = 256                        # held-out oracle sentences (and teacher/student samples)
  c.eval_batch = 64
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 200
  c.progress = True

  if args.get("hacking"):   # teacher hacking (arXiv:2502.02671): one regime per run, long curves
    c.arms = tuple(f"{m}:{objective or 'forward_kl'}"
                   for m in str(args.get("mode", "offline")).split("+"))
    c.student_steps = 1000
    c.eval_every = 50
    c.log_every = 50
    c.checkpoint_every = 500
  if args.get("compare"):   # the objective comparison at an equal step budget
    c.arms = COMPARE_ARMS
    c.teacher = str(args.get("teacher", "oracle"))   # golden = proxy: the objectives themselves
  if args.get("accel"):   # one TPU/GPU host (or a pod slice): same code, scaled sizes
    c.vocab = int(args.get("vocab", 16_383))
    c.seq_len = 64
    c.batch_size = 256
    c.teacher_model = ml_collections.ConfigDict(
        {"kind": "transformer", "d_model": 512, "num_heads": 8, "num_layers": 6, "mlp_dim": 2048})
    c.student = ml_collections.ConfigDict(
        {"kind": "transformer", "d_model": 256, "num_heads": 4, "num_layers": 4, "mlp_dim": 1024})
    c.teacher_steps = 10_000
    c.student_steps = 10_000
    c.optimizer.warmup_steps = 500
    c.offline_size = 8192
    c.eval_size = 1024
    c.eval_batch = 256
    c.tile_size = 4096
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 1000
  c.smoke = bool(args.get("smoke", False))
  if c.smoke:
    c.vocab = int(args.get("vocab", 511))
    c.seq_len = 16
    c.batch_size = 8
    c.teacher_model = ml_collections.ConfigDict(
        {"kind": "transformer", "d_model": 32, "num_heads": 2, "num_layers": 1, "mlp_dim": 64})
    c.student = ml_collections.ConfigDict(
        {"kind": "transformer", "d_model": 16, "num_heads": 2, "num_layers": 1, "mlp_dim": 32})
    c.teacher_steps = 20
    c.student_steps = 10
    c.optimizer.warmup_steps = 2
    if "mode" not in args and "objective" not in args:
      c.arms = SMOKE_ARMS
    c.offline_size = 32
    c.eval_size = 32
    c.eval_batch = 32
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
  return c
