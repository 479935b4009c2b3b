"""Runs every registered theorem check (the same registry as `python -m theory`)."""

import pytest

from theory import registry

_CHECKS = registry.checks()


def test_registry_is_not_empty():
  assert len(_CHECKS) > 0


@pytest.mark.parametrize("check", _CHECKS, ids=[c.name for c in _CHECKS])
def test_theory_check(check):
  result, _ = registry.run_check(check)
  rel = "<=" if result.mode == "max" else ">="
  assert result.passed, (f"{check.name}: measured {result.measured!r} {rel} tolerance "
                         f"{result.tolerance!r} failed. {result.detail}")


def test_index_lists_every_check():
  """theory/README.md is regenerated with `python -m theory --index`; it must not go stale."""
  import pathlib
  index = (pathlib.Path(registry.__file__).parent / "README.md").read_text()
  missing = [c.name for c in _CHECKS if f"`{c.name}`" not in index]
  assert not missing, f"theory/README.md lacks {missing}: run `python -m theory --index`"


def test_every_check_has_a_write_up():
  import pathlib
  root = pathlib.Path(registry.__file__).parent
  for c in _CHECKS:
    assert c.doc, f"{c.name} has no write-up link"
    assert (root / c.doc.split("#", 1)[0]).exists(), f"{c.name}: {c.doc} does not exist"
