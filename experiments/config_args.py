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
