"""Seconds per DPO step of the SmolLM2 recipe, float32 against bfloat16 autocast (SmolLM2 issue, item 1: the build's time).

    .venv/bin/python scripts/smollm2_dpo_bench.py --build ~/.cache/tqstar/smollm2/v1-0a09bee7
    .venv/bin/python scripts/smollm2_dpo_bench.py --build <folder> --steps 6 --repeats 3 --out x.json

Reads a finished build's SFT samples (samples/train.jsonl: token ids and log pi_sft), its prompts and sft/,
labels the target reward's pairs as the build does (`label_pairs`), and trains DPO (`train_dpo`, the build's own
function) for ``--steps`` optimiser steps under the build's recipe (its manifest's params) with ``bf16`` false and
true, ``--repeats`` times each, alternating. Prints and writes the seconds per step (TRL's train_runtime / steps;
model load and save excluded) with their medians, the machine and the library versions, to
docs/bench/smollm2_dpo_step.json. Run it on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", required=True, help="a finished SmolLM2 build's folder (its manifest's params are the recipe)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "smollm2_dpo_step.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tqstar.builds import quiet_libraries
    from tqstar.files import read_jsonl
    from tqstar.runs import cpu_model
    from tqstar.smollm2.cache import versions
    from tqstar.smollm2.params import Smollm2Params
    from tqstar.smollm2.sampling import format_prompts
    from tqstar.smollm2.training import label_pairs, train_dpo

    torch.set_num_threads(args.threads)
    build = Path(args.build).expanduser()
    manifest = json.loads((build / "manifest.json").read_text())
    params = Smollm2Params(**manifest["params"])
    samples = read_jsonl(build / "samples" / "train.jsonl")
    prompts = [p["prompt"] for p in read_jsonl(build / "prompts" / "train.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(build / "sft")
    prompt_ids = tokenizer(format_prompts(tokenizer, prompts))["input_ids"]
    pairs, _ = label_pairs(samples, "target_reward", params.min_gap, params.pairs_finished_only)

    per_step: dict[str, list[float]] = {"float32": [], "bf16": []}
    with quiet_libraries():
        for _ in range(args.repeats):
            for name, bf16 in (("float32", False), ("bf16", True)):
                recipe = dataclasses.replace(params, bf16=bf16, max_steps=args.steps)
                with tempfile.TemporaryDirectory(prefix="tqstar-dpo-bench-") as scratch:
                    record = train_dpo(
                        build / "sft", Path(scratch) / "dpo", prompt_ids, samples, pairs, recipe, params.beta, manifest["seed"]
                    )
                per_step[name].append(record["seconds_per_step"])
                print(f"{name}: {record['seconds_per_step']:.2f} s a step ({args.steps} steps, loss {record['train_loss']})", flush=True)

    medians = {name: statistics.median(values) for name, values in per_step.items()}
    result = {
        "build": build.name,
        "recipe": {k: v for k, v in dataclasses.asdict(params).items() if k not in ("sft_source",)},
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "seconds_per_step": per_step,
        "median_seconds_per_step": medians,
        "ratio_float32_over_bf16": round(medians["float32"] / medians["bf16"], 3),
        "machine": {"cpu": cpu_model(), "cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": versions(),
    }
    print(json.dumps({k: result[k] for k in ("median_seconds_per_step", "ratio_float32_over_bf16")}))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
