"""How far two judges agree on the same responses: Pearson and Spearman correlation and sign agreement.

Pure Python (no numpy, no scipy; the correlations are tqstar.stats's): `judge_agreement(vader_scores, afinn_scores)` on the scores two rewards gave the
same responses, in the same order. A judge the decoders were not guided by (afinn, textblob) that agrees with the
guide (vader) says the guide's gains are not only the guide's own quirks.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..stats import pearson, spearman


def _sign(value: float, zero: float) -> int:
    return 0 if abs(value) <= zero else (1 if value > 0 else -1)


def judge_agreement(a: Sequence[float | None], b: Sequence[float | None], zero: float = 0.0) -> dict:
    """Agreement of two judges' scores of the same responses (a[i] and b[i] score response i).

    Returns {"n", "pearson", "spearman", "sign_agreement", "both_positive", "both_negative", "both_zero"}:
    n = the pairs where both scores are finite (a None or NaN on either side drops the pair); the correlations are
    None when n < 2 or a judge is constant; Spearman's rho is Pearson's r on average ranks (ties share ranks).
    The shares are fractions of n (None when n = 0): both > zero, both < -zero, both within [-zero, zero];
    sign_agreement is their sum. `zero`: how close to 0 a score counts as neutral (0.0 = exactly 0).
    """
    if len(a) != len(b):
        raise ValueError(f"judge_agreement needs scores of the same responses: got {len(a)} and {len(b)}")
    if zero < 0:
        raise ValueError(f"judge_agreement: zero={zero!r} must be >= 0")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    signs = [(_sign(x, zero), _sign(y, zero)) for x, y in pairs]
    counts = {
        key: sum(1 for sx, sy in signs if sx == sy == value)
        for key, value in (("both_positive", 1), ("both_negative", -1), ("both_zero", 0))
    }
    shares = {key: (count / n if n else None) for key, count in counts.items()}
    return {
        "n": n,
        "pearson": pearson(xs, ys),
        "spearman": spearman(xs, ys),
        "sign_agreement": sum(counts.values()) / n if n else None,
        **shares,
    }
