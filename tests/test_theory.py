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
