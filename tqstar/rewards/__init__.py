"""Rewards: `reward(prompts, responses) -> list[float]`. Build one from a `reward` config group."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError
from .agreement import judge_agreement
from .base import REWARD_TYPES, FunctionReward, Reward, RewardBoundsError, RewardValueError, check_bounds, cut_at_stop, validate_reward_cfg
from .lexicons import AfinnReward, TextBlobReward
from .vader import VaderReward

__all__ = [
    "Reward",
    "FunctionReward",
    "RewardBoundsError",
    "RewardValueError",
    "VaderReward",
    "AfinnReward",
    "TextBlobReward",
    "judge_agreement",
    "build_reward",
    "check_bounds",
    "load_callable",
    "cut_at_stop",
    "validate_reward_cfg",
    "REWARD_TYPES",
]


def load_callable(spec: str, key: str = "reward.function"):
    """'package.module:function' -> the function."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}={spec!r} is not allowed: must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({exc})") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{key}={spec!r}: {module_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {attr!r} is not callable")
    return fn


def build_reward(cfg, default_device: str = "auto") -> Reward:
    """A Reward from a `reward` config (type vader | afinn | textblob | hf | callable), with its declared `bounds` (null = unbounded)."""
    from ..models import config_key

    stops = list(cfg.get("stop_strings") or [])
    bounds = validate_reward_cfg(cfg, config_key(cfg, "type").rpartition(".")[0])
    kind = cfg.type
    if kind == "vader":
        return VaderReward(stop_strings=stops, bounds=bounds)
    if kind == "afinn":
        return AfinnReward(stop_strings=stops, bounds=bounds)
    if kind == "textblob":
        return TextBlobReward(stop_strings=stops, bounds=bounds)
    if kind == "callable":
        fn = load_callable(cfg.function, config_key(cfg, "function"))
        return FunctionReward(fn, name=str(cfg.function), stop_strings=stops, bounds=bounds)
    return _build_hf(cfg, default_device, stops, bounds)  # validate_reward_cfg let only REWARD_TYPES through: hf is the one left


def _build_hf(cfg, default_device: str, stops: list[str], bounds: tuple[float, float] | None) -> Reward:
    from transformers import AutoModelForSequenceClassification

    from ..models import config_key, load_error, load_tokenizer, resolve_device, resolve_dtype
    from .hf import HFClassifierReward

    key = config_key(cfg, "name_or_path")
    device = resolve_device(cfg.get("device"), default_device, config_key(cfg, "device"))
    dtype = resolve_dtype(str(cfg.get("dtype") or "auto"), device, config_key(cfg, "dtype"))
    source = str(cfg.name_or_path)
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    trust = bool(cfg.get("trust_remote_code", False))
    revision = cfg.get("revision")
    tokenizer = load_tokenizer(str(cfg.get("tokenizer") or source), revision=revision, trust_remote_code=trust, key=key)
    kwargs = {"dtype": dtype, "trust_remote_code": trust}
    if revision:
        kwargs["revision"] = revision
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise load_error(source, exc, key, "reward model") from exc
    model.to(device).eval()
    return HFClassifierReward(
        model,
        tokenizer,
        label=cfg.get("label"),
        template=str(cfg.get("template") or "{prompt}{response}"),
        batch_size=int(cfg.get("batch_size") or 16),
        max_length=cfg.get("max_length"),
        overflow=str(cfg.get("overflow") or "truncate_left"),
        skip_value=cfg.get("skip_value"),
        stop_strings=stops,
        name=source,
        bounds=bounds,
        prefix_cache=cfg.get("prefix_cache"),  # null = auto; HFClassifierReward refuses anything but null / true / false
        output=str(cfg.get("output") or "logit"),
    )
