"""The registry of testbeds: offline tasks that tqstar builds itself (models, prompts, rewards) and caches.

A testbed is a package with a `testbed` module whose `TESTBED` object follows the `Testbed` protocol. It owns
a config block named like it (`synthetic:`, `smollm2:`), the names `<testbed>:<model>` (and rewards, where it
trains one), and the dataset of the same name. Everything else asks this registry and names no testbed:
adding a third is one package plus one line in `REGISTRY` (docs/architecture.md, "A testbed").

The registry loads a testbed's module only when asked, so importing it (config, identity) is cheap and
keeps the testbeds above the modules that consult it.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Protocol

# name -> the module holding its TESTBED
REGISTRY = {
    "synthetic": "tqstar.synthetic.testbed",
    "smollm2": "tqstar.smollm2.testbed",
}


class Testbed(Protocol):
    """What a testbed provides. `block` is its config block as plain data (None when the config has none)."""

    name: str

    def build_key(self, block: dict | None) -> str:
        """The name of the build this block selects (recipe version, seed, parameters): part of a run's identity."""

    def extra_identity(self, data: dict, block: dict | None) -> dict:
        """Further keys of a run's identity when the config reads something else the testbed builds (a reward model)."""


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Testbed:
    return importlib.import_module(REGISTRY[name]).TESTBED


def used_by(name: str, data: dict) -> bool:
    """Whether a (resolved, plain) config reads a testbed: its dataset, or a `<name>:` model or reward."""
    dataset = data.get("dataset") or {}
    return dataset.get("name") == name or f'"{name}:' in json.dumps(data, default=str)


def prefix_of(value: Any) -> str | None:
    """The testbed a name like `synthetic:rho0.1` belongs to, or None."""
    head, sep, _ = str(value).partition(":")
    return head if sep and head in REGISTRY else None


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
