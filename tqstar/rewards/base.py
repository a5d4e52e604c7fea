"""The reward interface: `reward(prompts, responses) -> list[float]`, one score per pair."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Sequence

from ..errors import ConfigError, check_choice

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
# What a reward config's `type` may be: rewards.build_reward has one branch for each.
REWARD_TYPES = ("vader", "hf", "callable", "afinn", "textblob")
# What a Hugging Face classifier reward scores with (config `reward.output`): its raw logit, or the label's probability.
HF_OUTPUTS = ("logit", "probability")


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string (the stop string itself is not part of a response)."""
    cut = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def check_bounds(value: Any, key: str = "reward.bounds") -> tuple[float, float] | None:
    """A reward's declared range (config `reward.bounds`: null = unbounded, or [lo, hi]) as (lo, hi), or a
    ConfigError naming the key: two finite numbers with lo <= hi. Torch-free: config validation uses it."""
    if value is None:
        return None
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)) else None
    shown = value if items is None else items
    if items is None or len(items) != 2 or not all(_is_finite_number(v) for v in items):
        raise ConfigError(f"{key}={shown!r} is not allowed: must be null (unbounded) or [lo, hi], two finite numbers")
    lo, hi = float(items[0]), float(items[1])
    if lo > hi:
        raise ConfigError(f"{key}={shown!r} is not allowed: [lo, hi] needs lo <= hi")
    return lo, hi


def validate_reward_cfg(cfg: Any, mount: str = "reward") -> tuple[float, float] | None:
    """The values of a reward config mounted at `mount` (config.validate and build_reward both call this): its type,
    bounds (returned as (lo, hi) or None), prefix_cache and output, each refused by a ConfigError naming the key.
    Torch-free; whether its paths, hub ids or function exist: decode.check_sources."""
    prefix = f"{mount}." if mount else ""
    check_choice(f"{prefix}type", cfg.get("type"), REWARD_TYPES)
    bounds = check_bounds(cfg.get("bounds"), f"{prefix}bounds")
    cache = cfg.get("prefix_cache")  # hf rewards: null = auto, true, false
    if not (cache is None or isinstance(cache, bool)):
        raise ConfigError(f"{prefix}prefix_cache={cache!r} is not allowed: null (auto), true or false")
    if cfg.get("output") is not None:
        check_choice(f"{prefix}output", cfg.get("output"), HF_OUTPUTS)
    return bounds


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Reward:
    """Wraps a scoring function: cuts responses at stop strings, counts calls, rejects NaN/inf.

    Subclasses implement `score(prompts, responses)`; callers use `reward(prompts, responses)`.

    `bounds` (config `reward.bounds`): the declared range [lo, hi] of every value, or None. A value
    outside it stops the run (`RewardBoundsError`, a ConfigError: exit code 2): decoders rely on the
    bounds (exact pruning of candidates, decoder.prune), so a wrong declaration must not pass silently.
    """

    name = "reward"

    # Parameters of the network that scores, for FLOPs estimates (2 x parameters x tokens); 0 for a
    # reward that is not a network (a lexicon, a Python function): its compute is not counted.
    num_parameters = 0

    def __init__(self, stop_strings: Sequence[str] = (), bounds: Sequence[float] | None = None):
        self.stop_strings = list(stop_strings)
        self.bounds = check_bounds(bounds)
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
        if self.bounds is not None:
            lo, hi = self.bounds
            for response, value in zip(responses, values):
                if not lo <= value <= hi:
                    raise RewardBoundsError(
                        f"reward {self.name} returned {value!r} for response {response[:60]!r}, outside its declared "
                        f"bounds [{lo!r}, {hi!r}]; correct `bounds` in its reward config (null = unbounded)"
                    )
        self.calls += len(values)
        self.batches += 1
        return values


class RewardValueError(ValueError):
    """A reward returned NaN or inf."""


class RewardBoundsError(ConfigError):
    """A reward returned a value outside its declared bounds: the declaration (config) is wrong."""


class FunctionReward(Reward):
    """Any Python callable `fn(prompts, responses) -> list[float]`."""

    def __init__(self, fn: RewardFn, name: str | None = None, stop_strings: Sequence[str] = (), bounds: Sequence[float] | None = None):
        super().__init__(stop_strings, bounds)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, prompts, responses):
        return list(self.fn(prompts, responses))


def zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """r_bl = 0: with baseline = pi_sft and beta_bl = beta, indirect transfer's self-normalised weights
    e^{r/beta} turn SFT rollouts into an importance-sampled estimate of Q*_beta (the exact-Q preset in conf/experiment/)."""
    return [0.0] * len(prompts)
