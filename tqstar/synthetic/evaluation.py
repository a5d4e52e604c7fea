"""Evaluation of the synthetic task's models on held-out prompts: greedy rewards, and the premise checks.

The premise checks (tqstar.premise) measure each baseline against the optimum it was built for,
rho*_beta ∝ pi_sft · e^{r/beta}: (a) its sampled (T=1) mean reward against a self-normalised
importance-sampling estimate of E_{rho*_beta}[r] from SFT samples, (b) KL(rho_bl || pi_sft) per
response against KL(rho*_beta || pi_sft), (c) the slope of beta · log(rho_bl / pi_sft) on r (1 at the optimum).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..stats import mean_and_stderr
from .generation import generate

EVAL_BATCH_PROMPTS = 128


def summary(xs: list[float]) -> dict:
    """``{"mean", "se", "n"}``, rounded to 4 digits (None where undefined, as in tqstar.stats)."""
    mean, se = mean_and_stderr(xs)
    return {"mean": None if mean is None else round(mean, 4), "se": None if se is None else round(se, 4), "n": len(xs)}


def evaluate_folder(folder: Path, prompts: list[str], max_new_tokens: int, update: Callable[..., None] = lambda **k: None) -> dict:
    """Greedy decoding of one saved model on ``prompts``: rewards (mean, s.e.), lengths, samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rewards import baseline_reward, target_reward

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, selection="greedy", batch_size=EVAL_BATCH_PROMPTS, update=update
    )
    responses = [o["response"] for o in outs]
    return {
        "target_reward": summary(target_reward(prompts, responses)),
        "baseline_reward": summary(baseline_reward(prompts, responses)),
        "mean_new_tokens": round(sum(o["n_tokens"] for o in outs) / len(outs), 2),
        "mean_words": round(sum(len(r.split()) for r in responses) / len(responses), 2),
        "finished_frac": round(sum(o["finished"] for o in outs) / len(outs), 4),
        "samples": [{"prompt": p, "response": r} for p, r in list(zip(prompts, responses))[:3]],
    }


def _rounded(data):
    if isinstance(data, float):
        return round(data, 4)
    if isinstance(data, dict):
        return {k: _rounded(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_rounded(v) for v in data]
    return data


def premise_checks(
    folder: Path, prompts: list[str], baselines: dict[str, tuple[str, float]], params, seed: int, task: Callable[..., Callable] = None
) -> dict:
    """The three checks for each baseline (``name -> (reward key, beta)``), on ``prompts``.

    SFT samples (``premise_sft_samples`` per prompt) give the importance-sampling estimates of
    rho*_beta; each baseline is sampled ``premise_policy_samples`` times per prompt with the SFT
    model scoring the same tokens. ``task(description, total)`` makes a progress callback."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import premise
    from .distill import rewards_by_prompt, sample_responses

    task = task or (lambda description, total: lambda **k: None)
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    sft = AutoModelForCausalLM.from_pretrained(folder / "sft", dtype=torch.float32).eval()
    sft_rows = sample_responses(
        sft, tokenizer, prompts, params, seed, params.premise_sft_samples, update=task("premise: SFT samples", len(prompts))
    )
    checks: dict[str, dict] = {
        "sft": {
            key: premise.sample_reward([r[key] for r in sft_rows], [r["prompt_index"] for r in sft_rows])
            for key in ("target_reward", "baseline_reward")
        }
    }
    # rho*_beta's reward-KL frontier of the target reward over a grid of beta: what no decoder can beat
    checks["sft"]["optimum_curve"] = {"target_reward": premise.optimum_curve(rewards_by_prompt(sft_rows, "target_reward"))}
    for name, (key, beta) in baselines.items():
        model = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32).eval()
        rows = sample_responses(
            model,
            tokenizer,
            prompts,
            params,
            seed,
            params.premise_policy_samples,
            update=task(f"premise: {name} samples", len(prompts)),
            sft_model=sft,
        )
        checks[name] = premise.baseline_checks(rows, rewards_by_prompt(sft_rows, key), key, beta)
    return _rounded(checks)


def truncated_optimum_curve(
    folder: Path,
    prompts: list[str],
    params,
    seed: int,
    top_k: int,
    samples: int,
    betas=None,
    update: Callable[..., None] = lambda **k: None,
) -> list[dict]:
    """rho*_{beta,k}'s reward-KL curve: the optimum a decoder that only ever picks among pi_sft's top ``top_k``
    tokens can reach (rho*_{beta,k} ∝ pi_k · e^{r/beta}, pi_k = pi_sft truncated to its top k at every step).

    Importance-sampled like the build's curve, from ``samples`` responses per prompt of pi_k; each response's
    truncation cost, log pi_k(y) - log pi_sft(y), enters the KL to pi_sft (tqstar.premise.optimum_curve).
    The optimal decoder with rollouts of pi_k (experiment=synthetic_optimal: decoder.rollout.top_k =
    decoder.top_k) samples rho*_{beta,k} exactly, up to the Monte-Carlo error of its soft values."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import premise
    from .distill import rewards_by_prompt, sample_responses

    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    sft = AutoModelForCausalLM.from_pretrained(folder / "sft", dtype=torch.float32).eval()
    rows = sample_responses(sft, tokenizer, prompts, params, seed, samples, update=update, top_k=top_k)
    for row in rows:
        row["cut"] = row["logprob"] - row["sft_logprob"]
    return premise.optimum_curve(
        rewards_by_prompt(rows, "target_reward"), betas or premise.OPTIMUM_CURVE_BETAS, cuts_by_prompt=rewards_by_prompt(rows, "cut")
    )
