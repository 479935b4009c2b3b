r"""Language-model teachers for distillation: one interface, an exact n-gram oracle and a Transformer.

Conventions (the token ids of :mod:`experiments.ngram`: ``0..V'-1`` words with ``</s>`` = 0,
``V'`` = ``<other>``, ``V'+1`` = ``<s>``, input only):

* ``tokens [B, L]`` int32 are sentences *after* ``<s>`` (``<s>`` is never written in them; a
  sentence ends with its ``</s>``, and positions after it are padding with ``mask`` False, as
  :meth:`experiments.ngram.NGramOracle.sample` returns them).
* ``log_probs(tokens)[b, t]`` is the natural-log next-token distribution ``log p(. | <s>,
  tokens[b, :t])`` over the ``V'+1`` outputs: position ``t`` *predicts* ``tokens[b, t]`` from the
  prefix before it, with ``<s>`` prepended. So ``log_probs(tokens)[b, 0]`` is the sentence-start
  distribution and ``take_along_axis(log_probs(tokens), tokens[..., None], -1)`` are the
  log-probabilities of the tokens themselves. :func:`shift_right` builds the model input
  ``[<s>, tokens[:, :-1]]``.
* ``where`` ([B, L] bool, optional) marks the positions that matter; the others get the uniform
  distribution ``-log(V'+1)`` (finite: no NaN can leak from padding into a loss).

:class:`Teacher` is the interface (a ``typing.Protocol``): ``num_outputs`` and ``log_probs``;
``sample`` (``(tokens, mask)`` of sentences, used for teacher-generated data) and, for the fused
large-vocabulary losses (:mod:`kdjax.losses.fused_linear`), ``hidden(tokens) [B, L, H]`` with
``head_weight [V'+1, H]`` and ``head_bias [V'+1]`` are optional. Both implementations are
``flax.struct`` pytrees, so a teacher is an ordinary argument of a ``jax.jit`` function (its tables
or parameters are traced inputs, not constants baked into the program) and every method works
eagerly and under ``jit``:

* :class:`NGramTeacher` wraps :class:`experiments.ngram.NGramOracle`: position ``t`` uses the
  context ``(h2, h1) = (tokens[t-2], tokens[t-1])`` with ``<s>`` padding at the start, and equals
  ``oracle.log_probs(h2, h1)`` exactly (it is the same traceable
  :func:`experiments.ngram.oracle_log_probs`). The oracle is a Markov chain of order 2, so this
  is the exact sequence distribution.
* :class:`TransformerTeacher` is a :class:`experiments.models.Transformer` (Flax NNX, output head
  of ``V'+1`` rows, embedding of ``V'+2``) given by ``(graphdef, params)``;
  :meth:`TransformerTeacher.restore` reads it back from the Orbax checkpoint an ``lm_distill``
  run wrote (``<workdir>/checkpoints/teacher``).

A pretrained checkpoint of a known architecture (e.g. a Hugging Face Llama converted to Flax
NNX) plugs in the same way: write a pytree class whose ``log_probs(tokens, where)`` returns
``[B, L, V+1]`` log-probs with the conventions above (prepend the model's BOS instead of
``<s>``, map its vocabulary to the task's ids), or ``hidden(tokens)`` with ``head_weight`` /
``head_bias`` of the same shapes for the fused losses, and ``sample(key, num, max_len)`` if it
should generate data. For an NNX port of a Llama, ``hidden`` is the final-norm output and
``head_weight`` the ``lm_head`` kernel transposed to ``[V, H]``; ``log_probs`` is
``log_softmax(hidden @ head_weight.T)``. Nothing else in the trainer depends on the teacher's
architecture.
"""

from __future__ import annotations

import pathlib
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from experiments import decoding
from experiments import ngram as ngram_lib

__all__ = ["Teacher", "NGramTeacher", "TransformerTeacher", "shift_right", "sentence_mask",
           "build_lm"]

Array = jax.Array


@runtime_checkable
class Teacher(Protocol):
  """A next-token teacher over the ``V'+1`` outputs (see the module docstring for the shapes).

  Required: ``num_outputs`` (``V'+1``) and ``log_probs(tokens [B, L], where=None) -> [B, L, V'+1]``
  float32 natural-log next-token probabilities. Optional: ``sample(key, num, max_len) ->
  (tokens, mask)``; ``hidden(tokens) -> [B, L, H]`` with ``head_weight [V'+1, H]`` and
  ``head_bias [V'+1]`` (the fused losses' inputs).
  """

  num_outputs: int

  def log_probs(self, tokens: Array, where: Array | None = None) -> Array:
    ...


def shift_right(tokens: Array, bos_id: int) -> Array:
  """``[<s>, tokens[:, :-1]]``: the model input whose position ``t`` predicts ``tokens[:, t]``."""
  tokens = jnp.asarray(tokens, jnp.int32)
  bos = jnp.full(tokens.shape[:-1] + (1,), bos_id, jnp.int32)
  return jnp.concatenate([bos, tokens[..., :-1]], axis=-1)


def sentence_mask(tokens: Array, eos_id: int = 0) -> tuple[Array, Array]:
  """``(tokens, mask)`` for generated rows that run on after their ``</s>``: the mask is True up
  to and including the first ``</s>``, and the tokens after it are set to ``</s>`` (the padding
  convention of :meth:`experiments.ngram.NGramOracle.sample`)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  eos = tokens == eos_id
  before = jnp.cumsum(eos.astype(jnp.int32), axis=-1) - eos.astype(jnp.int32)
  mask = before == 0
  return jnp.where(mask, tokens, eos_id), mask


def _masked(lp: Array, where: Array | None) -> Array:
  if where is None:
    return lp
  uniform = -jnp.log(jnp.asarray(lp.shape[-1], lp.dtype))
  return jnp.where(jnp.asarray(where, bool)[..., None], lp, uniform)


@struct.dataclass
class NGramTeacher:
  """The exact trigram oracle as a :class:`Teacher` (a pytree: ``tables`` are its leaves)."""

  tables: ngram_lib.OracleTables
  oracle: ngram_lib.NGramOracle = struct.field(pytree_node=False)

  @classmethod
  def from_oracle(cls, oracle: ngram_lib.NGramOracle, device=None) -> "NGramTeacher":
    return cls(tables=oracle.tables(device), oracle=oracle)

  @property
  def num_outputs(self) -> int:
    return self.oracle.num_outputs

  @property
  def bos_id(self) -> int:
    return self.oracle.bos_id

  def contexts(self, tokens: Array) -> tuple[Array, Array]:
    """``(h2, h1)`` of every position: the two previous tokens, ``<s>`` before the start."""
    h1 = shift_right(tokens, self.bos_id)
    return shift_right(h1, self.bos_id), h1

  def log_probs(self, tokens: Array, where: Array | None = None) -> Array:
    h2, h1 = self.contexts(tokens)
    lp = ngram_lib.oracle_log_probs(self.tables, h2, h1, max_bi=self.oracle.max_bi,
                                    max_tri=self.oracle.max_tri)
    return _masked(lp, where)

  def sample(self, key: Array, num: int, max_len: int) -> tuple[Array, Array]:
    """``num`` oracle sentences ``(tokens [num, max_len], mask)`` from ``(<s>, <s>)``."""
    # The oracle's own lax.scan sampler on this pytree's (possibly traced) tables.
    s = self.oracle._sample_impl(self.tables, key, self.bos_id, self.bos_id,  # pylint: disable=protected-access
                                 int(num), int(max_len))
    return s.tokens, s.mask


def build_lm(model_cfg, *, vocab_size: int, seq_len: int, seed: int) -> nnx.Module:
  """The task's decoder-only Transformer: embedding of ``V'+2`` ids, head of ``V'+1`` outputs
  (``<s>`` is never predicted), ``max_len = seq_len + 1`` positions (``<s>`` plus the sentence,
  so KV-cache sampling of ``seq_len`` tokens fits)."""
  from experiments import models  # pylint: disable=import-outside-toplevel
  cfg = {k: model_cfg[k] for k in ("d_model", "num_heads", "num_layers", "mlp_dim")
         if k in model_cfg}
  cfg.update(kind="transformer", vocab_size=int(vocab_size) + 2,
             num_outputs=int(vocab_size) + 1, max_len=int(seq_len) + 1)
  return models.build_model(cfg, seed=seed)


@struct.dataclass
class TransformerTeacher:
  """A :class:`experiments.models.Transformer` as a :class:`Teacher` (a pytree of its params).

  Also used for the student itself (its log-probs and KV-cache samples) by the metrics.
  """

  params: Any
  graphdef: Any = struct.field(pytree_node=False)
  bos_id: int = struct.field(pytree_node=False)

  @classmethod
  def from_model(cls, model: nnx.Module, bos_id: int) -> "TransformerTeacher":
    graphdef, params = nnx.split(model)
    return cls(params=params, graphdef=graphdef, bos_id=int(bos_id))

  @classmethod
  def restore(cls, ckpt_dir: str | pathlib.Path, *, model_cfg, opt_cfg, vocab_size: int,
              seq_len: int, num_steps: int, seed: int = 0, mesh=None,
              fsdp: bool = False) -> "TransformerTeacher":
    """The teacher from an Orbax checkpoint of :mod:`experiments.tasks.lm_distill`
    (``<workdir>/checkpoints/teacher``) at step ``num_steps``.

    ``model_cfg``/``opt_cfg``/``num_steps`` must be those the run used (they give the train
    state's structure). Raises ValueError when that step is not on disk.
    """
    from experiments import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from experiments import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from experiments import train  # pylint: disable=import-outside-toplevel
    model = build_lm(model_cfg, vocab_size=vocab_size, seq_len=seq_len, seed=seed)
    tx = train.make_optimizer(opt_cfg, num_steps)
    graphdef, state = train.create_train_state(model, tx)
    if mesh is not None:
      state = mesh_lib.place(state, mesh_lib.state_shardings(state, mesh, fsdp=fsdp))
    ckpt = ckpt_lib.Checkpointer(ckpt_dir)
    try:
      latest = ckpt.latest_step()
      if latest is None or latest < num_steps or num_steps not in ckpt.all_steps():
        raise ValueError(f"no finished teacher checkpoint (step {num_steps}) under "
                         f"{str(ckpt_dir)!r}; latest is {latest}.")
      state, _ = ckpt.restore(state, num_steps)
    finally:
      ckpt.close()
    return cls(params=state.params, graphdef=graphdef, bos_id=int(vocab_size) + 1)

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)

  @property
  def num_outputs(self) -> int:
    return int(self.model().head.out_features)

  def hidden(self, tokens: Array) -> Array:
    return self.model().hidden(shift_right(tokens, self.bos_id))

  @property
  def head_weight(self) -> Array:
    return self.model().head.kernel[...].T

  @property
  def head_bias(self) -> Array:
    return self.model().head.bias[...]

  def log_probs(self, tokens: Array, where: Array | None = None) -> Array:
    logits = self.model()(shift_right(tokens, self.bos_id)).astype(jnp.float32)
    return _masked(jax.nn.log_softmax(logits, axis=-1), where)

  def sample(self, key: Array, num: int, max_len: int, *,
             temperature: float = 1.0) -> tuple[Array, Array]:
    """``num`` sentences from ``<s>`` with the KV cache (:func:`experiments.decoding.sample`),
    cut at the first ``</s>`` (:func:`sentence_mask`)."""
    prompt = jnp.full((int(num), 1), self.bos_id, jnp.int32)
    toks, _ = decoding.sample(self.model(), prompt, max_new_tokens=int(max_len),
                              temperature=temperature, key=key)
    return sentence_mask(toks)
