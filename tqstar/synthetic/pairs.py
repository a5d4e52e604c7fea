"""Preference data: SFT samples on the train prompts, labelled by both rewards, and the DPO pairs."""

from __future__ import annotations

from typing import Callable

from .generation import generate
from .params import BuildParams

# DPO model -> the reward its pairs are ranked by
PAIR_REWARDS = {"dpo": "target_reward", "dpo_bl": "baseline_reward"}
SAMPLING_BATCH_PROMPTS = 64  # prompts per engine batch (x samples_per_prompt rows)


def sample_preference_data(
    model, tokenizer, prompts: list[str], params: BuildParams, seed: int, update: Callable[..., None] = lambda **k: None
) -> list[dict]:
    """``samples_per_prompt`` sampled responses per prompt (temperature ``sample_temperature``, full
    vocabulary), each row also carrying ``target_reward`` and ``baseline_reward``."""
    from .rewards import baseline_reward, target_reward

    samples = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=params.sample_max_new_tokens,
        selection="sample",
        temperature=params.sample_temperature,
        samples_per_prompt=params.samples_per_prompt,
        batch_size=SAMPLING_BATCH_PROMPTS,
        seed=seed,
        update=update,
    )
    sp = [prompts[s["prompt_index"]] for s in samples]
    sr = [s["response"] for s in samples]
    for s, r, rb in zip(samples, target_reward(sp, sr), baseline_reward(sp, sr)):
        s["target_reward"], s["baseline_reward"] = r, rb
    return samples


def make_pairs(prompts: list[str], samples: list[dict], reward_key: str, min_gap: float, pairs_per_prompt: int = 1) -> list[dict]:
    """Preference pairs under ``sample[reward_key]``: per prompt, its finished samples sorted by
    reward give (best, worst), then (second best, second worst), ... up to ``pairs_per_prompt``
    pairs, each kept when chosen - rejected >= ``min_gap``."""
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        if s["finished"] and s["response"]:
            by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = []
    for i in sorted(by_prompt):
        group = sorted(by_prompt[i], key=lambda s: s[reward_key])  # stable: ties keep sample order
        for k in range(min(pairs_per_prompt, len(group) // 2)):
            worst, best = group[k], group[-1 - k]
            if best[reward_key] - worst[reward_key] >= min_gap:
                pairs.append({"prompt": prompts[i], "chosen": " " + best["response"], "rejected": " " + worst["response"]})
    return pairs


def preference_pairs(prompts: list[str], samples: list[dict], params: BuildParams) -> dict[str, list[dict]]:
    """The pairs of every DPO model (PAIR_REWARDS); an error when one of them gets none."""
    pairs = {name: make_pairs(prompts, samples, key, params.min_reward_gap, params.pairs_per_prompt) for name, key in PAIR_REWARDS.items()}
    for name, rows in pairs.items():
        if not rows:
            finished = sum(s["finished"] for s in samples)
            raise RuntimeError(
                f"synthetic build: no preference pairs for {name!r} ({finished} of {len(samples)} samples ended "
                f"within sample_max_new_tokens={params.sample_max_new_tokens}); train the SFT model longer or "
                "raise sample_max_new_tokens / samples_per_prompt"
            )
    return pairs
