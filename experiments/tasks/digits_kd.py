r"""Classic KD on digits: teacher -> labels-only baseline -> distilled student, one results table.

Each phase trains from its own checkpoint directory (``workdir/checkpoints/<phase>``) and resumes
from it; a phase whose final step is on disk is restored, not retrained. The baseline and the
student share the student architecture, the initialisation seed, the training examples and the
batch order; they differ only in the loss (CE vs KD), so the gap between them is the effect of the
teacher's soft targets.

Outputs in ``workdir``: ``metrics.jsonl``, ``tb/<phase>/`` (TensorBoard), ``learning_curves.png``,
``results.json`` and the printed table (test accuracy, teacher–student top-1 agreement, mean
KL(p_T ‖ p_S) at T = 1).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments import checkpoint as ckpt_lib
from experiments import data, metrics, models, train
from experiments import mesh as mesh_lib

__all__ = ["run", "train_phase"]


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
  graphdef, state = train.create_train_state(model, tx)
  shardings = mesh_lib.state_shardings(state, mesh, fsdp=bool(config.fsdp))
  state = mesh_lib.place(state, shardings)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  try:
    latest = ckpt.latest_step()
    if restore_only:
      if latest is None or latest < num_steps:
        raise ValueError(f"`teacher_workdir`: no finished {name} checkpoint (step {num_steps}) "
                         f"under {str(ckpt_dir)!r}; latest is {latest}.")
      state, _ = ckpt.restore(state, num_steps)
      logging.info("[%s] restored step %d from %s", name, num_steps, ckpt_dir)
      return graphdef, state.params
    if latest is not None:
      state, _ = ckpt.restore(state)
      logging.info("[%s] resuming from step %d (%s)", name, latest, ckpt_dir)
      writer.truncate(name, latest)
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


def run(config, workdir) -> dict[str, Any]:
  """Runs the three phases and writes the outputs; returns the results dict."""
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  logging.info("digits_kd: mesh %s, workdir %s", dict(mesh.shape), workdir)
  ds = data.load_supervised(config.dataset, data_dir=config.data_dir or None)
  writer = metrics.MetricWriter(workdir)
  common = dict(input_shape=ds.input_shape, num_classes=ds.num_classes, mesh=mesh,
                batch_size=config.batch_size, writer=writer, config=config,
                opt_cfg=config.optimizer)
  test = {"x": ds.test.x, "y": ds.test.y}
  full_train = {"x": ds.train.x, "y": ds.train.y}

  teacher_root = pathlib.Path(config.teacher_workdir or workdir)
  g_t, p_t = train_phase(
      "teacher", model_cfg=config.teacher, loss_fn=train.ce_loss, num_steps=config.teacher_steps,
      seed=config.seed, train_arrays=full_train, eval_arrays=test,
      ckpt_dir=teacher_root / "checkpoints" / "teacher",
      restore_only=bool(config.teacher_workdir), **common)
  t_train = train.predict_logits(g_t, p_t, ds.train.x, mesh=mesh)
  t_test = train.predict_logits(g_t, p_t, ds.test.x, mesh=mesh)

  sub = student_subset(ds.train.y, config.student_train_size, config.seed)
  student_train = {"x": ds.train.x[sub], "y": ds.train.y[sub], "teacher_logits": t_train[sub]}
  test_t = dict(test, teacher_logits=t_test)
  student_seed = config.seed + 1
  g_b, p_b = train_phase(
      "baseline", model_cfg=config.student, loss_fn=train.ce_loss,
      num_steps=config.student_steps, seed=student_seed, train_arrays=student_train,
      eval_arrays=test_t, ckpt_dir=workdir / "checkpoints" / "baseline", **common)
  kd_loss = train.make_distill_loss(
      config.loss.name, temperature=config.loss.temperature, ce_weight=config.loss.ce_weight,
      scale_by_t2=config.loss.scale_by_t2,
      **{k: v for k, v in config.loss.items()
         if k not in ("name", "temperature", "ce_weight", "scale_by_t2")})
  g_s, p_s = train_phase(
      "student", model_cfg=config.student, loss_fn=kd_loss, num_steps=config.student_steps,
      seed=student_seed, train_arrays=student_train, eval_arrays=test_t,
      ckpt_dir=workdir / "checkpoints" / "student", **common)

  rows = []
  for name, g, p in (("teacher", g_t, p_t), ("baseline (labels only)", g_b, p_b),
                     (f"student (KD {config.loss.name}, T={config.loss.temperature:g})",
                      g_s, p_s)):
    ev = train.evaluate(train.make_eval_fn(g), p, test_t, mesh=mesh)
    rows.append({"model": name, "params": int(sum(x.size for x in jax.tree.leaves(p))),
                 "test_acc": ev["accuracy"], "agreement": ev["agreement"], "kl_T1": ev["kl"],
                 "test_ce": ev["ce"]})
  results = {"seed": config.seed, "student_train_size": int(len(sub)), "rows": rows,
             "kd_gain": rows[2]["test_acc"] - rows[1]["test_acc"]}
  table = metrics.format_table(rows, ["model", "params", "test_acc", "agreement", "kl_T1",
                                      "test_ce"])
  writer.close()
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    metrics.plot_learning_curves(
        metrics.read_metrics(workdir / "metrics.jsonl"), workdir / "learning_curves.png",
        title=f"digits KD (seed {config.seed}, {len(sub)} student examples)")
    print(f"\ndigits_kd results (seed {config.seed}, test set of {len(ds.test)}, student trained "
          f"on {len(sub)} examples):\n{table}\nKD gain over the labels-only baseline: "
          f"{100 * results['kd_gain']:+.2f} points\nworkdir: {workdir}", flush=True)
  return results
