#!/usr/bin/env python
"""Tables of the transfer study (`tqstar sweep --name transfer_study`) for README: across build seeds.

Reads the sweep's results.csv (one row per point, written by the sweep's aggregation) and each run's
generations.jsonl, and prints Markdown:
  (a) greedy arms at the authors' defaults: reward (mean over seeds ± s.e. across seeds, [min, max] of the
      seeds' means), diversity, coherence, length, seconds per response, Q spread and optimism gap;
  (b) sampled arms: reward and KL(decoder || pi_sft) per response by alpha (the reward-KL frontier);
  (c) paired differences on the same prompts: TQ* with each rung minus CD and minus that rung decoded
      alone, per seed (mean ± s.e. over prompts), so a claim can be checked seed by seed.

    python scripts/transfer_study_report.py outputs/sweeps/transfer_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from tqstar.stats import mean_and_stderr


def fmt(mean, se=None, digits=3) -> str:
    if mean is None or mean != mean:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and se == se else "")


def across(group: pd.DataFrame, column: str) -> str:
    values = [v for v in group[column].tolist() if v == v]
    if not values:
        return "–"
    mean, se = mean_and_stderr(values)
    spread = f" [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else ""
    return fmt(mean, se) + spread


def label(row) -> str:
    baseline = str(row.get("baseline") or "").removeprefix("synthetic:")
    return f"{row['arm']}" + (f" ({baseline})" if baseline and row["arm"] in ("baseline", "tqstar") else "")


def rewards_of(run: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (Path(run) / "generations.jsonl").read_text().splitlines() if line.strip()]
    return {str(r["prompt_id"]): float(r["reward"]) for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the sweep folder (holds results.csv)")
    args = parser.parse_args()
    table = pd.read_csv(args.folder / "results.csv")
    table = table.rename(columns={"selection_x": "selection"})  # tables aggregated before the merge kept one copy
    table["baseline"] = table["baseline"].fillna("")
    table["label"] = table.apply(label, axis=1)
    if "n" not in table.columns:  # sweeps aggregated before the n column existed: read it off the point
        table["n"] = table["point"].str.extract(r"decoder\.n=(\d+)")[0].astype(float).fillna(8).astype(int)
    # (a) is the authors' defaults: greedy selection, plus best-of-n at its default n = 8
    greedy = table[(table["selection"] == "greedy") | ((table["method"] == "best_of_n") & (table["arm"] == "best_of_n"))]
    print("(a) greedy, k=10, alpha=1 (mean over seeds ± s.e. across seeds [min, max of the seeds])\n")
    print("| run | seeds | reward | diversity | coherence | tokens | s / response | Q spread | optimism gap |")
    print("|---|---:|---|---|---|---|---|---|---|")
    for name, group in greedy.groupby("label", sort=False):
        print(
            f"| {name} | {group['seed'].nunique()} | {across(group, 'reward_mean')} | {across(group, 'diversity')} | "
            f"{across(group, 'coherence')} | {across(group, 'tokens_mean')} | {across(group, 'seconds_per_response')} | "
            f"{across(group, 'q_spread')} | {across(group, 'optimism_gap')} |"
        )
    sampled = table[(table["selection"] == "sample") & (table["arm"] != "best_of_n")]
    print("\n(b) sampled (T=1): reward and KL to the SFT model per response, by alpha (best-of-n: by n, analytic KL bound)\n")
    print("| run | alpha / n | seeds | reward | KL |")
    print("|---|---:|---:|---|---|")
    for (name, alpha, n), group in sampled.groupby(["label", "alpha", "n"], sort=False):
        knob = f"n={n}" if group["method"].iloc[0] == "best_of_n" else f"{alpha:g}"
        print(f"| {name} | {knob} | {group['seed'].nunique()} | {across(group, 'reward_mean')} | {across(group, 'kl')} |")
    print("\n(c) paired differences on the same prompts (greedy): per seed, mean ± s.e. over prompts\n")
    print("| comparison | " + " | ".join(f"seed {s}" for s in sorted(greedy["seed"].unique())) + " |")
    print("|---|" + "---|" * greedy["seed"].nunique())
    runs = {(row["label"], row["seed"]): row["run"] for _, row in greedy.iterrows()}
    ladder = greedy[greedy["arm"].isin(["tqstar", "baseline"])]["baseline"]
    rungs = sorted({b for b in ladder if b}, key=lambda b: -float(b.removeprefix("synthetic:rho")))
    comparisons = []
    for rung in rungs:
        short = rung.removeprefix("synthetic:")
        comparisons.append((f"tqstar ({short}) − cd", f"tqstar ({short})", "cd"))
        comparisons.append((f"tqstar ({short}) − baseline ({short})", f"tqstar ({short})", f"baseline ({short})"))
    comparisons.append(("cd − best_of_n", "cd", "best_of_n"))
    for title, a, b in comparisons:
        cells = []
        for seed in sorted(greedy["seed"].unique()):
            if (a, seed) not in runs or (b, seed) not in runs:
                cells.append("–")
                continue
            ra, rb = rewards_of(runs[(a, seed)]), rewards_of(runs[(b, seed)])
            shared = sorted(set(ra) & set(rb))
            mean, se = mean_and_stderr([ra[p] - rb[p] for p in shared])
            cells.append(fmt(mean, se))
        print(f"| {title} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
