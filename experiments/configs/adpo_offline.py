r"""ADPO offline policy distillation on a linear-Gaussian control task with an analytic teacher.

COMMAND:
  python -m experiments.main --config=experiments/configs/adpo_offline.py --workdir=/tmp/kdjax/adpo_offline
  python -m experiments.main --config=experiments/configs/adpo_offline.py:smoke --workdir=/tmp/kdjax/adpo_offline_smoke
  python -m experiments.main --config=experiments/configs/adpo_offline.py:seeds=10,temperature=2 --workdir=...

Spec adpo.md §7.2, protocol [proposed]: LQR teacher N(-Ks, 0.3^2 I), P = 16 candidate actions
per state drawn from the teacher, q = softmax(log pi_T / T); KD (uniform anchor, tau = T) vs
ADPO self-anchor (student at init, frozen) vs ADPO EMA anchor (0.99). Metrics: closed-form
Gaussian KL(teacher || student), NDCG of the student's candidate ranking, episodic return.
Argument string: ``smoke``, ``seeds=<int>``, ``steps=<int>``, ``seed=<int>``, ``temperature=<float>``.
"""

import ml_collections

from experiments.config_args import parse_arg



def get_config(arg=None):
  args = parse_arg(arg, config="adpo_offline",
                   allowed={"smoke", "seeds", "steps", "seed", "temperature"})
  c = ml_collections.ConfigDict()
  c.task = "adpo_offline"
  c.smoke = bool(args.get("smoke", False))   # tasks label smoke output "SMOKE RUN"
  c.resume = "strict"   # workdir holds another config: "strict" stops; "allow_changes" records it
  c.seed = int(args.get("seed", 0))
  c.seeds = 5
  c.state_dim = 6
  c.action_dim = 2
  c.horizon = 50
  c.process_noise = 0.1
  c.teacher_std = 0.3
  c.episodes = 64            # teacher episodes in the offline data set (64 x 50 states)
  c.test_states = 256
  c.eval_episodes = 32
  c.num_candidates = 16
  c.temperature = 1.0        # T of the target and tau of every method
  c.hidden = 64
  c.student_init_std = 1.0
  c.lr = 1e-3
  c.batch_size = 128
  c.steps = 3000
  c.ema_decay = 0.99
  c.progress = True
  if args.get("smoke"):
    c.seeds = 2
    c.steps = 100
    c.episodes = 8
    c.test_states = 64
    c.eval_episodes = 4
    c.progress = False
  if "seeds" in args:
    c.seeds = int(args["seeds"])
  if "steps" in args:
    c.steps = int(args["steps"])
  if "temperature" in args:
    c.temperature = float(args["temperature"])
  return c
