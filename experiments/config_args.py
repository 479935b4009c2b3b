"""The argument string of a config file (big_vision's ``parse_arg`` pattern).

``--config=experiments/configs/digits_kd.py:smoke,seed=1,loss=reverse_kl`` hands
``"smoke,seed=1,loss=reverse_kl"`` to ``get_config(arg)``; each config parses it with
:func:`parse_arg` and rejects keys it does not know, so a typo fails at parse time.
"""

from __future__ import annotations


def parse_arg(arg: str | None, *, config: str, allowed) -> dict:
  """Parses ``"flag,key=value,..."`` into ``{"flag": True, "key": "value"}``.

  Args:
    arg: the string after ``:`` in ``--config=file.py:arg`` (None or "" for none).
    config: the config's name, for the error message.
    allowed: the keys this config accepts.

  Raises:
    ValueError: naming the unknown keys and listing the accepted ones.
  """
  out = {}
  for item in (arg or "").split(","):
    item = item.strip()
    if item:
      key, _, value = item.partition("=")
      out[key.strip()] = value.strip() if value else True
  unknown = set(out) - set(allowed)
  if unknown:
    raise ValueError(f"{config} config: unknown argument(s) {sorted(unknown)}; "
                     f"expected {sorted(allowed)}")
  return out


# ----------------------------------------------------------------------------- config checks
# Each task's ``validate(config)`` uses these to check its whole config in its first second,
# before any data preparation or training; the error names the dotted key, the value and what is
# allowed, in one line (the launcher prints it as a usage error).


class ConfigError(ValueError):
  """A config value is invalid; the message starts with ``config.<key>``."""


_MISSING = object()


def get(config, key: str):
  """``config`` at the dotted ``key`` (ConfigDict or dict); ConfigError if absent."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f"config.{key}: missing (the config has no such key).") from None
  return node


def fail(key: str, value, allowed: str):
  raise ConfigError(f"config.{key}={value!r}: must be {allowed}.")


def check_choice(config, key: str, allowed) -> str:
  v = get(config, key)
  if v not in tuple(allowed):
    fail(key, v, "one of " + ", ".join(repr(a) for a in allowed))
  return v


def check_number(config, key: str, *, low=None, high=None, low_open=False, high_open=False,
                 integer=False):
  """A real (or integer) number in the given range; bools and strings are rejected."""
  import math  # pylint: disable=import-outside-toplevel
  import numbers  # pylint: disable=import-outside-toplevel
  v = get(config, key)
  kind = numbers.Integral if integer else numbers.Real
  lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
  hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
  rng = " and ".join(x for x in (lo, hi) if x)
  allowed = ("an integer" if integer else "a finite number") + (f" {rng}" if rng else "")
  if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
    fail(key, v, allowed)
  if low is not None and (v <= low if low_open else v < low):
    fail(key, v, allowed)
  if high is not None and (v >= high if high_open else v > high):
    fail(key, v, allowed)
  return v


def check_widths(config, key: str, *, allow_empty: bool = False) -> tuple:
  """A tuple of positive integer layer widths (e.g. ``--config.student.hidden='(64, 32)'``)."""
  import numbers  # pylint: disable=import-outside-toplevel
  v = get(config, key)
  ok = isinstance(v, (tuple, list)) and (allow_empty or len(v) > 0) and all(
      isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0 for w in v)
  if not ok:
    fail(key, v, "a tuple of positive integer widths, e.g. '(64, 32)' or '(64,)'")
  return tuple(v)


def check_model(config, key: str) -> None:
  """A model config of :func:`experiments.models.build_model` (kind, widths, activation)."""
  kind = check_choice(config, f"{key}.kind", ("mlp", "cnn", "transformer"))
  if kind == "mlp":
    check_widths(config, f"{key}.hidden")
  elif kind == "cnn":
    check_widths(config, f"{key}.features")
  node = get(config, key)
  if "activation" in node:
    check_choice(config, f"{key}.activation", ("relu", "gelu", "tanh", "silu"))


def check_optimizer(config, key: str = "optimizer", *, total_steps: int = 1) -> None:
  """The optimizer config: name, schedule and numbers, then built (no data needed)."""
  check_choice(config, f"{key}.name", ("adam", "adamw", "sgd", "momentum"))
  node = get(config, key)
  if "schedule" in node:
    check_choice(config, f"{key}.schedule", ("constant", "cosine", "warmup_cosine", "linear"))
  check_number(config, f"{key}.learning_rate", low=0, low_open=True)
  for k in ("warmup_steps",):
    if k in node:
      check_number(config, f"{key}.{k}", low=0, integer=True)
  for k in ("weight_decay", "grad_clip", "momentum"):
    if k in node:
      check_number(config, f"{key}.{k}", low=0)
  from experiments import train  # pylint: disable=import-outside-toplevel
  build(key, lambda: train.make_optimizer(node, max(int(total_steps), 1)))


def build(key: str, fn):
  """Calls ``fn()`` (e.g. a loss or optimizer factory); its ValueError/TypeError is re-raised as
  one ConfigError naming ``config.<key>``."""
  try:
    return fn()
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"config.{key}: {msg}") from None


def check_common(config) -> None:
  """Keys most tasks share, each checked only if the config has it."""
  ints_nonneg = ("seed", "num_devices", "log_every", "eval_every", "checkpoint_every",
                 "student_train_size", "val_size")
  for k in ints_nonneg:
    if k in config:
      check_number(config, k, low=0, integer=True)
  for k in ("batch_size", "teacher_steps", "student_steps", "steps", "num_seeds", "seeds"):
    if k in config and not isinstance(config[k], str):
      check_number(config, k, low=1, integer=True)
  if "resume" in config:
    check_choice(config, "resume", ("strict", "allow_changes"))
  if "dataset" in config and not (isinstance(config.dataset, str) and config.dataset):
    fail("dataset", config.dataset, "a dataset name ('digits' or 'mnist1d', or a prepared TFDS name)")
  if config.get("teacher_workdir"):
    import pathlib  # pylint: disable=import-outside-toplevel
    if not pathlib.Path(config.teacher_workdir).expanduser().is_dir():
      fail("teacher_workdir", config.teacher_workdir,
           "a finished workdir of this experiment (relative paths resolve against the current "
           "directory), or '' to train the teacher")


def check_numbers(config, key: str, *, low=None, high=None, integer=False,
                  nonempty: bool = True) -> tuple:
  """A tuple of numbers, each in ``[low, high]`` (e.g. ``--config.alphas='(0.0, 0.5)'``)."""
  import math  # pylint: disable=import-outside-toplevel
  import numbers  # pylint: disable=import-outside-toplevel
  v = get(config, key)
  kind = numbers.Integral if integer else numbers.Real
  rng = " and ".join(x for x in ("" if low is None else f">= {low}",
                                 "" if high is None else f"<= {high}") if x)
  what = "integers" if integer else "finite numbers"
  allowed = f"a {'non-empty ' if nonempty else ''}tuple of {what}" + (f" {rng}" if rng else "")
  if not isinstance(v, (tuple, list)) or (nonempty and not v):
    fail(key, v, allowed)
  for x in v:
    if isinstance(x, bool) or not isinstance(x, kind) or not math.isfinite(x) or (
        low is not None and x < low) or (high is not None and x > high):
      fail(key, v, allowed)
  return tuple(v)


def check_clip(config, key: str = "clip") -> tuple[float, float] | None:
  """``""`` (no clipping) or ``"lo,hi"`` with lo < hi (a clipping range for alpha)."""
  import math  # pylint: disable=import-outside-toplevel
  v = get(config, key)
  allowed = "'' (no clipping) or 'lo,hi' with finite lo < hi, e.g. '0,1'"
  if not isinstance(v, str):
    fail(key, v, allowed)
  if not v:
    return None
  try:
    lo, hi = (float(x) for x in v.split(","))
  except ValueError:
    fail(key, v, allowed)
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    fail(key, v, allowed)
  return lo, hi


def check_bool(config, key: str) -> bool:
  return check_choice(config, key, (True, False))


def check_teacher_student(config, *, total_steps: int) -> None:
  """The keys of a teacher -> student experiment: :func:`check_common`, both model configs and
  the optimizer (built for ``total_steps``)."""
  check_common(config)
  check_model(config, "teacher")
  check_model(config, "student")
  check_optimizer(config, "optimizer", total_steps=total_steps)
