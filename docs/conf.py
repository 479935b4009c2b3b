"""Sphinx configuration of the kdjax API reference (``sphinx-build -b html docs docs/_build``)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

project = "kdjax"
author = "kdjax authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_default_options = {"members": True, "imported-members": True, "undoc-members": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# MathJax is loaded by the browser when a page is viewed; building needs no network.
html_theme = "alabaster"
exclude_patterns = ["_build"]
