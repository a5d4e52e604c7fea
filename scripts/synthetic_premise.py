#!/usr/bin/env python
"""The premise checks of the synthetic task's baselines, per build seed and across seeds.

Reads the manifests of the builds for the given seeds (the default recipe, found by their cache key),
writes one CSV row per (seed, baseline) and prints a Markdown table of mean ± s.e. across seeds with the
per-seed range, so a claim can be checked against every seed.

    python scripts/synthetic_premise.py --seeds 0 1 2 --csv docs/synthetic/premise_by_seed.csv

Columns: the baseline's sampled (T=1) mean reward (under the reward it was built for), the
importance-sampling estimate of E_{rho*_beta}[r] from SFT samples, their gap, KL(rho_bl || pi_sft) and
KL(rho*_beta || pi_sft) per response, and the implied-reward slope (1 at the optimum).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tqstar.stats import mean_and_stderr
from tqstar.synthetic import BuildParams, load_manifest, task_dir
from tqstar.synthetic.cache import is_built

FIELDS = ("sampled_reward", "optimum_reward", "gap", "kl", "optimum_kl", "implied_slope")


def rows_of(seed: int, manifest: dict) -> list[dict]:
    rows = []
    for name, check in manifest["premise"].items():
        if name == "sft":
            continue
        rows.append(
            {
                "seed": seed,
                "baseline": name,
                "reward": check["reward"],
                "beta": check["beta"],
                "sampled_reward": check["sampled_reward"]["mean"],
                "sampled_reward_se": check["sampled_reward"]["se"],
                "optimum_reward": check["optimum_reward"]["mean"],
                "optimum_reward_se": check["optimum_reward"]["se"],
                "gap": check["sampled_reward"]["mean"] - check["optimum_reward"]["mean"],
                "kl": check["kl"]["mean"],
                "optimum_kl": check["optimum_kl"]["mean"],
                "implied_slope": check["implied_reward_slope"]["slope"],
                "sft_reward": manifest["premise"]["sft"][check["reward"]]["mean"],
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=None, help="the synthetic cache (default: $TQSTAR_CACHE or ~/.cache/tqstar)")
    parser.add_argument("--csv", type=Path, help="write the per-seed rows here")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        folder = task_dir(seed, args.cache_dir, BuildParams())
        if not is_built(folder):
            raise SystemExit(f"seed {seed}: no build at {folder} (tqstar prepare synthetic synthetic.seed={seed})")
        rows += rows_of(seed, load_manifest(folder))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(
        f"| baseline | reward, beta | sampled reward | E_rho*[r] (IS) | gap | KL(rho_bl‖sft) | KL(rho*‖sft) | implied slope |  (mean ± s.e. over seeds {args.seeds}; [min, max])"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["baseline"] for r in rows):
        group = [r for r in rows if r["baseline"] == name]
        cells = []
        for field in FIELDS:
            values = [r[field] for r in group]
            mean, se = mean_and_stderr(values)
            cells.append(f"{mean:.3f} ± {se:.3f} [{min(values):.3f}, {max(values):.3f}]" if se is not None else f"{mean:.3f}")
        print(f"| {name} | {group[0]['reward']}, {group[0]['beta']:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
