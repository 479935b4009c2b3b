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
  # The kernel inherits this process' environment: one device, smoke sizes. MPLBACKEND is left
  # unset so that the kernel uses its inline backend and figures become outputs, as in Colab.
  monkeypatch.setenv("KDJAX_SMOKE", "1")
  monkeypatch.delenv("MPLBACKEND", raising=False)
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
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, f"{path.name} executed without showing a figure"


def test_install_cell_says_how_to_install():
  """The first code cell installs from a checkout on Colab (the notebooks import experiments/
  and theory/, which pip does not install) and explains what to do when none is given."""
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "google.colab" in first.source and "KDJAX_REPO" in first.source, path.name
    assert "pip" in first.source and "-e" in first.source, path.name
