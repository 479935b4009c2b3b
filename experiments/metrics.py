"""Metrics out of a run: ``metrics.jsonl``, TensorBoard event files, a learning-curve PNG.

:class:`MetricWriter` appends one JSON row per (phase, step) to ``workdir/metrics.jsonl`` and
mirrors every scalar into TensorBoard event files under ``workdir/tb/<phase>`` (tensorboardX, no
TensorFlow). Only process 0 writes. On resume, :meth:`MetricWriter.truncate` drops the rows a killed
run wrote after its last checkpoint, so the file reads as one uninterrupted run.
:func:`plot_learning_curves` draws the rows as a PNG (one panel per metric, one line per phase).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import jax

__all__ = ["MetricWriter", "read_metrics", "plot_learning_curves", "format_table"]


def _scalar(v: Any) -> float:
  return float(jax.device_get(v))


class MetricWriter:
  """Writes metric rows ``{"phase", "step", "time", <name>: value}`` to jsonl and TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.active = jax.process_index() == 0
    self._tb: dict[str, Any] = {}
    self._use_tb = tensorboard

  def truncate(self, phase: str, step: int) -> None:
    """Drops rows of ``phase`` after ``step`` (written by a run killed after its last save)."""
    if not self.active or not self.path.exists():
      return
    keep = [r for r in read_metrics(self.path) if r.get("phase") != phase or r["step"] <= step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, self.path)

  def write(self, phase: str, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"phase": phase, "step": int(step), "time": time.time()}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._use_tb:
      if phase not in self._tb:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb[phase] = SummaryWriter(str(self.workdir / "tb" / phase))
      for k, v in row.items():
        if k not in ("phase", "step", "time") and math.isfinite(v):
          self._tb[phase].add_scalar(k, v, int(step))

  def flush(self) -> None:
    for w in self._tb.values():
      w.flush()

  def close(self) -> None:
    for w in self._tb.values():
      w.close()
    self._tb.clear()


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
  rows = []
  p = pathlib.Path(path)
  if not p.exists():
    return rows
  for line in p.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def plot_learning_curves(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                         keys: Sequence[str] = ("train/loss", "train/accuracy", "eval/accuracy",
                                                "eval/agreement"),
                         title: str | None = None) -> pathlib.Path:
  """One panel per metric key, one line per phase; saved as a PNG at ``path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = list(rows)
  keys = [k for k in keys if any(k in r for r in rows)]
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 3.4),
                           squeeze=False)
  phases = list(dict.fromkeys(r["phase"] for r in rows))
  for ax, key in zip(axes[0], keys):
    for i, ph in enumerate(phases):
      pts = sorted((r["step"], r[key]) for r in rows if r["phase"] == ph and key in r)
      if pts:  # one colour per phase in every panel
        ax.plot(*zip(*pts), label=ph, color=f"C{i}", marker="." if len(pts) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if "loss" in key:
      ax.set_yscale("log")
  handles = {}
  for ax in axes[0]:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  axes[0][0].legend(handles.values(), handles.keys())
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A fixed-width text table (floats with 4 decimals)."""
  cells = [[c for c in columns]] + [
      [f"{r.get(c, ''):.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
       for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
