"""Smoke runs of the self-distillation experiments (kernel_toy, kernel_sweep, selfdistill_nn).

The toy test checks the task's table against an independent explicit re-fit computed here (the
authors' notebook route: one kernel-ridge solve per step on the mixed target).
"""

import importlib

import numpy as np
import pytest

from kdjax import selfdistill as sd


def _config(name, arg="smoke"):
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


def _run(name, workdir, arg="smoke"):
  config = _config(name, arg)
  return importlib.import_module(f"experiments.tasks.{config.task}").run(config, workdir)


def _independent_toy_table():
  toy = sd.toy_data()
  x, y, grid, fs = toy["x"], toy["y"], toy["grid"], toy["f_star"]
  k = np.exp(-80.0 * np.subtract.outer(x, x) ** 2)
  kt = np.exp(-80.0 * np.subtract.outer(grid, x) ** 2)
  out = {}
  for al in (0.0, 0.25, 0.35):
    prev, row = y, []
    for t in range(6):
      target = y if t == 0 else al * y + (1 - al) * prev
      w = np.linalg.solve(k + 0.2 * np.eye(11), target)
      prev = k @ w
      row.append(np.mean((kt @ w - fs) ** 2))
    out[al] = row
  return out


def test_kernel_toy_matches_independent_refit(tmp_path, capsys):
  res = _run("kernel_toy", tmp_path)
  ref = _independent_toy_table()
  for al, row in ref.items():
    np.testing.assert_allclose(res["closed_form"][str(al)][:6], row, atol=1e-10)
  # Limit: ridge with lam / alpha; alpha = 0 collapses to the zero function.
  np.testing.assert_allclose(res["closed_form"]["0.0"][6], np.mean(sd.toy_data()["f_star"] ** 2),
                             atol=1e-12)
  assert res["max_route_gap"] < 1e-10
  np.testing.assert_allclose(res["greedy_alpha_star"], [-0.6218, 0.3304, 0.3348, 0.3358, 0.3360],
                             atol=5e-5)
  out = capsys.readouterr().out
  assert "t=inf" in out and "0.16477" in out
  assert (tmp_path / "results.json").exists()


def test_kernel_sweep_smoke(tmp_path):
  res = _run("kernel_sweep", tmp_path)
  (r,) = res["settings"]
  curves = np.asarray(r["test_curves"])
  assert curves.shape == (11, 5) and np.isfinite(curves).all()
  # alpha = 1 never moves away from the teacher; step 1 does not depend on alpha.
  np.testing.assert_allclose(curves[-1], curves[-1, 0], rtol=1e-9)
  np.testing.assert_allclose(curves[:, 0], r["teacher"], rtol=1e-9)
  for key in ("oracle", "val", "grid"):
    assert r[key][0] == pytest.approx(r["teacher"], rel=1e-9) and np.isfinite(r[key]).all()
  assert len(r["val_alpha"]) == 4 and len(r["grid_alpha"]) == 4
  assert (tmp_path / "test_mse_vs_step.png").exists()


def test_selfdistill_nn_smoke(tmp_path):
  res = _run("selfdistill_nn", tmp_path)
  (rows,) = res["per_seed"]
  assert [r["step"] for r in rows] == [1, 2]
  assert np.isfinite(rows[1]["alpha_star"])
  assert len(rows[1]["grid"]) == 3
  assert 0.0 <= rows[1]["test_acc_alg1"] <= 1.0
  assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize("name", ["kernel_toy", "kernel_sweep", "selfdistill_nn"])
def test_configs_reject_unknown_arguments(name):
  with pytest.raises(ValueError, match="unknown"):
    _config(name, "bogus=1")
  assert _config(name, None).task == name
