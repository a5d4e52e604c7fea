"""Prompt sets: the built tasks' prompts (synthetic, SmolLM2), hub datasets and local files, one path (`datasets`).

`load_prompts(dataset_cfg, tokenizer, synthetic_dir, smollm2_dir)` returns a `PromptSet`: the selected prompts
(each with a stable id) after offset / limit / shuffle / shard, and counts of what was skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


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


BUILT_DATASETS = {
    "synthetic": ("synthetic task", "synthetic_dir=tqstar.synthetic.ensure_built()"),
    "smollm2": ("SmolLM2 build", "smollm2_dir=tqstar.smollm2.ensure_built()"),
}


def _built_rows(dataset_cfg, folder) -> tuple[list[dict], str]:
    """The prompts of a built task (dataset=synthetic | smollm2): ``<folder>/prompts/<split>.jsonl``."""
    name = str(dataset_cfg.name)
    what, hint = BUILT_DATASETS[name]
    split = str(dataset_cfg.get("split", "test"))
    if folder is None:
        raise ConfigError(f"dataset={name} needs the {what}'s folder (tqstar decode resolves it; in Python pass {hint})")
    path = Path(folder) / "prompts" / f"{split}.jsonl"
    if not path.exists():
        raise ConfigError(f"dataset.split={split!r} is not allowed for the {what}; allowed: train, test")
    return [{"id": r["id"], "prompt": r["prompt"]} for r in _read_jsonl(path)], f"{name}:{split}"


def parse_shard(shard: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ConfigError(f"dataset.shard={shard!r} is not allowed: must be 'i/n' with 0 <= i < n") from None
    if not 0 <= index < count:
        raise ConfigError(f"dataset.shard={shard!r} is not allowed: must be 'i/n' with 0 <= i < n")
    return index, count


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


def load_prompts(dataset_cfg, tokenizer=None, synthetic_dir=None, smollm2_dir=None) -> PromptSet:
    """The selected prompts of a dataset config; prompts that cannot be used are skipped and counted
    (`empty`, `not_text`, `no_assistant_turn`, and `too_long`: over `max_prompt_tokens` of `tokenizer`)."""
    name = str(dataset_cfg.name)
    if name in BUILT_DATASETS:
        rows, source = _built_rows(dataset_cfg, synthetic_dir if name == "synthetic" else smollm2_dir)
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
