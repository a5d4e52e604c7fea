"""Where builds of the synthetic task live, and how one gets there safely.

A build's folder is ``<cache>/synthetic/v<VERSION>-<hash8>``; the hash covers VERSION, the seed,
every `BuildParams` field and the versions of the libraries that shape the weights and samples
(torch, transformers, trl, tokenizers, Python major.minor), so a different recipe or library
stack never reuses a folder another one built. ``<cache>`` is ``cache_dir``, ``$TQSTAR_CACHE``
or ``~/.cache/tqstar``.

`build_once` writes a build into a temp folder next to the final one and renames it into place
only after its manifest (the last file) is written, so a killed build never leaves a folder that
looks finished; a lock file makes a concurrent second caller wait for the first build instead
of repeating it. Torch-free: versions are read from package metadata, not by importing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..files import file_lock, read_json, write_json_atomic
from .params import VERSION, BuildParams

KEYED_LIBRARIES = ("torch", "transformers", "trl", "tokenizers")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$TQSTAR_CACHE``, else ``~/.cache/tqstar``."""
    root = cache_dir or os.environ.get("TQSTAR_CACHE") or Path.home() / ".cache" / "tqstar"
    return Path(root).expanduser()


def _versions() -> dict:
    """Python and the keyed libraries' installed versions (None for one not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEYED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _keyed_versions() -> dict:
    """What of `_versions()` enters the key: the libraries, and Python without its patch level."""
    versions = _versions()
    versions["python"] = ".".join(versions["python"].split(".")[:2])
    return versions


def build_key(seed: int, params: BuildParams) -> str:
    blob = json.dumps({"version": VERSION, "seed": int(seed), "params": params.to_dict(), "libraries": _keyed_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def task_dir(seed: int = 0, cache_dir: str | os.PathLike | None = None, params: BuildParams | None = None) -> Path:
    """Where the build for (seed, params, library stack) lives (whether or not it is built yet)."""
    params = params or BuildParams()
    return cache_root(cache_dir) / "synthetic" / f"v{VERSION}-{build_key(seed, params)}"


def is_built(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def load_manifest(folder: str | os.PathLike) -> dict:
    return read_json(Path(folder) / "manifest.json")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def first_use_line(what: str, seconds: float | None, ahead: str) -> str:
    """The one line a build prints when it starts (every build started on first use says the same three things):
    what it builds, how long that took on a 2-core CPU machine (``seconds``: the constant kept next to the
    build's params; None: not measured) and the command that builds it ahead of time."""
    took = "" if seconds is None else f": about {_duration(seconds)} on a 2-core CPU machine"
    return f"building {what}{took}, once (cached); `{ahead}` builds it ahead"


def build_once(final: Path, build: Callable[[Path], dict], announce: str | None = None) -> Path:
    """Return ``final`` if it holds a complete build; else run ``build(tmp)`` (which fills the
    temp folder and returns the manifest), write the manifest last and rename tmp -> final.

    ``announce``: a line printed (stderr) when the build starts, not when it is found built (`first_use_line`)."""
    final = Path(final)
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        if is_built(final):  # another process built it while we waited
            return final
        if announce:
            print(announce, file=sys.stderr, flush=True)
        if final.exists():  # a stray incomplete folder (no manifest): never trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
        try:
            manifest = build(tmp)
            write_json_atomic(tmp / "manifest.json", manifest)  # last file written
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
