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
import numpy as np
from absl import logging

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import data, metrics, models, train
from experiments import mesh as mesh_lib

__all__ = ["run", "validate", "train_phase", "student_subset", "validation_split",
           "make_kd_loss"]


def train_phase(name: str, *, model_cfg, opt_cfg, loss_fn, num_steps: int, seed: int,
                train_arrays: dict[str, np.ndarray], input_shape, num_classes: int, batch_size: int,
                mesh, ckpt_dir: pathlib.Path, writer, config,
                eval_arrays: dict[str, np.ndarray] | None = None, restore_only: bool = False):
  """Trains (or resumes, or restores) one model; returns ``(graphdef, params)``.

  The model is initialised from ``seed`` and the batches follow ``BatchSampler(seed)``, so two
  phases with the same seed differ only in ``loss_fn``.
  """
  model = models.build_model(model_cfg, input_shape=input_shape, num_classes=num_classes,
                             seed=seed)
  tx = train.make_optimizer(opt_cfg, num_steps)
  graphdef, state = train.create_train_state(model, tx, aux=train.initial_aux(loss_fn))
  shardings = mesh_lib.state_shardings(state, mesh, fsdp=bool(config.fsdp))
  state = mesh_lib.place(state, shardings)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  try:
    if restore_only:
      latest = ckpt.latest_step()
      if latest is None or latest < num_steps:
        raise ValueError(f"`teacher_workdir`: no finished {name} checkpoint (step {num_steps}) "
                         f"under {str(ckpt_dir)!r}; latest is {latest}.")
      state, _ = ckpt.restore(state, num_steps)
      logging.info("[%s] restored step %d from %s", name, num_steps, ckpt_dir)
      return graphdef, state.params
    # The newest checkpoint that restores and verifies (a corrupt newer one is skipped, with a
    # warning naming it); the metrics of a killed run are cut back to it (to 0 if there is none).
    state, latest = ckpt.restore_latest(state)
    if latest is not None:
      logging.info("[%s] resuming from step %d (%s)", name, latest, ckpt_dir)
    writer.truncate(name, latest or 0)
    if latest is not None and latest >= num_steps:
      return graphdef, state.params
    step_fn = train.make_train_step(graphdef, tx, loss_fn, state_sharding=shardings)
    sampler = data.BatchSampler(len(train_arrays["y"]), batch_size, seed)
    if sampler.batch_size % mesh.size:
      raise ValueError(f"`batch_size` {sampler.batch_size} must be a multiple of the "
                       f"{mesh.size} devices.")
    eval_fn = train.make_eval_fn(graphdef)
    callback = None
    if eval_arrays is not None:
      callback = lambda st: train.evaluate(eval_fn, st.params, eval_arrays, mesh=mesh)
    state = train.train_loop(
        state, step_fn, sampler=sampler,
        get_batch=lambda idx: {k: v[idx] for k, v in train_arrays.items()},
        num_steps=num_steps, mesh=mesh, checkpointer=ckpt,
        checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        eval_every=config.eval_every, eval_callback=callback, writer=writer, phase=name,
        progress=config.progress)
    return graphdef, state.params
  finally:
    ckpt.close()


def student_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Indices of a class-stratified subset of ``size`` training examples (all if 0 or too big)."""
  n = len(y)
  if size <= 0 or size >= n:
    return np.arange(n)
  rng = np.random.default_rng([seed, 12345])
  classes = np.unique(y)
  per = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
  quota = np.array([size * len(per[c]) / n for c in classes])
  take_arr = np.floor(quota).astype(int)
  # Largest remainders get the leftover examples, so the subset has exactly `size` examples.
  take_arr[np.argsort(-(quota - take_arr), kind="stable")[:size - take_arr.sum()]] += 1
  take = dict(zip(classes, take_arr))
  idx = np.concatenate([per[c][:take[c]] for c in classes])
  return np.sort(idx)


_VAL_SEED = 2**31 - 1  # the validation split's own seed (not the run's)


def validation_split(y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train_idx, val_idx)``: a class-stratified validation split of ``size`` examples.

  The split is fixed (it does not depend on the run's seed), so every seed selects on the same
  validation examples. ``size`` 0 gives no validation split.
  """
  if size <= 0:
    return np.arange(len(y)), np.zeros((0,), np.int64)
  val = student_subset(y, size, seed=_VAL_SEED)
  train_idx = np.setdiff1d(np.arange(len(y)), val)
  return train_idx, val


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
  C.check_common(config)
  C.check_model(config, "teacher")
  C.check_model(config, "student")
  C.check_optimizer(config, "optimizer", total_steps=config.student_steps)
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
  tr_idx, va_idx = validation_split(ds.train.y, int(config.val_size))
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
  g_t, p_t = train_phase(
      "teacher", model_cfg=config.teacher, loss_fn=train.ce_loss, num_steps=config.teacher_steps,
      seed=config.seed, train_arrays=full_train, eval_arrays=val,
      ckpt_dir=teacher_root / "checkpoints" / "teacher",
      restore_only=bool(config.teacher_workdir), **common)
  t_train = train.predict_logits(g_t, p_t, x_tr, mesh=mesh)
  t_test = train.predict_logits(g_t, p_t, ds.test.x, mesh=mesh)
  val_t = None
  if has_val:
    val_t = dict(val, teacher_logits=train.predict_logits(g_t, p_t, val["x"], mesh=mesh))

  sub = student_subset(y_tr, config.student_train_size, config.seed)
  student_train = {"x": x_tr[sub], "y": y_tr[sub], "teacher_logits": t_train[sub]}
  test_t = dict(test, teacher_logits=t_test)
  student_seed = config.seed + 1
  g_b, p_b = train_phase(
      "baseline", model_cfg=config.student, loss_fn=train.ce_loss,
      num_steps=config.student_steps, seed=student_seed, train_arrays=student_train,
      eval_arrays=val_t, ckpt_dir=workdir / "checkpoints" / "baseline", **common)
  g_s, p_s = train_phase(
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
