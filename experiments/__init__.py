"""Paper reproductions on an absl launcher: `python -m experiments.main --config=... --workdir=...`.

Shared pieces the tasks build on:

* :mod:`experiments.data` — TFDS builders ``digits`` / ``mnist1d`` (array_record, prepared offline
  on first use into ``$KDJAX_DATA_DIR`` or ``~/.cache/kdjax/tfds``), ``load_supervised`` (numpy
  splits), ``BatchSampler`` (batches a pure function of (seed, step)).
* :mod:`experiments.models` — Flax NNX MLP, small CNN, small decoder-only Transformer;
  ``build_model(cfg, input_shape=, num_classes=, seed=)``.
* :mod:`experiments.train` — optax optimizer/schedule from config, ``TrainState`` (Orbax-saveable),
  ``make_train_step`` / ``make_eval_fn`` / ``evaluate`` / ``predict_logits``, KD losses by name
  (``make_distill_loss``), ``train_loop`` (tqdm, eval, checkpoints, NaN guard).
* :mod:`experiments.mesh` — data-parallel mesh (batch sharded, params replicated), FSDP option,
  multi-process batch assembly.
* :mod:`experiments.checkpoint` — Orbax ``CheckpointManager`` wrapper with resume.
* :mod:`experiments.metrics` — metrics.jsonl, TensorBoard events (tensorboardX), learning-curve PNG,
  text tables.

A config ``experiments/configs/<exp>.py`` sets ``config.task``; the launcher imports
``experiments.tasks.<task>`` and calls ``run(config, workdir)``.
"""
