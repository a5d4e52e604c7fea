#!/usr/bin/env python
"""Tables of the transfer study (`tqstar sweep --name transfer_study`) for README: across build seeds.

Reads the sweep's results.csv (one row per point, written by the sweep's aggregation) and each run's
generations.jsonl, and prints Markdown:
  (a) greedy arms at the authors' defaults: reward (mean over seeds ± s.e. across seeds, [min, max] of the
      seeds' means), diversity, coherence, length, seconds per response, Q spread and optimism gap;
  (b) sampled arms: reward and KL(decoder || pi_sft) per response by alpha (the reward-KL frontier);
  (c) paired differences on the same prompts: TQ* with each rung minus CD and minus that rung decoded
      alone, per seed (mean ± s.e. over prompts), so a claim can be checked seed by seed;
  (d) each sampled point against the optimum: its reward as a fraction of rho*_beta's reward at the same KL
      (the build manifest's importance-sampled curve over beta, interpolated in KL, per seed; past the
      curve's last point, an upper bound against that point's reward), and the
      frontier plot with that curve (and the optimal decoder's runs of `--optimal`, when given).

    python scripts/transfer_study_report.py outputs/sweeps/transfer_study \
        [--optimal outputs/sweeps/optimal_check] [--plot docs/transfer_study/frontier.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from tqstar.stats import mean_and_stderr
from tqstar.synthetic import load_manifest, task_dir
from tqstar.synthetic.cache import is_built


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


def optimum_curve(seed: int, cache_dir: str | None) -> list[tuple[float, float, float]] | None:
    """(KL, reward, beta) of rho*_beta on the build's held-out prompts, from KL 0 (the SFT model, beta -> inf)
    upwards; None for a build without the curve (recipe v5 and earlier)."""
    folder = task_dir(seed, cache_dir)
    if not is_built(folder):
        return None
    manifest = load_manifest(folder)
    sft = (manifest.get("premise") or {}).get("sft") or {}
    curve = (sft.get("optimum_curve") or {}).get("target_reward")
    if not curve:
        return None
    points = [(0.0, float(sft["target_reward"]["mean"]), float("inf"))]
    return points + sorted((float(p["kl"]), float(p["reward"]), float(p["beta"])) for p in curve)


def optimum_at(curve: list[tuple[float, float, float]], kl: float) -> float | None:
    """rho*'s reward at this KL, linear in KL between the curve's points; None past its last point
    (importance sampling from M samples per prompt cannot estimate a KL above log M). Past it the optimum
    earns at least the last point's reward, so a fraction against that point is an upper bound (≤)."""
    for (k0, r0, _), (k1, r1, _) in zip(curve, curve[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1
    return None


def topk_optimum_points(optimal: Path, seeds: list[int], top_k: int = 10) -> list[dict]:
    """rho*_(beta,k)'s curve (what a decoder among pi_sft's top k can reach; its KL to pi_sft includes the
    cut), from the optimal_check report's cache (optimum_topk/seed<S>-k<k>-m<M>.json), averaged over the seeds
    it has; [] when the report has not computed it."""
    import json

    curves = {}
    for seed in seeds:
        files = sorted((optimal / "optimum_topk").glob(f"seed{seed}-k{top_k}-m*.json"))
        if files:
            curves[seed] = json.loads(files[-1].read_text())
    if not curves:
        return []
    name = f"rho*_(β,{top_k}) (IS, seed{'s' if len(curves) > 1 else ''} {', '.join(map(str, curves))})"
    points = []
    for i, point in enumerate(next(iter(curves.values()))):
        at = [c[i] for c in curves.values()]
        kl, reward = sum(p["kl"] for p in at) / len(at), sum(p["reward"] for p in at) / len(at)
        points.append({"curve": name, "label": f"β={point['beta']:g}", "kl": kl, "reward": reward, "reward_se": None})
    print(f"\n{name}: " + ", ".join(f"{p['label']}: KL {p['kl']:.2f}, r {p['reward']:.3f}" for p in points))
    return points


def against_optimum(sampled: pd.DataFrame, cache_dir: str | None, optimal: Path | None, plot: Path) -> None:
    seeds = sorted(int(s) for s in sampled["seed"].unique())
    curves = {seed: optimum_curve(seed, cache_dir) for seed in seeds}
    if any(c is None for c in curves.values()):
        print("\n(d) skipped: a build of the current recipe is missing or has no optimum curve in its manifest")
        return
    print("\n(d) against the optimum: reward / reward of rho*_beta at the same KL (per seed, then mean ± s.e. across seeds)\n")
    print("| run | alpha / n | seeds | reward | KL | fraction of the optimum's reward at that KL |")
    print("|---|---:|---:|---|---|---|")
    points = []
    for (name, alpha, n), group in sampled.groupby(["label", "alpha", "n"], sort=False, dropna=False):
        best_of_n = group["method"].iloc[0] == "best_of_n"
        fractions, past = [], 0
        for _, row in group.iterrows():
            curve = curves[int(row["seed"])]
            reference = optimum_at(curve, float(row["kl"]))
            if reference is None:  # past the curve: the optimum there earns at least the curve's last reward
                reference, past = curve[-1][1], past + 1
            fractions.append(float(row["reward_mean"]) / reference)
        knob = f"n={int(n)}" if best_of_n else f"{alpha:g}"
        cell = (
            ("≤ " if past else "")
            + fmt(*mean_and_stderr(fractions))
            + (f" (KL past the curve on {past} of {len(group)} seeds)" if past else "")
        )
        print(f"| {name} | {knob} | {group['seed'].nunique()} | {across(group, 'reward_mean')} | {across(group, 'kl')} | {cell} |")
        rewards, kls = group["reward_mean"].tolist(), group["kl"].tolist()
        points.append(
            {
                "curve": name,
                "label": knob if best_of_n else f"α={knob}",
                "kl": sum(kls) / len(kls),
                "reward": sum(rewards) / len(rewards),
                "reward_se": mean_and_stderr(rewards)[1],
            }
        )
    betas = [b for b in {p[2] for c in curves.values() for p in c}]
    mean_curve = []
    for beta in sorted(betas, reverse=True):
        at = [p for c in curves.values() for p in c if p[2] == beta]
        mean_curve.append((sum(p[0] for p in at) / len(at), sum(p[1] for p in at) / len(at)))
    print(
        "\nrho*_beta (importance-sampled, mean over seeds): "
        + ", ".join(f"beta={b:g}: KL {k:.2f}, r {r:.3f}" for b, (k, r) in zip(sorted(betas, reverse=True), mean_curve) if b != float("inf"))
    )
    if optimal is not None and (optimal / "results.csv").is_file():
        check = pd.read_csv(optimal / "results.csv")
        check = check[check["num_prompts"] >= 128] if "num_prompts" in check.columns else check
        for _, row in check.iterrows():
            points.append(
                {
                    "curve": "optimal decoder (seed 0)",
                    "label": f"β={1 / float(row['alpha']):g}",
                    "kl": row["kl"],
                    "reward": row["reward_mean"],
                    "reward_se": None,
                }
            )
    points += topk_optimum_points(optimal, seeds) if optimal is not None else []
    from tqstar.plots import plot_frontier

    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_frontier(
        pd.DataFrame(points),
        x="kl",
        y="reward",
        label_cols=["label"],
        path=plot,
        yerr="reward_se",
        group="curve",
        title=f"reward against KL to the SFT model (sampled, mean over {len(seeds)} build seeds)",
        xlabel="KL(decoder || SFT) per response",
        ylabel="mean target reward",
        reference=([k for k, _ in mean_curve], [r for _, r in mean_curve], "rho*_beta (optimum, IS estimate)"),
        xmax=8.0,
    )
    print(f"\nplot: {plot} (x cut at 8 nats; points beyond are in table (b))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the sweep folder (holds results.csv)")
    parser.add_argument("--cache-dir", default=None, help="the synthetic cache (default: $TQSTAR_CACHE or ~/.cache/tqstar)")
    parser.add_argument(
        "--optimal",
        type=Path,
        help="an optimal_check sweep folder: its 128-prompt runs, and rho*_(beta,10)'s curve when its report cached it, join the plot",
    )
    parser.add_argument("--plot", type=Path, help="the frontier plot with the optimum (default: FOLDER/frontier_optimum.png)")
    args = parser.parse_args()
    table = pd.read_csv(args.folder / "results.csv")
    table = table.rename(columns={"selection_x": "selection"})  # tables aggregated before the merge kept one copy
    table["baseline"] = table["baseline"].fillna("")
    table["label"] = table.apply(label, axis=1)
    table["run"] = [str(args.folder / Path(run).name) for run in table["run"]]  # relative to where the sweep ran
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
    for (name, alpha, n), group in sampled.groupby(["label", "alpha", "n"], sort=False, dropna=False):
        knob = f"n={int(n)}" if group["method"].iloc[0] == "best_of_n" else f"{alpha:g}"
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
    against_optimum(sampled, args.cache_dir, args.optimal, args.plot or args.folder / "frontier_optimum.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
