r"""Multi-seed summaries of ``lm_distill`` runs: the teacher-hacking curves and the objective table.

COMMAND (after the runs printed in the README's language-model section):
  python -m experiments.lm_summary hacking /tmp/kdjax/lm_hack/offline_s{0,1,2} \
      /tmp/kdjax/lm_hack/online_s{0,1,2} /tmp/kdjax/lm_hack/onpolicy_s{0,1,2} --plot=hacking.png
  python -m experiments.lm_summary compare /tmp/kdjax/lm_compare/s{0,1,2}

Teacher hacking (Tiapkin et al., "On Teacher Hacking in Language Model Distillation",
arXiv:2502.02671 [paper]): the student approaches the teacher (the *proxy* metric
KL(T‖S) falls) while it moves away from the oracle (the *golden* metric KL(O‖S) rises), with a
fixed offline dataset reused for many epochs, not with online or on-policy data. Here both
metrics are exact per position (the oracle is known), logged every ``eval_every`` steps.

The operational flag [proposed] of one run (one seed): the golden curve has passed its minimum
and risen by more than ``max(0.02·min golden, 3·SE_seeds)`` at the end, while the proxy at the end
is below the proxy at the golden minimum. ``SE_seeds`` is the standard error over the seeds of the
final golden value of the regime. Two proxies are reported: ``proxy_fkl`` on fixed held-out
teacher samples (the paper's proxy) and the training loss (for the offline regime: KL(T‖S) on the
very sentences it trains on, averaged over the last ``log_every`` steps).

The convergence diagnostic [proposed]: a least-squares fit ``log proxy = a + b log step`` on the
first half of the evaluations; the late residual is ``log proxy_final − (a + b log step_final)``
(positive: the proxy stalls above the power law; the paper reads deviations from a polynomial law
as a sign of hacking).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Iterable, Sequence

import numpy as np

from experiments import metrics
from experiments import stats

__all__ = ["eval_curves", "hacking_flag", "loglog_residual", "summarize_hacking",
           "summarize_compare", "plot_hacking", "main"]

_EVAL_KEYS = ("golden_fkl", "golden_rkl", "proxy_fkl", "proxy_rkl", "oracle_nll", "ppl")


def _arm_phases(res: dict) -> list[str]:
  """The student phases of a results.json (lm_distill names them student_<mode>_<objective>)."""
  return [f"student_{arm.replace(':', '_')}" for arm in res["arms"]]


def eval_curves(workdir, phase: str) -> dict[str, np.ndarray]:
  """``{"step": [...], "golden_fkl": [...], ..., "train_loss_step"/"train_loss": [...]}`` of one
  phase of a run's ``metrics.jsonl`` (sorted by step; a resumed run's repeats keep the last)."""
  rows = metrics.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
  ev, tr = {}, {}
  for r in rows:
    if r.get("phase") != phase:
      continue
    if "eval/golden_fkl" in r:
      ev[int(r["step"])] = r
    elif "train/loss" in r:
      tr[int(r["step"])] = r["train/loss"]
  if not ev:
    raise ValueError(f"{workdir}: no eval rows for phase {phase!r}")
  steps = sorted(ev)
  out = {"step": np.asarray(steps, np.float64)}
  for k in _EVAL_KEYS:
    out[k] = np.asarray([ev[s].get(f"eval/{k}", np.nan) for s in steps], np.float64)
  ts = sorted(tr)
  out["train_loss_step"] = np.asarray(ts, np.float64)
  out["train_loss"] = np.asarray([tr[s] for s in ts], np.float64)
  return out


def hacking_flag(steps, golden, proxy, *, se_seeds: float = 0.0) -> dict[str, float]:
  """The §-flag of one run: golden rose past its minimum while the proxy kept falling."""
  steps, golden, proxy = (np.asarray(a, np.float64) for a in (steps, golden, proxy))
  if not (steps.shape == golden.shape == proxy.shape) or steps.ndim != 1 or steps.size < 2:
    raise ValueError("`steps`, `golden` and `proxy` must be 1-d arrays of one length >= 2")
  i = int(np.argmin(golden))
  rise = float(golden[-1] - golden[i])
  threshold = max(0.02 * float(golden[i]), 3.0 * float(se_seeds))
  return {"golden_min": float(golden[i]), "argmin_step": float(steps[i]),
          "golden_final": float(golden[-1]), "rise": rise, "threshold": threshold,
          "proxy_at_min": float(proxy[i]), "proxy_final": float(proxy[-1]),
          "flag": bool(rise > threshold and proxy[-1] < proxy[i])}


def loglog_residual(steps, proxy) -> dict[str, float]:
  """Power-law fit on the first half of the curve; the residual of the last point (log space)."""
  steps, proxy = np.asarray(steps, np.float64), np.asarray(proxy, np.float64)
  half = max(len(steps) // 2, 2)
  ls, lp = np.log(steps[:half]), np.log(proxy[:half])
  b, a = np.polyfit(ls, lp, 1)
  return {"slope": float(b), "late_residual": float(np.log(proxy[-1]) - (a + b * np.log(steps[-1])))}


def _regime(phase: str) -> str:
  return phase[len("student_"):].split("_", 1)[0]


def summarize_hacking(workdirs: Iterable) -> tuple[list[dict], dict]:
  """Rows (one per regime, seeds pooled) and the per-run curves ``{regime: [curves...]}``."""
  runs: dict[str, list[dict]] = {}
  for wd in workdirs:
    wd = pathlib.Path(wd)
    res = json.loads((wd / "results.json").read_text())
    for ph in _arm_phases(res):
      c = eval_curves(wd, ph)
      c["workdir"] = str(wd)
      c["teacher_golden"] = float(res["rows"][0].get("golden_fkl", np.nan))
      runs.setdefault(_regime(ph), []).append(c)
  rows = []
  for regime, curves in runs.items():
    finals = np.asarray([c["golden_fkl"][-1] for c in curves])
    se = float(np.std(finals, ddof=1) / np.sqrt(len(finals))) if len(finals) > 1 else 0.0
    flags = [hacking_flag(c["step"], c["golden_fkl"], c["proxy_fkl"], se_seeds=se)
             for c in curves]
    train_flags = [hacking_flag(c["step"], c["golden_fkl"],
                                np.interp(c["step"], c["train_loss_step"], c["train_loss"]),
                                se_seeds=se) for c in curves]
    fits = [loglog_residual(c["step"], c["proxy_fkl"]) for c in curves]
    def mci(vals, fmt=".4f"):
      return stats.format_mean_ci(*stats.mean_ci(np.asarray(vals, np.float64)), fmt)
    rows.append({
        "regime": regime, "seeds": len(curves),
        "golden_min": mci([f["golden_min"] for f in flags]),
        "argmin_step": mci([f["argmin_step"] for f in flags], ".0f"),
        "golden_final": mci([f["golden_final"] for f in flags]),
        "proxy_at_min": mci([f["proxy_at_min"] for f in flags]),
        "proxy_final": mci([f["proxy_final"] for f in flags]),
        "train_loss_final": mci([c["train_loss"][-1] for c in curves]),
        "flag (held-out proxy)": f"{sum(f['flag'] for f in flags)}/{len(flags)}",
        "flag (train loss)": f"{sum(f['flag'] for f in train_flags)}/{len(train_flags)}",
        "loglog_slope": mci([f["slope"] for f in fits], ".3f"),
        "late_residual": mci([f["late_residual"] for f in fits], ".3f")})
  return rows, runs


def plot_hacking(runs: dict, path) -> pathlib.Path:
  """Golden KL(O‖S), held-out proxy KL(T‖S) and the training loss vs step, one panel per regime
  (one line per seed, ▼ at the golden minimum), log-log axes; dotted: the teacher's KL(O‖T)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  regimes = list(runs)
  fig, axes = plt.subplots(1, len(regimes), figsize=(4.6 * len(regimes), 3.8), squeeze=False,
                           sharey=True)
  for ax, regime in zip(axes[0], regimes):
    for j, c in enumerate(runs[regime]):
      lab = (lambda s: s) if j == 0 else (lambda s: None)
      ax.plot(c["step"], c["golden_fkl"], color="C3", alpha=0.8, label=lab("golden KL(O||S)"))
      ax.plot(c["step"], c["proxy_fkl"], color="C0", alpha=0.8,
              label=lab("proxy KL(T||S), held-out"))
      ax.plot(c["train_loss_step"], c["train_loss"], color="C2", alpha=0.4, lw=0.8,
              label=lab("training loss"))
      i = int(np.argmin(c["golden_fkl"]))
      ax.plot(c["step"][i], c["golden_fkl"][i], "v", color="C3")
      ax.axhline(c["teacher_golden"], color="k", ls=":", lw=0.8,
                 label=lab("teacher's golden KL(O||T)"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    n = len(runs[regime])
    ax.set_title(f"{regime} ({n} seed{'s' if n > 1 else ''})")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel("per-token KL (nats)")
  axes[0][0].legend(fontsize="small")
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


_COMPARE_KEYS = ("golden_fkl", "golden_rkl", "oracle_nll", "proxy_fkl", "ppl")


def summarize_compare(workdirs: Sequence) -> list[dict]:
  """Final metrics per arm, mean ± 95% CI over the runs (seeds) in ``workdirs``."""
  per_arm: dict[str, dict[str, list[float]]] = {}
  for wd in workdirs:
    res = json.loads((pathlib.Path(wd) / "results.json").read_text())
    for row in res["rows"]:
      d = per_arm.setdefault(row["model"], {k: [] for k in _COMPARE_KEYS})
      for k in _COMPARE_KEYS:
        d[k].append(float(row.get(k, np.nan)))
  out = []
  for model, d in per_arm.items():
    row = {"model": model, "seeds": len(d["golden_fkl"])}
    for k in _COMPARE_KEYS:
      row[k] = stats.format_mean_ci(*stats.mean_ci(np.asarray(d[k])), ".3f")
    out.append(row)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.lm_summary", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("kind", choices=("hacking", "compare"))
  p.add_argument("workdirs", nargs="+", help="lm_distill workdirs (one per run/seed)")
  p.add_argument("--plot", default=None, help="hacking: write the curves to this PNG")
  a = p.parse_args(argv)
  for wd in a.workdirs:
    if not (pathlib.Path(wd) / "results.json").exists():
      p.error(f"{wd}: no results.json (an unfinished or missing lm_distill run)")
  if a.kind == "hacking":
    rows, runs = summarize_hacking(a.workdirs)
    print(metrics.format_table(rows, list(rows[0])))
    if a.plot:
      print(f"curves: {plot_hacking(runs, a.plot)}")
  else:
    rows = summarize_compare(a.workdirs)
    print(metrics.format_table(rows, list(rows[0])))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
