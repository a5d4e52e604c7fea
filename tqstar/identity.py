"""What identifies a run: the resolved configuration, minus what only says where and how fast it runs.

Same identity, same run folder: a rerun of a command resumes its run. Two rules make this hold by
construction, with no list of exceptions to maintain:

- **Execution-only keys** (`EXECUTION`: placement, batch and chunk sizes, threads, and the exact savings
  that change how much work is done but not what is generated or traced) are left out. A new switch of that kind is
  added to this one tuple.
- **Keys added later are filled with their defaults.** A run folder keeps the resolved config it was made
  with; an older folder lacks the keys added since. To compare it with a command's config, its missing
  keys take the values the same composition (the command's group choices, `choices` in the config) gives
  by default, which by the rule for adding a key are the values that reproduce what old runs generated.
  So adding a key with a default orphans no run, and changing a default cannot alias an old run: its
  config says which value it ran with.

A testbed's config block (named like the testbed, tqstar.testbeds) is replaced by its build's key when the config reads the
testbed (a recipe change is a new model behind the same name) and dropped when it does not.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Dotted keys that place a run, size its batches or switch an exact saving: never part of its identity.
# Not `decoder.prune`: the tokens are the same, but a traced run records a pruned candidate's Q as null, and one
# run folder must not mix traces written both ways (the transfer study's Q-spread diagnostic reads them).
EXECUTION = (
    "output_dir",
    "experiment_name",
    "evaluate",
    "num_threads",
    "choices",
    "decoder.batch_size",
    "decoder.max_batch_rows",
    "decoder.reuse_rollouts",
    "decoder.shared_prefix",
    "reward.batch_size",
    "reward.prefix_cache",
    "baseline_reward.batch_size",
    "baseline_reward.prefix_cache",
)


def _container(cfg: DictConfig | dict) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(cfg)


def _fill(data: Any, defaults: Any) -> Any:
    """`data` with every key of `defaults` it lacks (recursively, into blocks both have)."""
    if not isinstance(data, dict) or not isinstance(defaults, dict):
        return data
    for key, value in defaults.items():
        if key not in data:
            data[key] = copy.deepcopy(value)
        else:
            data[key] = _fill(data[key], value)
    return data


def _drop(data: dict, dotted: str) -> None:
    *path, leaf = dotted.split(".")
    block = data
    for part in path:
        block = block.get(part) if isinstance(block, dict) else None
    if isinstance(block, dict):
        block.pop(leaf, None)


def identity(cfg: DictConfig | dict, defaults: DictConfig | dict | None = None) -> dict:
    """The part of a config that says what a run generates (plain data, JSON-able)."""
    from .testbeds import identity_keys, stored_blocks

    data = _container(cfg)
    if defaults is not None:
        data = _fill(stored_blocks(data), _container(defaults))
    for key in EXECUTION:
        _drop(data, key)
    return identity_keys(data)


def digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def config_hash(cfg: DictConfig | dict) -> str:
    """8 hex digits of a config's identity: the suffix of its run folder's name."""
    return digest(identity(cfg))


def defaults_of(cfg: DictConfig) -> DictConfig | None:
    """The config the same group choices give with no value overridden (None when the config does not say
    which choices composed it)."""
    from .config import compose

    choices = cfg.get("choices") if isinstance(cfg, DictConfig) else None
    if not choices:
        return None
    dropped = [group for group, option in compose([]).choices.items() if option is not None and group not in choices]
    return compose([f"{group}={option}" for group, option in choices.items() if option is not None] + [f"~{g}" for g in dropped])


def same_run(stored: DictConfig | dict, cfg: DictConfig, defaults: DictConfig | dict | None = None, target: dict | None = None) -> bool:
    """Whether a run folder's stored config (perhaps written before some keys existed) is the run `cfg` asks for.
    `defaults` (`defaults_of(cfg)`) and `target` (`identity(cfg)`) may be given when many folders are compared."""
    defaults = defaults if defaults is not None else defaults_of(cfg)
    return identity(stored, defaults) == (target if target is not None else identity(cfg))
