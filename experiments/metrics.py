r"""Metrics out of a run: ``metrics.jsonl``, TensorBoard event files, a learning-curve PNG.

:class:`MetricWriter` appends one JSON row per (phase, step) to ``workdir/metrics.jsonl`` and
mirrors every scalar into TensorBoard event files under ``workdir/tb/<phase>`` (tensorboardX, no
TensorFlow), flushed after every row, so a killed run loses nothing that its jsonl kept. Only
process 0 writes. On resume, :meth:`MetricWriter.truncate` drops the rows a killed run wrote after
its last checkpoint (all of a phase's rows when it has no checkpoint) from the jsonl *and*
rewrites that phase's TensorBoard events from the kept rows, so both read as one uninterrupted run.
:func:`plot_learning_curves` draws the rows as a PNG with labelled axes: each phase's training
objective in its own panel (a KD objective and a cross-entropy are different quantities), then
the evaluation metrics that every phase shares (CE, accuracy, agreement, KL).

The artifact contract every experiment follows: ``config.json`` (written by the launcher,
:mod:`experiments.workdir`), ``metrics.jsonl`` + ``tb/``, ``results.json`` (with the
hyper-parameters that produced it, :func:`write_results`), plots, and Orbax checkpoints
(:mod:`experiments.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import jax

__all__ = ["MetricWriter", "read_metrics", "plot_learning_curves", "format_table",
           "write_results", "smoke_banner"]


def _scalar(v: Any) -> float:
  return float(jax.device_get(v))


class _EventFile:
  """A TensorBoard event file written synchronously (``flush`` means on disk).

  tensorboardX's ``SummaryWriter`` queues events for a background thread and its ``flush`` does
  not wait for the queue, so a SIGKILL loses the rows still queued; its ``EventsWriter`` (the
  record writer underneath, local or gs://) is used directly instead.
  """

  def __init__(self, logdir: pathlib.Path):
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=import-outside-toplevel
    logdir.mkdir(parents=True, exist_ok=True)
    self._w = EventsWriter(str(logdir / "events"))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    self._w.write_event(event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, simple_value=float(value))])))

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class MetricWriter:
  """Writes metric rows ``{"phase", "step", "time", <name>: value}`` to jsonl and TensorBoard.

  Args:
    workdir: the run's directory.
    tensorboard: also write TensorBoard event files under ``workdir/tb/<phase>``.
    eval_split: the name written for the ``eval/`` prefix of the rows (e.g. ``"val"`` when the
      evaluation callback runs on a validation split), so the keys say which split they are.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               eval_split: str = "eval"):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.active = jax.process_index() == 0
    self._tb: dict[str, Any] = {}
    self._use_tb = tensorboard
    self._eval_split = str(eval_split)

  def _key(self, k: str) -> str:
    if self._eval_split != "eval" and k.startswith("eval/"):
      return f"{self._eval_split}/{k[5:]}"
    return k

  def _tb_writer(self, phase: str):
    if phase not in self._tb:
      self._tb[phase] = _EventFile(self.workdir / "tb" / phase)
    return self._tb[phase]

  def _tb_add(self, row: Mapping[str, Any]) -> None:
    w = self._tb_writer(row["phase"])
    for k, v in row.items():
      if k not in ("phase", "step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
        w.add_scalar(k, v, int(row["step"]))

  def truncate(self, phase: str, step: int) -> None:
    """Drops rows of ``phase`` after ``step`` (written by a run killed after its last save).

    ``step=0`` drops all of the phase's rows (a phase killed before its first checkpoint). The
    phase's TensorBoard events are rewritten from the rows kept.
    """
    if not self.active:
      return
    rows = read_metrics(self.path)
    keep = [r for r in rows if r.get("phase") != phase or r["step"] <= step]
    if self.path.exists():
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
      os.replace(tmp, self.path)
    tb_dir = self.workdir / "tb" / phase
    if self._use_tb and tb_dir.exists():
      old = self._tb.pop(phase, None)
      if old is not None:
        old.close()
      for f in tb_dir.glob("events.out.tfevents.*"):
        f.unlink()
      mine = [r for r in keep if r.get("phase") == phase]
      for r in mine:
        self._tb_add(r)
      if mine:
        self._tb[phase].flush()

  def truncate_all(self) -> None:
    """Drops every row and event file: for tasks that write their curves once, at the end (a
    rerun replaces them instead of appending duplicates)."""
    if not self.active:
      return
    self.close()
    if self.path.exists():
      self.path.unlink()
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(self.workdir / "tb", ignore_errors=True)

  def write(self, phase: str, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"phase": phase, "step": int(step), "time": time.time()}
    row.update({self._key(k): _scalar(v) for k, v in scalars.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._use_tb:
      self._tb_add(row)
      self._tb[phase].flush()  # a kill loses no row that the jsonl has

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


_UNITS = {"loss": "objective (nats)", "ce": "cross-entropy (nats)", "kl": "KL (nats)",
          "accuracy": "accuracy (fraction)", "agreement": "top-1 agreement (fraction)",
          "grad_norm": "gradient norm"}


def _ylabel(key: str) -> str:
  return _UNITS.get(key.rsplit("/", 1)[-1], key)


def plot_learning_curves(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                         keys: Sequence[str] | None = None,
                         title: str | None = None) -> pathlib.Path:
  """Learning curves as a PNG at ``path``, every axis labelled.

  First one panel per phase with that phase's training objective ``train/loss`` (objectives of
  different phases are different quantities, e.g. T²-scaled KD vs CE, so they never share an
  axis), then one panel per shared metric (default: the ``<split>/ce``, ``/accuracy``,
  ``/agreement``, ``/kl`` keys present, ``<split>`` being ``val``, ``eval`` or ``test``), one line
  per phase.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = list(rows)
  phases = list(dict.fromkeys(r["phase"] for r in rows))
  if keys is None:
    keys = [f"{split}/{m}" for split in ("val", "eval", "test")
            for m in ("ce", "accuracy", "agreement", "kl")] + ["train/accuracy"]
  keys = [k for k in keys if any(k in r for r in rows)]
  loss_phases = [ph for ph in phases if any(r["phase"] == ph and "train/loss" in r for r in rows)]
  panels = [("train/loss", [ph]) for ph in loss_phases] + [(k, phases) for k in keys]
  n = max(len(panels), 1)
  cols = min(n, 4)
  nrows = (n + cols - 1) // cols
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
  flat = list(axes.flat)
  for ax, (key, phs) in zip(flat, panels):
    for ph in phs:
      i = phases.index(ph)
      pts = sorted((r["step"], r[key]) for r in rows if r["phase"] == ph and key in r)
      if pts:  # one colour per phase in every panel
        ax.plot(*zip(*pts), label=ph, color=f"C{i}", marker="." if len(pts) < 30 else None)
    ax.set_title(f"{key} ({phs[0]})" if len(phs) == 1 and key == "train/loss" else key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_ylabel(key))
    ax.grid(alpha=0.3)
    if key.endswith(("/loss", "/ce", "/kl")) and all(
        r[key] > 0 for r in rows if key in r and r["phase"] in phs):
      ax.set_yscale("log")
  for ax in flat[len(panels):]:
    ax.axis("off")
  handles = {}
  for ax in flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  if handles:
    fig.legend(handles.values(), handles.keys(), loc="lower right", fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any], config: Any, *,
                  smoke: bool = False, name: str = "results.json") -> pathlib.Path | None:
  """Writes ``<workdir>/results.json``: the results plus the config that produced them.

  The file has ``results``' keys, ``"config"`` (the resolved config, as in ``config.json``) and
  ``"smoke"`` (True for a seconds-long test run, whose numbers are not results). Process 0 only;
  returns the path (``None`` on other processes).
  """
  if jax.process_index() != 0:
    return None
  from experiments import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  out = dict(results)
  out["config"] = workdir_lib.config_to_dict(config)
  out["smoke"] = bool(smoke)
  path = pathlib.Path(workdir) / name
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(out, indent=2, default=float) + "\n")
  os.replace(tmp, path)
  return path


def smoke_banner(name: str, *, end: bool = False) -> str:
  """The line a smoke run prints first and last: its numbers are a test, not results."""
  return (f"SMOKE RUN of {name} ({'end' if end else 'start'}): a seconds-long test of the code "
          f"path; its numbers are not results. Drop ':smoke' for the real experiment.")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A fixed-width text table (floats with 4 decimals)."""
  cells = [[c for c in columns]] + [
      [f"{r.get(c, ''):.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
       for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
