"""Rewards: `reward(prompts, responses) -> list[float]`. Build one from a `reward` config group."""

from __future__ import annotations

import importlib

from ..config import ConfigError
from .base import FunctionReward, Reward, RewardValueError, cut_at_stop
from .vader import VaderReward

__all__ = ["Reward", "FunctionReward", "RewardValueError", "VaderReward", "build_reward", "load_callable", "cut_at_stop"]


def load_callable(spec: str):
    """'package.module:function' -> the function."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward.function={spec!r} is not allowed: must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward.function={spec!r}: cannot import {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward.function={spec!r}: {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def build_reward(cfg, default_device: str = "auto") -> Reward:
    """A Reward from a `reward` config (type vader | hf | callable)."""
    stops = list(cfg.get("stop_strings") or [])
    kind = cfg.type
    if kind == "vader":
        return VaderReward(stop_strings=stops)
    if kind == "callable":
        fn = load_callable(cfg.function)
        return FunctionReward(fn, name=str(cfg.function), stop_strings=stops)
    if kind == "hf":
        from transformers import AutoModelForSequenceClassification

        from ..models import _load_error, load_tokenizer, resolve_device, resolve_dtype

        device = resolve_device(cfg.get("device"), default_device)
        dtype = resolve_dtype(str(cfg.get("dtype", "auto")), device)
        source = str(cfg.name_or_path)
        tokenizer = load_tokenizer(source, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
        tokenizer.padding_side = "right"
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
        except Exception as exc:  # noqa: BLE001
            raise _load_error(source, exc) from exc
        model.to(device).eval()
        from .hf import HFClassifierReward

        return HFClassifierReward(
            model, tokenizer, label=cfg.get("label"), template=str(cfg.get("template", "{prompt}{response}")),
            batch_size=int(cfg.get("batch_size", 16)), max_length=cfg.get("max_length"),
            overflow=str(cfg.get("overflow", "truncate_left")), stop_strings=stops, name=source,
        )
    raise ConfigError(f"reward.type={kind!r} is not allowed; allowed: vader, hf, callable")
