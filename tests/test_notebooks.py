"""Executes every notebook in colabs/ headless; a cell that raises fails the test.

KDJAX_SMOKE=1 (set in conftest.py and passed on to the kernel) makes notebooks shrink their
experiments; the repository root is the working directory, as on a local checkout.
"""

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, tmp_path):
  # The kernel inherits this process' environment: one device, smoke sizes, no GUI backend.
  monkeypatch.setenv("KDJAX_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("KDJAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv("NPROC", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
