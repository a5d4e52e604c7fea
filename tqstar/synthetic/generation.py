"""Decoding for the build (preference samples, greedy evaluation): `tqstar.builds.generate` through the
project's engine, responses ending at EOS or at the task's stop strings (STOP_STRINGS), which are cut off."""

from __future__ import annotations

from ..builds import generate as _generate
from .params import STOP_STRINGS


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[dict]:
    """`tqstar.builds.generate` with the synthetic task's stop strings unless ``stop_strings`` says otherwise."""
    kwargs.setdefault("stop_strings", STOP_STRINGS)
    return _generate(model, tokenizer, prompts, **kwargs)
