"""The synthetic task as a testbed (`tqstar.testbeds`): its build key, and what a run's identity adds."""

from __future__ import annotations

import json


class SyntheticTestbed:
    name = "synthetic"

    def build_key(self, block: dict | None) -> str:
        from .cache import task_dir
        from .params import params_for

        block = block or {}
        return task_dir(seed=int(block.get("seed") or 0), cache_dir="/", params=params_for(block.get("size"))).name

    def extra_identity(self, data: dict, block: dict | None) -> dict:
        from .proxy import PROXY_NAME, proxy_key

        return {"synthetic_proxy": proxy_key()} if f'"synthetic:{PROXY_NAME}"' in json.dumps(data, default=str) else {}


TESTBED = SyntheticTestbed()
