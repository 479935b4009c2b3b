r"""Training pieces: optimizers from config, an Orbax-saveable train state, jitted steps, KD losses.

The flow every task follows::

  model = models.build_model(cfg.student, input_shape=..., num_classes=..., seed=cfg.seed)
  tx = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
  graphdef, state = create_train_state(model, tx)
  loss_fn = make_distill_loss("forward_kl", temperature=4.0, ce_weight=0.1)  # or ce_loss
  step_fn = make_train_step(graphdef, tx, loss_fn, mesh=mesh)
  state, history = train_loop(state, step_fn, ..., ckpt=checkpoint.Checkpointer(...))

* The train state is a pytree (``step``, ``params`` = ``nnx.State``, ``opt_state``, ``bad_step``):
  Orbax saves and restores it as is; ``nnx.merge(graphdef, state.params)`` rebuilds the model.
* A training step is ``jax.jit`` over a device mesh (see :mod:`experiments.mesh`): the batch is
  sharded over the ``data`` axis, the parameters are replicated (or sharded, FSDP-style); the
  compiler inserts the gradient all-reduce. The same code runs on 1 CPU, 8 fake CPU devices, a
  GPU/TPU host, or several hosts.
* Non-finite loss: the step keeps the previous parameters and records the first bad step in
  ``state.bad_step``; the loop raises :class:`NonFiniteLossError` naming that step *before* it
  would save a checkpoint, so no checkpoint ever holds NaN parameters.
* Distillation loss, per example (Hinton et al., arXiv:1503.02531 [paper]):
  ``ce_weight * CE(y, z_S) + (1 - ce_weight) * T^2 * D(z_S, z_T; T)`` with ``D`` chosen by name
  from :mod:`kdjax.divergences` (``T^2`` keeps gradient magnitudes comparable across T [paper];
  ``scale_by_t2=False`` drops it).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from kdjax import divergences, reductions
from experiments import mesh as mesh_lib

__all__ = [
    "TrainState", "NonFiniteLossError", "make_schedule", "make_optimizer", "create_train_state",
    "DIVERGENCES", "ce_loss", "make_distill_loss", "make_train_step", "make_eval_fn",
    "predict_logits", "train_loop",
]

Array = jax.Array
Batch = Mapping[str, Array]


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the message names the first bad step."""


@struct.dataclass
class TrainState:
  """Everything a training step updates; a pytree Orbax can save.

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: the model's ``nnx.State`` (rebuild the model with ``nnx.merge(graphdef, params)``).
    opt_state: the optax state.
    bad_step: the first step whose loss/gradient was not finite, -1 if none (int32 scalar).
  """

  step: Array
  params: Any
  opt_state: Any
  bad_step: Array


def _cfg(cfg, key, default):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Learning-rate schedule from config: ``learning_rate``, ``schedule``, ``warmup_steps``.

  ``schedule``: ``"constant"``, ``"cosine"`` (decay to 0 over ``total_steps``),
  ``"warmup_cosine"`` (linear warm-up then cosine), ``"linear"`` (decay to 0).
  """
  lr = float(_cfg(cfg, "learning_rate", 1e-3))
  kind = _cfg(cfg, "schedule", "constant")
  warmup = int(_cfg(cfg, "warmup_steps", 0))
  total = max(int(total_steps), 1)
  if lr <= 0 or not math.isfinite(lr):
    raise ValueError(f"`learning_rate` must be positive and finite, got {lr}.")
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, total)
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total - 1), total)
  if kind == "linear":
    return optax.linear_schedule(lr, 0.0, total)
  raise ValueError(f"`schedule` must be constant, cosine, warmup_cosine or linear, got {kind!r}.")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """optax optimizer from config.

  Keys: ``name`` (``adam``, ``adamw``, ``sgd``, ``momentum``), the schedule keys of
  :func:`make_schedule`, ``weight_decay`` (adamw), ``momentum`` (momentum, default 0.9),
  ``grad_clip`` (global-norm clipping, 0 = off).
  """
  name = _cfg(cfg, "name", "adam")
  sched = make_schedule(cfg, total_steps)
  if name == "adam":
    tx = optax.adam(sched)
  elif name == "adamw":
    tx = optax.adamw(sched, weight_decay=float(_cfg(cfg, "weight_decay", 1e-4)))
  elif name == "sgd":
    tx = optax.sgd(sched)
  elif name == "momentum":
    tx = optax.sgd(sched, momentum=float(_cfg(cfg, "momentum", 0.9)))
  else:
    raise ValueError(f"optimizer `name` must be adam, adamw, sgd or momentum, got {name!r}.")
  clip = float(_cfg(cfg, "grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into (graphdef, state) and initialises the optimizer."""
  graphdef, params = nnx.split(model)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32))


# ----------------------------------------------------------------------------- losses

DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": divergences.forward_kl,
    "reverse_kl": divergences.reverse_kl,
    "skew_forward_kl": divergences.skew_forward_kl,
    "skew_reverse_kl": divergences.skew_reverse_kl,
    "generalized_jsd": divergences.generalized_jsd,
    "total_variation": divergences.total_variation,
}


def ce_loss(logits: Array, batch: Batch) -> Array:
  """Per-example cross-entropy with the integer labels ``batch["y"]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"])


def make_distill_loss(name: str, *, temperature: float = 1.0, ce_weight: float = 0.0,
                      scale_by_t2: bool = True, **divergence_kwargs
                      ) -> Callable[[Array, Batch], Array]:
  """Per-example KD loss ``ce_weight·CE + (1 − ce_weight)·T²·D(student, teacher; T)``.

  Args:
    name: a key of :data:`DIVERGENCES` (a :mod:`kdjax.divergences` logits function).
    temperature: T > 0, applied to both the student and the teacher.
    ce_weight: weight in [0, 1] of the hard-label cross-entropy (at temperature 1).
    scale_by_t2: multiply the divergence by T² (Hinton et al. [paper]).
    **divergence_kwargs: extra hyper-parameters of the divergence (``skew``, ``beta``).

  Returns:
    ``loss(student_logits, batch)`` using ``batch["teacher_logits"]`` and ``batch["y"]``.
  """
  if name not in DIVERGENCES:
    raise ValueError(f"distillation loss `name` must be one of {sorted(DIVERGENCES)}, "
                     f"got {name!r}.")
  if not (isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
  if not 0.0 <= float(ce_weight) <= 1.0:
    raise ValueError(f"`ce_weight` must be in [0, 1], got {ce_weight!r}.")
  div = functools.partial(DIVERGENCES[name], temperature=float(temperature), **divergence_kwargs)
  scale = float(temperature) ** 2 if scale_by_t2 else 1.0
  w = float(ce_weight)

  def loss(logits: Array, batch: Batch) -> Array:
    teacher = jax.lax.stop_gradient(batch["teacher_logits"])
    kd = scale * div(logits, teacher)
    return kd if w == 0.0 else w * ce_loss(logits, batch) + (1.0 - w) * kd

  return loss


# ----------------------------------------------------------------------------- steps


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[[Array, Batch], Array], *,
                    state_sharding: Any = None, donate: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A jitted step ``(state, batch) -> (state, metrics)``.

  ``batch`` holds ``x`` (model input), ``y`` (labels) and whatever ``loss_fn`` reads
  (``teacher_logits``), optionally ``mask`` (bool per example: padding). The loss is a masked mean
  of ``loss_fn``'s per-example values over the *global* batch. With a sharded batch the compiler
  inserts the cross-device reductions; ``state_sharding`` (from :mod:`experiments.mesh`) pins the
  parameters' layout (replicated or FSDP) on the outputs.

  A step whose loss or gradient norm is not finite leaves params/opt_state unchanged and sets
  ``bad_step`` (if not already set); metrics report ``finite`` = 0 for it.
  """

  def step(state: TrainState, batch: Batch):
    def objective(params):
      model = nnx.merge(graphdef, params)
      logits = model(batch["x"])
      values = loss_fn(logits, batch)
      return reductions.masked_mean(values, where=batch.get("mask")), logits

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step))
    metrics = {"loss": loss, "accuracy": reductions.masked_mean(correct, where=batch.get("mask")),
               "grad_norm": gnorm, "finite": ok.astype(jnp.float32)}
    return new_state, metrics

  kwargs = {"donate_argnums": (0,)} if donate else {}
  if state_sharding is not None:
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(step, **kwargs)


_EVAL_CACHE: dict = {}


def make_eval_fn(graphdef: nnx.GraphDef, *, temperature: float = 1.0
                 ) -> Callable[[Any, Batch], dict]:
  """A jitted ``(params, batch) -> sums`` for evaluation over padded, sharded batches.

  Returns sums over the unmasked examples (add them over batches, divide by ``count``):
  ``count``, ``correct``, ``ce``; and if ``batch`` has ``teacher_logits``: ``agree`` (top-1
  agreement with the teacher) and ``kl`` (KL(p_T ‖ p_S) at ``temperature``).
  Cached per (graphdef, temperature): models of the same architecture share one compilation.
  """
  key = (graphdef, float(temperature))
  if key in _EVAL_CACHE:
    return _EVAL_CACHE[key]

  @jax.jit
  def evaluate(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"]).astype(jnp.float32)
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(logits.shape[:1], bool)
    m = mask.astype(jnp.float32)
    pred = jnp.argmax(logits, -1)
    out = {"count": jnp.sum(m),
           "correct": jnp.sum(m * (pred == batch["y"])),
           "ce": jnp.sum(m * ce_loss(logits, batch))}
    if "teacher_logits" in batch:
      t = batch["teacher_logits"]
      out["agree"] = jnp.sum(m * (pred == jnp.argmax(t, -1)))
      out["kl"] = jnp.sum(m * divergences.forward_kl(logits, t, temperature=temperature,
                                                      where=mask))
    return out

  _EVAL_CACHE[key] = evaluate
  return evaluate


def _padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterable[dict]:
  """Fixed-size batches covering all examples; the last is padded and masked."""
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    b = {k: np.concatenate([v[start:stop], np.repeat(v[stop - 1:stop], pad, 0)]) if pad else
         v[start:stop] for k, v in arrays.items()}
    b["mask"] = np.arange(batch_size) < stop - start
    yield b


def evaluate(eval_fn, params, arrays: Mapping[str, np.ndarray], *, mesh=None,
             batch_size: int = 512) -> dict[str, float]:
  """Evaluates on whole arrays (``x``, ``y``, optional ``teacher_logits``); returns means.

  Keys: ``accuracy``, ``ce``, and with a teacher ``agreement`` and ``kl``.
  """
  n_dev = 1 if mesh is None else mesh.size
  bs = max(n_dev, (min(batch_size, len(arrays["y"])) + n_dev - 1) // n_dev * n_dev)
  tot: dict[str, float] = {}
  for b in _padded_batches(arrays, bs):
    b = mesh_lib.shard_batch(b, mesh) if mesh is not None else jax.tree.map(jnp.asarray, b)
    for k, v in jax.device_get(eval_fn(params, b)).items():
      tot[k] = tot.get(k, 0.0) + float(v)
    # float64 host sums: exact enough and independent of the batch split.
  c = tot["count"]
  out = {"accuracy": tot["correct"] / c, "ce": tot["ce"] / c}
  if "agree" in tot:
    out["agreement"] = tot["agree"] / c
    out["kl"] = tot["kl"] / c
  return out


@functools.lru_cache(maxsize=64)
def _apply_fn(graphdef):
  return jax.jit(lambda p, xb: nnx.merge(graphdef, p)(xb))


def predict_logits(graphdef: nnx.GraphDef, params, x: np.ndarray, *, mesh=None,
                   batch_size: int = 512) -> np.ndarray:
  """Logits of the model on all of ``x`` as a host numpy array (e.g. a teacher's, for KD)."""
  n_dev = 1 if mesh is None else mesh.size
  bs = max(n_dev, (min(batch_size, len(x)) + n_dev - 1) // n_dev * n_dev)
  apply = _apply_fn(graphdef)
  outs = []
  for b in _padded_batches({"x": x}, bs):
    xb = mesh_lib.shard_batch({"x": b["x"]}, mesh)["x"] if mesh is not None else b["x"]
    logits = apply(params, xb)
    logits = mesh_lib.to_host(logits)
    outs.append(logits[b["mask"]])
  return np.concatenate(outs).astype(np.float32)


# ----------------------------------------------------------------------------- loop


def train_loop(state: TrainState, step_fn, *, sampler, get_batch: Callable[[np.ndarray], dict],
               num_steps: int, mesh=None, checkpointer=None, checkpoint_every: int = 0,
               log_every: int = 50, eval_every: int = 0,
               eval_callback: Callable[[TrainState], Mapping[str, float]] | None = None,
               writer=None, phase: str = "train", progress: bool = True) -> TrainState:
  """Runs ``step_fn`` from ``state.step`` to ``num_steps`` with logging, eval and checkpoints.

  Args:
    state: the (possibly restored) train state; training resumes at ``state.step``.
    step_fn: from :func:`make_train_step`.
    sampler: a :class:`experiments.data.BatchSampler` (batches depend on (seed, step) only).
    get_batch: global example indices -> dict of numpy arrays (``x``, ``y``, ...).
    num_steps: total steps of this phase.
    mesh: device mesh to shard the batch over (``None``: default device).
    checkpointer: an :class:`experiments.checkpoint.Checkpointer` or ``None``.
    checkpoint_every: save every this many steps (0: only at the end).
    log_every: fetch and log training metrics every this many steps.
    eval_every: call ``eval_callback`` every this many steps (0: only at the end).
    eval_callback: ``state -> metrics`` (e.g. test accuracy), logged with prefix ``eval/``.
    writer: an :class:`experiments.metrics.MetricWriter` or ``None``.
    phase: the name written with every metrics row (e.g. ``"teacher"``).
    progress: show a tqdm progress bar (process 0 only).

  Raises:
    NonFiniteLossError: a step produced a NaN/inf loss or gradient; names the step. Raised before
      any save, so the checkpoints on disk all hold finite parameters.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  start = int(jax.device_get(state.step))
  bar = tqdm(total=num_steps, initial=start, desc=phase, unit="step", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0, leave=False)
  pending: list[dict] = []
  t0 = time.perf_counter()

  def check_finite(st):
    bad = int(jax.device_get(st.bad_step))
    if bad >= 0:
      raise NonFiniteLossError(
          f"[{phase}] non-finite loss or gradient at step {bad}; stopped before saving a "
          f"checkpoint (the last checkpoint holds finite parameters). Lower the learning rate or "
          f"check the inputs.")

  def flush(step):
    if not pending:
      return
    rows = jax.device_get(pending)
    pending.clear()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "finite"}
    mean["steps_per_sec"] = len(rows) / max(time.perf_counter() - flush.t, 1e-9)
    flush.t = time.perf_counter()
    if writer is not None:
      writer.write(phase, step, {f"train/{k}": v for k, v in mean.items()})
    bar.set_postfix(loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}", refresh=False)
    if bar.disable and jax.process_index() == 0:  # no bar: rate + ETA in the log instead
      rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
      logging.info("[%s] step %d/%d  loss %.4f  acc %.3f  %.0f steps/s  ETA %.0fs", phase, step,
                   num_steps, mean["loss"], mean["accuracy"], rate, (num_steps - step) / rate)

  flush.t = t0
  for step, idx in sampler.iterate(start, num_steps):
    batch = get_batch(idx)
    batch = mesh_lib.shard_batch(batch, mesh) if mesh is not None else batch
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    done = step + 1
    bar.update(1)
    last = done == num_steps
    if log_every and (done % log_every == 0 or last):
      check_finite(state)
      flush(done)
    if eval_callback is not None and ((eval_every and done % eval_every == 0) or last):
      check_finite(state)
      ev = dict(eval_callback(state))
      if writer is not None:
        writer.write(phase, done, {f"eval/{k}": v for k, v in ev.items()})
    if checkpointer is not None and ((checkpoint_every and done % checkpoint_every == 0) or last):
      check_finite(state)
      checkpointer.save(done, state)
  check_finite(state)
  bar.close()
  return state
