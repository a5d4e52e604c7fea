"""Where builds of the synthetic task live: ``<cache>/synthetic/v<VERSION>-<hash8>``.

The hash covers VERSION, the seed, every `BuildParams` field and the versions of the libraries that
shape the weights and samples (torch, transformers, trl, tokenizers, Python major.minor), so a
different recipe or library stack never reuses a folder another one built. ``<cache>``, the lock /
temp-folder / rename that keep a build safe and the first-use line are every testbed's
(`tqstar.builds`). Torch-free: versions are read from package metadata, not by importing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..builds import build_once, cache_root, first_use_line, is_built, keyed, library_versions, load_manifest
from .params import VERSION, BuildParams

KEYED_LIBRARIES = ("torch", "transformers", "trl", "tokenizers")

__all__ = ["build_key", "build_once", "cache_root", "first_use_line", "is_built", "load_manifest", "task_dir"]


def _versions() -> dict:
    """Python and the keyed libraries' installed versions (None for one not installed)."""
    return library_versions(KEYED_LIBRARIES)


def build_key(seed: int, params: BuildParams) -> str:
    blob = json.dumps({"version": VERSION, "seed": int(seed), "params": params.to_dict(), "libraries": keyed(_versions())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def task_dir(seed: int = 0, cache_dir: str | os.PathLike | None = None, params: BuildParams | None = None) -> Path:
    """Where the build for (seed, params, library stack) lives (whether or not it is built yet)."""
    params = params or BuildParams()
    return cache_root(cache_dir) / "synthetic" / f"v{VERSION}-{build_key(seed, params)}"
