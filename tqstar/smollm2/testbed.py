"""The SmolLM2 experiment as a testbed (`tqstar.testbeds`): its build key, and what a run's identity adds."""

from __future__ import annotations


class Smollm2Testbed:
    name = "smollm2"

    def build_key(self, block: dict | None) -> str:
        from .cache import build_dir
        from .params import params_from_config

        block = block or {}
        return build_dir(seed=int(block.get("seed") or 0), cache_dir="/", params=params_from_config(block.get("params"))).name

    def extra_identity(self, data: dict, block: dict | None) -> dict:
        return {}


TESTBED = Smollm2Testbed()
