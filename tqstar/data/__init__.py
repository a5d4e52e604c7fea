"""Prompt sets: the synthetic task's held-out prompts, hub datasets and local files, one path (`datasets`).

`load_prompts(dataset_cfg, tokenizer, synthetic_cfg)` returns a `PromptSet`: the selected prompts
(each with a stable id) after offset / limit / shuffle / shard, and counts of what was skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, parse_shard


@dataclass
class Prompt:
    id: str
    text: str


@dataclass
class PromptSet:
    prompts: list[Prompt]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    return rows


def _synthetic_rows(dataset_cfg, synthetic_cfg) -> tuple[list[dict], str]:
    from ..synthetic.build import ensure_built

    seed = synthetic_cfg.seed if synthetic_cfg is not None else 0
    cache_dir = synthetic_cfg.cache_dir if synthetic_cfg is not None else None
    split = str(dataset_cfg.get("split", "test"))
    path = ensure_built(seed=seed, cache_dir=cache_dir) / "prompts" / f"{split}.jsonl"
    if not path.exists():
        raise ConfigError(f"dataset.split={split!r} is not allowed for the synthetic task; allowed: train, test")
    return [{"id": r["id"], "prompt": r["prompt"]} for r in _read_jsonl(path)], f"synthetic:{split}"


def select(rows: list[dict], dataset_cfg) -> list[dict]:
    """Shuffle (seeded), then offset, limit and shard, in that order."""
    if dataset_cfg.get("shuffle"):
        import random

        rows = list(rows)
        random.Random(int(dataset_cfg.get("shuffle_seed", 0))).shuffle(rows)
    offset = int(dataset_cfg.get("offset") or 0)
    limit = dataset_cfg.get("limit")
    rows = rows[offset:] if limit is None else rows[offset:offset + int(limit)]
    shard = dataset_cfg.get("shard")
    if shard:
        index, count = parse_shard(str(shard))
        rows = rows[index::count]
    return rows


def load_prompts(dataset_cfg, tokenizer=None, synthetic_cfg=None) -> PromptSet:
    name = str(dataset_cfg.name)
    if name == "synthetic":
        rows, source = _synthetic_rows(dataset_cfg, synthetic_cfg)
    else:
        from .sources import load_rows

        rows, source = load_rows(dataset_cfg)
    rows = select(rows, dataset_cfg)
    skipped: dict[str, int] = {}
    prompts = []
    max_tokens = dataset_cfg.get("max_prompt_tokens")
    for row in rows:
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        if max_tokens and tokenizer is not None and len(tokenizer(text)["input_ids"]) > int(max_tokens):
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        prompts.append(Prompt(str(row["id"]), text))
    if not prompts:
        raise ConfigError(f"dataset {source} has no prompts to decode after selection (skipped: {skipped or 'none'})")
    return PromptSet(prompts, source, skipped)
