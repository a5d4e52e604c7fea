"""The registry of testbeds: offline tasks that tqstar builds itself (models, prompts, rewards) and caches.

A testbed is a package with a `testbed` module whose `TESTBED` object follows the `Testbed` protocol. It owns
a config block named like it (`<testbed>:` in conf/decode.yaml, e.g. `seed`, `cache_dir`), the names
`<testbed>:<model>` (and `<testbed>:<reward>` for reward models it trains), the dataset of the same name (its
build's `prompts/<split>.jsonl`) and the command `tqstar prepare <testbed>`. Everything else asks this registry
and names no testbed: adding one is a package plus one line in `REGISTRY` (docs/architecture.md, "A testbed").

The registry is a ground module: it names its entries' modules as strings and imports one only when asked
(`get`), so importing it is cheap and the testbeds stay above the modules that consult it (config, data,
models, decode, evaluate, sweep, cli).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping, Protocol

from .errors import ConfigError, did_you_mean

# name -> the module holding its TESTBED
REGISTRY = {
    "synthetic": "tqstar.synthetic.testbed",
    "smollm2": "tqstar.smollm2.testbed",
}


class Testbed(Protocol):
    """What a testbed provides. `block` is its config block (a DictConfig or plain dict; None when the config has
    none): a testbed reads it with `.get`, so every method also takes an older config's block."""

    name: str  # its config block, its `<name>:` names and its dataset
    title: str  # how messages name it: "the {title} has no model 'x'"
    splits: tuple[str, ...]  # its dataset's splits: `<build>/prompts/<split>.jsonl`
    prepare_help: str  # `tqstar prepare <name> --help`: what the command builds
    overrides_help: str  # ... and an example of its overrides
    prepare_flags: dict[str, str]  # extra `--flag`s of `tqstar prepare <name>` (flag -> help), passed to `prepare`
    # keys added to the block whose default builds something else than before they existed, with the value that
    # reproduces what a block without them built (a run folder's stored block keeps its build: `stored_blocks`)
    stored_defaults: dict[str, Any]

    def build_key(self, block) -> str:
        """The name of the build this block selects (recipe version, seed, parameters): part of a run's identity."""

    def extra_identity(self, data: dict, block) -> dict:
        """Further keys of a run's identity when the config reads something else the testbed builds (a reward model)."""

    def validate(self, block) -> None:
        """Check the block's values (its recipe knobs); ConfigError naming the key (config.validate calls it)."""

    def model_names(self, block) -> tuple[str, ...]:
        """The `<name>:<model>` names a build of this block holds."""

    def check_model(self, model: str, block, what: str) -> None:
        """ConfigError (`what: the <title> has no model ...; did you mean ...`) unless a build of `block` holds `model`."""

    def check_reward(self, reward: str, block, what: str) -> None:
        """Likewise for a reward model `<name>:<reward>` the testbed trains."""

    def ensure(self, block, num_threads: int | None = None, progress: bool = True) -> Path:
        """The folder of the build `block` selects: found in the cache, or built now (printing its first-use line)."""

    def find(self, block) -> Path | None:
        """The build's folder when it is complete, else None (never builds)."""

    def resolve_reward(self, reward_cfg, block):
        """A reward config naming `<name>:<reward>` as a copy naming its folder (built on first use)."""

    def references(self, cfg, rows: list[dict]) -> list[dict]:
        """The build's own evaluation of the config's models on the prompts a run decoded (decode summary), or []."""

    def next_steps(self, block, run_path: Path) -> list[tuple[str, str]] | None:
        """(command, what it does) rows the decode summary shows after a run (folder `run_path`) on this block, or None."""

    def prepare(self, cfg, flags: dict[str, bool], console) -> None:
        """`tqstar prepare <name>`: build (or find) what the validated config's block selects and print its summary."""


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Testbed:
    if name not in REGISTRY:
        raise ConfigError(f"no testbed {name!r}; {did_you_mean(name, names())}")
    return importlib.import_module(REGISTRY[name]).TESTBED


def used_by(name: str, data: dict) -> bool:
    """Whether a (resolved, plain) config reads a testbed: its dataset, or a `<name>:` model or reward."""
    dataset = data.get("dataset") or {}
    return dataset.get("name") == name or f'"{name}:' in json.dumps(data, default=str)


def prefix_of(value: Any) -> str | None:
    """The testbed a name like `synthetic:rho0.1` belongs to, or None."""
    head, sep, _ = str(value).partition(":")
    return head if sep and head in REGISTRY else None


def block_of(cfg: Any, name: str) -> Any:
    """A testbed's config block in a config (None when it has none)."""
    return cfg.get(name) if cfg is not None else None


def block_seed(block: Any) -> int:
    """A testbed block's `seed` (0 when the block or the key is missing: an older config)."""
    return int((block.get("seed") if block is not None else None) or 0)


def block_cache_dir(block: Any) -> Any:
    """A testbed block's `cache_dir` (None: $TQSTAR_CACHE or ~/.cache/tqstar)."""
    return block.get("cache_dir") if block is not None else None


def check_name(testbed: Testbed, kind: str, name: str, allowed: tuple[str, ...], what: str) -> None:
    """The one message for a `<testbed>:<name>` a testbed does not have: `what: the <title> has no <kind> 'x'; did you mean ...`."""
    if name in allowed:
        return
    if not allowed:
        raise ConfigError(f"{what}: the {testbed.title} has no {kind}s")
    raise ConfigError(f"{what}: the {testbed.title} has no {kind} {name!r}; {did_you_mean(name, allowed)}")


def folder_of(builds: Mapping[str, Path] | None, name: str, what: str) -> Path:
    """The build folder of testbed `name` in a `builds` mapping (testbed -> folder, resolved by `tqstar.decode.builds`)."""
    folder = (builds or {}).get(name)
    if folder is None:
        raise ConfigError(
            f"{what} needs the {get(name).title}'s folder (tqstar decode resolves it; in Python pass "
            f"builds={{'{name}': tqstar.testbeds.get('{name}').ensure(block)}})"
        )
    return Path(folder)


def stored_blocks(data: dict) -> dict:
    """A stored config's testbed blocks with the keys they predate set as they were (`Testbed.stored_defaults`),
    before the rest of its missing keys take today's defaults (`identity.identity`): so a change of default recipe
    gives new run folders, and the older ones stay reachable by naming the older recipe."""
    for name in REGISTRY:
        block = data.get(name)
        if isinstance(block, dict):
            for key, value in getattr(get(name), "stored_defaults", {}).items():
                block.setdefault(key, value)
    return data


def builds_read(data: dict) -> list[tuple[str, int, Path]]:
    """(testbed, seed, folder) of each complete build a stored (plain) config reads; builds nothing."""
    data = stored_blocks(data)
    found = []
    for name in REGISTRY:
        if used_by(name, data):
            block = data.get(name)
            folder = get(name).find(block)
            if folder is not None:
                found.append((name, block_seed(block), folder))
    return found


def identity_keys(data: dict) -> dict:
    """A run's identity data with each testbed's block replaced by its build key where the config reads the
    testbed (dropped where it does not): a recipe change is a new model behind the same names."""
    blocks = {name: data.pop(name, None) for name in REGISTRY}
    for name, block in blocks.items():
        if used_by(name, data):
            testbed = get(name)
            data[f"{name}_build"] = testbed.build_key(block)
            data.update(testbed.extra_identity(data, block))
    return data
