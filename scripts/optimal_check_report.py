#!/usr/bin/env python
"""Does the optimal decoder reach rho*_beta? The check of `tqstar sweep --name optimal_check`, for README.

For each run of experiment=synthetic_optimal in the sweep, its mean reward and KL(decoder || pi_sft) per
response against importance-sampling estimates of the optimum it targets, at the run's beta, on the same
prompts:
- a run whose rollouts are truncated to the decoder's top k (decoder.rollout.top_k = decoder.top_k, the
  preset's default) targets rho*_{beta,k} ∝ pi_k · e^{r/beta}, pi_k = pi_sft truncated to its top k: the
  estimates come from `--samples` responses per held-out prompt of pi_k (tqstar.synthetic.evaluation.
  truncated_optimum_curve), computed once per (build seed, k) and cached in the sweep folder;
- a run with untruncated rollouts is compared with rho*_beta itself (the build manifest's
  premise.sft.optimum_curve), which a top-k decoder cannot reach: it pays -log(top-k mass) per step.
The difference is paired by prompt, so its standard error combines the decoder's sampling error and the
estimate's; |difference| <= 2 s.e. is reported as a match.

    python scripts/optimal_check_report.py outputs/sweeps/optimal_check [--samples 128] [--cache-dir DIR] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from tqstar.stats import mean_and_stderr
from tqstar.synthetic import load_manifest, task_dir
from tqstar.synthetic.params import BuildParams


def fmt(mean, se=None, digits=3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def per_prompt(run: Path) -> dict[int, dict]:
    """Prompt index in the test split -> that prompt's row of metrics_per_prompt.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics_per_prompt.jsonl").read_text().splitlines() if line.strip()]
    return {int(str(r["prompt_id"]).rsplit("-", 1)[1]): r for r in rows}


def optimum_point(curve: list[dict], beta: float) -> dict | None:
    return next((p for p in curve if abs(p["beta"] - beta) < 1e-9), None)


def truncated_curve(folder: Path, seed: int, top_k: int, samples: int, cache_dir: str | None) -> list[dict]:
    """rho*_{beta,k}'s curve on the build's held-out prompts, from `samples` draws of pi_k per prompt (cached)."""
    path = folder / "optimum_topk" / f"seed{seed}-k{top_k}-m{samples}.json"
    if path.exists():
        return json.loads(path.read_text())
    from tqstar.synthetic.evaluation import truncated_optimum_curve

    build = task_dir(seed, cache_dir)
    manifest = load_manifest(build)
    prompts = [json.loads(line)["prompt"] for line in (build / "prompts" / "test.jsonl").read_text().splitlines() if line.strip()]
    print(f"sampling pi_sft truncated to its top {top_k}: {samples} responses x {len(prompts)} prompts (build seed {seed})")
    curve = truncated_optimum_curve(build, prompts, BuildParams(**manifest["params"]), seed + 2, top_k, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curve))
    return curve


def compare(run: Path, folder: Path, samples: int, cache_dir: str | None) -> dict | None:
    """One run against the optimum it targets, at its beta, on its prompts; None where there is no curve point."""
    cfg = OmegaConf.load(run / "config.yaml")
    beta, seed, top_k = float(cfg.decoder.beta), int(cfg.synthetic.seed), int(cfg.decoder.top_k)
    rollout_top_k = cfg.decoder.rollout.get("top_k")
    if rollout_top_k is not None and int(rollout_top_k) == top_k:
        target, curve = f"rho*_(beta,{top_k})", truncated_curve(folder, seed, top_k, samples, cache_dir)
    else:
        manifest = load_manifest(task_dir(seed, cache_dir))
        target = "rho*_beta"
        curve = ((manifest.get("premise") or {}).get("sft") or {}).get("optimum_curve", {}).get("target_reward") or []
    point = optimum_point(curve, beta)
    if point is None:
        return None
    rows = per_prompt(run)
    prompts = sorted(rows)
    out = {
        "run": str(run),
        "seed": seed,
        "beta": beta,
        "alpha": float(cfg.decoder.alpha),
        "top_k": int(cfg.decoder.top_k),
        "rollouts": int(cfg.decoder.rollout.num),
        "rollout_len": int(cfg.decoder.rollout.max_new_tokens),
        "rollout_top_k": rollout_top_k,
        "target": target,
        "prompts": len(prompts),
        "seconds_per_response": sum(rows[i]["seconds"] for i in prompts) / len(prompts),
    }
    for name, key, curve_key in (("reward", "reward", "reward_by_prompt"), ("kl", "kl", "kl_by_prompt")):
        decoded = [float(rows[i][key]) for i in prompts]
        optimum = [float(point[curve_key][i]) for i in prompts]
        out[name], out[f"{name}_se"] = mean_and_stderr(decoded)
        out[f"optimum_{name}"], out[f"optimum_{name}_se"] = mean_and_stderr(optimum)
        out[f"{name}_diff"], out[f"{name}_diff_se"] = mean_and_stderr([d - o for d, o in zip(decoded, optimum)])
        out[f"{name}_match"] = abs(out[f"{name}_diff"]) <= 2 * out[f"{name}_diff_se"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the sweep folder (holds results.csv)")
    parser.add_argument("--cache-dir", default=None, help="the synthetic cache (default: $TQSTAR_CACHE or ~/.cache/tqstar)")
    parser.add_argument("--csv", type=Path, help="write one row per run here")
    parser.add_argument("--samples", type=int, default=128, help="responses of pi_k per prompt for rho*_(beta,k) (default 128)")
    args = parser.parse_args()
    table = pd.read_csv(args.folder / "results.csv")
    # runs live in the sweep folder; results.csv names them relative to where the sweep ran
    rows = [
        r
        for r in (compare(args.folder / Path(run).name, args.folder, args.samples, args.cache_dir) for run in table["run"])
        if r is not None
    ]
    if not rows:
        raise SystemExit(f"no run in {args.folder} has a matching optimum curve point (rebuild with recipe v6 or later)")
    print(
        "| beta (alpha) | k | rollouts x length | prompts | optimum | reward | its E[r] (IS) | difference | KL | its KL to SFT (IS) | difference | s / response |"
    )
    print("|---|---:|---:|---:|---|---|---|---|---|---|---|---:|")
    for r in sorted(
        rows, key=lambda r: (r["target"] == "rho*_beta", -r["prompts"], -r["beta"], r["top_k"], r["rollouts"], r["rollout_len"])
    ):
        mark = {True: " ✓", False: " ✗"}
        print(
            f"| {r['beta']:g} ({r['alpha']:g}) | {r['top_k']} | {r['rollouts']} x {r['rollout_len']} | {r['prompts']} | {r['target']} | {fmt(r['reward'], r['reward_se'])} | "
            f"{fmt(r['optimum_reward'], r['optimum_reward_se'])} | {fmt(r['reward_diff'], r['reward_diff_se'])}{mark[r['reward_match']]} | "
            f"{fmt(r['kl'], r['kl_se'])} | {fmt(r['optimum_kl'], r['optimum_kl_se'])} | {fmt(r['kl_diff'], r['kl_diff_se'])}{mark[r['kl_match']]} | "
            f"{r['seconds_per_response']:.2f} |"
        )
    print("\n✓: |difference| <= 2 s.e. (paired by prompt: the decoder's and the estimate's errors combined)")
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
