#!/usr/bin/env python
"""At equal compute, which method is best? The table of `tqstar sweep --name compute_frontier`, for README.

For each build seed and method, the method's best mean target reward at a budget B is the highest reward of
its points that cost at most B FLOPs per response (its reward-vs-compute frontier; a method with no point
that cheap has none). At each budget (half-decades spanning the sweep) the table gives every method's best
reward, mean ± s.e. over seeds, and the method that is best on every seed, or "differs by seed" (with each
seed's winner). The winner on a seed is the plain argmax; its lead over the runner-up (smallest over the
seeds) is reported beside it, so that close calls are visible.

    python scripts/compute_frontier_report.py outputs/sweeps/compute_frontier [--csv docs/compute_frontier/table.csv]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from tqstar.stats import mean_and_stderr

METHOD_ORDER = ("best_of_n", "args", "cd", "tqstar")


def best_at(points: pd.DataFrame, budget: float) -> float | None:
    """The highest reward among `points` costing at most `budget` FLOPs per response, or None."""
    cheap = points[points["flops_per_response"] <= budget * (1 + 1e-9)]
    return None if cheap.empty else float(cheap["reward_mean"].max())


def budgets(table: pd.DataFrame) -> list[float]:
    """Half-decades (1, 3.16, 10, ...) from the cheapest point's to past the dearest's."""
    low = math.floor(2 * math.log10(table["flops_per_response"].min()))
    high = math.ceil(2 * math.log10(table["flops_per_response"].max()))
    return [10.0 ** (e / 2) for e in range(low, high + 1)]


def frontier_table(table: pd.DataFrame) -> pd.DataFrame:
    methods = [m for m in METHOD_ORDER if m in set(table["method"])]
    seeds = sorted(table["seed"].dropna().unique())
    rows = []
    for budget in budgets(table):
        row = {"flops_per_response_at_most": budget}
        winners = {}
        for seed in seeds:
            by_method = {m: best_at(table[(table["seed"] == seed) & (table["method"] == m)], budget) for m in methods}
            reached = {m: v for m, v in by_method.items() if v is not None}
            if reached:
                ranked = sorted(reached.items(), key=lambda kv: -kv[1])
                margin = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else None
                winners[int(seed)] = (ranked[0][0], margin)
            for m, v in by_method.items():
                row.setdefault(m, []).append(v)
        for m in methods:
            values = row.pop(m)
            if any(v is None for v in values):
                row[m], row[f"{m}_se"] = None, None  # not reachable at this budget on some seed
            else:
                row[m], row[f"{m}_se"] = mean_and_stderr(values)
        names = {w for w, _ in winners.values()}
        margins = [mg for _, mg in winners.values() if mg is not None]
        if not winners:
            row["best"] = "none reachable"
        else:
            row["best"] = names.pop() if len(names) == 1 and len(winners) == len(seeds) else "differs by seed"
        row["winners_by_seed"] = ", ".join(f"{s}: {w}" for s, (w, _) in sorted(winners.items()))
        row["smallest_margin"] = min(margins) if margins else None
        rows.append(row)
    return pd.DataFrame(rows)


def fmt(mean, se) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.3f} ± {se:.3f}" if se is not None and not math.isnan(se) else f"{mean:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the sweep folder (holds results.csv)")
    parser.add_argument("--csv", type=Path, help="write the table here")
    args = parser.parse_args()
    table = pd.read_csv(args.folder / "results.csv")
    out = frontier_table(table)
    methods = [m for m in METHOD_ORDER if m in out.columns]
    seeds = sorted(table["seed"].dropna().unique())
    print(f"best mean target reward at <= B FLOPs per response (mean ± s.e. over build seeds {', '.join(str(int(s)) for s in seeds)})\n")
    print("| FLOPs / response ≤ | " + " | ".join(methods) + " | best on every seed | smallest margin |")
    print("|---:|" + "---|" * len(methods) + "---|---:|")
    for _, r in out.iterrows():
        cells = [fmt(r[m], r[f"{m}_se"]) for m in methods]
        best = r["best"] if r["best"] != "differs by seed" else f"differs ({r['winners_by_seed']})"
        margin = "–" if pd.isna(r["smallest_margin"]) else f"{r['smallest_margin']:.3f}"
        print(f"| {r['flops_per_response_at_most']:.1e} | " + " | ".join(cells) + f" | {best} | {margin} |")
    print("\nsmallest margin: the winner's lead over the runner-up on the seed where it is smallest")
    cost = table.groupby("arm")["flops_per_response"].agg(["min", "max"])
    print("\nFLOPs per response by arm (min - max over its points):")
    for arm, r in cost.iterrows():
        print(f"  {arm}: {r['min']:.2e} - {r['max']:.2e}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
