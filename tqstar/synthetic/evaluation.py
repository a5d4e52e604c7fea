"""Greedy evaluation of a saved model of the synthetic task on held-out prompts."""

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
