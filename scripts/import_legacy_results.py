#!/usr/bin/env python
"""One-time migration (CHANGELOG, 0.2.0): the per-point tables published before `tqstar report` existed
become report archives under docs/results/, so that `tqstar report --all` renders their pages.

The sweeps' run folders of those studies were not kept (they lived in outputs/ of earlier machines), so
the archives hold what the repository had at commit 9ba89c5: each sweep's results.csv (written by the sweep's
aggregation), `tqstar evaluate`'s comparison table for SmolLM2, the optimal check's per-run rows, and the
premise checks' per-seed rows. No per-prompt rows: the pages say which sections need a rerun.

    python scripts/import_legacy_results.py            # reads the old docs/<study>/ files from git, writes docs/results/
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd

from tqstar.studies.sources import StudyData, environment_of, normalise_points, write_archive

COMMIT = "9ba89c5"
OUT = Path("docs/results")
MACHINE = "2-core AMD EPYC VM, no GPU (README at the time; the run folders did not record the CPU or the load then)"


def old(path: str) -> pd.DataFrame:
    text = subprocess.run(["git", "show", f"{COMMIT}:{path}"], capture_output=True, text=True, check=True).stdout
    return pd.read_csv(io.StringIO(text))


def environment(points: pd.DataFrame | None, source: str, notes: list[str]) -> dict:
    runs = [Path(str(r)).name for r in points["run"]] if points is not None else []
    env = environment_of([{} for _ in runs], runs)
    env["source"] = f"{source} at commit {COMMIT} (run folders not kept)"
    env["notes"] = [MACHINE, *notes]
    return env


def premise_curves(premise: pd.DataFrame) -> dict:
    """rho*_beta's (KL, reward) points of each seed's premise rows (beta 1, 0.5, 0.25, 0.1) with the SFT model at KL 0."""
    curves = {}
    for seed, group in premise[premise["reward"] == "target_reward"].groupby("seed"):
        points = [[0.0, float(group["sft_reward"].iloc[0]), None]]
        points += sorted([float(r.optimum_kl), float(r.optimum_reward), float(r.beta)] for r in group.itertuples())
        curves[str(int(seed))] = points
    return {"rho*_beta": curves}


def main() -> int:
    premise = old("docs/synthetic/premise_by_seed.csv")
    studies = {}
    points = normalise_points(old("docs/transfer_study/results.csv"))
    studies["transfer_study"] = StudyData(
        "transfer_study",
        points,
        environment(
            points,
            "docs/transfer_study/results.csv",
            [
                "tqstar sweep --name transfer_study --executor local --jobs 2, one thread each, with the optimal check running beside it: times are upper bounds",
                "the optimum's curve here is the 4 rung points of each build's premise check plus the SFT model at KL 0, coarser than the "
                "builds' manifest curves (beta 4 to 0.025) that the earlier script read",
            ],
        ),
        "legacy",
        curves=premise_curves(premise),
    )
    points = normalise_points(old("docs/compute_frontier/results.csv"))
    studies["compute_frontier"] = StudyData(
        "compute_frontier",
        points,
        environment(points, "docs/compute_frontier/results.csv", ["--executor local --jobs 1 while other jobs shared the 2 cores"]),
        "legacy",
    )
    points = normalise_points(old("docs/proxy_guided/results.csv"))
    studies["proxy_guided"] = StudyData(
        "proxy_guided",
        points,
        environment(
            points,
            "docs/proxy_guided/results.csv",
            ["--jobs 1, sharing the 2 cores with other jobs; proxies of seeds 1, 2 built on first use"],
        ),
        "legacy",
    )
    rows = old("docs/optimal_check/optimal_check.csv")
    rows["run"] = [Path(str(r)).name for r in rows["run"]]
    studies["optimal_check"] = StudyData(
        "optimal_check",
        pd.DataFrame(),
        environment(
            rows,
            "docs/optimal_check/optimal_check.csv",
            [
                "build seed 0; optimum estimates from 128 samples of pi_k per held-out prompt",
                "earlier whole-vocabulary-rollout runs against rho*_beta: docs/optimal_check/full_rollouts.csv at that commit",
            ],
        ),
        "legacy",
        tables={"rows": rows},
    )
    points = normalise_points(old("docs/smollm2_methods/results.csv"))
    comparison = old("docs/smollm2_methods/vs_baseline.csv")
    studies["smollm2_methods"] = StudyData(
        "smollm2_methods",
        points,
        environment(
            points,
            "docs/smollm2_methods/results.csv and vs_baseline.csv",
            [
                "one thread, with a benchmark on the other core (times are upper bounds); one build seed (key v1-ac49779c)",
                "a follow-up run outside the sweep (indirect TQ*, self-normalised, 4 sampled rollouts): its `tqstar evaluate` "
                "table is smollm2_methods/indirect_self_normalized.md",
            ],
        ),
        "legacy",
        tables={"comparison": comparison},
    )
    studies["synthetic_premise"] = StudyData(
        "synthetic_premise",
        pd.DataFrame(),
        environment(
            None, "docs/synthetic/premise_by_seed.csv", ["recipe v6, seeds 0-2 built at once on the 2 cores, OMP_NUM_THREADS=1 each"]
        ),
        "legacy",
        tables={"premise": premise},
    )
    for name, data in studies.items():
        write_archive(data, OUT / name)
        print(f"archived {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
