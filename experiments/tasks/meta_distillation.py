r"""Anchored multi-generation distillation on digits: KL(p0 ‖ q_t) and accuracy per generation.

Recursion (arXiv:2601.13100 [paper]; operator families Design choice (kdjax) [proposed], see
theory/recursive_meta_distillation.md §5): q_t = D_Q(M_α(p0, q_{t−1})), where p0 is the base
teacher, M_α = ``kdjax.operators.meta_teacher`` (on log-probabilities) and D_Q is *training* a
fresh capacity-limited student on a finite set of inputs by forward KL to the target — the
practical counterpart of the M-projection of the theory. With the capacity limit and finite data
the realizability assumption (R) fails, so the theory predicts (Theorem 4 / F9) convergence to a
floor, not to p0, and the α = 0 chain (no anchor, plain born-again copying) has no contraction at
all: its error can only accumulate.

Per generation and α the task measures, on the **test** inputs: KL(p0 ‖ q_t) (mean over inputs),
test accuracy and top-1 agreement with the teacher; on the training inputs: KL(p0 ‖ q_t) and the
fit error KL(M_α ‖ q_t). Outputs in ``workdir``: ``results.json``, ``metrics.jsonl``,
``meta_distillation.png`` (KL and accuracy vs generation per α, with the (1 − α)^t KL(p0‖q0)
bound of Theorem 2 dashed) and the printed tables.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import data, metrics, models, train
from experiments import mesh as mesh_lib
from kdjax import divergences
from kdjax.operators import META_KINDS, meta_teacher

__all__ = ["validate", "run", "train_generation", "chain_metrics", "plot_generations",
           "format_tables"]


@jax.jit
def _log_probs(logits):
  return divergences.log_softmax(jnp.asarray(logits, jnp.float32))


@jax.jit
def _mean_kl(log_p, log_q):
  return jnp.mean(divergences.kl_from_log(log_p=log_p, log_q=log_q))


def chain_metrics(log_p0_test, log_q_test, y_test) -> dict[str, float]:
  """Test-set KL(p0 ‖ q), accuracy and agreement with the teacher argmax."""
  pred = np.argmax(log_q_test, -1)
  return {"kl_test": float(_mean_kl(log_p0_test, log_q_test)),
          "test_acc": float(np.mean(pred == y_test)),
          "agreement": float(np.mean(pred == np.argmax(log_p0_test, -1)))}


class _StudentTrainer:
  """Trains students of one architecture; one jitted step per loss, shared by all generations."""

  def __init__(self, config, *, input_shape, num_classes, mesh, writer):
    self.config, self.mesh, self.writer = config, mesh, writer
    self.input_shape, self.num_classes = input_shape, num_classes
    self.tx = train.make_optimizer(config.optimizer, config.generation_steps)
    self._steps: dict[str, Any] = {}

  def __call__(self, name: str, loss_name: str, loss_fn, seed: int,
               arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Trains a fresh student (init ``seed``, batches ``BatchSampler(seed)``); train logits."""
    c = self.config
    model = models.build_model(c.student, input_shape=self.input_shape,
                               num_classes=self.num_classes, seed=seed)
    graphdef, state = train.create_train_state(model, self.tx)
    shardings = mesh_lib.state_shardings(state, self.mesh, fsdp=bool(c.fsdp))
    state = mesh_lib.place(state, shardings)
    if loss_name not in self._steps:  # same architecture and optimizer: compile once per loss
      self._steps[loss_name] = (graphdef, train.make_train_step(
          graphdef, self.tx, loss_fn, state_sharding=shardings))
    graphdef, step_fn = self._steps[loss_name]
    sampler = data.BatchSampler(len(arrays["y"]), c.batch_size, seed)
    if sampler.batch_size % self.mesh.size:
      raise ValueError(f"`batch_size` {sampler.batch_size} must be a multiple of the "
                       f"{self.mesh.size} devices.")
    state = train.train_loop(
        state, step_fn, sampler=sampler,
        get_batch=lambda idx: {k: v[idx] for k, v in arrays.items()},
        num_steps=c.generation_steps, mesh=self.mesh, log_every=c.log_every,
        writer=self.writer, phase=name, progress=c.progress)
    self.graphdef, self.params = graphdef, state.params
    return state.params

  def logits(self, params, x):
    return train.predict_logits(self.graphdef, params, x, mesh=self.mesh)


def train_generation(trainer, *, name, seed, x, y, log_target, kd_loss):
  """One generation: fit a fresh student to ``log_target`` (log-probs on ``x``) by forward KL."""
  arrays = {"x": x, "y": y, "teacher_logits": np.asarray(log_target, np.float32)}
  return trainer(name, "kd", kd_loss, seed, arrays)


_STARTS = ("uniform", "teacher", "labels")


def _starts(q0: str) -> list[str]:
  names = [n.strip() for n in str(q0).split(",") if n.strip()]
  if not names or any(n not in _STARTS for n in names):
    C.fail("q0", q0, f"a comma-separated list of {', '.join(_STARTS)}")
  return names


def validate(config) -> None:
  """Checks the whole config and builds the operator and optimizer, without data (the launcher
  calls it before anything is prepared or trained).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_number(config, "generations", low=1, integer=True)
  C.check_number(config, "generation_steps", low=1, integer=True)
  C.check_teacher_student(config, total_steps=config.generation_steps)
  _starts(config.q0)
  alphas = C.check_numbers(config, "alphas", low=0, high=1)   # anchor weights
  C.check_choice(config, "kind", META_KINDS)
  if config.kind == "power":
    C.check_number(config, "beta")
  lp = np.log(np.full((1, 3), 1 / 3, np.float32))  # a tiny instance: the operator's own checks
  for a in alphas:
    C.build("kind", lambda a=a: meta_teacher(
        lp, lp, alpha=float(a), kind=config.kind,
        power=float(config.beta) if config.kind == "power" else None))


def format_tables(results: dict) -> str:
  """Per start q0: α × generation tables of test KL(p0‖q_t) and test accuracy, and a summary."""
  gens = results["generations"]
  cols = ["alpha"] + [f"t={t}" for t in range(gens + 1)]
  out = []
  for q0, start in results["starts"].items():
    for key, title in (("kl_test", "test KL(p0 || q_t)"), ("test_acc", "test accuracy")):
      rows = [{"alpha": f"{c['alpha']:g}",
               **{f"t={t}": float(m[key]) for t, m in enumerate(c["per_generation"])}}
              for c in start["chains"]]
      out.append(f"q0={q0}: {title}\n" + metrics.format_table(rows, cols))
    out.append(f"q0={q0}: summary (floor = mean test KL of the alpha=1 generations: "
               f"{start['floor_kl']:.4f})\n" + metrics.format_table(
                   [{"alpha": f"{c['alpha']:g}", "rate(t<=3)": c["rate_first3"],
                     "bound 1-a": c["bound_rate"], "KL_G - KL_1": c["drift"]}
                    for c in start["chains"]], ["alpha", "rate(t<=3)", "bound 1-a",
                                                "KL_G - KL_1"]))
  return "\n\n".join(out)


def plot_generations(results: dict, path) -> pathlib.Path:
  """Per start q0 (rows): KL(p0‖q_t) (log scale; dashed (1−α)^t KL(p0‖q0)) and test accuracy."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  starts = list(results["starts"].values())
  fig, axes = plt.subplots(len(starts), 2, figsize=(10, 3.6 * len(starts)), squeeze=False)
  for (ax_kl, ax_acc), start in zip(axes, starts):
    for i, chain in enumerate(start["chains"]):
      a = chain["alpha"]
      kl = np.array([m["kl_test"] for m in chain["per_generation"]])
      acc = [m["test_acc"] for m in chain["per_generation"]]
      t = np.arange(len(kl))
      ax_kl.plot(t, kl, marker="o", color=f"C{i}", label=f"α={a:g}")
      if 0 < a < 1:
        ax_kl.plot(t, kl[0] * (1 - a) ** t, ls="--", color=f"C{i}", alpha=0.6)
      ax_acc.plot(t, acc, marker="o", color=f"C{i}", label=f"α={a:g}")
    ax_kl.axhline(start["floor_kl"], color="k", ls=":", label="floor (α=1 mean)")
    ax_kl.set_yscale("log")
    ax_kl.set_ylim(bottom=max(start["floor_kl"] / 3, 1e-3))
    ax_kl.set_title(f"q0={start['q0']}: test KL(p0 ‖ q_t); dashed (1−α)^t KL(p0‖q0)",
                    fontsize=9)
    ax_acc.axhline(results["teacher_test_acc"], color="k", ls=":", label="teacher")
    ax_acc.set_title(f"q0={start['q0']}: test accuracy", fontsize=9)
    for ax in (ax_kl, ax_acc):
      ax.set_xlabel("generation t")
      ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=7)
  fig.suptitle(f"anchored recursion M_α ({results['kind']}) on {results['student_train_size']}"
               f" training inputs, student {results['student_params']} params", fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(config, workdir) -> dict[str, Any]:
  """Teacher, q0, then ``generations`` students per α; writes table, plot and results.json."""
  validate(config)
  smoke = bool(config.get("smoke", False))
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("meta_distillation"), flush=True)
  alphas = [float(a) for a in config.alphas]
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  ds = data.load_supervised(config.dataset, data_dir=config.data_dir or None)
  writer = metrics.MetricWriter(workdir)
  logging.info("meta_distillation: mesh %s, workdir %s", dict(mesh.shape), workdir)

  teacher_root = pathlib.Path(config.teacher_workdir or workdir)
  g_t, p_t = train.train_phase(
      "teacher", model_cfg=config.teacher, opt_cfg=config.optimizer, loss_fn=train.ce_loss,
      num_steps=config.teacher_steps, seed=config.seed,
      train_arrays={"x": ds.train.x, "y": ds.train.y}, input_shape=ds.input_shape,
      num_classes=ds.num_classes, batch_size=config.batch_size, mesh=mesh,
      ckpt_dir=teacher_root / "checkpoints" / "teacher", writer=writer, config=config,
      restore_only=bool(config.teacher_workdir))
  sub = data.student_subset(ds.train.y, config.student_train_size, config.seed)
  x_tr, y_tr = ds.train.x[sub], ds.train.y[sub]
  lp0_tr = np.asarray(_log_probs(train.predict_logits(g_t, p_t, x_tr, mesh=mesh)))
  lp0_te = np.asarray(_log_probs(train.predict_logits(g_t, p_t, ds.test.x, mesh=mesh)))
  teacher_acc = float(np.mean(np.argmax(lp0_te, -1) == ds.test.y))

  trainer = _StudentTrainer(config, input_shape=ds.input_shape, num_classes=ds.num_classes,
                            mesh=mesh, writer=writer)
  kd_loss = train.make_distill_loss("forward_kl", temperature=1.0, ce_weight=0.0)
  student_seed = config.seed + 1
  beta = float(config.beta) if config.kind == "power" else None
  starts = {}
  for q0 in _starts(config.q0):
    if q0 == "labels":
      p_q0 = trainer("q0_labels", "ce", train.ce_loss, student_seed, {"x": x_tr, "y": y_tr})
      lq0_tr = np.asarray(_log_probs(trainer.logits(p_q0, x_tr)))
      lq0_te = np.asarray(_log_probs(trainer.logits(p_q0, ds.test.x)))
    elif q0 == "uniform":  # a member of the student family (zero output layer)
      lq0_tr = np.full_like(lp0_tr, -np.log(ds.num_classes))
      lq0_te = np.full_like(lp0_te, -np.log(ds.num_classes))
    else:
      lq0_tr, lq0_te = lp0_tr, lp0_te
    chains = []
    for a in alphas:
      lq_tr = lq0_tr
      per_gen = [dict(chain_metrics(lp0_te, lq0_te, ds.test.y),
                      kl_train=float(_mean_kl(lp0_tr, lq0_tr)), fit_kl=0.0)]
      for t in range(1, int(config.generations) + 1):
        # Target M_α(p0, q_{t−1}) on the student's training inputs, in log space.
        log_m = np.asarray(meta_teacher(jnp.asarray(lp0_tr), jnp.asarray(lq_tr), alpha=a,
                                        kind=config.kind, power=beta))
        # Every generation (and α) re-initialises the student from the same seed with the same
        # batch order, so the target is the only thing that changes along and across chains.
        params = train_generation(trainer, name=f"{q0}/alpha={a:g}/gen{t}", seed=student_seed,
                                  x=x_tr, y=y_tr, log_target=log_m, kd_loss=kd_loss)
        lq_tr = np.asarray(_log_probs(trainer.logits(params, x_tr)))
        lq_te = np.asarray(_log_probs(trainer.logits(params, ds.test.x)))
        m = dict(chain_metrics(lp0_te, lq_te, ds.test.y),
                 kl_train=float(_mean_kl(lp0_tr, lq_tr)), fit_kl=float(_mean_kl(log_m, lq_tr)))
        per_gen.append(m)
        writer.write(f"{q0} alpha={a:g}", t, m)
      kl = np.array([m["kl_test"] for m in per_gen])
      chains.append({"alpha": a, "per_generation": per_gen,
                     # Measured per-generation factor over the first generations vs 1−α.
                     # (None for the teacher start, where KL(p0 || q0) = 0).
                     "rate_first3": float((kl[min(3, len(kl) - 1)] / kl[0]) **
                                          (1.0 / min(3, len(kl) - 1))) if kl[0] > 1e-9 else None,
                     "bound_rate": 1.0 - a,
                     "drift": float(kl[-1] - kl[1])})
    floor = [m["kl_test"] for c in chains if c["alpha"] == 1.0 for m in c["per_generation"][1:]]
    starts[q0] = {"q0": q0, "chains": chains,
                  "floor_kl": float(np.mean(floor)) if floor else float("nan")}
  results = {
      "seed": config.seed, "dataset": config.dataset, "kind": config.kind,
      "generations": int(config.generations), "student_train_size": int(len(sub)),
      "student_params": models.count_params(models.build_model(
          config.student, input_shape=ds.input_shape, num_classes=ds.num_classes)),
      "teacher_test_acc": teacher_acc, "starts": starts}
  writer.close()
  if jax.process_index() == 0:
    metrics.write_results(workdir, results, config, smoke=smoke)
    plot_generations(results, workdir / "meta_distillation.png")
    print(f"\nmeta_distillation ({config.dataset}, kind={config.kind}, student "
          f"{results['student_params']} params on {len(sub)} inputs, teacher test acc "
          f"{teacher_acc:.4f}):\n{format_tables(results)}\nworkdir: {workdir}", flush=True)
  bad = [m for st in starts.values() for c in st["chains"] for m in c["per_generation"]
         if not math.isfinite(m["kl_test"])]
  if bad:
    raise FloatingPointError("meta_distillation: non-finite KL(p0 || q_t); see results.json.")
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("meta_distillation", end=True), flush=True)
  return results
