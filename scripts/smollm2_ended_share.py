"""How many SmolLM2 answers end by themselves within the cap? (SmolLM2 issue, item 2: finished answers.)

    .venv/bin/python scripts/smollm2_ended_share.py                  # 32 held-out questions, caps 48 and 64
    .venv/bin/python scripts/smollm2_ended_share.py --prompts 64 --caps 48 96
    .venv/bin/python scripts/smollm2_ended_share.py --instructions "Answer in one short sentence." --out x.json

Samples the SFT model (SmolLM2-135M-Instruct from the packaged GGUF, chat template, temperature 1, the build's
sampling settings) on the build's held-out questions (`tqstar.smollm2.prompts.make_prompts`, seed 0) with and
without the brevity instruction (`Smollm2Params.instruction`), and reports the share of responses that ended by
EOS or a stop string before the cap (`evaluate.ended_share`'s rule), with the mean length. Writes
docs/bench/smollm2_ended_share.json. The DPO baselines are not measured here (they need the build).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTRUCTION = "Answer in one or two sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--caps", type=int, nargs="+", default=[48, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--instructions",
        nargs="+",
        default=["none", INSTRUCTION],
        help="brevity instructions to compare ('none': the questions as they are)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "smollm2_ended_share.json"))
    args = parser.parse_args()

    import torch

    from tqstar.config import compose, validate
    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.settings import DecoderSettings
    from tqstar.models import format_prompt, load_model
    from tqstar.rewards.base import zero_reward
    from tqstar.smollm2.params import STOP_STRINGS
    from tqstar.smollm2.prompts import make_prompts

    torch.set_num_threads(args.threads)
    cfg = validate(compose(["experiment=smollm2_offline", "sft=smollm2", "baseline=smollm2", "dataset=hh_sample", "device=cpu"]))
    sft = load_model(cfg.sft, "cpu", {})
    results = []
    for instruction in [None if i == "none" else i for i in args.instructions]:
        _, test = make_prompts(0, 400, 128, instruction)
        prompts = [row["prompt"] for row in test[: args.prompts]]
        texts = [format_prompt(sft.tokenizer, p, "chat") for p in prompts]
        for cap in args.caps:
            settings = DecoderSettings(
                method="sft", selection="sample", temperature=1.0, max_new_tokens=cap, batch_size=8, stop_strings=list(STOP_STRINGS)
            )
            decoder = Decoder(sft.model, sft.tokenizer, reward=zero_reward, settings=settings)
            started = time.perf_counter()
            generations = decoder.decode(texts, list(range(len(texts))), reward_prompts=prompts)
            ended = sum(g.stop_reason != "max_new_tokens" for g in generations)
            row = {
                "instruction": instruction,
                "cap": cap,
                "prompts": len(generations),
                "ended_share": round(ended / len(generations), 3),
                "mean_tokens": round(sum(g.num_tokens for g in generations) / len(generations), 1),
                "seconds": round(time.perf_counter() - started, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct (packaged GGUF, float32), chat template, sampled at temperature 1, seed 0",
        "questions": "tqstar.smollm2.prompts.make_prompts(0, 400, 128): the first held-out questions",
        "results": results,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
