"""Every ```python block of README.md runs as written (K4: the API tour must not be fragments)."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_python_snippets():
  assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(code):
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
