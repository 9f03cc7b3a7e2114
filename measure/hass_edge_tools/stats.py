"""Percentiles and spreads of measured samples."""
from __future__ import annotations

import statistics


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (p in 0..100, nearest rank) of values; NaN when there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    """"min … p50 … max …" of values, or "n/a"."""
    if not values:
        return "n/a"
    return f"min {min(values):.{digits}f}{unit} p50 {statistics.median(values):.{digits}f}{unit} max {max(values):.{digits}f}{unit}"
