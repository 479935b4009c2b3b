"""Test-wide setup: 8 fake CPU devices, made safe on a 2-core machine.

Both variables must be set before jax creates its backend. NPROC >= 2 x the fake device count
avoids an all-reduce rendezvous deadlock of XLA:CPU with fake devices on a 2-core machine (with
fewer worker threads than devices a collective can wait forever for a participant that never
runs). Only set where fake devices are used: it slows single-device runs by 20-30 %.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("NPROC", "16")
# Notebooks and experiment configs read this to shrink themselves in the test suite.
os.environ.setdefault("KDJAX_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def x64():
  """Runs a test body in float64 (for comparisons with closed forms)."""
  with jax.enable_x64(True):
    yield
