"""The decoding engine: `Decoder(sft_model, tokenizer, reward, baseline_model, settings).decode(prompts)`.

Imports are lazy, so `tqstar.decoding.settings` (torch-free) can be used to validate a config
without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Decoder", "DecoderSettings", "Generation"]


def __getattr__(name: str) -> Any:
    if name in ("Decoder", "Generation"):
        from . import engine

        return getattr(engine, name)
    if name == "DecoderSettings":
        from .settings import DecoderSettings

        return DecoderSettings
    raise AttributeError(f"module 'tqstar.decoding' has no attribute {name!r}")
