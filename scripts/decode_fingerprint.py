#!/usr/bin/env python
"""Fingerprint what every method generates on a built synthetic task, to prove a refactor changed nothing.

Decodes each method (greedy and sampled variants, direct and indirect transfer, with a trace) through
the `tqstar decode` command line, on explicit model folders and a local prompt file, so the check does
not depend on how the task is located or built. Each run's rows are reduced to what it generated
(ids, text, log-probs, rewards, stop reasons, traces; no timings) and hashed.

    python scripts/decode_fingerprint.py --task-dir ~/.cache/tqstar/synthetic/v3-dc7f5f90 -o before.json
    ... change the code ...
    python scripts/decode_fingerprint.py --task-dir ... -o after.json --compare before.json

Exits 1 when --compare finds a method whose generations differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
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

CASES = {
    "sft": ["decoder=sft"],
    "sft_sample": ["decoder=sft", "decoder.selection=sample"],
    "baseline": ["decoder=baseline"],
    "best_of_n": ["decoder=best_of_n", "decoder.n=4"],
    "args": ["decoder=args", "decoder.trace=true"],
    "cd": ["decoder=cd", "decoder.trace=true"],
    "cd_sample": ["decoder=cd", "decoder.selection=sample", "decoder.rollout.selection=sample", "decoder.rollout.num=2"],
    "tqstar": ["decoder=tqstar", "decoder.trace=true"],
    "tqstar_indirect": ["decoder=tqstar", "decoder.transfer=indirect", "decoder.rollout.max_new_tokens=5", "decoder.trace=true", "@bl"],
    "tqstar_indirect_sn": [
        "decoder=tqstar",
        "decoder.transfer=indirect",
        "decoder.self_normalize=true",
        "decoder.rollout.selection=sample",
        "decoder.rollout.num=2",
        "decoder.rollout.max_new_tokens=5",
        "@bl",
    ],
}


def fingerprint(task_dir: Path, out: Path, limit: int, tokens: int, tqstar: str, baseline_direct: str, baseline_bl: str) -> dict:
    results = {}
    for name, extra in CASES.items():
        baseline = baseline_bl if "@bl" in extra else baseline_direct
        overrides = [o for o in extra if o != "@bl"] + [
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
        ]
        subprocess.run([tqstar, "decode", *overrides], check=True, stdout=subprocess.DEVNULL)
        (folder,) = (out / name).iterdir()
        rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines() if line.strip()]
        rows.sort(key=lambda r: r["index"])
        kept = [{k: r.get(k) for k in FIELDS} for r in rows]
        blob = json.dumps(kept, sort_keys=True).encode()
        results[name] = {
            "sha256": hashlib.sha256(blob).hexdigest(),
            "rows": len(rows),
            "mean_reward": sum(r["reward"] for r in rows) / len(rows),
        }
        print(f"{name:20s} {results[name]['sha256'][:16]}  rows={len(rows)}  reward={results[name]['mean_reward']:.4f}", flush=True)
    return results


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
        results = fingerprint(args.task_dir.expanduser(), Path(tmp), args.limit, args.tokens, args.tqstar, args.baseline, args.baseline_bl)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = [n for n in sorted(set(before) | set(results)) if before.get(n, {}).get("sha256") != results.get(n, {}).get("sha256")]
        print("identical: every method" if not differ else f"DIFFERENT: {', '.join(differ)}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
