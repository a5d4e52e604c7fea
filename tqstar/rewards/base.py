"""The reward interface: `reward(prompts, responses) -> list[float]`, one score per pair."""

from __future__ import annotations

import math
from typing import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string (the stop string itself is not part of a response)."""
    cut = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


class Reward:
    """Wraps a scoring function: cuts responses at stop strings, counts calls, rejects NaN/inf.

    Subclasses implement `score(prompts, responses)`; callers use `reward(prompts, responses)`.
    """

    name = "reward"

    # Parameters of the network that scores, for FLOPs estimates (2 x parameters x tokens); 0 for a
    # reward that is not a network (a lexicon, a Python function): its compute is not counted.
    num_parameters = 0

    def __init__(self, stop_strings: Sequence[str] = ()):
        self.stop_strings = list(stop_strings)
        self.calls = 0  # responses scored (one per pair), for run.json counters
        self.batches = 0
        self.last_tokens: list[int] | None = None  # tokens the model read per pair in the last call (networks only)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"reward got {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        responses = [cut_at_stop(r, self.stop_strings) for r in responses]
        values = [float(v) for v in self.score(list(prompts), responses)]
        if len(values) != len(prompts):
            raise ValueError(f"{self.name} returned {len(values)} scores for {len(prompts)} responses")
        for prompt, response, value in zip(prompts, responses, values):
            if not math.isfinite(value):
                raise RewardValueError(f"{self.name} returned {value} for response {response[:60]!r} (prompt {prompt[-60:]!r})")
        self.calls += len(values)
        self.batches += 1
        return values


class RewardValueError(ValueError):
    """A reward returned NaN or inf."""


class FunctionReward(Reward):
    """Any Python callable `fn(prompts, responses) -> list[float]`."""

    def __init__(self, fn: RewardFn, name: str | None = None, stop_strings: Sequence[str] = ()):
        super().__init__(stop_strings)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, prompts, responses):
        return list(self.fn(prompts, responses))


def zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """r_bl = 0: with baseline = pi_sft and beta_bl = beta, indirect transfer's self-normalised weights
    e^{r/beta} turn SFT rollouts into an importance-sampled estimate of Q*_beta (conf/experiment/synthetic_exact_q.yaml)."""
    return [0.0] * len(prompts)
