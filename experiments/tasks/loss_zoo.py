r"""Loss-zoo benchmark: the digits_kd phases run once per (seed, loss); one table of test accuracy
and teacher agreement (mean ± std over seeds) per loss, with the labels-only baseline.

Reuses :func:`experiments.train.train_phase` and :func:`experiments.data.student_subset` (no second training
loop). Each loss is a ``loss(student_logits, batch) -> per-example values`` built from
:mod:`kdjax.losses` / :mod:`kdjax.policy` by :func:`make_zoo_loss`; TAID is an
:class:`experiments.train.StatefulLoss` that runs its adaptive schedule (``taid_init`` /
``taid_update``, Shing et al., arXiv:2501.16937 [paper]) on a :class:`kdjax.losses.TaidState`
carried in the train state, so t is a pure function of the train state and a resumed phase
continues the schedule exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import checkpoint as ckpt_lib
from experiments import config_args as C
from experiments import data, metrics, train
from experiments import mesh as mesh_lib
from kdjax import losses as L
from kdjax import policy, reductions

__all__ = ["LOSSES", "make_zoo_loss", "validate", "run"]

LOSSES = ("hinton", "logit_standardized", "taid", "akl", "pld", "random_sampling", "topk_tail",
          "multi_teacher", "reverse_kl")

_LABELS = {
    "hinton": "Hinton KD (forward KL, T², α=0.9)",
    "logit_standardized": "logit-standardised KD",
    "taid": "TAID (adaptive t)",
    "akl": "AKL (μ=0.5)",
    "pld": "PLD (Plackett–Luce)",
    "random_sampling": "random-sampling KD",
    "topk_tail": "top-k + tail bucket",
    "multi_teacher": "multi-teacher (arith. pool, confidence)",
    "reverse_kl": "reverse KL (MiniLLM token term)",
}


def make_zoo_loss(name: str, config) -> Callable[..., Any]:
  """The per-example training loss of one zoo row (KD term + ``ce_weight`` × hard-label CE).

  Every row but TAID is a plain ``loss(logits, batch) -> values``. TAID is a
  :class:`experiments.train.StatefulLoss` ``loss(logits, batch, *, step, aux) -> (values,
  new_aux)``: ``aux`` is the :class:`kdjax.losses.TaidState` (initial t = ``taid_t_start``),
  updated once per step with the batch mean of the TAID term, ramping to t = 1 at
  ``student_steps``.
  """
  temp, w = float(config.temperature), float(config.ce_weight)
  t2 = temp * temp

  def kd(logits, batch):
    z_t = jax.lax.stop_gradient(batch["teacher_logits"])
    if name == "hinton":
      return L.hinton_kd(logits, z_t, temperature=temp, scale_by_t2=True)
    if name == "logit_standardized":
      return L.logit_standardized_kd(logits, z_t, temperature=2.0, scale_by_t2=True)
    if name == "akl":
      return L.adaptive_kl(logits, z_t, temperature=temp) * t2
    if name == "pld":
      return L.plackett_luce_kd(logits, z_t, batch["y"])
    if name == "random_sampling":
      return L.random_sampling_kd(logits, batch["rs_ids"], batch["rs_weights"],
                                  temperature=temp) * t2
    if name == "topk_tail":
      return L.topk_tail_kl(logits, batch["topk_ids"], batch["topk_log_probs"],
                            temperature=temp) * t2
    if name == "multi_teacher":
      zs = jnp.moveaxis(jax.lax.stop_gradient(batch["teachers_logits"]), 1, 0)  # [M, B, V]
      wts = L.teacher_weights(zs, mode="confidence", temperature=temp)
      return L.multi_teacher_kd(logits, zs, weights=wts, aggregation="arithmetic",
                                temperature=temp) * t2
    if name == "reverse_kl":
      return policy.minillm_token_reverse_kl(logits, z_t, temperature=temp) * t2
    raise ValueError(f"unknown zoo loss {name!r}; expected one of {LOSSES}.")

  def loss(logits, batch):
    logits = logits.astype(jnp.float32)
    return w * train.ce_loss(logits, batch) + (1.0 - w) * kd(logits, batch)

  if name != "taid":
    return loss
  t_start, total = float(config.taid_t_start), int(config.student_steps)
  L.taid_init(t_start=t_start)  # validates t_start before any training

  def taid(logits, batch, *, step, aux):
    logits = logits.astype(jnp.float32)
    z_t = jax.lax.stop_gradient(batch["teacher_logits"])
    term = L.taid_loss(logits, z_t, interpolation=aux.t, temperature=temp) * t2
    j = reductions.masked_mean(term, where=batch.get("mask"))
    new_aux = L.taid_update(aux, j, step=step + 1, total_steps=total)
    return w * train.ce_loss(logits, batch) + (1.0 - w) * term, new_aux

  return train.StatefulLoss(taid, init_aux=lambda: L.taid_init(t_start=t_start))


def _extra_columns(name, config, arrays, t_logits, seed):
  """Offline teacher targets a loss reads from the batch (computed once, like a cache)."""
  temp = float(config.temperature)
  if name == "random_sampling":
    ids, wts = L.sample_sparse_targets(jax.random.key(seed), t_logits,
                                       num_samples=int(config.num_samples), temperature=temp)
    return {"rs_ids": np.asarray(ids), "rs_weights": np.asarray(wts)}
  if name == "topk_tail":
    ids, lp = L.topk_teacher(t_logits, k=int(config.topk), temperature=temp)
    return {"topk_ids": np.asarray(ids), "topk_log_probs": np.asarray(lp)}
  if name == "multi_teacher":
    return {"teachers_logits": arrays["teachers_logits"]}
  return {}


def _loss_names(config) -> tuple[str, ...]:
  v = C.get(config, "losses")
  names = LOSSES if v == "all" else tuple(n.strip() for n in str(v).split("+"))
  if not names or any(n not in LOSSES for n in names):
    C.fail("losses", v, f"'all' or names from {', '.join(LOSSES)} joined by '+'")
  return names


def validate(config) -> None:
  """Checks the whole config and builds every loss, without data (the launcher calls it first).

  Raises:
    experiments.config_args.ConfigError: one line naming the key, its value and what is allowed.
  """
  C.check_teacher_student(config, total_steps=config.student_steps)
  C.check_number(config, "temperature", low=0, low_open=True)
  C.check_number(config, "ce_weight", low=0, high=1)
  C.check_number(config, "num_teachers", low=1, integer=True)
  C.check_number(config, "topk", low=1, high=9, integer=True)   # 10 classes: k < 10 leaves a tail
  C.check_number(config, "num_samples", low=1, integer=True)
  C.check_number(config, "taid_t_start", low=0, high=1)
  for name in _loss_names(config):
    C.build(f"losses ({name})", lambda n=name: make_zoo_loss(n, config))


def run(config, workdir) -> dict[str, Any]:
  validate(config)
  smoke = bool(config.get("smoke", False))
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("loss_zoo"), flush=True)
  workdir = ckpt_lib.ensure_writable_dir(workdir)
  names = _loss_names(config)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  ds = data.load_supervised(config.dataset, data_dir=config.data_dir or None)
  writer = metrics.MetricWriter(workdir)
  common = dict(input_shape=ds.input_shape, num_classes=ds.num_classes, mesh=mesh,
                batch_size=config.batch_size, writer=writer, config=config,
                opt_cfg=config.optimizer)
  test = {"x": ds.test.x, "y": ds.test.y}
  full_train = {"x": ds.train.x, "y": ds.train.y}
  per_seed = []
  for s in range(config.seed, config.seed + config.num_seeds):
    root = workdir / f"seed{s}" / "checkpoints"
    n_teachers = int(config.num_teachers) if "multi_teacher" in names else 1
    teachers = []
    for i in range(n_teachers):
      g, p = train.train_phase(
          f"seed{s}/teacher{i}", model_cfg=config.teacher, loss_fn=train.ce_loss,
          num_steps=config.teacher_steps, seed=1000 * i + s, train_arrays=full_train,
          ckpt_dir=root / f"teacher{i}", **common)
      teachers.append((train.predict_logits(g, p, ds.train.x, mesh=mesh),
                       train.predict_logits(g, p, ds.test.x, mesh=mesh),
                       train.evaluate(train.make_eval_fn(g), p, test, mesh=mesh)["accuracy"]))
    t_train, t_test, t_acc = teachers[0]
    sub = data.student_subset(ds.train.y, config.student_train_size, s)
    base = {"x": ds.train.x[sub], "y": ds.train.y[sub], "teacher_logits": t_train[sub]}
    if n_teachers > 1:
      base["teachers_logits"] = np.stack([t[0][sub] for t in teachers], axis=1)
    test_t = dict(test, teacher_logits=t_test)
    rows = {"teacher": {"test_acc": t_acc, "agreement": 1.0}}
    for name in ("baseline",) + names:
      arrays = dict(base)
      if name == "baseline":
        loss_fn = train.ce_loss
      else:
        arrays.update(_extra_columns(name, config, base, base["teacher_logits"], s))
        loss_fn = make_zoo_loss(name, config)
      g, p = train.train_phase(
          f"seed{s}/{name}", model_cfg=config.student, loss_fn=loss_fn,
          num_steps=config.student_steps, seed=s + 1, train_arrays=arrays,
          ckpt_dir=root / name, **common)
      ev = train.evaluate(train.make_eval_fn(g), p, test_t, mesh=mesh)
      rows[name] = {"test_acc": ev["accuracy"], "agreement": ev["agreement"]}
      logging.info("loss_zoo seed %d %s: %s", s, name, rows[name])
    per_seed.append(rows)
  writer.close()
  table_rows = []
  for name in ("teacher", "baseline") + names:
    acc = np.array([r[name]["test_acc"] for r in per_seed])
    agr = np.array([r[name]["agreement"] for r in per_seed])
    table_rows.append({
        "loss": {"teacher": f"teacher (MLP {'-'.join(map(str, config.teacher.hidden))})",
                 "baseline": "baseline (labels only)"}.get(name, _LABELS.get(name, name)),
        "test_acc": f"{acc.mean():.4f} ± {acc.std():.4f}",
        "agreement": f"{agr.mean():.4f} ± {agr.std():.4f}",
        "gain_vs_baseline": ("" if name in ("teacher", "baseline") else
                             f"{100 * (acc.mean() - np.mean([r['baseline']['test_acc'] for r in per_seed])):+.2f}")})
  results = {"seeds": list(range(config.seed, config.seed + config.num_seeds)),
             "student_train_size": int(config.student_train_size), "per_seed": per_seed,
             "table": table_rows}
  table = metrics.format_table(table_rows, ["loss", "test_acc", "agreement", "gain_vs_baseline"])
  if jax.process_index() == 0:
    metrics.write_results(workdir, results, config, smoke=smoke)
    print(f"\nloss_zoo on {config.dataset} ({config.num_seeds} seeds, student trained on "
          f"{config.student_train_size} examples; mean ± std over seeds):\n{table}\n"
          f"workdir: {workdir}", flush=True)
  if smoke and jax.process_index() == 0:
    print(metrics.smoke_banner("loss_zoo", end=True), flush=True)
  return results
