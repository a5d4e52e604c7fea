"""Summary statistics used everywhere a number is reported (ground module: no tqstar imports).

One definition of mean and standard error: non-finite values and None are left out; a mean of no
values and a standard error of fewer than two are None (a table prints them as blank, never 0).
"""

from __future__ import annotations

import math
from typing import Sequence


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers and finite, as floats."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_and_stderr(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; None where undefined."""
    kept = finite(values)
    if not kept:
        return None, None
    mean = math.fsum(kept) / len(kept)
    if len(kept) < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, math.sqrt(variance / len(kept))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    return mean_and_stderr(values)[0]


def format_mean_se(mean: float | None, se: float | None = None, digits: int = 3, missing: str = "–") -> str:
    """'0.123 ± 0.004', '0.123' without an s.e., `missing` without a mean (None and NaN count as absent): how
    every table and summary prints a mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return missing
    text = f"{mean:.{digits}f}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        text += f" ± {se:.{digits}f}"
    return text


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r of paired values; None when n < 2 or either side is constant (no correlation is defined)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy))) if sxx > 0 and syy > 0 else None


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values`, ties sharing the mean of their ranks (as Spearman's rho needs): [3, 1, 3] -> [2.5, 1, 2.5]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r on average ranks."""
    return pearson(average_ranks(xs), average_ranks(ys))
