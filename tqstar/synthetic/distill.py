"""The baselines' training data: SFT samples on the train prompts, weighted towards rho*_beta.

rho*_beta(y|x) ∝ pi_sft(y|x) · exp(r(x,y) / beta). Given M responses y_1..y_M ~ pi_sft(.|x), the
self-normalised weights w_i = e^{r_i/beta} / sum_j e^{r_j/beta} make sum_i w_i δ(y_i) an importance-
sampling approximation of rho*_beta(.|x). The build resamples a fixed number of rows per prompt from
it (`resampled_rows`) and fine-tunes the SFT model by weighted maximum likelihood on them (reward-
weighted distillation), whose optimum is that distribution for whatever beta is chosen: the
baseline's strength is set by beta, not by a step count. Each prompt carries total weight one, so
every prompt counts alike.
"""

from __future__ import annotations

from typing import Callable

from ..builds import sample_and_score
from ..premise import soft_weights
from .params import STOP_STRINGS, BuildParams

SAMPLING_BATCH_PROMPTS = 64  # prompts per engine batch (x samples_per_prompt rows)


def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    params: BuildParams,
    seed: int,
    samples: int,
    update: Callable[..., None] = lambda **k: None,
    sft_model=None,
    top_k: int | None = None,
) -> list[dict]:
    """``samples`` responses per prompt from ``model`` at temperature 1 (full vocabulary, or its top ``top_k``
    tokens at every step; through the engine),
    each row also carrying ``target_reward``, ``baseline_reward`` and its summed log-probs (``logprob``;
    ``sft_logprob`` under ``sft_model`` when given)."""
    from .rewards import baseline_reward, target_reward

    return sample_and_score(
        model,
        tokenizer,
        prompts,
        {"target_reward": target_reward, "baseline_reward": baseline_reward},
        max_new_tokens=params.sample_max_new_tokens,
        stop_strings=STOP_STRINGS,
        samples_per_prompt=samples,
        batch_size=SAMPLING_BATCH_PROMPTS,
        seed=seed,
        update=update,
        sft_model=sft_model,
        top_k=top_k,
    )


def rewards_by_prompt(rows: list[dict], key: str) -> list[list[float]]:
    """Rewards grouped by prompt index (in prompt order)."""
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(row["prompt_index"], []).append(row[key])
    return [groups[i] for i in sorted(groups)]


def resampled_rows(prompts: list[str], samples: list[dict], reward_key: str, beta: float, draws: int, seed: int) -> list[dict]:
    """``{"prompt", "response", "weight"}`` rows: per prompt, ``draws`` of its finished samples resampled with
    replacement with probabilities softmax(r / beta) (sampling-importance-resampling), duplicates merged
    with weight count / draws. Each prompt carries total weight one; in expectation a row's weight is its
    self-normalised importance weight, at a cost per prompt that stays ``draws`` rows however many
    samples there are (and more samples make a closer approximation of rho*_beta)."""
    import random

    rng = random.Random(f"tqstar-resample-{seed}-{reward_key}-{beta!r}")
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        if s["finished"] and s["response"]:
            by_prompt.setdefault(s["prompt_index"], []).append(s)
    rows = []
    for i in sorted(by_prompt):
        group = by_prompt[i]
        counts: dict[int, int] = {}
        for j in rng.choices(range(len(group)), weights=soft_weights([s[reward_key] for s in group], beta), k=draws):
            counts[j] = counts.get(j, 0) + 1
        rows += [{"prompt": prompts[i], "response": group[j]["response"], "weight": counts[j] / draws} for j in sorted(counts)]
    if not rows:
        raise RuntimeError(
            f"synthetic build: no finished samples to distil (of {len(samples)}, none ended within "
            f"sample_max_new_tokens); train the SFT model longer or raise sample_max_new_tokens"
        )
    return rows
