"""Decoder settings: one dataclass, built from the `decoder` config group or by hand in a notebook."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..config import METHODS, SELECTIONS, TRANSFERS, ConfigError


@dataclass
class DecoderSettings:
    method: str = "tqstar"  # sft | baseline | best_of_n | args | cd | tqstar
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
    n: int = 8  # best_of_n samples
    rollout_max_new_tokens: int = 20
    rollout_num: int = 1
    rollout_selection: str = "greedy"
    rollout_temperature: float = 1.0

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> ConfigError:
            return ConfigError(f"decoder.{key}={getattr(self, key)!r} is not allowed: {allowed}")

        if self.method not in METHODS:
            raise bad("method", ", ".join(METHODS))
        for key in ("selection", "rollout_selection"):
            if getattr(self, key) not in SELECTIONS:
                raise bad(key, ", ".join(SELECTIONS))
        if self.transfer not in TRANSFERS:
            raise bad("transfer", ", ".join(TRANSFERS))
        for key in ("top_k", "max_new_tokens", "batch_size", "max_batch_rows", "n", "rollout_max_new_tokens", "rollout_num"):
            if int(getattr(self, key)) < 1:
                raise bad(key, "must be an integer >= 1")
        if self.alpha < 0:
            raise bad("alpha", "must be >= 0")
        for key in ("temperature", "rollout_temperature", "beta_bl"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")

    @classmethod
    def from_config(cls, decoder_cfg: Any) -> "DecoderSettings":
        """From a `decoder` config (DictConfig or dict); the nested `rollout` block is flattened."""
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(decoder_cfg, resolve=True) if not isinstance(decoder_cfg, dict) else dict(decoder_cfg)
        rollout = data.pop("rollout", {}) or {}
        for key, value in rollout.items():
            data[f"rollout_{key}"] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown decoder setting(s): {', '.join(unknown)}")
        return cls(**data)

    @property
    def uses_rollouts(self) -> bool:
        return self.method in ("cd", "tqstar")

    @property
    def uses_values(self) -> bool:
        return self.method in ("args", "cd", "tqstar")
