"""The theorem registry: every check has a name, a source label, a one-line statement and a
function returning what it measured against a tolerance.

A check module (``theory/<topic>.py``) registers its checks with the decorator::

  @register("divergences.pinsker", source="[paper] Pinsker's inequality",
            statement="TV(p, q) <= sqrt(KL(p||q)/2) on random pairs",
            doc="divergences.md#pinsker")
  def _pinsker():
    ...
    return Result(measured=worst_violation, tolerance=1e-12)

`Result.mode` says how to compare: ``"max"`` (default) passes when measured <= tolerance (an
error or a violation that must stay small); ``"min"`` passes when measured >= tolerance (a
counter-example check that must *find* a violation at least that large).

Checks run in float64 (`jax.enable_x64`) with fixed seeds; `run_check` takes care of both.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import time
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Result:
  measured: float
  tolerance: float
  mode: str = "max"
  detail: str = ""

  @property
  def passed(self) -> bool:
    m = float(self.measured)
    if math.isnan(m):
      return False
    if self.mode == "max":
      return m <= self.tolerance
    if self.mode == "min":
      return m >= self.tolerance
    raise ValueError(f"Result.mode must be 'max' or 'min', got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class Check:
  name: str
  source: str
  statement: str
  fn: Callable[[], Result]
  doc: str = ""


_REGISTRY: dict[str, Check] = {}
# Modules of the theory package that are infrastructure, not check modules.
_NOT_CHECKS = {"registry", "__main__", "cli"}


def register(name: str, *, source: str, statement: str, doc: str = ""):
  """Decorator registering a zero-argument function returning a `Result`."""
  if not (source.startswith("[paper]") or source.startswith("[proposed]")):
    raise ValueError(f"source of {name!r} must start with [paper] or [proposed], got {source!r}")

  def deco(fn: Callable[[], Result]) -> Callable[[], Result]:
    if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
      raise ValueError(f"theory check {name!r} registered twice")
    _REGISTRY[name] = Check(name, source, statement, fn, doc)
    return fn

  return deco


def load_all() -> None:
  """Imports every check module in the theory package (registration happens on import)."""
  import theory  # pylint: disable=import-outside-toplevel
  for mod in pkgutil.iter_modules(theory.__path__):
    if mod.name not in _NOT_CHECKS and not mod.name.startswith("_"):
      importlib.import_module(f"theory.{mod.name}")


def checks(pattern: str | None = None) -> list[Check]:
  load_all()
  out = sorted(_REGISTRY.values(), key=lambda c: c.name)
  if pattern:
    out = [c for c in out if pattern.lower() in c.name.lower()]
  return out


def run_check(check: Check) -> tuple[Result, float]:
  """Runs one check in float64; returns its result and the seconds it took."""
  start = time.perf_counter()
  with jax.enable_x64(True):
    result = check.fn()
  if not isinstance(result, Result):
    raise TypeError(f"check {check.name} returned {type(result).__name__}, expected Result")
  return result, time.perf_counter() - start


def markdown_index(pattern: str | None = None) -> str:
  """The index of checks as Markdown tables, one per topic (the part of the name before '.')."""
  by_topic: dict[str, list[Check]] = {}
  for c in checks(pattern):
    by_topic.setdefault(c.name.split(".", 1)[0], []).append(c)
  out = []
  for topic, cs in by_topic.items():
    docs = sorted({c.doc.split("#", 1)[0] for c in cs if c.doc})
    links = ", ".join(f"[{d}]({d})" for d in docs)
    out.append(f"### `{topic}` — {len(cs)} checks — {links}\n")
    out.append("| check | source | statement |")
    out.append("|---|---|---|")
    for c in cs:
      name = f"[`{c.name}`]({c.doc})" if c.doc else f"`{c.name}`"
      statement = c.statement.replace("|", "\\|")
      out.append(f"| {name} | {c.source.replace('|', '/')} | {statement} |")
    out.append("")
  return "\n".join(out) + "\n"
