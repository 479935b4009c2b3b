"""The API reference builds from the docstrings without a warning and documents every public name."""

import importlib
import pathlib

import pytest

sphinx_build = pytest.importorskip("sphinx.cmd.build")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_cleanly_and_cover_every_public_name(tmp_path):
  from tests.test_contract import PUBLIC_MODULES  # the modules whose __all__ is the public API
  out = tmp_path / "html"
  # -W: a docstring that is not valid reStructuredText (e.g. a bare |x|) fails the build.
  rc = sphinx_build.build_main(["-b", "html", "-q", "-W", "--keep-going", "-d",
                                str(tmp_path / "doctrees"), str(REPO / "docs"), str(out)])
  assert rc == 0
  html = (out / "api.html").read_text()
  missing = []
  for mod_name in PUBLIC_MODULES:
    mod = importlib.import_module(mod_name)
    for name in mod.__all__:
      if not name.isupper() and f'id="{mod_name}.{name}"' not in html and \
          f'.{name}"' not in html:
        missing.append(f"{mod_name}.{name}")
  assert not missing, f"public names without an API-reference entry: {missing}"
