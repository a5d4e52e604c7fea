"""Prompt sets: a testbed's prompts, hub datasets and local files (one path: `datasets`).

`load_prompts(dataset_cfg, tokenizer, builds)` returns a `PromptSet`: the selected prompts (each with a stable
id) after offset / limit / shuffle / shard, and counts of what was skipped. A dataset named like a testbed
(`tqstar.testbeds`) reads its build's ``prompts/<split>.jsonl`` (the folder in `builds`: testbed -> folder);
any other reads `path` (tqstar/data/sources.py), so a new `conf/dataset/<name>.yaml` needs no code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, did_you_mean
from ..testbeds import folder_of, get, names
from .sources import check_dataset_config, parse_shard, validate_dataset

__all__ = ["Prompt", "PromptSet", "check_dataset_config", "load_prompts", "parse_shard", "select", "validate_dataset"]


@dataclass
class Prompt:
    id: str
    text: str
    index: int = 0  # position in the selection before sharding: seeds sampling; shards merge back in this order


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


def _built_rows(dataset_cfg, builds: dict[str, Path] | None) -> tuple[list[dict], str]:
    """The prompts of a testbed's build (the dataset named like the testbed): ``<build>/prompts/<split>.jsonl``."""
    name = str(dataset_cfg.name)
    split = str(dataset_cfg.get("split", "test"))
    path = folder_of(builds, name, f"dataset={name}") / "prompts" / f"{split}.jsonl"
    if not path.exists():
        testbed = get(name)
        raise ConfigError(f"dataset.split={split!r} is not allowed for the {testbed.title}; {did_you_mean(split, testbed.splits)}")
    return [{"id": r["id"], "prompt": r["prompt"]} for r in _read_jsonl(path)], f"{name}:{split}"


def select(rows: list[dict], dataset_cfg) -> list[dict]:
    """Shuffle (seeded), then offset, limit and shard, in that order."""
    if dataset_cfg.get("shuffle"):
        import random

        rows = list(rows)
        random.Random(int(dataset_cfg.get("shuffle_seed", 0))).shuffle(rows)
    offset = int(dataset_cfg.get("offset") or 0)
    limit = dataset_cfg.get("limit")
    rows = rows[offset:] if limit is None else rows[offset : offset + int(limit)]
    rows = [{**row, "position": position} for position, row in enumerate(rows)]
    shard = dataset_cfg.get("shard")
    if shard:
        index, count = parse_shard(str(shard))
        rows = rows[index::count]
    return rows


def _token_counts(tokenizer, texts: list[str], chunk: int = 512) -> list[int]:
    counts: list[int] = []
    for start in range(0, len(texts), chunk):
        counts.extend(len(ids) for ids in tokenizer(texts[start : start + chunk])["input_ids"])
    return counts


def load_prompts(dataset_cfg, tokenizer=None, builds: dict[str, Path] | None = None) -> PromptSet:
    """The selected prompts of a dataset config; prompts that cannot be used are skipped and counted
    (`empty`, `not_text`, `no_assistant_turn`, and `too_long`: over `max_prompt_tokens` of `tokenizer`).
    `builds`: testbed -> build folder (`tqstar.decode.builds`), for a testbed's dataset."""
    if str(dataset_cfg.name) in names():
        rows, source = _built_rows(dataset_cfg, builds)
    else:
        from .sources import load_rows

        rows, source = load_rows(dataset_cfg)
    total = len(rows)
    rows = select(rows, dataset_cfg)
    skipped: dict[str, int] = {}
    usable = []
    for row in rows:
        text = row.get("prompt")
        reason = row.get("skip") or (None if isinstance(text, str) and text.strip() else "empty")
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            usable.append(row)
    max_tokens = dataset_cfg.get("max_prompt_tokens")
    if max_tokens and tokenizer is not None and usable:
        counts = _token_counts(tokenizer, [row["prompt"] for row in usable])
        kept = [row for row, count in zip(usable, counts) if count <= int(max_tokens)]
        if len(kept) < len(usable):
            skipped["too_long"] = len(usable) - len(kept)
        usable = kept
    prompts = [Prompt(str(row["id"]), row["prompt"], row["position"]) for row in usable]
    if not prompts:
        raise ConfigError(
            f"dataset {source} has no prompts to decode after selection ({total} rows, {len(rows)} selected, skipped: {skipped or 'none'})"
        )
    return PromptSet(prompts, source, skipped)
