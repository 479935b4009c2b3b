r"""Classic KD on digits: teacher -> labels-only baseline -> distilled student, one results table.

Each phase trains from its own checkpoint directory (``workdir/checkpoints/<phase>``) and resumes
from the newest verified checkpoint there; a phase whose final step is on disk is restored, not
retrained. The baseline and the student share the student architecture, the initialisation seed,
the training examples and the batch order; they differ only in the loss (CE vs KD), so the gap
between them is the effect of the teacher's soft targets.

Splits: ``val_size`` examples (class-stratified, the same for every seed) are carved out of the
training split as a validation split; the models train on the rest. Learning curves
(``val/*`` in ``metrics.jsonl`` and TensorBoard) and any model or hyper-parameter selection use
the validation split; the test split is evaluated once, at the end, for the table.

Outputs in ``workdir`` (besides the launcher's ``config.json``): ``metrics.jsonl``,
``tb/<phase>/`` (TensorBoard), ``learning_curves.png``, ``results.json`` (with the config) and the
printed table: validation and test accuracy, teacher–student top-1 agreement and mean
KL(p_T ‖ p_S) at T = 1 on the test split, and the test cross-entropy.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from absl import logging

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import data, metrics, train
from experiments import mesh as mesh_lib

__all__ = ["run", "validate", "make_kd_loss"]


def make_kd_loss(config):
  """The student's loss from ``config.loss``: ``ce_weight·CE + (1 − ce_weight)·T²·D``.

  ``config.loss`` has ``name`` (a key of :data:`experiments.train.DIVERGENCES`), ``temperature``,
  ``ce_weight`` (in [0, 1]), ``scale_by_t2`` and the divergence's own hyper-parameters (``skew``,
  ``beta``) by name. Built by :func:`experiments.train.make_distill_loss`.
  """
  lc = config.loss
  extra = {k: v for k, v in lc.items() if k not in ("name", "temperature", "ce_weight",
                                                    "scale_by_t2")}
  # The library's ce_weight·CE + kd_weight·T²·D with kd_weight = 1 − ce_weight.
  return train.make_distill_loss(lc.name, temperature=lc.temperature, ce_weight=lc.ce_weight,
                                 kd_weight=1.0 - float(lc.ce_weight),
                                 scale_by_t2=lc.scale_by_t2, **extra)


def validate(config) -> None:
  """Checks the whole config and builds the losses and optimizer, without data (the launcher
  calls it before anything is prepared or trained).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_teacher_student(config, total_steps=config.student_steps)
  C.check_choice(config, "loss.name", tuple(train.DIVERGENCES))
  C.check_number(config, "loss.temperature", low=0, low_open=True)
  C.check_number(config, "loss.ce_weight", low=0, high=1)
  C.check_choice(config, "loss.scale_by_t2", (True, False))
  C.build("loss", lambda: make_kd_loss(config))
  n_train = 1347 if config.dataset == "digits" else None
  if n_train is not None and config.val_size >= n_train:
    C.fail("val_size", config.val_size, f"smaller than the {n_train} training examples")


def run(config, workdir) -> dict[str, Any]:
  """Runs the three phases and writes the outputs; returns the results dict."""
  validate(config)
  smoke = bool(config.get("smoke", False))
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("digits_kd"), flush=True)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  logging.info("digits_kd: mesh %s, workdir %s", dict(mesh.shape), workdir)
  ds = data.load_supervised(config.dataset, data_dir=config.data_dir or None)
  tr_idx, va_idx = data.validation_split(ds.train.y, int(config.val_size))
  x_tr, y_tr = ds.train.x[tr_idx], ds.train.y[tr_idx]
  has_val = len(va_idx) > 0
  writer = metrics.MetricWriter(workdir, eval_split="val" if has_val else "eval")
  common = dict(input_shape=ds.input_shape, num_classes=ds.num_classes, mesh=mesh,
                batch_size=config.batch_size, writer=writer, config=config,
                opt_cfg=config.optimizer)
  val = {"x": ds.train.x[va_idx], "y": ds.train.y[va_idx]} if has_val else None
  test = {"x": ds.test.x, "y": ds.test.y}
  full_train = {"x": x_tr, "y": y_tr}

  teacher_root = pathlib.Path(config.teacher_workdir or workdir)
  g_t, p_t = train.train_phase(
      "teacher", model_cfg=config.teacher, loss_fn=train.ce_loss, num_steps=config.teacher_steps,
      seed=config.seed, train_arrays=full_train, eval_arrays=val,
      ckpt_dir=teacher_root / "checkpoints" / "teacher",
      restore_only=bool(config.teacher_workdir), **common)
  t_train = train.predict_logits(g_t, p_t, x_tr, mesh=mesh)
  t_test = train.predict_logits(g_t, p_t, ds.test.x, mesh=mesh)
  val_t = None
  if has_val:
    val_t = dict(val, teacher_logits=train.predict_logits(g_t, p_t, val["x"], mesh=mesh))

  sub = data.student_subset(y_tr, config.student_train_size, config.seed)
  student_train = {"x": x_tr[sub], "y": y_tr[sub], "teacher_logits": t_train[sub]}
  test_t = dict(test, teacher_logits=t_test)
  student_seed = config.seed + 1
  g_b, p_b = train.train_phase(
      "baseline", model_cfg=config.student, loss_fn=train.ce_loss,
      num_steps=config.student_steps, seed=student_seed, train_arrays=student_train,
      eval_arrays=val_t, ckpt_dir=workdir / "checkpoints" / "baseline", **common)
  g_s, p_s = train.train_phase(
      "student", model_cfg=config.student, loss_fn=make_kd_loss(config),
      num_steps=config.student_steps, seed=student_seed, train_arrays=student_train,
      eval_arrays=val_t, ckpt_dir=workdir / "checkpoints" / "student", **common)

  rows = []
  for name, g, p in (("teacher", g_t, p_t), ("baseline (labels only)", g_b, p_b),
                     (f"student (KD {config.loss.name}, T={config.loss.temperature:g})",
                      g_s, p_s)):
    eval_fn = train.make_eval_fn(g)
    ev = train.evaluate(eval_fn, p, test_t, mesh=mesh)  # the one test evaluation
    row = {"model": name, "params": int(sum(x.size for x in jax.tree.leaves(p)))}
    if has_val:
      row["val_acc"] = train.evaluate(eval_fn, p, val_t, mesh=mesh)["accuracy"]
    row.update({"test_acc": ev["accuracy"], "agreement": ev["agreement"], "kl_T1": ev["kl"],
                "test_ce": ev["ce"]})
    rows.append(row)
  results = {"seed": config.seed, "teacher_train_size": int(len(tr_idx)),
             "val_size": int(len(va_idx)), "test_size": int(len(ds.test)),
             "student_train_size": int(len(sub)), "rows": rows,
             "kd_gain": rows[2]["test_acc"] - rows[1]["test_acc"]}
  cols = ["model", "params"] + (["val_acc"] if has_val else []) + [
      "test_acc", "agreement", "kl_T1", "test_ce"]
  table = metrics.format_table(rows, cols)
  writer.close()
  if jax.process_index() == 0:
    metrics.write_results(workdir, results, config, smoke=smoke)
    metrics.plot_learning_curves(
        metrics.read_metrics(workdir / "metrics.jsonl"), workdir / "learning_curves.png",
        title=(f"digits KD (seed {config.seed}, {len(sub)} student examples; curves on the "
               f"{'validation' if has_val else 'evaluation'} split)"))
    print(f"\ndigits_kd results (seed {config.seed}; teacher trained on {len(tr_idx)} examples, "
          f"student on {len(sub)}; validation split of {len(va_idx)}, test split of "
          f"{len(ds.test)}):\n{table}\nagreement, kl_T1 = top-1 agreement with the teacher and "
          f"mean KL(p_teacher || p_student) at T = 1 on the test split.\nKD gain over the "
          f"labels-only baseline: {100 * results['kd_gain']:+.2f} test-accuracy points\n"
          f"workdir: {workdir}", flush=True)
    if smoke:
      print(metrics.smoke_banner("digits_kd", end=True), flush=True)
  return results
