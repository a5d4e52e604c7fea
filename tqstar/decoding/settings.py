"""Decoder settings: one dataclass, built from the `decoder` config group or by hand in a notebook.

The one validator of decoder values: `tqstar.config.validate` calls `DecoderSettings.from_config`,
so a bad value gets the same message (key, value, what is allowed, did-you-mean) whichever way the
settings were made. Torch-free, so validating a config never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..methods import METHODS, PROPOSALS, SELECTIONS, TRANSFERS, VALUES, MethodSpec, spec

# Nested config blocks flattened into fields: decoder.rollout.num -> rollout_num.
NESTED = ("rollout",)
_INTEGERS = ("top_k", "max_new_tokens", "batch_size", "max_batch_rows", "n", "rollout_max_new_tokens", "rollout_num")
_OPTIONAL_INTEGERS = ("rollout_top_k", "sample_top_k")  # null = no truncation
_POSITIVE = ("temperature", "rollout_temperature", "beta_bl", "beta")


def config_key(name: str) -> str:
    """The config key of a field: rollout_num -> decoder.rollout.num, alpha -> decoder.alpha."""
    for block in NESTED:
        if name.startswith(block + "_"):
            return f"decoder.{block}.{name[len(block) + 1 :]}"
    return f"decoder.{name}"


@dataclass
class DecoderSettings:
    method: str = "tqstar"  # a name in tqstar.methods.METHODS
    alpha: float = 1.0  # score = log p_sft + alpha * Q
    top_k: int = 10  # candidates from pi_sft per step
    max_new_tokens: int = 128
    selection: str = "greedy"  # greedy | sample
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8  # prompts decoded together
    max_batch_rows: int = 256  # rows in any one forward pass
    stop_strings: list[str] = field(default_factory=lambda: ["\n\nHuman:"])
    trace: bool = False
    transfer: str = "direct"  # tqstar: direct | indirect
    beta_bl: float = 2.0
    self_normalize: bool = False
    value: str = "mean"  # rollout methods: Q = mean rollout reward | soft: beta * log mean exp(r / beta)
    beta: float = 1.0  # value=soft: the KL coefficient of the target optimum rho*_beta (sample with alpha = 1/beta)
    n: int = 8  # best_of_n samples
    rollout_max_new_tokens: int = 20
    rollout_num: int = 1
    rollout_selection: str = "greedy"
    rollout_temperature: float = 1.0
    rollout_top_k: int | None = None  # sampled rollouts draw from the rollout model's top k tokens only; None = whole vocabulary
    # soft_transfer: rollouts drawn from the baseline (restricted to pi_sft's top rollout.top_k tokens), from a mixture of
    # pi_k and the baseline (rollout.mixture of them from pi_k; weighted by the mixture's density, the balance
    # heuristic of multiple importance sampling), or from pi_k itself (the optimal decoder with SFT rollouts)
    rollout_proposal: str = "baseline"
    rollout_mixture: float = 0.5  # rollout.proposal=mixture: the share of each candidate's rollouts drawn from pi_k
    sample_top_k: int | None = None  # sampled plain decoding (sft, baseline, best_of_n): top-k sampling; None = whole vocabulary
    prune: bool = True  # exact bound pruning of candidates where it is exact (see `prunes`); false: value every candidate
    reuse_rollouts: bool = True  # greedy rollouts: reuse the chosen candidate's rollout at the next step (see `reuses_rollouts`)
    shared_prefix: bool = True  # rollout rows attend to one copy of their prompt's prefix (decoding/cascade.py) where the model allows

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> ConfigError:
            return ConfigError(f"{config_key(key)}={getattr(self, key)!r} is not allowed: {allowed}")

        for key, allowed in (
            ("method", tuple(METHODS)),  # read now: a method added to the registry is allowed
            ("selection", SELECTIONS),
            ("rollout_selection", SELECTIONS),
            ("transfer", TRANSFERS),
            ("value", VALUES),
            ("rollout_proposal", PROPOSALS),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{config_key(key)}={getattr(self, key)!r} is not allowed; {did_you_mean(getattr(self, key), allowed)}")
        for key in _INTEGERS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "must be an integer >= 1")
        for key in _OPTIONAL_INTEGERS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise bad(key, "must be null (the whole vocabulary) or an integer >= 1")
        if not _is_number(self.alpha) or self.alpha < 0:
            raise bad("alpha", "must be a number >= 0")
        for key in _POSITIVE:
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, "must be a number > 0")
        if not _is_number(self.rollout_mixture) or not 0 < self.rollout_mixture < 1:
            raise bad("rollout_mixture", "must be a number strictly between 0 and 1 (the share of rollouts drawn from pi_k)")
        for key in ("prune", "reuse_rollouts", "shared_prefix"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        stops = self.stop_strings
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise bad("stop_strings", "must be a list of non-empty strings")
        self.stop_strings = list(stops)
        self._refuse_no_ops()

    def _refuse_no_ops(self) -> None:
        """Settings that would silently change nothing (or only the cost) are refused with one line."""
        if self.spec.uses_rollouts and self.rollout_num > 1 and self.rollout_selection == "greedy":
            raise ConfigError(
                f"decoder.rollout.num={self.rollout_num} with decoder.rollout.selection=greedy rolls out the same "
                f"continuation {self.rollout_num} times (same Q, {self.rollout_num}x the cost); "
                "use decoder.rollout.selection=sample, or decoder.rollout.num=1"
            )
        if self.rollout_top_k is not None and self.spec.uses_rollouts and self.rollout_selection == "greedy":
            raise ConfigError(
                f"decoder.rollout.top_k={self.rollout_top_k} truncates sampled rollouts, and greedy rollouts take the top "
                "token anyway; use decoder.rollout.selection=sample, or decoder.rollout.top_k=null"
            )
        if self.sample_top_k is not None and not self.spec.uses_values and not (self.spec.sampled or self.selection == "sample"):
            raise ConfigError(
                f"decoder.sample_top_k={self.sample_top_k} truncates sampling, and decoder.method={self.method!r} with "
                "decoder.selection=greedy takes the top token anyway; use decoder.selection=sample, or decoder.sample_top_k=null"
            )
        if self.value == "soft" and not self.spec.uses_rollouts:
            raise ConfigError(
                f"decoder.value=soft needs rollouts, and decoder.method={self.method!r} has none; use decoder=cd (SFT rollouts) or tqstar"
            )
        if self.value == "soft" and self.needs_baseline_reward:
            raise ConfigError("decoder.value=soft with decoder.transfer=indirect is not defined here; use transfer=direct, or value=mean")
        if self.value == "soft" and self.spec.rollout == "baseline" and not self.spec.weighs_rollouts:
            raise ConfigError(
                f"decoder.value=soft with decoder.method={self.method!r} takes beta log mean e^(r/beta) over baseline rollouts, "
                "which counts the baseline's tilt towards r twice; use decoder=soft_transfer (the same rollouts weighted by "
                "pi_k/q), or decoder=cd for SFT rollouts"
            )
        if self.spec.weighs_rollouts:
            self._check_soft_transfer()
        elif self.rollout_proposal != "baseline" or self.rollout_mixture != 0.5:
            raise ConfigError(
                f"decoder.rollout.proposal / decoder.rollout.mixture apply to decoder=soft_transfer only, not "
                f"decoder.method={self.method!r}; leave them at their defaults (baseline, 0.5)"
            )
        if self.self_normalize and self.needs_baseline_reward and self.rollout_num == 1:
            raise ConfigError(
                "decoder.self_normalize=true with decoder.rollout.num=1: sum(w r) / sum(w) over one rollout is r "
                "itself (direct transfer); use decoder.rollout.num >= 2 with decoder.rollout.selection=sample"
            )

    def _check_soft_transfer(self) -> None:
        if self.value != "soft":
            raise ConfigError(
                "decoder=soft_transfer estimates the soft value (decoder.value=soft); for the mean reward of baseline rollouts "
                "use decoder=tqstar"
            )
        if self.transfer != "direct":
            raise ConfigError("decoder=soft_transfer with decoder.transfer=indirect is not defined here; use transfer=direct")
        if self.rollout_selection != "sample":
            raise ConfigError(
                "decoder=soft_transfer weighs sampled rollouts by pi_k/q; greedy rollouts are no sample of q: "
                "use decoder.rollout.selection=sample"
            )
        if self.rollout_proposal == "mixture":
            drawn = self.mixture_rows
            if not 0 < drawn < self.rollout_num:
                raise ConfigError(
                    f"decoder.rollout.proposal=mixture draws round({self.rollout_mixture} x {self.rollout_num}) = {drawn} of "
                    f"decoder.rollout.num={self.rollout_num} rollouts from pi_k: it needs at least one from each; use "
                    "decoder.rollout.num >= 2 and another decoder.rollout.mixture"
                )

    @property
    def mixture_rows(self) -> int:
        """Rollouts per candidate drawn from pi_k: all of them (proposal=sft), rollout.mixture of them (mixture), none."""
        if self.rollout_proposal == "sft":
            return self.rollout_num
        if self.rollout_proposal == "mixture":
            return int(round(self.rollout_mixture * self.rollout_num))
        return 0

    @classmethod
    def from_config(cls, decoder_cfg: Any) -> "DecoderSettings":
        """From a `decoder` config (DictConfig or dict); nested blocks (`rollout`) are flattened."""
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(decoder_cfg, resolve=True) if not isinstance(decoder_cfg, dict) else dict(decoder_cfg)
        for block in NESTED:
            for key, value in (data.pop(block, {}) or {}).items():
                data[f"{block}_{key}"] = value
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"unknown config key '{config_key(key)}'; "
                f"{did_you_mean(config_key(key).rsplit('.', 1)[-1], [config_key(k).rsplit('.', 1)[-1] for k in known])}"
            )
        return cls(**data)

    @property
    def spec(self) -> MethodSpec:
        return spec(self.method)

    @property
    def uses_rollouts(self) -> bool:
        return self.spec.uses_rollouts

    @property
    def uses_values(self) -> bool:
        return self.spec.uses_values

    @property
    def needs_baseline_reward(self) -> bool:
        return self.spec.needs_baseline_reward(self.transfer)

    @property
    def q_within_reward_bounds(self) -> bool:
        """Q from rollouts provably lies within the target reward's bounds [lo, hi]: a mean of rewards
        (cd, tqstar direct), the soft value beta log mean e^{r/beta}, or the self-normalised importance-
        weighted mean (weights > 0). Not the plain importance-weighted mean mean(w r) (indirect,
        self_normalize=false), whose weights are unbounded."""
        if not self.uses_rollouts:
            return False  # ARGS's Q, a reward, is within them too; not pruned: its k candidates cost one reward batch, no rollouts
        if self.needs_baseline_reward or self.spec.weighs_rollouts:
            return self.self_normalize  # log weights are unbounded: only sum_j w_j e^{r_j/beta} / sum_j w_j stays within
        return True

    @property
    def prunes(self) -> bool:
        """decoder.prune is active, given a target reward with bounds: greedy selection (argmax: a candidate
        whose best possible score loses cannot be chosen), Q within the reward's bounds, alpha >= 0. Elsewhere
        decoder.prune=true is inactive, not an error (the default works everywhere)."""
        return self.prune and self.selection == "greedy" and self.q_within_reward_bounds and self.alpha >= 0

    @property
    def reuses_rollouts(self) -> bool:
        """decoder.reuse_rollouts is active: one greedy rollout per candidate (rollout.selection=greedy, rollout.num=1), so
        the rollout [tau_1, ..., tau_L] of the token chosen at step t is, from tau_2 on, the rollout of candidate tau_1 at
        step t+1 short of its last token (docs/architecture.md). Elsewhere (sampled rollouts, ARGS, plain decoding,
        best-of-n) decoder.reuse_rollouts=true is inert, not an error."""
        return self.reuse_rollouts and self.uses_rollouts and self.rollout_selection == "greedy" and self.rollout_num == 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
