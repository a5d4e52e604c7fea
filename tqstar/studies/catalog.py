"""The results pages: one renderer per study, and the registry `STUDIES` that `tqstar report` reads.

A renderer turns a `StudyData` into a `Page`: tables from `analysis` functions, and checks (sentences such as
"lower on every seed") computed, not read off a table. A section whose input the source lacks says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..methods import spec
from ..metrics import win_tie
from . import analysis as A
from .page import Page, fmt, fmt_across
from .sources import StudyData

ACROSS = ("reward_mean", "gold_reward_mean", "baseline_reward_mean", "kl", "diversity", "coherence", "tokens_mean")
ACROSS += ("seconds_per_response", "flops_per_response", "q_spread", "optimism_gap")
NO_PER_PROMPT = "this source has no per-prompt rows (its run folders were not kept); rerun the sweep and `tqstar report` it"


def _knob(row) -> str:
    """A sampled point's strength: n for best-of-N, alpha otherwise."""
    if row.get("method") == "best_of_n" and row.get("n") == row.get("n"):
        return f"n={int(row['n'])}"
    return f"{row['alpha']:g}"


def _text(value) -> str:
    """A table cell as text: '' for a missing one (None, or NaN as pandas reads an empty CSV cell)."""
    return "" if value is None or value != value else str(value)


def _records(frame) -> list[dict]:
    return frame.to_dict("records")


def _seed_difference(points, label_a: str, label_b: str, per_prompt=None) -> dict[int, tuple]:
    """Per seed: (a - b, s.e.) paired by prompt when both runs have per-prompt rows, else the difference of the
    runs' means with no s.e."""
    out = {}
    for seed in sorted(points["seed"].dropna().unique()):
        a = points[(points["label"] == label_a) & (points["seed"] == seed)]
        b = points[(points["label"] == label_b) & (points["seed"] == seed)]
        if a.empty or b.empty:
            continue
        mean, se, shared = A.paired(per_prompt, a["run"].iloc[0], b["run"].iloc[0]) if per_prompt is not None else (None, None, 0)
        if not shared:  # no per-prompt rows for one of them (e.g. an archived point merged with a new sweep's)
            mean, se = float(a["reward_mean"].iloc[0]) - float(b["reward_mean"].iloc[0]), None
        out[int(seed)] = (mean, se)
    return out


def _comparison_table(page: Page, name: str, points, comparisons: list[tuple[str, str]], per_prompt) -> None:
    seeds = [int(s) for s in sorted(points["seed"].dropna().unique())]
    rows, frame = [], []
    for a, b in comparisons:
        by_seed = _seed_difference(points, a, b, per_prompt)
        if not by_seed:
            continue
        claim = A.seed_claim(by_seed)
        rows.append([f"{a} − {b}", *[fmt(*by_seed[s]) if s in by_seed else "–" for s in seeds], claim])
        frame += [{"comparison": f"{a} - {b}", "seed": s, "diff": m, "se": se} for s, (m, se) in by_seed.items()]
        page.check(f"{a} − {b}: {claim}")
    import pandas as pd

    page.table(name, ["comparison", *[f"seed {s}" for s in seeds], "on every seed"], rows, pd.DataFrame(frame))


def transfer_study(data: StudyData, page: Page) -> None:
    points = data.points
    greedy = points[(points["selection"] == "greedy") | ((points["method"] == "best_of_n") & (points["arm"] == "best_of_n"))]
    sampled = points[(points["selection"] == "sample") & (points["arm"] != "best_of_n")]
    page.text(
        "## (a) Greedy at the authors' defaults\n\nMean over build seeds ± s.e. across seeds [min, max of the seeds' means]. "
        "Q spread: per step, max Q − min Q over the k candidates; optimism gap: Q of the chosen candidate minus the reward "
        "the final response earned (from the trace)."
    )
    table = A.across_seeds(greedy, ACROSS, keys=("label",))
    metrics = ("reward_mean", "diversity", "coherence", "tokens_mean", "seconds_per_response", "q_spread", "optimism_gap")
    page.table(
        "greedy",
        ["run", "seeds", "reward", "diversity", "coherence", "tokens", "s / response", "Q spread", "optimism gap"],
        [[r["label"], r["seeds"], *[fmt_across(r, m, spread=m == "reward_mean") for m in metrics]] for r in _records(table)],
        table,
    )
    page.text(
        "## (b) Sampled (T=1): reward and KL to the SFT model per response\n\nBy alpha; best-of-n by n (its KL is the "
        "analytic bound log n − (n−1)/n). One row per setting, n included."
    )
    table = A.across_seeds(sampled, ACROSS)
    page.table(
        "sampled",
        ["run", "alpha / n", "seeds", "reward", "KL"],
        [[r["label"], _knob(r), r["seeds"], fmt_across(r, "reward_mean"), fmt_across(r, "kl")] for r in _records(table)],
        table,
    )
    page.text(
        "## (c) Differences on the same prompts (greedy), per seed\n\n"
        + (
            "Mean ± s.e. over prompts of the paired difference."
            if data.per_prompt is not None
            else "Differences of the runs' mean rewards (no paired s.e.: " + NO_PER_PROMPT + ")."
        )
    )
    labels = list(dict.fromkeys(greedy["label"]))
    rungs = [label.split("(", 1)[1].rstrip(")") for label in labels if label.startswith("tqstar (")]
    comparisons = [pair for rung in rungs for pair in ((f"tqstar ({rung})", "cd"), (f"tqstar ({rung})", f"baseline ({rung})"))]
    comparisons.append(("cd", "best_of_n"))
    _comparison_table(page, "differences", greedy, [(a, b) for a, b in comparisons if a in labels and b in labels], data.per_prompt)
    _against_optimum(data, sampled, page)
    _paper_alpha(greedy, labels, data.per_prompt, page)


def _paper_alpha(greedy, labels: list[str], per_prompt, page: Page) -> None:
    """(e), soft-transfer issue 5c: TQ* with the mean value at the paper's alpha = 1/beta of its rung (arms
    tqstar_alpha_<rung>), against the same rung at alpha = 1, CD and the rung decoded alone; greedy, per seed."""
    page.text(
        "## (e) The paper's alpha: TQ* at alpha = 1/beta of its rung\n\nThe mean value of the rung's greedy rollouts, "
        "as in (a), with alpha = 1/beta of the DPO beta the rung was distilled for (the paper's choice; (a) uses alpha = 1, "
        "which is 1/beta only for rho1), so the ladder compares estimators rather than alphas. Paired by prompt where both "
        "runs have per-prompt rows, else the difference of the runs' means (no s.e.)."
    )
    arms = [label for label in labels if label.startswith("tqstar_alpha_")]
    if not arms:
        page.missing(
            "(e)", "no tqstar_alpha_<rung> points in this source (tqstar sweep --name transfer_study --arm tqstar_alpha_rho0.1 ...)"
        )
        return
    comparisons = []
    for arm in arms:
        rung = arm.removeprefix("tqstar_alpha_")
        comparisons += [(arm, f"tqstar ({rung})"), (arm, "cd"), (arm, f"baseline ({rung})")]
    _comparison_table(page, "paper_alpha", greedy, [(a, b) for a, b in comparisons if a in labels and b in labels], per_prompt)


def _against_optimum(data: StudyData, sampled, page: Page) -> None:
    page.text("## (d) Sampled points against the optimum rho*_beta at the same KL")
    curves = (data.curves or {}).get("rho*_beta")
    if not curves:
        page.missing("(d)", "no optimum curve (the builds' manifests were not available to this report)")
        return
    rows, frame = [], []
    for _, group in sampled.groupby([c for c in ("label", "alpha", "n") if c in sampled], sort=False, dropna=False):
        fractions, past = [], 0
        for r in _records(group):
            curve = [(p[0], p[1]) for p in curves[str(int(r["seed"]))]]
            fraction, bound = A.fraction_of_optimum(float(r["reward_mean"]), float(r["kl"]), curve)
            fractions.append(fraction)
            past += bound
        mean, se = A.mean_and_stderr(fractions)
        first = _records(group)[0]
        cell = ("≤ " if past else "") + fmt(mean, se) + (f" (KL past the curve on {past} of {len(group)} seeds)" if past else "")
        rows.append([first["label"], _knob(first), group["seed"].nunique(), cell])
        frame.append({"label": first["label"], "knob": _knob(first), "fraction": mean, "fraction_se": se, "seeds_past_curve": past})
    import pandas as pd

    page.table("against_optimum", ["run", "alpha / n", "seeds", "fraction of the optimum's reward at that KL"], rows, pd.DataFrame(frame))

    def draw(path):
        from ..plots import plot_frontier

        means = A.across_seeds(sampled, ("reward_mean", "kl"))
        means["curve"], means["knob"] = means["label"], [_knob(r) for r in _records(means)]
        betas = sorted({p[2] for c in curves.values() for p in c if p[2] is not None}, reverse=True)
        mean_curve = [(0.0, sum(c[0][1] for c in curves.values()) / len(curves))]
        for beta in betas:
            at = [p for c in curves.values() for p in c if p[2] == beta]
            mean_curve.append((sum(p[0] for p in at) / len(at), sum(p[1] for p in at) / len(at)))
        plot_frontier(
            means.rename(columns={"reward_mean": "reward"}),
            x="kl",
            y="reward",
            label_cols=["knob"],
            path=path,
            yerr="reward_mean_se_seeds",
            group="curve",
            title="reward against KL to the SFT model (sampled, mean over seeds)",
            xlabel="KL(decoder || SFT) per response",
            ylabel="mean target reward",
            reference=([k for k, _ in mean_curve], [r for _, r in mean_curve], "rho*_beta (IS estimate)"),
            xmax=8.0,
        )

    page.figure("frontier", "reward against KL, with rho*_beta's curve", draw)


def _group(row) -> str:
    """A method's line on the compute frontier; its sampled points (but best-of-N's) apart from its greedy ones."""
    sampled = row.get("selection") == "sample" and row.get("method") not in ("best_of_n", "soft_transfer")  # these always sample
    return f"{row['method']}, sampled" if sampled else str(row["method"])


def compute_frontier(data: StudyData, page: Page) -> None:
    points = data.points.copy()
    points["group"] = [_group(r) for r in _records(points)]
    groups = list(dict.fromkeys(points["group"]))
    page.text(
        "## Best reward at a compute budget\n\nFor each build seed and method, its best mean target reward among its points "
        "that cost at most B FLOPs per response; mean ± s.e. over seeds (– where some seed has no point that cheap). "
        "'best on every seed' is the plain argmax on each seed; 'smallest margin' is the winner's smallest lead."
    )
    if "baseline" not in groups:
        page.text(
            "The baseline decoded alone is not among this source's points (conf/sweep/compute_frontier.yaml has it since "
            "this report was introduced; a rerun adds it)."
        )
    table = A.best_at_budget(points, group="group")
    rows = []
    for r in _records(table):
        best = r["best"] if r["best"] != "differs by seed" else f"differs ({r['winners_by_seed']})"
        margin = "–" if r["smallest_margin"] is None or math.isnan(r["smallest_margin"]) else f"{r['smallest_margin']:.3f}"
        rows.append([f"{r['flops_per_response_at_most']:.1e}", *[fmt(r[g], r[f"{g}_se"]) for g in groups], best, margin])
        if r["best"] not in ("none reachable", "differs by seed"):
            page.check(f"at ≤ {r['flops_per_response_at_most']:.1e} FLOPs per response, {r['best']} is best on every seed")
    page.table("best_at_budget", ["FLOPs / response ≤", *groups, "best on every seed", "smallest margin"], rows, table)
    cost = points.groupby("arm")["flops_per_response"].agg(["min", "max"]).reset_index()
    page.table(
        "cost_by_arm",
        ["arm", "FLOPs / response, min", "max"],
        [[r["arm"], f"{r['min']:.2e}", f"{r['max']:.2e}"] for r in _records(cost)],
        cost,
    )

    def draw(path):
        from ..plots import plot_frontier

        means = A.across_seeds(points, ("reward_mean", "flops_per_response"))
        plot_frontier(
            means,
            x="flops_per_response",
            y="reward_mean",
            label_cols=[],
            path=path,
            yerr="reward_mean_se_seeds",
            group="arm",
            logx=True,
            title="reward against FLOPs per response (mean over seeds)",
        )

    page.figure("reward_vs_flops", "reward against FLOPs per response", draw)
    _equal_kl(points, page)


def _equal_kl(points, page: Page) -> None:
    """Sampled arms (the optimal decoder, soft transfer, the baseline at T = 1, ...) against best-of-N at the same KL."""
    page.text(
        "## Sampled arms at equal KL\n\nEach sampled point against best-of-N at the same KL to the SFT model on the same "
        "seed: best-of-N's reward linear in KL between its n (KL: the analytic bound log n − (n−1)/n, which is at least its "
        "true KL, so best-of-N's reward at a given true KL is at least this: a lead over it here is an upper bound, a "
        "deficit is real). Difference ± sqrt(s.e.² + interpolated s.e.²) (unpaired runs); – where the point's KL is past "
        "best-of-N's largest n. Mean ± s.e. across seeds."
    )
    sampled = points[(points["selection"] == "sample") & (points["method"] != "best_of_n") & points["kl"].notna()]
    reference = points[(points["method"] == "best_of_n") & points["kl"].notna()]
    if sampled.empty or reference.empty:
        page.missing("equal KL", "no sampled points with a KL, or no best-of-N points, in this source")
        return
    seeds = sorted(int(s) for s in points["seed"].dropna().unique())
    rows, frame = [], []
    for r in A.against_curve_at_kl(sampled, reference, keys=("group", "rollout_num")):
        per = r["seeds"]
        mean = {m: A.mean_and_stderr([v[m] for v in per.values() if v[m] is not None]) for m in ("kl", "reward", "flops", "reference")}
        rolls_out = spec(r["group"].split(",")[0]).uses_rollouts  # rollouts per candidate are a setting of the point
        rollouts = int(r["rollout_num"]) if rolls_out and r["rollout_num"] == r["rollout_num"] else "–"
        past = sorted(set(per) - set(r["by_seed"]))  # seeds where the point's KL is past best-of-N's largest n
        claim = r["claim"] + (f"; seed {', '.join(map(str, past))}: KL past best-of-N's largest n" if past else "")
        cells = [fmt(*r["by_seed"][s]) if s in r["by_seed"] else "–" for s in seeds]
        flops = f"{mean['flops'][0]:.1e}" if mean["flops"][0] is not None else "–"
        rows.append([r["group"], rollouts, len(per), flops, fmt(*mean["kl"]), fmt(*mean["reward"]), fmt(*mean["reference"]), *cells, claim])
        frame += [
            {
                "group": r["group"],
                "rollouts": rollouts,
                "seed": s,
                **v,
                "diff": r["by_seed"].get(s, (None, None))[0],
                "se": r["by_seed"].get(s, (None, None))[1],
            }
            for s, v in per.items()
        ]
        page.check(f"{r['group']}" + (f" (n = {rollouts})" if rollouts != "–" else "") + f" − best-of-N at equal KL: {claim}")
    import pandas as pd

    page.table(
        "equal_kl",
        [
            "arm",
            "rollouts / candidate",
            "seeds",
            "FLOPs / response",
            "KL",
            "reward",
            "best-of-N at that KL",
            *[f"diff, seed {s}" for s in seeds],
            "on every seed",
        ],
        rows,
        pd.DataFrame(frame),
    )


def proxy_guided(data: StudyData, page: Page) -> None:
    points = data.points
    page.text(
        "## Guided by the proxy, judged by the gold reward\n\nEvery run is guided by the learned proxy (its `reward`) and "
        "scored by both; mean over seeds ± s.e. across seeds [min, max]."
    )
    table = A.across_seeds(points, ACROSS)
    page.table(
        "results",
        ["run", "alpha / n", "seeds", "proxy (guide)", "gold", "FLOPs / response"],
        [
            [
                r["label"],
                _knob(r),
                r["seeds"],
                fmt_across(r, "reward_mean", 2, False),
                fmt_across(r, "gold_reward_mean"),
                f"{r['flops_per_response']:.1e}",
            ]
            for r in _records(table)
        ],
        table,
    )
    for label, group in points.groupby("label", sort=False):
        knob = "n" if group["method"].iloc[0] == "best_of_n" else "alpha"
        for seed, by_seed in group.groupby("seed"):
            ordered = by_seed.sort_values(knob)
            gold = ordered["gold_reward_mean"].tolist()
            knobs = ordered[knob].tolist()
            falls = [(knobs[i], knobs[i + 1]) for i in range(len(gold) - 1) if gold[i + 1] < gold[i]]
            if len(gold) > 1:
                state = "rises at every step" if not falls else "falls between " + ", ".join(f"{knob} {a:g} and {b:g}" for a, b in falls)
                page.check(f"{label}, seed {int(seed)}: gold reward {state} ({knob} {knobs[0]:g} to {knobs[-1]:g})")

    def draw(path):
        from ..sweep import plot_gold_vs_guide

        means = A.across_seeds(points, ("reward_mean", "gold_reward_mean"))
        means["curve"] = means["label"]
        plot_gold_vs_guide(means, "reward_mean", "gold_reward_mean", path)

    page.figure("gold_vs_guide", "gold against guide reward", draw)


def optimal_rows(points, per_prompt, curve_of: Callable) -> list[dict]:
    """Each run of the optimal decoder against the optimum it targets at its beta, paired by prompt, on all its
    prompts and, where runs of one setting group ran on different numbers of prompts, on the prompts they share
    (so that rows can be compared on the same prompts). `curve_of(seed, top_k or None)` gives the optimum's
    curve points (beta, reward_by_prompt, kl_by_prompt)."""
    rows = []
    for r in _records(points):
        truncated = r.get("rollout_top_k") == r.get("rollout_top_k") and r.get("rollout_top_k") is not None
        truncated = truncated and int(r["rollout_top_k"]) == int(r["top_k"])
        curve = curve_of(int(r["seed"]), int(r["top_k"]) if truncated else None)
        point = next((p for p in curve or [] if abs(float(p["beta"]) - float(r["beta"])) < 1e-9), None)
        if point is None:
            continue
        own = per_prompt[per_prompt["run"] == r["run"]].sort_values("index")
        subsets = [None] + sorted({n for n in points["num_prompts"] if n < len(own)})
        for limit in subsets:
            kept = own if limit is None else own.head(int(limit))
            row = {
                "run": r["run"],
                "seed": int(r["seed"]),
                "beta": float(r["beta"]),
                "alpha": float(r["alpha"]),
                "top_k": int(r["top_k"]),
                "rollouts": int(r["rollout_num"]),
                "rollout_len": int(r["rollout_len"]),
                "target": f"rho*_(beta,{int(r['top_k'])})" if truncated else "rho*_beta",
                "prompts": len(kept),
                "subset": limit is not None,
                "seconds_per_response": float(kept["seconds"].mean()),
            }
            measures = [("reward", "reward", "reward_by_prompt"), ("kl", "kl", "kl_by_prompt")]
            if "kl_corrected" in kept.columns and kept["kl_corrected"].notna().all():
                measures.append(("kl_corrected", "kl_corrected", "kl_by_prompt"))  # the recorded KL less its Jensen gap
            for name, column, key in measures:
                decoded = kept[column].astype(float).tolist()
                optimum = [float(point[key][int(i)]) for i in kept["index"]]
                row[name], row[f"{name}_se"] = A.mean_and_stderr(decoded)
                row[f"optimum_{name}"], row[f"optimum_{name}_se"] = A.mean_and_stderr(optimum)
                row[f"{name}_diff"], row[f"{name}_diff_se"] = A.paired_difference(decoded, optimum)
            rows.append(row)
    return rows


def optimal_check(data: StudyData, page: Page) -> None:
    import pandas as pd

    page.text(
        "## The optimal decoder against the optimum it targets\n\nPaired by prompt (the decoder's and the importance-sampling "
        f"estimate's errors combined). ✓ match: |difference| ≤ {A.Z:g} s.e. and {A.Z:g} s.e. ≤ the tolerance "
        f"(reward {A.TOLERANCE['reward']:g}, KL {A.TOLERANCE['kl']:g} nats); ✗ differs: |difference| > {A.Z:g} s.e.; "
        "? undecidable: within 2 s.e. but the interval is wider than the tolerance."
    )
    if data.per_prompt is not None and data.curves:
        rows = pd.DataFrame(optimal_rows(data.points, data.per_prompt, lambda seed, k: _optimum_points(data.curves, seed, k)))
    elif "rows" in data.tables:
        rows = data.tables["rows"].copy()
        rows["subset"] = rows.get("subset", False)
        page.text("Rows as archived (per-run differences against the optimum); this source has no per-prompt rows, so no subset rows.")
    else:
        page.missing("the check", NO_PER_PROMPT)
        return
    for name in ("reward", "kl"):
        rows[f"{name}_verdict"] = [A.verdict(d, s, A.TOLERANCE[name]) for d, s in zip(rows[f"{name}_diff"], rows[f"{name}_diff_se"])]
    rows = rows.sort_values(
        ["target", "subset", "prompts", "beta", "top_k", "rollouts", "rollout_len"], ascending=[True, True, False, False, True, True, True]
    )
    table = []
    for r in _records(rows):
        table.append(
            [
                f"{r['beta']:g} ({r['alpha']:g})",
                r["top_k"],
                f"{r['rollouts']} x {r['rollout_len']}",
                f"{r['prompts']}" + (" (shared subset)" if r.get("subset") else ""),
                r["target"],
                fmt(r["reward"], r["reward_se"]),
                fmt(r["optimum_reward"], r["optimum_reward_se"]),
                f"{fmt(r['reward_diff'], r['reward_diff_se'])} {A.MARK[r['reward_verdict']]}",
                fmt(r["kl"], r["kl_se"]),
                fmt(r["optimum_kl"], r["optimum_kl_se"]),
                f"{fmt(r['kl_diff'], r['kl_diff_se'])} {A.MARK[r['kl_verdict']]}",
                f"{r['seconds_per_response']:.2f}",
            ]
        )
        page.check(
            f"beta {r['beta']:g}, k {r['top_k']}, {r['rollouts']} x {r['rollout_len']}, {r['prompts']} prompts against {r['target']}: "
            f"reward {r['reward_verdict']}, KL {r['kl_verdict']}"
        )
    page.table(
        "check",
        [
            "beta (alpha)",
            "k",
            "rollouts x length",
            "prompts",
            "optimum",
            "reward",
            "its E[r] (IS)",
            "difference",
            "KL",
            "its KL (IS)",
            "difference",
            "s / response",
        ],
        table,
        rows,
    )


PROPOSAL_LABEL = {"sft": "pi_k (SFT rollouts)", "baseline": "the rung (soft transfer)", "mixture": "mixture (half pi_k)"}


def _proposal(proposal, baseline, beta: float) -> str:
    """The proposal a run drew its rollouts from: sft, baseline (the rung distilled for the run's beta), mixture, or,
    where the rung was distilled for another beta (synthetic:rhoB with B != beta), that proposal and the rung's name."""
    import re

    proposal = _text(proposal) or "sft"
    match = re.search(r"rho([0-9.]+)$", _text(baseline))
    if proposal != "sft" and match and not math.isclose(float(match.group(1)), float(beta)):
        return f"{proposal} rho{match.group(1)}"
    return proposal


def _proposal_label(proposal: str) -> str:
    kind, _, rung = proposal.partition(" ")
    if rung:
        return f"mismatched rung {rung} (soft transfer)" if kind == "baseline" else f"mixture with mismatched rung {rung}"
    return PROPOSAL_LABEL.get(proposal, proposal)


def ground_truth_section(data: StudyData, page: Page) -> None:
    """Where the optimal decoder's KL excess comes from (scripts/soft_ground_truth.py): per seed, per response, the KL
    it records, the KL of what it decodes, the target's, and their differences (premise.summarise_split)."""
    from ..premise import SPLIT_KEYS, summarise_split

    page.text(
        "## Ground truth at beta 0.25: where the KL excess comes from\n\nAt states the optimal decoder (16 SFT rollouts "
        "a candidate) visited, every candidate rolled out 1,024 times: near-exact values give the target step "
        "distribution p*, and 64 disjoint groups of 16 give draws of the decoder's own p. Per response (sums over its "
        "steps): the KL the decoder records, E[KL(p || pi_sft)]; the KL of what it really decodes, KL(p_bar || pi_sft) "
        "(p_bar = E[p], fresh value noise at every step); the target's, KL(p* || pi_sft); the Jensen gap (recorded - "
        "real: a measurement artefact), the gap the delta method predicts from one draw's own rollouts, the distortion "
        "(real - target: a real change of the decoded distribution) and KL(p_bar || p*). Command: "
        "`scripts/soft_ground_truth.py --sweep <this sweep>`."
    )
    table = data.tables.get("ground_truth") if data.tables else None
    if table is None or table.empty:
        page.missing("the ground-truth split", "the sweep folder has no ground_truth/ (run scripts/soft_ground_truth.py --sweep)")
        return
    rows, summaries = [], {}
    for seed, group in table.groupby("seed"):
        summary = summarise_split(_records(group))
        summaries[int(seed)] = summary
        rows.append([int(seed), summary["responses"], len(group)] + [fmt(*summary[key]) for key in SPLIT_KEYS])
    page.table(
        "ground_truth",
        [
            "seed",
            "responses",
            "states",
            "recorded KL",
            "real KL",
            "target KL",
            "Jensen gap",
            "predicted gap",
            "distortion",
            "KL(p_bar || p*)",
        ],
        rows,
    )
    for seed, s in summaries.items():
        gap, distortion = s["jensen_gap"], s["distortion"]
        excess = s["recorded"][0] - s["target"][0]
        share = gap[0] / excess if excess else float("nan")
        page.check(
            f"seed {seed}: the recorded KL exceeds the target's by {excess:.3f} nats a response; the Jensen gap (measurement) is "
            f"{fmt(*gap)} ({share:.0%} of it), the distortion {fmt(*distortion)}"
        )


def soft_transfer(data: StudyData, page: Page) -> None:
    """5a of the soft-transfer issue: the optimal decoder's value from rollouts of pi_k, of the rung distilled for the
    same beta, or of their mixture, n rollouts a candidate, against rho*_(beta,k) paired by prompt, per seed."""
    import pandas as pd

    ground_truth_section(data, page)
    page.text(
        "## Rollouts needed: proposals against rho*_(beta,k)\n\nThe optimal decoder (soft value, alpha = 1/beta, sampled) "
        "with its rollouts drawn from pi_k, from the rung distilled for that beta (soft transfer: weighted back to pi_k), "
        "or from their mixture; each run against rho*_(beta,k)'s importance-sampling estimate on the same prompts, paired "
        f"by prompt. ✓ match: |difference| ≤ {A.Z:g} s.e. and {A.Z:g} s.e. ≤ the tolerance (reward "
        f"{A.TOLERANCE['reward']:g}, KL {A.TOLERANCE['kl']:g} nats); ✗ differs; ? undecidable. The KL is the one the "
        "decoder records, E[KL(p || pi_sft)] over its value noise, which exceeds the KL of what it decodes by a Jensen "
        "gap (docs/bench/soft_ground_truth_seed*.json). ESS: the weights' effective sample size / n, mean over steps."
    )
    if data.per_prompt is None or not data.curves:
        page.missing("the comparison", NO_PER_PROMPT + " (and the builds, for rho*_(beta,k))")
        return
    points = data.points.copy()
    rows = pd.DataFrame(optimal_rows(points, data.per_prompt, lambda seed, k: _optimum_points(data.curves, seed, k)))
    if rows.empty:
        page.missing("the comparison", "no run has an optimum to compare with (rollout.top_k must equal top_k)")
        return
    rows = rows[~rows["subset"]]
    extra = points.set_index("run")
    baselines = extra["baseline"] if "baseline" in extra.columns else {}  # an archive from before the column: none
    rows["proposal"] = [_proposal(extra.loc[run, "proposal"], baselines.get(run), beta) for run, beta in zip(rows["run"], rows["beta"])]
    for column in ("ess_fraction", "flops_per_response"):
        rows[column] = [extra.loc[run, column] if column in extra.columns else None for run in rows["run"]]
    if "kl_corrected_diff" not in rows.columns:
        rows["kl_corrected_diff"] = rows["kl_corrected_diff_se"] = None
    for name in ("reward", "kl", "kl_corrected"):
        tolerance = A.TOLERANCE["kl" if name == "kl_corrected" else name]
        rows[f"{name}_verdict"] = [
            A.verdict(d, se, tolerance) if d == d and d is not None else None
            for d, se in zip(rows[f"{name}_diff"], rows[f"{name}_diff_se"])
        ]
    rows = rows.sort_values(["beta", "proposal", "rollouts", "seed"], ascending=[False, True, True, True])
    table = []
    for r in _records(rows):
        ess = r.get("ess_fraction")
        table.append(
            [
                f"{r['beta']:g}",
                _proposal_label(r["proposal"]),
                r["rollouts"],
                r["seed"],
                r["prompts"],
                f"{fmt(r['reward_diff'], r['reward_diff_se'])} {A.MARK[r['reward_verdict']]}",
                f"{fmt(r['kl_diff'], r['kl_diff_se'])} {A.MARK[r['kl_verdict']]}",
                "-"
                if not _text(r.get("kl_corrected_verdict"))
                else f"{fmt(r['kl_corrected_diff'], r['kl_corrected_diff_se'])} {A.MARK[r['kl_corrected_verdict']]}",
                "-" if ess is None or ess != ess else f"{float(ess):.2f}",
                "-" if r.get("flops_per_response") != r.get("flops_per_response") else f"{float(r['flops_per_response']):.2e}",
                f"{r['seconds_per_response']:.2f}",
            ]
        )
    page.table(
        "rollouts_needed",
        [
            "beta",
            "proposal q",
            "n",
            "seed",
            "prompts",
            "reward - rho*'s",
            "KL - rho*'s",
            "corrected KL - rho*'s",
            "ESS / n",
            "FLOPs / response",
            "s / response",
        ],
        table,
        rows,
    )
    needed = []  # the sentence: per beta and proposal, the fewest n that match on every seed it ran on
    for beta, by_beta in rows.groupby("beta", sort=False):
        for proposal, group in by_beta.groupby("proposal", sort=False):
            label = _proposal_label(proposal)
            seeds = sorted({int(s) for s in group["seed"]})  # a mismatched rung may run on one seed only
            # "on every seed (3" / "on seed 0 (the only one run", closed by the sentence that uses it
            every = f"on every seed ({len(seeds)}" if len(seeds) > 1 else f"on seed {seeds[0]} (the only one run"
            fewest_by_kl = {}
            for kl, what in (("kl_verdict", "recorded KL"), ("kl_corrected_verdict", "corrected KL")):
                verdicts = {}
                for r in _records(group):
                    if _text(r.get(kl)):
                        verdicts.setdefault(int(r["rollouts"]), {})[int(r["seed"])] = (r["reward_verdict"], r[kl])
                if not verdicts:
                    continue
                fewest = A.fewest_matching(verdicts, seeds)
                tried = ", ".join(str(n) for n in sorted(verdicts))
                if fewest is None:  # why not, at the most rollouts tried: a difference, or an interval too wide to tell
                    most = verdicts[max(verdicts)]
                    why = ", ".join(f"seed {seed}: reward {A.MARK[v[0]]} {what} {A.MARK[v[1]]}" for seed, v in sorted(most.items()))
                    matched = f"no n in {{{tried}}} matches rho*_(beta,k) in reward and {what} {every}; n = {max(verdicts)}: {why})"
                    fewest_by_kl[what] = f"none of {tried}"
                else:
                    matched = f"n = {fewest} rollouts match rho*_(beta,k) in reward and {what} {every})"
                    fewest_by_kl[what] = str(fewest)
                page.check(f"beta {beta:g}, {label}: {matched}")
            needed.append(
                [f"{beta:g}", label, ", ".join(map(str, seeds))] + [fewest_by_kl.get(what, "-") for what in ("recorded KL", "corrected KL")]
            )
    page.text(
        "## Rollouts needed, in one table\n\nThe fewest rollouts n a candidate at which the decoder matches "
        "rho*_(beta,k) in reward and in KL (✓ above) on every seed it ran on; 'none of ...' where no n tried does (a "
        "difference or an interval too wide to tell: the rows above say which). Recorded KL carries the Jensen gap of "
        "one noisy value per step; corrected KL (n >= 2) removes its delta-method estimate."
    )
    header = ["beta", "proposal q", "seeds", "n (recorded KL)", "n (corrected KL)"]
    page.table("rollouts_fewest", header, needed, pd.DataFrame(needed, columns=header))
    transfer_against_pi_k(rows, data.per_prompt, page)


def transfer_against_pi_k(rows, per_prompt, page: Page) -> None:
    """The rung and the mixture against pi_k's own rollouts at the same beta, n and seed, paired by prompt: the
    difference in reward and in KL (recorded; corrected where both runs have it). Lower KL at the same reward is
    closer to rho*_(beta,k) (its KL is the least any decoder of that reward can have)."""
    reference = {(r["beta"], r["rollouts"], r["seed"]): r["run"] for r in _records(rows) if r["proposal"] == "sft"}
    table, claims = [], {}
    for r in _records(rows):
        other = reference.get((r["beta"], r["rollouts"], r["seed"]))
        if r["proposal"] == "sft" or other is None:
            continue
        cells = [f"{r['beta']:g}", _proposal_label(r["proposal"]), r["rollouts"], r["seed"]]
        for column in ("reward", "kl", "kl_corrected"):
            diff, se = A.paired_if_recorded(per_prompt, r["run"], other, column)
            cells.append("-" if diff is None else fmt(diff, se))
            if diff is not None:
                claims.setdefault((r["beta"], r["proposal"], r["rollouts"], column), {})[int(r["seed"])] = (diff, se)
        table.append(cells)
    if not table:
        return
    page.text(
        "## Transfer against pi_k at the same n\n\nEach proposal minus pi_k's own rollouts (the optimal decoder of "
        "today), same beta, n and seed, paired by prompt. At the same reward, lower KL is closer to rho*_(beta,k)."
    )
    page.table("against_pi_k", ["beta", "proposal q", "n", "seed", "reward", "recorded KL", "corrected KL"], table)
    names = {"reward": "reward", "kl": "recorded KL", "kl_corrected": "corrected KL"}
    for (beta, proposal, n, column), by_seed in claims.items():
        if column == "reward":
            continue
        page.check(f"beta {beta:g}, n = {n}: {_proposal_label(proposal)} minus pi_k in {names[column]}: {A.seed_claim(by_seed)}")


def _optimum_points(curves: dict, seed: int, top_k: int | None):
    key = f"rho*_(beta,{top_k})" if top_k else "rho*_beta_by_prompt"
    return (curves.get(key) or {}).get(str(seed))


def smollm2_methods(data: StudyData, page: Page) -> None:
    import pandas as pd

    points = data.points
    reference = points[points["arm"] == "baseline"]
    page.text(
        "## The methods on SmolLM2\n\nΔ and win/tie/lose are paired by prompt against the DPO baseline decoded alone; "
        "r_bl is the on-topic reward."
    )
    rows, frame = [], []
    for r in _records(points):
        diff = se = wins = None
        if r["arm"] != "baseline" and not reference.empty:
            if data.per_prompt is not None:
                diff, se, _ = A.paired(data.per_prompt, r["run"], reference["run"].iloc[0])
                a = data.per_prompt[data.per_prompt["run"] == r["run"]].set_index("prompt_id")["reward"]
                b = data.per_prompt[data.per_prompt["run"] == reference["run"].iloc[0]].set_index("prompt_id")["reward"]
                shared = [p for p in a.index if p in b.index]
                rates = win_tie(a.loc[shared].tolist(), b.loc[shared].tolist())
                wins = (rates["win_rate"], rates["tie_rate"], rates["lose_rate"])
            elif "comparison" in data.tables:
                c = data.tables["comparison"]
                match = c[c["run"].astype(str).str.endswith(r["run"])]
                if not match.empty:
                    m = match.iloc[0]
                    diff, se = m["reward_diff_vs_reference"], m["reward_diff_vs_reference_stderr"]
                    wins = (m["win_rate"], m["tie_rate"], m["lose_rate"])
        significance = None
        if diff is not None and se is not None:
            ratio = abs(diff) / se if se else math.inf
            significance = f"{'differs from' if ratio > A.Z else 'does not differ significantly from'} the baseline ({ratio:.2f} s.e.)"
            page.check(f"{r['label']}: Δ {fmt(diff, se)}, {significance}")
        rows.append(
            [
                r["label"],
                fmt(r["reward_mean"], r["reward_stderr"]),
                fmt(diff, se) if diff is not None else "–",
                "/".join(f"{w:.0f}" for w in wins) if wins else "–",
                fmt(r.get("baseline_reward_mean"), r.get("baseline_reward_stderr")),
                fmt(r["diversity"]),
                fmt(r["coherence"]),
                f"{r['seconds_per_response']:.2f}",
            ]
        )
        frame.append({"label": r["label"], "run": r["run"], "reward_diff": diff, "reward_diff_se": se, "significance": significance})
    page.table(
        "methods",
        ["method", "VADER r", "Δ vs baseline", "win/tie/lose %", "on-topic r_bl", "diversity", "coherence", "s / response"],
        rows,
        pd.DataFrame(frame),
    )
    if data.per_prompt is None and "comparison" in data.tables:
        page.text("Δ and win/tie/lose as `tqstar evaluate -r <baseline run>` wrote them (inputs/comparison.csv); " + NO_PER_PROMPT + ".")


SOFT_ARMS = {"soft_transfer": "soft transfer (DPO rollouts)", "soft_sft": "soft decoder (SFT rollouts)"}


def _soft_arm(arm: str) -> str | None:
    """soft_transfer / soft_sft for the sweep's soft arms (soft_transfer_n4, ...), else None."""
    return next((name for name in SOFT_ARMS if str(arm).startswith(name)), None)


def _arm_label(r: dict) -> str:
    """A point of the SmolLM2 soft-transfer sweep as a reader names it: the arm and its n (samples or rollouts)."""
    if r["arm"] == "best_of_n":
        return f"best-of-{int(r['n'])}"
    if _soft_arm(r["arm"]):
        return f"{SOFT_ARMS[_soft_arm(r['arm'])]}, n = {int(r['rollout_num'])}"
    return {"sft": "SFT sampled", "baseline": "DPO baseline sampled"}.get(r["arm"], str(r["arm"]))


def _seed_text(seed) -> str:
    return "" if seed is None or seed != seed else str(int(seed))


def smollm2_soft_transfer(data: StudyData, page: Page) -> None:
    """5d of the soft-transfer issue: on the SmolLM2 build, the soft decoder (beta 0.1) with its rollouts from the DPO
    baseline weighted back to pi_k, against the same decoder rolling out pi_k, at the same n; the DPO baseline, the
    SFT model and best-of-N beside them. Every arm samples, so each reward is read with the KL it spends."""
    import pandas as pd

    page.text(
        "## Soft transfer on SmolLM2\n\nThe soft decoder aims at rho*_(0.1,k) of VADER (soft value, alpha = 1/beta, "
        "sampled, k = 5, rollouts of 10 tokens): its rollouts are drawn from the DPO baseline (restricted to pi_sft's top "
        "k) and weighted back to pi_k (soft transfer), or from pi_k itself (SFT rollouts). KL to the SFT model: the "
        "decoder's recorded one (E[KL(p ‖ pi_sft)] over its value noise), the corrected one (less the predicted Jensen "
        "gap, which needs n >= 2 rollouts), and for best-of-N the analytic bound log n - (n-1)/n. ESS: the weights' "
        "effective sample size / n."
    )
    points = data.points.copy()
    order = {"sft": 0, "baseline": 1, "best_of_n": 2, "soft_sft": 3, "soft_transfer": 4}
    points["order"] = [order.get(_soft_arm(a) or a, 9) for a in points["arm"]]
    points["n_sort"] = points["n"].fillna(0) + points["rollout_num"].fillna(0)
    points = points.sort_values(["seed", "order", "n_sort"])
    points["display"] = [_arm_label(r) for r in _records(points)]

    def number(r: dict, key: str, form: Callable[[float], str]) -> str:
        value = r.get(key)
        return "-" if value is None or value != value else form(float(value))

    def cell(r: dict, key: str) -> str:
        return number(r, key, lambda value: fmt(value, r.get(f"{key.removesuffix('_mean')}_stderr")))

    rows = []
    for r in _records(points):
        bound = r.get("kl_source") == "best_of_n_bound"
        rows.append(
            [
                r["display"],
                _seed_text(r.get("seed")),
                r["num_prompts"],
                cell(r, "reward_mean"),
                cell(r, "gold_reward_mean"),
                cell(r, "kl") + (" (bound)" if bound else ""),
                cell(r, "kl_corrected"),
                cell(r, "baseline_reward_mean"),
                cell(r, "coherence"),
                number(r, "ended_share", lambda v: f"{100 * v:.0f}%"),
                number(r, "ess_fraction", lambda v: f"{v:.2f}"),
                number(r, "flops_per_response", lambda v: f"{v:.2e}"),
                number(r, "seconds_per_response", lambda v: f"{v:.2f}"),
            ]
        )
    page.table(
        "arms",
        ["method", "seed", "prompts", "VADER r", "judge", "KL to SFT", "corrected KL", "on-topic r_bl", "coherence", "ended", "ESS / n"]
        + ["FLOPs / response", "s / response"],
        rows,
        points.drop(columns=["order", "n_sort"]),
    )
    if data.per_prompt is None:
        page.missing("the paired comparisons", NO_PER_PROMPT)
        return
    comparisons, frame = [], []

    def size(r: dict) -> int | None:  # what tells apart points of one arm: rollouts (soft arms), samples (best-of-N)
        return int(r["rollout_num"]) if _soft_arm(r["arm"]) else int(r["n"]) if r["arm"] == "best_of_n" else None

    runs = {(_soft_arm(r["arm"]) or r["arm"], size(r), r["seed"]): r for r in _records(points)}
    for (arm, n, seed), r in runs.items():
        pairs = []
        if arm == "soft_transfer" and ("soft_sft", n, seed) in runs:
            pairs.append((runs[("soft_sft", n, seed)], ("reward", "gold_reward", "kl", "kl_corrected")))
        if arm != "baseline" and ("baseline", None, seed) in runs:
            pairs.append((runs[("baseline", None, seed)], ("reward", "gold_reward")))
        for other, columns in pairs:
            cells = [f"{r['display']} − {other['display']}", _seed_text(seed)]
            for column in ("reward", "gold_reward", "kl", "kl_corrected"):
                diff, se = A.paired_if_recorded(data.per_prompt, r["run"], other["run"], column) if column in columns else (None, None)
                cells.append("-" if diff is None else fmt(diff, se))
                if diff is not None:
                    frame.append({"comparison": cells[0], "seed": _seed_text(seed), "column": column, "diff": diff, "se": se})
            comparisons.append(cells)
    page.text(
        "## Paired by prompt\n\nSoft transfer against SFT rollouts at the same n, and every arm against the DPO baseline "
        "sampled. The judge (the runs' gold reward, e.g. AFINN with `tqstar sweep -g afinn`) guides no decoder: a method that "
        "raises VADER but not the judge may be gaming VADER's lexicon."
    )
    page.table("paired", ["comparison", "seed", "VADER r", "judge", "recorded KL", "corrected KL"], comparisons, pd.DataFrame(frame))
    _judge_agreement(points[points["arm"] == "sft"], data.per_prompt, page)
    claims: dict[tuple[str, str], dict[int, tuple]] = {}
    for f in frame:
        claims.setdefault((f["comparison"], f["column"]), {})[f["seed"]] = (f["diff"], f["se"])
    names = {"reward": "VADER r", "gold_reward": "judge", "kl": "recorded KL", "kl_corrected": "corrected KL"}
    for (comparison, column), by_seed in claims.items():
        page.check(f"{comparison}, {names[column]}: {A.seed_claim(by_seed)}")


def _judge_agreement(sft_points, per_prompt, page: Page) -> None:
    """How far the judge (gold reward) agrees with VADER on the SFT model's own samples, one check per seed."""
    from ..rewards import judge_agreement

    for r in _records(sft_points):
        rows = per_prompt[per_prompt["run"] == r["run"]]
        if "gold_reward" not in rows.columns or rows["gold_reward"].isna().all():
            continue
        a = judge_agreement(rows["reward"].tolist(), rows["gold_reward"].tolist())
        if a["pearson"] is None:
            continue
        page.check(
            f"seed {_seed_text(r.get('seed'))}: the judge against VADER on the SFT model's samples: Pearson {a['pearson']:.2f}, "
            f"Spearman {a['spearman']:.2f}, same sign on {100 * a['sign_agreement']:.0f}% of {a['n']}"
        )


STUDY_METHODS = {  # arm (less a leading "sampled_") -> how the page names it, in the order it lists them
    "sft": "SFT",
    "baseline": "DPO baseline",
    "best_of_n": "best-of-N",
    "top_k": "SFT top-k (alpha 0)",
    "args": "ARGS",
    "cd": "CD",
    "tqstar": "TQ* direct",
    "indirect": "TQ* indirect",
    "indirect_sn": "TQ* indirect, self-normalised",
    "soft_sft": SOFT_ARMS["soft_sft"],  # the soft value, alpha = 1/beta, rollouts from pi_k
    "soft_transfer": SOFT_ARMS["soft_transfer"],  # the same, rollouts from the DPO baseline weighted back to pi_k
}
STUDY_KNOB = {"best_of_n": "n", "indirect": "beta_bl", "indirect_sn": "beta_bl", "soft_sft": "rollout_num", "soft_transfer": "rollout_num"}
STUDY_SOFT_ARMS = ["sampled_soft_sft", "sampled_soft_transfer"]
STUDY_METRICS = (
    "reward_mean",
    "gold_reward_mean",
    "baseline_reward_mean",
    "coherence",
    "diversity",
    "ended_share",
    "kl",
    "seconds_per_response",
)


def _study_label(r: dict) -> str:
    """A point of the SmolLM2 study as a reader names it: the method, and what tells its points apart (N, beta_bl,
    alpha where the arm is sampled and guided)."""
    sampled = str(r["arm"]).startswith("sampled_")
    base = str(r["arm"]).removeprefix("sampled_")
    name = STUDY_METHODS.get(base, base)
    if base == "best_of_n":
        return f"best-of-{int(r['n'])}"
    if base in ("indirect", "indirect_sn"):
        name = f"{name}, beta_bl {float(r['beta_bl']):g}"
    if base in ("soft_sft", "soft_transfer"):
        return f"{name}, n = {int(r['rollout_num'])}"
    if sampled and base in ("args", "cd", "tqstar"):
        return f"{name}, alpha {float(r['alpha']):g}"
    return name


def _study_order(r: dict) -> tuple:
    base = str(r["arm"]).removeprefix("sampled_")
    order = list(STUDY_METHODS)
    knob = r.get(STUDY_KNOB.get(base, "alpha"))  # what tells an arm's points apart, in its order
    return (order.index(base) if base in order else len(order), float(knob) if knob == knob and knob is not None else 0.0)


def smollm2_study(data: StudyData, page: Page) -> None:
    """Issue 27's study: every method on the SmolLM2 builds of several seeds, greedy (the presets' settings) and sampled
    (reward against KL to the SFT model), VADER beside an independent judge, paired against the DPO baseline and CD."""

    points = data.points.copy()
    if "gold_reward_mean" not in points.columns:
        points["gold_reward_mean"] = points["gold_reward_stderr"] = None
    for column in ("beta_bl", "n", "alpha"):
        if column not in points.columns:
            points[column] = None
    points["display"] = [_study_label(r) for r in _records(points)]
    points["order"] = [_study_order(r) for r in _records(points)]
    points = points.sort_values(["order", "seed"]).drop(columns=["order"])
    sampled_arm = points["arm"].astype(str).str.startswith("sampled_")
    greedy, sampled = points[~sampled_arm], points[sampled_arm]
    seeds = sorted(int(s) for s in points["seed"].dropna().unique())
    _study_builds(page, data.tables.get("premise"))
    page.text(
        "## Greedy, the presets' settings\n\nk = 5 candidates, rollouts of 10 tokens, alpha 1, at most 80 new tokens. Per "
        "method: the mean over build seeds of each run's mean ± the s.e. across seeds [min, max]. VADER is the target "
        "every guided decoder uses; the judge (the sweep's gold reward, AFINN) guides none; on-topic is r_bl (cosine of "
        "question and answer); ended: the share of answers that end (EOS or a stop string) within the cap."
    )
    _study_summary(page, "greedy", greedy)
    _study_paired(page, greedy, data.per_prompt, seeds, ("DPO baseline", "CD"))
    page.text(
        "## Sampled: reward against KL to the SFT model\n\nT = 1 on the first 64 held-out prompts; ARGS, CD and TQ* at "
        "alpha 1 and 10, best-of-N at n = 4 and 16 (its KL: the analytic bound log n − (n−1)/n), and the SFT model "
        "sampled among its top k = 5 tokens (alpha 0, what ARGS, CD and TQ* become without guidance: the KL the top-k "
        "restriction alone spends). KL: the decoder's recorded KL to the SFT model. Best-of-N's line starts at the SFT "
        "model (best-of-1, KL 0), CD's at alpha 0. "
        + (
            "The soft decoder (soft value, alpha = 1/beta = 10, one rollout a candidate) with its rollout from pi_k itself "
            "(SFT rollouts) or from the DPO baseline weighted back to pi_k (soft transfer); n = 4 and recipe v2 (seed 0): "
            "[smollm2_soft_transfer](smollm2_soft_transfer.md)."
            if sampled["arm"].isin(STUDY_SOFT_ARMS).any()
            else "The soft value (SFT or DPO rollouts) is on its own page, [smollm2_soft_transfer](smollm2_soft_transfer.md) "
            "(seed 0 of recipe v2)."
        )
    )
    _study_summary(page, "sampled", sampled, kl=True)
    if not sampled.empty:

        def draw(path):
            from ..plots import plot_frontier

            means = A.across_seeds(
                sampled.assign(method=[d.split(",")[0] for d in sampled["display"]]), ("reward_mean", "kl"), keys=("display", "method")
            )
            plot_frontier(
                means,
                x="kl",
                y="reward_mean",
                label_cols=[],
                path=path,
                yerr="reward_mean_se_seeds",
                group="method",
                title="VADER against KL to the SFT model (sampled; mean over seeds)",
                xlabel="KL to the SFT model (nats a response)",
                ylabel="VADER",
            )

        page.figure("reward_vs_kl", "VADER against KL to the SFT model, sampled arms", draw)
        soft = sampled[sampled["arm"].isin(STUDY_SOFT_ARMS)]
        if soft["arm"].nunique() == 2:  # soft transfer against the same decoder rolling out pi_k, prompt by prompt
            reference = next(d for d in soft["display"] if d.startswith(STUDY_METHODS["soft_sft"]))
            _study_paired(page, soft, data.per_prompt, seeds, (reference,), "sampled")
        # each reference's line starts where its knob is 0: best-of-1 is the SFT model sampled, CD at alpha 0 is the
        # SFT model sampled among its top k tokens (sampled_top_k, which ARGS and TQ* also become at alpha 0)
        guided = sampled[~sampled["arm"].isin(["sampled_best_of_n", "sampled_sft"]) & sampled["kl"].notna()]
        for arms, name in ((("sampled_best_of_n", "sampled_sft"), "best-of-N"), (("sampled_cd", "sampled_top_k"), "CD")):
            reference = sampled[sampled["arm"].isin(arms) & sampled["kl"].notna()]
            compared = guided[~guided["arm"].isin(arms)]
            table = f"matched_kl_{arms[0].removeprefix('sampled_')}"
            _study_matched_kl(page, table, compared.assign(group=compared["display"]), reference, name, seeds)
    if data.per_prompt is not None:
        judge_from = sampled[sampled["arm"] == "sampled_sft"]
        _judge_agreement(judge_from if not judge_from.empty else greedy[greedy["arm"] == "sft"], data.per_prompt, page)
    if hours := _decoding_hours(points, {"greedy": greedy, "sampled": sampled}):
        page.check(
            f"the study's decoding time (each run's response seconds summed, model loading left out; threads per run: see "
            f"Environment): {', '.join(f'{name} {h:.1f} h' for name, h in hours.items())}"
        )
    for arm, name in (("sft", "SFT"), ("baseline", "DPO baseline")):
        shares = _by_seed(greedy[greedy["arm"] == arm], "ended_share")
        if shares:
            below = sorted(s for s, v in shares.items() if v < 0.8)
            verdict = "at least 80% on every seed" if not below else f"below 80% on seed {', '.join(map(str, below))}"
            page.check(f"{name}, greedy: answers that end within the cap: {_per_seed(shares, _percent)} ({verdict})")


def _decoding_hours(points, parts: dict) -> dict[str, float]:
    """Hours of decoding per part of a study (and in all, where there are several): each run's mean seconds a
    response times its prompts, summed (the runs' machine time, whichever invocations ran them; a run without a time
    adds nothing); {} where no run recorded its time."""
    if "seconds_per_response" not in points.columns or points["seconds_per_response"].isna().all():
        return {}

    def hours(frame) -> float:
        return float((frame["seconds_per_response"] * frame["num_prompts"]).sum()) / 3600  # NaN skipped

    per_part = {name: hours(frame) for name, frame in parts.items() if len(frame)}
    return per_part | {"all": hours(points)} if len(per_part) > 1 else per_part or {"all": hours(points)}


def _by_seed(frame, column: str) -> dict[int, float]:
    """{seed: value} of a column over a frame's rows, the rows without a value left out."""
    return {
        int(r["seed"]): r[column]
        for r in _records(frame.sort_values("seed"))
        if r.get(column) == r.get(column) and r.get(column) is not None
    }


def _per_seed(values: dict[int, float], form: Callable[[float], str]) -> str:
    """'seed 0: <value>, seed 1: <value>' in seed order."""
    return ", ".join(f"seed {s}: {form(v)}" for s, v in sorted(values.items()))


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _share(r: dict, metric: str) -> str:
    """An across-seeds share as a percentage, [min, max] over seeds."""
    value = r.get(metric)
    if value is None or value != value:
        return "-"
    return f"{100 * value:.0f}%" + (f" [{100 * r[f'{metric}_min']:.0f}, {100 * r[f'{metric}_max']:.0f}]" if r.get("seeds", 1) > 1 else "")


def _study_builds(page: Page, premise) -> None:
    """The builds the study ran on, from their manifests: each DPO baseline against rho*_beta of the reward it was
    aligned to, and the share of sampled answers that end within the cap (the SFT model's, the baseline's, rho*'s)."""
    if premise is None or premise.empty:
        page.missing("the builds' premise table", "no build manifest found for the runs (built on another machine?)")
        return
    page.text(
        "## The builds\n\nEach seed is its own build (prompts, SFT samples, preference pairs, DPO), measured by the build "
        "on its first 64 held-out prompts, sampled at T = 1: each DPO baseline's reward against E_rho*_beta[r] of the reward "
        "it was aligned to (self-normalised importance sampling from SFT samples), KL to the SFT model against rho*'s, the "
        "implied-reward slope (1 at the optimum), and the share of answers that end by themselves within the cap. Mean ± "
        "s.e. across seeds [min, max]."
    )
    fields = (*PREMISE_FIELDS, ("ended", "ended"), ("optimum_ended", "rho*'s ended (IS)"), ("sft_ended", "SFT ended"))
    table = A.across_seeds(
        premise.assign(label=premise["baseline"]), [f for f, _ in fields] + ["build_seconds"], keys=("label", "reward", "beta")
    )
    rows = []
    for r in _records(table):
        cells = [r["label"], f"{'r' if r['reward'] == 'target_reward' else 'r_bl'}, {r['beta']:g}", r["seeds"]]
        cells += [fmt_across(r, f) for f, _ in PREMISE_FIELDS] + [_share(r, f) for f in ("ended", "optimum_ended", "sft_ended")]
        rows.append(cells)
    page.table("builds", ["baseline", "aligned to", "seeds", *[title for _, title in fields]], rows, table)
    builds = premise.drop_duplicates("seed")
    for name, frame, column in [*((n, g, "ended") for n, g in premise.groupby("baseline", sort=False)), ("SFT model", builds, "sft_ended")]:
        if ended := _by_seed(frame, column):
            page.check(f"{name}: sampled answers that end within the cap: {_per_seed(ended, _percent)}")
    if times := _by_seed(builds, "build_seconds"):
        page.check(f"build time (the manifest's, on the machine that built it): {_per_seed(times, lambda v: f'{v:,.0f} s')}")


def _study_summary(page: Page, name: str, points, kl: bool = False) -> None:
    if points.empty:
        page.missing(f"the {name} table", "no point of these arms has run")
        return
    table = A.across_seeds(points, STUDY_METRICS, keys=("display",))
    header = ["method", "seeds", "prompts", "VADER", "judge", "on-topic r_bl", "coherence", "diversity", "ended"]
    header += ["KL to SFT"] if kl else []
    rows = []
    for r in _records(table):
        prompts = points[points["display"] == r["display"]]["num_prompts"]
        cells = [
            r["display"],
            r["seeds"],
            f"{int(prompts.min())}" if prompts.nunique() == 1 else f"{int(prompts.min())}-{int(prompts.max())}",
        ]
        cells += [fmt_across(r, m) for m in ("reward_mean", "gold_reward_mean", "baseline_reward_mean", "coherence", "diversity")]
        cells.append(_share(r, "ended_share"))
        if kl:
            cells.append(fmt_across(r, "kl"))
        rows.append(cells + [f"{r['seconds_per_response']:.2f}" if r.get("seconds_per_response") == r.get("seconds_per_response") else "-"])
    page.table(name, header + ["s / response"], rows, table)


def _study_paired(page: Page, greedy, per_prompt, seeds: list[int], references: tuple, part: str = "greedy") -> None:
    """Every method of one part (greedy, sampled) against each reference, paired by prompt per seed, in VADER and the
    judge; a seed where VADER rises by 2 s.e. or more while the judge does not is named (a sign of gaming VADER)."""
    import pandas as pd

    if per_prompt is None:
        page.missing(f"the paired comparisons, {part}", NO_PER_PROMPT)
        return
    page.text(
        f"### Paired by prompt, {part}\n\nEach method minus "
        f"{' and minus '.join('the DPO baseline alone' if r == 'DPO baseline' else r for r in references)}, per seed, on the prompts "
        "both decoded: mean ± s.e. 'VADER only': seeds where VADER rises by 2 s.e. or more but the judge does not."
    )
    runs = {(r["display"], int(r["seed"])): r["run"] for r in _records(greedy)}
    methods = list(dict.fromkeys(greedy["display"]))
    rows, frame = [], []
    for reference in references:
        for method in methods:
            if method == reference:
                continue
            cells_by_column = {}
            for column in ("reward", "gold_reward"):
                by_seed = {}
                for seed in seeds:
                    a, b = runs.get((method, seed)), runs.get((reference, seed))
                    if a is None or b is None:
                        continue
                    diff, se = A.paired_if_recorded(per_prompt, a, b, column)
                    if diff is not None:
                        by_seed[seed] = (diff, se)
                        frame.append({"comparison": f"{method} - {reference}", "column": column, "seed": seed, "diff": diff, "se": se})
                cells_by_column[column] = by_seed
            vader, judge = cells_by_column["reward"], cells_by_column["gold_reward"]
            if not vader:
                continue
            only = [
                s
                for s, (d, se) in vader.items()
                if se and d > A.Z * se and not (s in judge and judge[s][1] and judge[s][0] > A.Z * judge[s][1])
            ]
            title = f"{method} − {reference}"
            for column, label in (("reward", "VADER"), ("gold_reward", "judge")):
                by_seed = cells_by_column[column]
                if not by_seed:
                    continue
                claim = A.seed_claim(by_seed)
                absent = [s for s in seeds if s not in by_seed]
                if absent:  # a partial study: "every seed" means the seeds this pair ran on
                    claim += f"; not run on seed {', '.join(map(str, absent))}"
                rows.append(
                    [title, label, *[fmt(*by_seed[s]) if s in by_seed else "–" for s in seeds], claim]
                    + [(", ".join(map(str, only)) or "none") if column == "reward" and judge else ""]
                )
                page.check(f"{part}, {title}, {label}: {claim}")
    page.table(
        "paired" if part == "greedy" else f"paired_{part}",
        ["comparison", "measure", *[f"seed {s}" for s in seeds], "on every seed", "VADER only"],
        rows,
        pd.DataFrame(frame),
    )


def _study_matched_kl(page: Page, table: str, points, reference, name: str, seeds: list[int]) -> None:
    """Sampled points against a reference curve (best-of-N over n, CD over alpha) at the same KL, per seed."""
    import pandas as pd

    if points.empty or reference.empty:
        page.missing(f"matched KL against {name}", "no sampled guided points with a KL, or no reference points")
        return
    page.text(
        f"### At matched KL: against {name}\n\nEach sampled point minus {name}'s VADER at the same KL on the same seed "
        f"({name}'s reward linear in KL between its points; – where the point's KL is outside them). Difference ± "
        "sqrt(s.e.² + interpolated s.e.²) (unpaired runs)."
    )
    rows, frame = [], []
    ran = {(str(g), int(s)) for g, s in zip(points["group"], points["seed"])} | {("reference", int(s)) for s in reference["seed"]}
    for r in A.against_curve_at_kl(points, reference, keys=("group",)):
        cells = [fmt(*r["by_seed"][s]) if s in r["by_seed"] else "–" for s in seeds]
        claim = r["claim"]
        absent = [s for s in seeds if (str(r["group"]), s) not in ran or ("reference", s) not in ran]
        if absent:  # a partial study: "every seed" means the seeds both ran on
            claim += f"; not run on seed {', '.join(map(str, absent))}"
        if outside := [s for s in seeds if s not in absent and s not in r["by_seed"]]:  # ran, but past the line's ends
            claim += f"; its KL outside {name}'s points on seed {', '.join(map(str, outside))}"
        rows.append([r["group"], *cells, claim])
        frame += [{"point": r["group"], "seed": s, "diff": d, "se": se} for s, (d, se) in r["by_seed"].items()]
        if r["by_seed"]:
            page.check(f"sampled, {r['group']} − {name} at matched KL: {claim}")
    page.table(table, ["point", *[f"seed {s}" for s in seeds], "on every seed"], rows, pd.DataFrame(frame))


PREMISE_FIELDS = (
    ("sampled_reward", "sampled reward"),
    ("optimum_reward", "E_rho*[r] (IS)"),
    ("gap", "gap"),
    ("kl", "KL(rho_bl ‖ sft)"),
    ("optimum_kl", "KL(rho* ‖ sft)"),
    ("implied_slope", "implied slope"),
)


def synthetic_premise(data: StudyData, page: Page) -> None:
    premise = data.tables.get("premise")
    if premise is None:
        page.missing("the premise table", "no build manifests and no archived premise table")
        return
    page.text(
        "## Each baseline against the optimum it was built for\n\nOn the build's held-out prompts: the baseline's sampled "
        "(T=1) reward against a self-normalised importance-sampling estimate of E_rho*_beta[r] from SFT samples, KL to the "
        "SFT model against KL(rho*_beta ‖ pi_sft), and the implied-reward slope (1 at the optimum). Mean ± s.e. over seeds "
        "[min, max]."
    )
    table = A.across_seeds(premise.assign(label=premise["baseline"]), [f for f, _ in PREMISE_FIELDS], keys=("label",))
    page.table(
        "premise",
        ["baseline", "seeds", *[title for _, title in PREMISE_FIELDS]],
        [[r["label"], r["seeds"], *[fmt_across(r, f) for f, _ in PREMISE_FIELDS]] for r in _records(table)],
        table,
    )
    ladder = premise[premise["reward"] == "target_reward"]
    ordered = []
    for _seed, group in ladder.groupby("seed"):
        rewards = group.sort_values("beta", ascending=False)["sampled_reward"].tolist()
        ordered.append(all(b > a for a, b in zip(rewards, rewards[1:])))
    page.check(
        "the ladder's sampled reward rises as beta falls on "
        + ("every seed" if all(ordered) else f"{sum(ordered)} of {len(ordered)} seeds")
        + f" ({len(ordered)} seeds)"
    )
    gaps, ratios = premise["gap"], premise["kl"] / premise["optimum_kl"]
    page.check(
        f"every baseline on every seed falls short of its optimum's reward by {-gaps.max():.3f} to {-gaps.min():.3f}"
        if (gaps < 0).all()
        else f"gap to the optimum's reward ranges {gaps.min():+.3f} to {gaps.max():+.3f} (not below zero everywhere)"
    )
    page.check(f"KL(rho_bl ‖ sft) / KL(rho* ‖ sft): {ratios.min():.2f} to {ratios.max():.2f} over baselines and seeds")


@dataclass(frozen=True)
class Study:
    """A results page: its title, its renderer, and whether a sweep source needs the synthetic optimum curves."""

    name: str
    title: str
    render: Callable[[StudyData, Page], None]
    synthetic_curves: bool = False


STUDIES = {
    s.name: s
    for s in (
        Study("transfer_study", "When does transfer help? The transfer study", transfer_study, synthetic_curves=True),
        Study("compute_frontier", "At equal compute: the reward-compute frontier", compute_frontier),
        Study("proxy_guided", "Guided by a learned proxy, judged by the gold reward", proxy_guided),
        Study("optimal_check", "Ground truth: the optimal decoder against rho*_(beta,k)", optimal_check),
        Study("soft_transfer", "Soft transfer: rollouts needed to reach rho*_(beta,k)", soft_transfer),
        Study("smollm2_methods", "The methods on SmolLM2-135M with a DPO baseline", smollm2_methods),
        Study("smollm2_soft_transfer", "Soft transfer on SmolLM2: DPO rollouts against SFT rollouts", smollm2_soft_transfer),
        Study("smollm2_study", "The methods on SmolLM2 over build seeds, with an independent judge", smollm2_study),
        Study("synthetic_premise", "The synthetic testbed's baselines against the optimum", synthetic_premise),
    )
}
