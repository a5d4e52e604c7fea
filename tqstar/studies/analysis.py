"""The statistics of the results pages: pure functions of tables, no I/O (tests call them on small frames).

- `across_seeds`: one row per setting, each metric's mean over build seeds, s.e. across seeds, min and max;
  the setting includes best-of-N's n (a table grouped without it averages n = 2, 4 and 16 as one row).
- `paired`: a paired difference by prompt between two runs (through `tqstar.metrics.paired_difference`).
- `verdict`: match / differs / undecidable for a difference against its s.e. and a tolerance.
- `seed_claim`: whether a per-seed comparison holds on every seed (the only claims the pages make).
- `optimum_at`: the optimum's reward at a KL, interpolated along its curve.
- `best_at_budget`: each method's best reward at a compute budget, per seed, and who wins on every seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..metrics import paired_difference
from ..stats import finite, mean_and_stderr

# What identifies a setting of a sweep point, apart from the build seed.
SETTING_COLUMNS = ("label", "arm", "baseline", "method", "transfer", "alpha", "top_k", "n", "selection", "rollout_len", "rollout_num")

# A difference within 2 s.e. of zero is a match only when that interval is narrow enough to mean something:
# |diff| <= 2 s.e. and 2 s.e. <= tolerance. Wider intervals are undecidable at that sample size.
Z = 2.0
TOLERANCE = {"reward": 0.1, "kl": 0.25}


def across_seeds(points, metrics: Sequence[str], keys: Sequence[str] = SETTING_COLUMNS):
    """One row per setting (the `keys` present in `points`, the seed excluded): for each metric its mean over
    the seeds' values, the s.e. across seeds (`<metric>_se_seeds`), min and max, and the number of seeds."""
    import pandas as pd

    keys = [k for k in keys if k in points.columns]
    rows = []
    for values, group in points.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = int(group["seed"].nunique(dropna=True)) if "seed" in group else 1
        for metric in metrics:
            if metric not in group.columns:
                continue
            kept = finite(group[metric].tolist())
            mean, se = mean_and_stderr(kept)
            row[metric], row[f"{metric}_se_seeds"] = mean, se
            row[f"{metric}_min"], row[f"{metric}_max"] = (min(kept), max(kept)) if kept else (None, None)
        rows.append(row)
    return pd.DataFrame(rows)


def paired(per_prompt, run_a: str, run_b: str, column: str = "reward", prompts: Iterable[str] | None = None):
    """Mean and s.e. over prompts of `column` in run_a minus run_b, on the prompts both have (or the given
    subset of them); (None, None, 0) when they share none."""
    a = per_prompt[per_prompt["run"] == run_a].set_index("prompt_id")[column]
    b = per_prompt[per_prompt["run"] == run_b].set_index("prompt_id")[column]
    shared = [p for p in a.index if p in b.index]
    if prompts is not None:
        wanted = set(prompts)
        shared = [p for p in shared if p in wanted]
    if not shared:
        return None, None, 0
    mean, se = paired_difference(a.loc[shared].astype(float).tolist(), b.loc[shared].astype(float).tolist())
    return mean, se, len(shared)


def paired_if_recorded(per_prompt, run_a: str, run_b: str, column: str) -> tuple[float | None, float | None]:
    """`paired` of `column` (mean, s.e.) when both runs recorded it for every prompt; (None, None) when the column is
    absent or either run lacks a value (e.g. a corrected KL, which only decoders with n >= 2 rollouts record)."""
    if column not in per_prompt.columns or not per_prompt[per_prompt["run"].isin([run_a, run_b])][column].notna().all():
        return None, None
    diff, se, _ = paired(per_prompt, run_a, run_b, column)
    return diff, se


def verdict(diff: float | None, se: float | None, tolerance: float) -> str:
    """'match' (within Z s.e. of zero, and Z s.e. within the tolerance), 'differs' (more than Z s.e. from zero)
    or 'undecidable' (within Z s.e. of zero, but the interval is wider than the tolerance, or no s.e.)."""
    if diff is None or se is None or not math.isfinite(se):
        return "undecidable"
    if abs(diff) > Z * se:
        return "differs"
    return "match" if Z * se <= tolerance else "undecidable"


MARK = {"match": "✓", "differs": "✗", "undecidable": "?"}


@dataclass(frozen=True)
class SeedComparison:
    """One comparison (a minus b) on every seed: per-seed means, s.e. (None when unpaired) and the claim."""

    title: str
    by_seed: dict[int, tuple[float, float | None]]

    @property
    def claim(self) -> str:
        return seed_claim(self.by_seed)


def seed_claim(by_seed: dict[int, tuple[float, float | None]]) -> str:
    """What holds on every seed for a difference a - b given per seed as (mean, s.e.):
    'a > b on every seed' / 'a < b on every seed' (with how many by Z s.e. or more, when s.e. are known),
    or 'differs in sign across seeds'. With no seed: 'no data'."""
    values = {s: v for s, v in by_seed.items() if v[0] is not None}
    if not values:
        return "no data"
    signs = {math.copysign(1, mean) if mean != 0 else 0 for mean, _ in values.values()}
    if len(signs) != 1 or 0 in signs:
        return f"differs in sign across seeds ({len(values)} seeds)"
    word = "higher" if signs.pop() > 0 else "lower"
    known = [(m, se) for m, se in values.values() if se is not None]
    strong = sum(abs(m) > Z * se for m, se in known)
    tail = f"; by {Z:g} s.e. or more on {strong} of {len(values)}" if known else " (difference of means; no paired s.e.)"
    return f"{word} on every seed ({len(values)} of {len(values)}){tail}"


def optimum_at(curve: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The optimum's reward at this KL, linear in KL between the curve's (KL, reward) points (sorted by KL,
    the first at KL 0); None past its last point (importance sampling from M samples cannot estimate a KL
    above log M; past it the optimum earns at least the last point's reward)."""
    for (k0, r0), (k1, r1) in zip(curve, curve[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1
    return None


def fraction_of_optimum(reward: float, kl: float, curve: Sequence[tuple[float, float]]) -> tuple[float, bool]:
    """reward / the optimum's reward at that KL, and whether it is an upper bound (KL past the curve)."""
    reference = optimum_at(curve, kl)
    if reference is None:
        return reward / curve[-1][1], True
    return reward / reference, False


def budgets(flops: Sequence[float]) -> list[float]:
    """Half-decades (1, 3.16, 10, ...) from the cheapest point's cost to past the dearest's."""
    low = math.floor(2 * math.log10(min(flops)))
    high = math.ceil(2 * math.log10(max(flops)))
    return [10.0 ** (e / 2) for e in range(low, high + 1)]


def best_at(points, budget: float, reward: str = "reward_mean") -> float | None:
    """The highest reward among `points` costing at most `budget` FLOPs per response, or None."""
    cheap = points[points["flops_per_response"] <= budget * (1 + 1e-9)]
    return None if cheap.empty else float(cheap[reward].max())


def best_at_budget(points, group: str = "method", reward: str = "reward_mean"):
    """Per budget: each group's best reward (mean ± s.e. over seeds; blank where some seed has no point that
    cheap), the group best on every seed or 'differs by seed' with each seed's winner, and the smallest lead of
    a seed's winner over its runner-up."""
    import pandas as pd

    groups = list(dict.fromkeys(points[group]))
    seeds = sorted(points["seed"].dropna().unique())
    rows = []
    for budget in budgets(points["flops_per_response"].dropna().tolist()):
        row: dict = {"flops_per_response_at_most": budget}
        winners = {}
        per_group: dict[str, list] = {g: [] for g in groups}
        for seed in seeds:
            at = {g: best_at(points[(points["seed"] == seed) & (points[group] == g)], budget, reward) for g in groups}
            for g, value in at.items():
                per_group[g].append(value)
            reached = sorted(((v, g) for g, v in at.items() if v is not None), reverse=True)
            if reached:
                winners[int(seed)] = (reached[0][1], reached[0][0] - reached[1][0] if len(reached) > 1 else None)
        for g, values in per_group.items():
            row[g], row[f"{g}_se"] = (None, None) if any(v is None for v in values) else mean_and_stderr(values)
        names = {w for w, _ in winners.values()}
        if not winners:
            row["best"] = "none reachable"
        elif len(names) == 1 and len(winners) == len(seeds):
            row["best"] = names.pop()
        else:
            row["best"] = "differs by seed"
        row["winners_by_seed"] = ", ".join(f"{s}: {w}" for s, (w, _) in sorted(winners.items()))
        margins = [m for _, m in winners.values() if m is not None]
        row["smallest_margin"] = min(margins) if margins else None
        rows.append(row)
    return pd.DataFrame(rows)


def against_curve_at_kl(points, reference, keys: Sequence[str] = ("group", "n", "rollout_num")) -> list[dict]:
    """Sampled points against a reference method at the same KL, per seed: the reference's reward at the point's
    KL, linear in KL between the reference's own points of that seed (sorted by KL; none past its largest KL), and
    the difference with s.e. sqrt(point s.e.^2 + interpolated reference s.e.^2) (the two runs are not paired).
    One dict per setting (the `keys` present): its per-seed (KL, reward, FLOPs, diff, se) and the seed claim."""
    keys = [k for k in keys if k in points.columns]
    out = []
    for values, group in points.groupby(keys, dropna=False, sort=False):
        by_seed, rows = {}, {}
        for r in group.to_dict("records"):
            ref = reference[reference["seed"] == r["seed"]].sort_values("kl")
            curve = list(zip(ref["kl"].astype(float), ref["reward_mean"].astype(float), ref["reward_stderr"].astype(float)))
            at = None
            for (k0, r0, s0), (k1, r1, s1) in zip(curve, curve[1:]):
                if k0 <= r["kl"] <= k1:
                    w = (r["kl"] - k0) / (k1 - k0) if k1 > k0 else 1.0
                    at = (r0 + w * (r1 - r0), math.sqrt(((1 - w) * s0) ** 2 + (w * s1) ** 2))
                    break
            seed = int(r["seed"])
            rows[seed] = {"kl": r["kl"], "reward": r["reward_mean"], "flops": r.get("flops_per_response"), "reference": at and at[0]}
            if at is not None:
                by_seed[seed] = (r["reward_mean"] - at[0], math.sqrt(float(r["reward_stderr"]) ** 2 + at[1] ** 2))
        out.append(
            {
                **dict(zip(keys, values if isinstance(values, tuple) else (values,))),
                "by_seed": by_seed,
                "seeds": rows,
                "claim": seed_claim(by_seed),
            }
        )
    return out


def fewest_matching(verdicts_by_n: dict[int, dict[int, tuple[str, str]]], seeds: Sequence[int]) -> int | None:
    """The fewest rollouts n at which reward and KL both match (verdict 'match') on every one of `seeds`:
    verdicts_by_n[n][seed] = (reward verdict, KL verdict). None when no n does (or a seed lacks the point)."""
    for n in sorted(verdicts_by_n):
        by_seed = verdicts_by_n[n]
        if seeds and all(seed in by_seed and by_seed[seed] == ("match", "match") for seed in seeds):
            return n
    return None
