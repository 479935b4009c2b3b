"""experiments.lm_summary: the teacher-hacking flag, the power-law diagnostic, the summaries."""

import json

import numpy as np
import pytest

from experiments import lm_summary as S


def test_flag_fires_only_when_golden_rises_while_the_proxy_falls():
  steps = np.arange(50, 1050, 50.0)
  proxy = 1.0 / np.sqrt(steps)                      # falls throughout
  golden = 0.5 + 1e-6 * (steps - 400.0) ** 2        # minimum at 400, ends 0.68 above it
  f = S.hacking_flag(steps, golden, proxy)
  assert f["flag"] and f["argmin_step"] == 400 and f["rise"] == pytest.approx(0.36)
  assert f["proxy_final"] < f["proxy_at_min"]
  # Golden falling all along: no flag.
  assert not S.hacking_flag(steps, 0.5 + 1 / steps, proxy)["flag"]
  # Golden rises but so does the proxy (plain overfitting of both): no flag.
  assert not S.hacking_flag(steps, golden, golden + 0.1)["flag"]
  # A rise within 3 SE over the seeds (or 2 % of the minimum) is noise: no flag.
  small = 0.5 + 1e-8 * (steps - 400.0) ** 2           # rise 0.0036 < 2 % of 0.5
  assert not S.hacking_flag(steps, small, proxy)["flag"]
  assert not S.hacking_flag(steps, golden, proxy, se_seeds=0.2)["flag"]
  with pytest.raises(ValueError, match="1-d arrays"):
    S.hacking_flag(steps, golden[:-1], proxy)


def test_loglog_residual_is_zero_on_a_power_law_and_positive_on_a_stall():
  steps = np.arange(50, 1550, 50.0)
  law = 3.0 * steps ** -0.7
  fit = S.loglog_residual(steps, law)
  assert fit["slope"] == pytest.approx(-0.7, abs=1e-9)
  assert abs(fit["late_residual"]) < 1e-9
  stall = np.maximum(law, law[len(law) // 2])       # stops improving after the first half
  assert S.loglog_residual(steps, stall)["late_residual"] > 0.3


def _fake_run(path, arm, golden, proxy, seed):
  path.mkdir()
  phase = "student_" + arm.replace(":", "_")
  rows = []
  for s, g, p in zip(range(50, 50 * (len(golden) + 1), 50), golden, proxy):
    rows.append({"phase": phase, "step": s, "train/loss": p / 2})
    rows.append({"phase": phase, "step": s, "eval/golden_fkl": g, "eval/proxy_fkl": p,
                 "eval/golden_rkl": g, "eval/proxy_rkl": p, "eval/oracle_nll": 5.0,
                 "eval/ppl": 100.0})
  rows.append(rows[-1])  # a resumed run repeats a step: the last row wins
  (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (path / "results.json").write_text(json.dumps({
      "seed": seed, "arms": [arm],
      "rows": [{"model": "teacher", "golden_fkl": 0.4},
               {"model": f"student {arm}", "golden_fkl": golden[-1], "golden_rkl": 1.0 + seed,
                "oracle_nll": 5.0, "proxy_fkl": proxy[-1], "ppl": 100.0}]}))


def test_summaries_pool_seeds_per_regime(tmp_path, capsys):
  t = np.arange(1, 21, dtype=float)
  hack = 0.5 + 0.002 * (t - 6) ** 2
  for seed in range(3):
    _fake_run(tmp_path / f"off{seed}", "offline:forward_kl", hack + 0.001 * seed, 1 / t, seed)
    _fake_run(tmp_path / f"on{seed}", "online:forward_kl", 0.5 + 1 / t + 0.001 * seed, 1 / t,
              seed)
  rows, runs = S.summarize_hacking(sorted(tmp_path.iterdir()))
  by = {r["regime"]: r for r in rows}
  assert by["offline"]["flag (held-out proxy)"] == "3/3"
  assert by["online"]["flag (held-out proxy)"] == "0/3"
  assert by["offline"]["argmin_step"].startswith("300")
  assert len(runs["offline"]) == 3 and len(runs["offline"][0]["step"]) == 20
  cmp = S.summarize_compare([tmp_path / f"off{s}" for s in range(3)])
  student = [r for r in cmp if r["model"].startswith("student")][0]
  assert student["seeds"] == 3 and student["golden_rkl"].startswith("2.000 ±")
  assert S.main(["hacking", *map(str, sorted(tmp_path.iterdir())),
                 f"--plot={tmp_path / 'h.png'}"]) == 0
  assert (tmp_path / "h.png").stat().st_size > 0
  assert "offline" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    S.main(["compare", str(tmp_path / "missing")])
