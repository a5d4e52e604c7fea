#!/usr/bin/env python
"""Fingerprint what every method generates on a built synthetic task, to prove a refactor changed nothing.

Decodes each method of the registry (tqstar/methods.py; `cases()` derives the list: greedy, a sampled
variant where selection applies, direct and indirect transfer, a trace where candidates are valued)
through the `tqstar decode` command line, on explicit model folders and a local prompt file, so the check
does not depend on how the task is located or built. Each run's rows are reduced to what it generated
(ids, text, log-probs, rewards, stop reasons, traces; no timings) and hashed.

    python scripts/decode_fingerprint.py --task-dir ~/.cache/tqstar/synthetic/v3-dc7f5f90 -o before.json
    ... change the code ...
    python scripts/decode_fingerprint.py --task-dir ... -o after.json --compare before.json

Exits 1 when --compare finds a method whose generations differ (or one that is no longer decoded).
The fast test tier runs the same fingerprint in-process on tiny models against committed hashes
(tests/test_golden.py, tests/data/decode_golden.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Fields that say what a run generated (timings and placement left out).
FIELDS = (
    "index",
    "prompt_id",
    "response",
    "num_tokens",
    "reward",
    "stop_reason",
    "token_ids",
    "sft_logprobs",
    "policy_logprobs",
    "trace",
    "best_of_n_rewards",
    "best_of_n_chosen",
)
BASELINE_BL = "@bl"  # marks a case whose baseline is the indirect-transfer one (rho_bl, aligned to r_bl)


def cases() -> dict[str, list[str]]:
    """Decoder overrides of each case, derived from the method registry so a new method cannot drop out:
    `<method>` greedy (with a trace where candidates are valued; best-of-n draws n=4 samples),
    `<method>_sample` where selection applies (sampled rollouts too, 2 a candidate, where there are rollouts),
    and for a method with indirect transfer `<method>_indirect` (greedy, traced) and `<method>_indirect_sn`
    (self-normalised, sampled rollouts). The names and overrides of the ten cases this script always had are kept."""
    from tqstar.methods import METHODS

    out: dict[str, list[str]] = {}
    for name, spec in METHODS.items():
        head = [f"decoder={name}"]
        out[name] = head + (["decoder.n=4"] if spec.response_level else []) + (["decoder.trace=true"] if spec.uses_values else [])
        if not spec.sampled:
            rollouts = ["decoder.rollout.selection=sample", "decoder.rollout.num=2"] if spec.uses_rollouts else []
            out[f"{name}_sample"] = head + ["decoder.selection=sample"] + rollouts
        if spec.needs_baseline_reward("indirect"):
            indirect = head + ["decoder.transfer=indirect"]
            out[f"{name}_indirect"] = indirect + ["decoder.rollout.max_new_tokens=5", "decoder.trace=true", BASELINE_BL]
            out[f"{name}_indirect_sn"] = indirect + [
                "decoder.self_normalize=true",
                "decoder.rollout.selection=sample",
                "decoder.rollout.num=2",
                "decoder.rollout.max_new_tokens=5",
                BASELINE_BL,
            ]
    return out


def reduce_rows(rows: list[dict]) -> list[dict]:
    """What a run generated: its rows in prompt order, each cut to FIELDS."""
    return [{k: r.get(k) for k in FIELDS} for r in sorted(rows, key=lambda r: r["index"])]


def digest(kept: list[dict]) -> str:
    """The sha256 of reduced rows (canonical JSON)."""
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines() if line.strip()]


def cli_decode(tqstar: str) -> Callable[[list[str]], None]:
    """Decode through the `tqstar decode` command, one process a case."""

    def decode(overrides: list[str]) -> None:
        subprocess.run([tqstar, "decode", *overrides], check=True, stdout=subprocess.DEVNULL)

    return decode


def fingerprint(
    task_dir: Path,
    out: Path,
    limit: int,
    tokens: int,
    decode: Callable[[list[str]], None],
    baseline_direct: str = "rho0.1",
    baseline_bl: str = "rho_bl",
    extra: tuple[str, ...] = (),
    keep_rows: bool = False,
    quiet: bool = False,
) -> dict:
    """{case: {sha256, rows, mean_reward (, generations: the reduced rows when keep_rows)}} for every case of
    `cases()`, each decoded by `decode(overrides)` into its own folder under `out`; `extra` overrides go last."""
    results = {}
    for name, overrides in cases().items():
        baseline = baseline_bl if BASELINE_BL in overrides else baseline_direct
        overrides = [o for o in overrides if o != BASELINE_BL] + [
            "model@sft=hf",
            f"sft.name_or_path={task_dir / 'sft'}",
            "model@baseline=hf",
            f"baseline.name_or_path={task_dir / baseline}",
            "dataset=local",
            f"dataset.path={task_dir / 'prompts' / 'test.jsonl'}",
            f"dataset.limit={limit}",
            f"decoder.max_new_tokens={tokens}",
            "decoder.batch_size=4",
            "device=cpu",
            f"output_dir={out}",
            f"experiment_name={name}",
            *extra,
        ]
        decode(overrides)
        (folder,) = (out / name).iterdir()
        kept = reduce_rows(read_rows(folder))
        results[name] = {"sha256": digest(kept), "rows": len(kept), "mean_reward": sum(r["reward"] for r in kept) / len(kept)}
        if keep_rows:
            results[name]["generations"] = kept
        if not quiet:
            print(f"{name:20s} {results[name]['sha256'][:16]}  rows={len(kept)}  reward={results[name]['mean_reward']:.4f}", flush=True)
    return results


def differences(before: dict, after: dict) -> tuple[list[str], list[str], list[str]]:
    """(cases whose hashes differ, cases no longer decoded, cases new since `before`)."""
    differ = sorted(n for n in set(before) & set(after) if before[n]["sha256"] != after[n]["sha256"])
    return differ, sorted(set(before) - set(after)), sorted(set(after) - set(before))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-dir", type=Path, required=True, help="a built synthetic task folder (holds sft/, the baselines, prompts/)")
    parser.add_argument("--baseline", default="rho0.1", help="folder of the direct-transfer baseline in the task (v3/v4 builds: dpo)")
    parser.add_argument("--baseline-bl", default="rho_bl", help="folder of the indirect-transfer baseline (v3/v4 builds: dpo_bl)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the fingerprints (JSON)")
    parser.add_argument("--compare", type=Path, help="an earlier fingerprint file: exit 1 on any difference")
    parser.add_argument("--limit", type=int, default=8, help="prompts per method")
    parser.add_argument("--tokens", type=int, default=24, help="decoder.max_new_tokens")
    parser.add_argument("--tqstar", default=str(Path(sys.executable).with_name("tqstar")), help="the tqstar command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = fingerprint(
            args.task_dir.expanduser(), Path(tmp), args.limit, args.tokens, cli_decode(args.tqstar), args.baseline, args.baseline_bl
        )
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.compare:
        differ, gone, new = differences(json.loads(args.compare.read_text()), results)
        if new:
            print(f"new since {args.compare} (not compared): {', '.join(new)}")
        if gone:
            print(f"NO LONGER DECODED: {', '.join(gone)}")
        print("identical: every method" if not differ else f"DIFFERENT: {', '.join(differ)}")
        return 1 if differ or gone else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
