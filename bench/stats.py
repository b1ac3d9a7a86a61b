"""Small summaries: median, nearest-rank percentiles, rounding for the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q <= 1), or None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(
    values: Sequence[float], scale: float = 1.0, digits: int = 1
) -> dict[str, float | int | None]:
    """n, median, mean, p95, min and max, multiplied by `scale` and rounded."""
    if not values:
        return {"n": 0, "median": None, "mean": None, "p95": None, "min": None, "max": None}

    def r(v: float | None) -> float | None:
        return None if v is None else round(v * scale, digits)

    return {
        "n": len(values),
        "median": r(statistics.median(values)),
        "mean": r(statistics.fmean(values)),
        "p95": r(percentile(values, 0.95)),
        "min": r(min(values)),
        "max": r(max(values)),
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b rounded, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)
