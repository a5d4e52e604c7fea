"""Samples of the build's models through the project's engine, scored by both rewards.

The models see each HH prompt through the tokenizer's chat template (`tqstar.models.format_prompt`,
what `tqstar decode` does for ``prompt_format: chat``); the rewards see the HH prompt as written.
Sampling is the engine's plain decoding at temperature 1 over the whole vocabulary (the premise
checks' log-probs are those of the model itself), one seeded generator per row
(`tqstar.builds.sample_and_score`), so samples do not depend on batching.
"""

from __future__ import annotations

from typing import Callable

from .params import PROMPT_FORMAT, STOP_STRINGS

ROWS_PER_BATCH = (
    128  # engine rows (prompts x samples) per batch: on a CPU a 135M model's decoding step costs a quarter less per row than at 64
)


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    from ..models import format_prompt

    return [format_prompt(tokenizer, p, PROMPT_FORMAT) for p in prompts]


def sample(
    model,
    tokenizer,
    prompts: list[str],
    samples: int,
    max_new_tokens: int,
    seed: int,
    update: Callable[..., None] = lambda **k: None,
    sft_model=None,
    keep_ids: bool = False,
) -> list[dict]:
    """``samples`` responses per prompt (rows prompt-major, as `generate` returns them), each with
    ``target_reward`` (r) and ``baseline_reward`` (r_bl). With ``sft_model`` the rows carry both
    models' log-probs of the response (``logprob``, ``sft_logprob``); without it, ``sft_logprob`` is
    ``model``'s own."""
    from ..builds import sample_and_score
    from .rewards import baseline_reward, target_reward

    return sample_and_score(
        model,
        tokenizer,
        format_prompts(tokenizer, prompts),
        {"target_reward": target_reward, "baseline_reward": baseline_reward},
        reward_prompts=prompts,
        max_new_tokens=max_new_tokens,
        stop_strings=STOP_STRINGS,
        samples_per_prompt=samples,
        batch_size=max(1, ROWS_PER_BATCH // samples),
        seed=seed,
        update=update,
        sft_model=sft_model,
        keep_ids=keep_ids,
    )
