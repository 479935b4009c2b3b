"""Theorem write-ups and their executable numeric checks. Run ``python -m theory``."""

from theory.registry import Check, Result, register, checks, run_check  # noqa: F401
