"""The premise checks of the SmolLM2 baselines on the held-out prompts, and the build's headline.

Each DPO baseline is measured against the optimum its DPO objective aims at, rho*_beta ∝ pi_sft ·
e^{r/beta} with beta its DPO beta and r the reward its pairs were labelled by (tqstar.premise, the
functions the synthetic build uses): SFT samples (``premise_sft_samples`` per prompt) give the
importance-sampling estimates of E_{rho*_beta}[r] and KL(rho*_beta || pi_sft); each baseline is sampled
``premise_policy_samples`` times per prompt with the SFT model scoring the same tokens, for its sampled
reward, KL(rho_bl || pi_sft) and the slope of its implied reward beta · log(rho_bl / pi_sft) on r.

The headline: the DPO baseline's sampled mean target reward (VADER) minus the SFT model's, paired by
prompt (per-prompt means of each, then the mean and s.e. of the differences over prompts); the
recipe is meant to make it at least ``HEADLINE_SE`` standard errors above zero. Both models are
sampled with the same per-row seeds, so the pairing also shares their sampling noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..stats import mean_and_stderr
from .params import Smollm2Params

HEADLINE_SE = 3.0  # the DPO baseline must beat the SFT model on r by at least this many standard errors
REWARD_KEYS = ("target_reward", "baseline_reward")


def rounded(data):
    if isinstance(data, float):
        return round(data, 4)
    if isinstance(data, dict):
        return {k: rounded(v) for k, v in data.items()}
    if isinstance(data, list):
        return [rounded(v) for v in data]
    return data


def by_prompt(rows: list[dict], key: str) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(int(row["prompt_index"]), []).append(row[key])
    return groups


def paired_gain(policy_rows: list[dict], sft_rows: list[dict], key: str) -> dict:
    """Mean over prompts of (the policy's mean ``key`` - the SFT model's mean ``key``) on that prompt, its s.e.
    and the ratio of the two (``z``), over the prompts both were sampled on."""
    policy, sft = by_prompt(policy_rows, key), by_prompt(sft_rows, key)
    diffs = [sum(policy[i]) / len(policy[i]) - sum(sft[i]) / len(sft[i]) for i in sorted(policy) if i in sft]
    mean, se = mean_and_stderr(diffs)
    z = None if mean is None or not se else mean / se
    return {"difference": mean, "se": se, "z": z, "prompts": len(diffs)}


def premise_checks(
    folder: Path, prompts: list[str], params: Smollm2Params, seed: int, task: Callable[..., Callable] | None = None
) -> tuple[dict, dict, dict[str, list[dict]]]:
    """(checks per model, the headline, the held-out samples per model) on ``prompts``.
    ``task(description, total)`` makes a progress callback."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import premise
    from .sampling import sample

    task = task or (lambda description, total: lambda **k: None)
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    sft = AutoModelForCausalLM.from_pretrained(folder / "sft", dtype=torch.float32).eval()
    sft_rows = sample(
        sft, tokenizer, prompts, params.premise_sft_samples, params.max_new_tokens, seed, update=task("premise: SFT samples", len(prompts))
    )

    def rewards_by_prompt(rows: list[dict], key: str) -> list[list[float]]:
        groups = by_prompt(rows, key)
        return [groups[i] for i in sorted(groups)]

    checks: dict[str, dict] = {"sft": {key: premise.sample_reward([r[key] for r in sft_rows], _prompt_of(sft_rows)) for key in REWARD_KEYS}}
    checks["sft"]["finished_frac"] = sum(r["finished"] for r in sft_rows) / len(sft_rows)
    # rho*_beta's reward-KL frontier of the target reward over a grid of beta: what no decoder of pi_sft can beat
    checks["sft"]["optimum_curve"] = {"target_reward": premise.optimum_curve(rewards_by_prompt(sft_rows, "target_reward"))}
    samples = {"sft": sft_rows}
    sft_finished = [[float(f) for f in g] for g in rewards_by_prompt(sft_rows, "finished")]  # 1 for an answer that ended
    for name, (key, beta) in params.baselines.items():
        model = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32).eval()
        rows = sample(
            model,
            tokenizer,
            prompts,
            params.premise_policy_samples,
            params.max_new_tokens,
            seed,
            update=task(f"premise: {name} samples", len(prompts)),
            sft_model=sft,
        )
        del model
        prompt_of = _prompt_of(rows)
        checks[name] = {
            **premise.baseline_checks(rows, rewards_by_prompt(sft_rows, key), key, beta),
            # the share of rho*_beta's responses that end within the cap: what a baseline close to it can reach
            "optimum_finished_frac": premise.optimum_expectation(rewards_by_prompt(sft_rows, key), sft_finished, beta),
            # both rewards of its samples, and what it gains over the SFT model on each (paired by prompt)
            "sampled": {k: premise.sample_reward([r[k] for r in rows], prompt_of) for k in REWARD_KEYS},
            "gain_over_sft": {k: paired_gain(rows, sft_rows, k) for k in REWARD_KEYS},
        }
        samples[name] = rows
    gain = checks["dpo"]["gain_over_sft"]["target_reward"]
    headline = {
        "statement": f"dpo's sampled mean target reward (VADER) exceeds the SFT model's by at least {HEADLINE_SE:g} s.e. (paired by prompt)",
        **gain,
        "threshold_se": HEADLINE_SE,
        "passes": gain["z"] is not None and gain["z"] >= HEADLINE_SE,
    }
    return rounded(checks), rounded(headline), samples


def _prompt_of(rows: list[dict]) -> list[int]:
    return [int(r["prompt_index"]) for r in rows]
