"""A third testbed for tests/test_recipes.py, written by the recipe in docs/architecture.md ("A testbed"): a
`TESTBED` following `tqstar.testbeds.Testbed`. Its "build" copies two saved tiny models and writes prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqstar.testbeds import check_name

SOURCES: dict[str, Path] = {}  # model name -> a saved model folder (the test sets it)
PROMPTS = ["the hotel", "the food", "a sad day"]


class ToyTestbed:
    name = "toy"
    title = "toy testbed"
    splits = ("test",)
    prepare_help = "Build the toy testbed (two tiny models, three prompts)."
    overrides_help = "e.g. toy.seed=1"
    prepare_flags: dict[str, str] = {}

    def build_key(self, block) -> str:
        return f"toy-v1-seed{int((block or {}).get('seed') or 0)}"

    def extra_identity(self, data: dict, block) -> dict:
        return {}

    def validate(self, block) -> None:
        if int((block or {}).get("seed") or 0) < 0:
            raise ValueError("toy.seed must be >= 0")

    def model_names(self, block) -> tuple[str, ...]:
        return tuple(SOURCES)

    def check_model(self, model: str, block, what: str) -> None:
        check_name(self, "model", model, self.model_names(block), what)

    def check_reward(self, reward: str, block, what: str) -> None:
        check_name(self, "reward model", reward, (), what)

    def ensure(self, block, num_threads=None, progress: bool = True) -> Path:
        folder = Path((block or {}).get("cache_dir")) / self.build_key(block)
        if not folder.is_dir():
            (folder / "prompts").mkdir(parents=True)
            for name, source in SOURCES.items():
                shutil.copytree(source, folder / name)
            from conftest import ASSISTANT, HUMAN

            rows = [{"id": f"test-{i}", "prompt": f"{HUMAN} {text}{ASSISTANT}"} for i, text in enumerate(PROMPTS)]
            (folder / "prompts" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    def find(self, block) -> Path | None:
        folder = Path((block or {}).get("cache_dir")) / self.build_key(block)
        return folder if folder.is_dir() else None

    def resolve_reward(self, reward_cfg, block):
        self.check_reward(str(reward_cfg.get("name_or_path")).split(":", 1)[1], block, "reward.name_or_path")

    def references(self, cfg, rows: list[dict]) -> list[dict]:
        return []

    def next_steps(self, block, run_path: Path):
        return None

    def prepare(self, cfg, flags: dict[str, bool], console) -> None:
        console.print(f"toy testbed at {self.ensure(cfg.get(self.name))}")


TESTBED = ToyTestbed()
