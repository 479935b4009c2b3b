r"""Training pieces: optimizers from config, an Orbax-saveable train state, jitted steps, KD losses.

The flow every task follows::

  model = models.build_model(cfg.student, input_shape=..., num_classes=..., seed=cfg.seed)
  tx = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
  loss_fn = make_distill_loss("forward_kl", temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                              scale_by_t2=True)                      # or ce_loss
  graphdef, state = create_train_state(model, tx, aux=initial_aux(loss_fn))
  shardings = mesh.state_shardings(state, mesh_)                     # experiments.mesh
  state = mesh.place(state, shardings)
  step_fn = make_train_step(graphdef, tx, loss_fn, state_sharding=shardings)
  state = train_loop(state, step_fn, sampler=..., get_batch=..., num_steps=cfg.steps,
                     mesh=mesh_, checkpointer=checkpoint.Checkpointer(...))  # returns the state

* The train state is a pytree (``step``, ``params`` = ``nnx.State``, ``opt_state``, ``bad_step``,
  ``aux``): Orbax saves and restores it as is; ``nnx.merge(graphdef, state.params)`` rebuilds the
  model. ``aux`` is the loss's own state (e.g. TAID's :class:`kdjax.losses.TaidState`), so
  schedules are a pure function of the train state and resume exactly.
* Losses. A plain loss is ``loss(logits, batch) -> per-example values``. A loss that needs the
  step or carries state follows the :class:`LossFn` protocol
  ``loss(logits, batch, *, step, aux) -> (per-example values, new_aux)`` (``step`` = optimizer
  steps taken before this one, ``aux`` = ``state.aux``); wrap it in :class:`StatefulLoss` (which
  also gives the initial ``aux``) or pass ``loss_takes_step=True`` to :func:`make_train_step`.
* A training step is ``jax.jit`` over a device mesh (see :mod:`experiments.mesh`): the batch is
  sharded over the ``data`` axis, the parameters are replicated, split by their NNX sharding
  annotations over ``model``, or FSDP-split; the compiler inserts the gradient all-reduce. The
  same code runs on 1 CPU, 8 fake CPU devices, a GPU/TPU host, or several hosts; each host reads
  only the batch rows its devices hold, one batch ahead (host prefetch).
* Non-finite loss: the step keeps the previous parameters, optimizer and loss state and records
  the first bad step in ``state.bad_step``; the loop raises :class:`NonFiniteLossError` naming
  that step *before* it would save a checkpoint, so no checkpoint ever holds NaN parameters.
  (This is ``optax.apply_if_finite`` extended to the loss value and the loss state, with the
  first bad step recorded; the optimizer-state layout stays that of ``tx``.)
* Distillation loss, per example: :func:`kdjax.losses.ce_kd_mixture`,
  ``ce_weight * CE(y, z_S) + kd_weight * (T^2 if scale_by_t2 else 1) * D(z_S, z_T; T)`` with
  ``D`` chosen by name from :mod:`kdjax.divergences` (Hinton et al., arXiv:1503.02531 [paper];
  ``T^2`` keeps gradient magnitudes comparable across T [paper]). The older convention
  ``c·CE + (1 − c)·T²·D`` is ``ce_weight=c, kd_weight=1 − c, scale_by_t2=True``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from kdjax import divergences, reductions
from kdjax import losses as kd_losses
from experiments import mesh as mesh_lib

__all__ = [
    "train_phase",
    "TrainState", "NonFiniteLossError", "LossFn", "StatefulLoss", "initial_aux", "make_schedule",
    "make_optimizer", "create_train_state", "DIVERGENCES", "ce_loss", "make_distill_loss",
    "make_train_step", "make_eval_fn", "evaluate", "predict_logits", "train_loop",
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
    aux: the loss's own state (:class:`LossFn`), ``()`` for a plain loss; checkpointed with the
      rest, so a resumed run continues the loss's schedule exactly.
  """

  step: Array
  params: Any
  opt_state: Any
  bad_step: Array
  aux: Any = ()


class LossFn(Protocol):
  """A loss that sees the train step and carries its own state (schedules, EMA anchors, ...).

  ``loss(logits, batch, *, step, aux) -> (values, new_aux)``: ``step`` is the int32 number of
  optimizer steps taken before this one (traced), ``aux`` is ``state.aux``; ``values`` are the
  per-example losses (the step takes their masked mean over the global batch) and ``new_aux``
  becomes ``state.aux`` (same structure; it gets no gradient). ``new_aux`` must be a pure function
  of (``aux``, ``step``, the batch, the parameters): that is what makes a resumed run equal an
  uninterrupted one. For the masked batch mean of ``values`` use
  ``kdjax.reductions.masked_mean(values, where=batch.get("mask"))``.
  """

  def __call__(self, logits: Array, batch: Batch, *, step: Array, aux: Any
               ) -> tuple[Array, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class StatefulLoss:
  """A :class:`LossFn` with its initial state: ``StatefulLoss(fn, init_aux)``.

  :func:`make_train_step` recognises it (no ``loss_takes_step`` needed) and
  :func:`initial_aux` returns ``init_aux()`` for :func:`create_train_state`.
  """

  fn: Callable[..., tuple[Array, Any]]
  init_aux: Callable[[], Any]

  def __call__(self, logits: Array, batch: Batch, *, step: Array, aux: Any
               ) -> tuple[Array, Any]:
    return self.fn(logits, batch, step=step, aux=aux)


def initial_aux(loss_fn) -> Any:
  """The initial ``TrainState.aux`` for ``loss_fn``: ``init_aux()`` of a :class:`StatefulLoss`,
  else ``()``."""
  init = getattr(loss_fn, "init_aux", None)
  return init() if callable(init) else ()


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


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, aux: Any = ()
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into (graphdef, state) and initialises the optimizer.

  ``aux``: the loss's initial state (``initial_aux(loss_fn)``; ``()`` for a plain loss).
  """
  graphdef, params = nnx.split(model)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32),
                              aux=jax.tree.map(jnp.asarray, aux))


# ----------------------------------------------------------------------------- losses

#: Divergence names of :func:`make_distill_loss` (those of :func:`kdjax.losses.ce_kd_mixture`).
DIVERGENCES: dict[str, Callable[..., Array]] = dict(kd_losses.MIXTURE_DIVERGENCES)


def ce_loss(logits: Array, batch: Batch) -> Array:
  """Per-example cross-entropy with the integer labels ``batch["y"]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"])


def make_distill_loss(name: str, *, temperature: float = 1.0, kd_weight: float = 1.0,
                      ce_weight: float = 1.0, scale_by_t2: bool = False, **divergence_kwargs
                      ) -> Callable[[Array, Batch], Array]:
  """Per-example KD loss: :func:`kdjax.losses.ce_kd_mixture` on the batch's teacher and labels.

  ``ce_weight·CE(y, z_S) + kd_weight·(T² if scale_by_t2 else 1)·D(z_S, sg(z_T); T)`` (the one
  kdjax convention; the experiments' older ``c·CE + (1 − c)·T²·D`` is ``ce_weight=c,
  kd_weight=1 − c, scale_by_t2=True``). The hyper-parameters are validated here, by the library,
  before any training.

  Args:
    name: a key of :data:`DIVERGENCES` (a :mod:`kdjax.divergences` logits function).
    temperature: T > 0, applied to both the student and the teacher in D.
    kd_weight: weight >= 0 of the divergence term.
    ce_weight: weight >= 0 of the hard-label cross-entropy (at temperature 1).
    scale_by_t2: multiply the divergence by T² (Hinton et al. [paper]).
    **divergence_kwargs: extra hyper-parameters of the divergence (``skew``, ``beta``).

  Returns:
    ``loss(student_logits, batch)`` using ``batch["teacher_logits"]`` (stop-gradient),
    ``batch["y"]`` and, if present, the position mask ``batch["mask"]``.
  """
  if name not in DIVERGENCES:
    raise ValueError(f"distillation loss `name` must be one of {sorted(DIVERGENCES)}, "
                     f"got {name!r}.")
  hparams = dict(kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
                 temperature=temperature, divergence=name, **divergence_kwargs)
  # Early validation by the library itself (its errors name the argument): one tiny eager call.
  z = np.zeros((1, 2), np.float32)
  kd_losses.ce_kd_mixture(z, z, np.zeros((1,), np.int32), **hparams)

  def loss(logits: Array, batch: Batch) -> Array:
    teacher = jax.lax.stop_gradient(batch["teacher_logits"])
    mask = batch.get("mask")
    return kd_losses.ce_kd_mixture(logits, teacher, batch["y"], where=mask, **hparams)

  return loss


# ----------------------------------------------------------------------------- steps


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[..., Any], *, loss_takes_step: bool | None = None,
                    state_sharding: Any = None, donate: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A jitted step ``(state, batch) -> (state, metrics)``.

  Args:
    graphdef: the model's graph definition (from :func:`create_train_state`).
    tx: the optax optimizer ``state.opt_state`` was initialised with.
    loss_fn: per-example loss. Either plain, ``loss_fn(logits, batch) -> values``, or a
      :class:`LossFn`, ``loss_fn(logits, batch, *, step, aux) -> (values, new_aux)``, which sees
      ``state.step`` and updates ``state.aux``.
    loss_takes_step: whether ``loss_fn`` is a :class:`LossFn`. Default (None): True exactly for a
      :class:`StatefulLoss`.
    state_sharding: the train state's shardings (from :func:`experiments.mesh.state_shardings`),
      pinned on the output state (replicated, model-axis or FSDP layouts).
    donate: donate the input state's buffers.

  ``batch`` holds ``x`` (model input), ``y`` (labels) and whatever ``loss_fn`` reads
  (``teacher_logits``), optionally ``mask`` (bool per example: padding). The loss is a masked mean
  of ``loss_fn``'s per-example values over the *global* batch. With a sharded batch the compiler
  inserts the cross-device reductions.

  A step whose loss or gradient norm is not finite leaves params, opt_state and aux unchanged and
  sets ``bad_step`` (if not already set); metrics report ``finite`` = 0 for it.
  """
  if loss_takes_step is None:
    loss_takes_step = isinstance(loss_fn, StatefulLoss)
  if not isinstance(loss_takes_step, bool):
    raise TypeError(f"`loss_takes_step` must be a bool or None, got {loss_takes_step!r}.")

  def step(state: TrainState, batch: Batch):
    mask = batch.get("mask")

    def objective(params):
      model = nnx.merge(graphdef, params)
      logits = model(batch["x"])
      if loss_takes_step:
        values, new_aux = loss_fn(logits, batch, step=state.step, aux=state.aux)
      else:
        values, new_aux = loss_fn(logits, batch), state.aux
      return reductions.masked_mean(values, where=mask), (logits, new_aux)

    (loss, (logits, new_aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    new_aux = jax.lax.stop_gradient(new_aux)
    if jax.tree.structure(new_aux) != jax.tree.structure(state.aux):
      raise TypeError(f"the loss's new aux has structure {jax.tree.structure(new_aux)}, but "
                      f"state.aux has {jax.tree.structure(state.aux)} (initialise the state with "
                      f"`create_train_state(..., aux=initial_aux(loss_fn))`).")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: optax.tree.where(ok, new, old)
    correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
        aux=keep(jax.tree.map(lambda n, o: jnp.asarray(n, jnp.asarray(o).dtype), new_aux,
                              state.aux), state.aux))
    metrics = {"loss": loss, "accuracy": reductions.masked_mean(correct, where=mask),
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
                   batch_size: int = 512, host_local: bool = False):
  """Logits of the model on all of ``x`` (e.g. a teacher's, for KD), row ``i`` for ``x[i]``.

  Args:
    graphdef, params: the model.
    x: the inputs ``[N, ...]`` (the same on every process).
    mesh: device mesh to shard the batches over (``None``: default device).
    batch_size: examples per forward pass (rounded up to a multiple of the ``data`` axis).
    host_local: return only the rows computed on this process's devices, as
      ``(indices, logits)`` with their global row indices: nothing crosses hosts, which is what a
      large vocabulary needs (write them to a :mod:`kdjax.teacher_cache`, or feed them to the
      rows this host trains on).

  Returns:
    ``host_local=False``: the float32 ``[N, V]`` numpy array on every host (across processes this
    all-gathers the logits: fine for a few classes, not for an LLM vocabulary). ``host_local=True``:
    ``(indices, logits)`` with ``logits[j]`` the output for ``x[indices[j]]``; with one process
    ``indices`` is ``arange(N)``.
  """
  n_dev = 1 if mesh is None else int(mesh.shape.get("data", mesh.size))
  bs = max(n_dev, (min(batch_size, len(x)) + n_dev - 1) // n_dev * n_dev)
  apply = _apply_fn(graphdef)
  outs, idxs = [], []
  n = len(x)
  for start, b in zip(range(0, n, bs), _padded_batches({"x": x}, bs)):
    xb = mesh_lib.shard_batch({"x": b["x"]}, mesh)["x"] if mesh is not None else b["x"]
    logits = apply(params, xb)
    if host_local:
      if getattr(logits, "is_fully_addressable", True) and mesh is None:
        rows, vals = np.arange(bs), np.asarray(logits)
      else:
        rows, vals = mesh_lib.host_local_rows(logits)
      keep = b["mask"][rows]
      idxs.append(start + rows[keep])
      outs.append(vals[keep])
    else:
      outs.append(mesh_lib.to_host(logits)[b["mask"]])
  out = np.concatenate(outs).astype(np.float32)
  return (np.concatenate(idxs), out) if host_local else out


# ----------------------------------------------------------------------------- loop


def train_loop(state: TrainState, step_fn, *, sampler, get_batch: Callable[[np.ndarray], dict],
               num_steps: int, mesh=None, checkpointer=None, checkpoint_every: int = 0,
               log_every: int = 50, eval_every: int = 0,
               eval_callback: Callable[[TrainState], Mapping[str, float]] | None = None,
               writer=None, phase: str = "train", progress: bool = True,
               prefetch: bool = True) -> TrainState:
  """Runs ``step_fn`` from ``state.step`` to ``num_steps`` with logging, eval and checkpoints.

  Input: every process draws the same global batch indices from ``sampler``; with a mesh each
  process calls ``get_batch`` only on the rows its devices hold (:func:`experiments.mesh.host_rows`,
  right for any device order) and :func:`experiments.mesh.shard_batch` assembles the global batch.
  With ``prefetch`` the next batch is read and placed on the devices in a background thread while
  the current step runs (double buffering).

  Args:
    state: the (possibly restored) train state; training resumes at ``state.step``.
    step_fn: from :func:`make_train_step`.
    sampler: a :class:`experiments.data.BatchSampler` (batches depend on (seed, step) only).
    get_batch: example indices -> dict of numpy arrays (``x``, ``y``, ...), one row per index
      (with several processes: only this process's rows of the global batch).
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
    prefetch: prepare batch ``s + 1`` while step ``s`` runs (``get_batch`` then runs in a
      background thread, one call at a time, in step order).

  Returns:
    The final train state (at ``num_steps``).

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
  rows = None
  if mesh is not None and jax.process_count() > 1:
    rows = mesh_lib.host_rows(mesh, sampler.batch_size)

  def load(idx):
    if rows is None:
      b = get_batch(idx)
      return mesh_lib.shard_batch(b, mesh) if mesh is not None else b
    return mesh_lib.shard_batch(get_batch(idx[rows]), mesh, rows=rows, global_size=len(idx))

  pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
  steps = sampler.iterate(start, num_steps)
  nxt = next(steps, None)
  ahead = None if nxt is None or pool is None else pool.submit(load, nxt[1])
  try:
    while nxt is not None:
      step, idx = nxt
      batch = load(idx) if ahead is None else ahead.result()
      nxt = next(steps, None)
      ahead = None if nxt is None or pool is None else pool.submit(load, nxt[1])
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
      if checkpointer is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                       or last):
        check_finite(state)
        checkpointer.save(done, state)
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  check_finite(state)
  bar.close()
  return state


def train_phase(name: str, *, model_cfg, opt_cfg, loss_fn, num_steps: int, seed: int,
                train_arrays: dict[str, np.ndarray], input_shape, num_classes: int, batch_size: int,
                mesh, ckpt_dir, writer, config,
                eval_arrays: dict[str, np.ndarray] | None = None, restore_only: bool = False):
  """Trains (or resumes, or restores) one model; returns ``(graphdef, params)``.

  The model is initialised from ``seed`` and the batches follow ``BatchSampler(seed)``, so two
  phases with the same seed differ only in ``loss_fn``.
  """
  from experiments import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from experiments import data, models  # pylint: disable=import-outside-toplevel
  model = models.build_model(model_cfg, input_shape=input_shape, num_classes=num_classes,
                             seed=seed)
  tx = make_optimizer(opt_cfg, num_steps)
  graphdef, state = create_train_state(model, tx, aux=initial_aux(loss_fn))
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
    step_fn = make_train_step(graphdef, tx, loss_fn, state_sharding=shardings)
    sampler = data.BatchSampler(len(train_arrays["y"]), batch_size, seed)
    if sampler.batch_size % mesh.size:
      raise ValueError(f"`batch_size` {sampler.batch_size} must be a multiple of the "
                       f"{mesh.size} devices.")
    eval_fn = make_eval_fn(graphdef)
    callback = None
    if eval_arrays is not None:
      callback = lambda st: evaluate(eval_fn, st.params, eval_arrays, mesh=mesh)
    state = train_loop(
        state, step_fn, sampler=sampler,
        get_batch=lambda idx: {k: v[idx] for k, v in train_arrays.items()},
        num_steps=num_steps, mesh=mesh, checkpointer=ckpt,
        checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        eval_every=config.eval_every, eval_callback=callback, writer=writer, phase=name,
        progress=config.progress)
    return graphdef, state.params
  finally:
    ckpt.close()
