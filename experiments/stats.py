"""Seed statistics shared by the experiment tasks (the smoke-run banner is
:func:`experiments.metrics.smoke_banner`).

* :func:`mean_ci` — mean and Student-t confidence half-width over seeds (one convention for every
  task: with fewer than 2 seeds the half-width is undefined and returned as NaN);
* :func:`format_mean_ci` — ``"0.812 ± 0.013"``, or ``"0.812 (1 seed)"`` when the half-width is NaN,
  so no table prints ``± nan``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_ci", "format_mean_ci"]


def mean_ci(x, axis: int = -1, *, confidence: float = 0.95):
  """Mean and Student-t ``confidence`` interval half-width of ``x`` over ``axis`` (the seeds).

  Returns ``(mean, half_width)`` as float64 numpy values (0-d for 1-d input). With fewer than 2
  samples along ``axis`` the half-width is NaN (a single seed has no spread estimate).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
  x = np.asarray(x, np.float64)
  n = x.shape[axis]
  if n == 0:
    raise ValueError("`mean_ci` needs at least one value along `axis`.")
  m = x.mean(axis)
  if n < 2:
    return m, np.full_like(m, np.nan)
  from scipy import stats  # pylint: disable=import-outside-toplevel
  t = stats.t.ppf(0.5 + confidence / 2, n - 1)
  return m, t * x.std(axis, ddof=1) / math.sqrt(n)


def format_mean_ci(mean, half_width, fmt: str = ".3f") -> str:
  """``"m ± h"``; ``"m (1 seed)"`` when ``h`` is NaN (no spread estimate)."""
  mean, half_width = float(mean), float(half_width)
  if math.isnan(half_width):
    return f"{mean:{fmt}} (1 seed)"
  return f"{mean:{fmt}} ± {half_width:{fmt}}"

