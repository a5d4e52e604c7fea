#!/usr/bin/env python
"""Benchmark the TQ* engine against the reference implementation and a generate() floor.

In one process, on the same models, prompts and settings:
  1. engine     tqstar.decoding.engine.Decoder (KV caches kept across steps, candidates batched)
  2. reference  tqstar.decoding.reference.reference_decode, the authors' structure (re-encode
                everything each step, k candidates rolled out from scratch with generate(),
                reward on decoded text); the oracle of the test suite
  3. floor      the same number of rollout tokens produced by model.generate() from an
                already-filled cache (k x batch rows, L tokens per response token)
With --batch-size B the engine decodes B prompts together (decoder.batch_size) and its seconds per
response are the batch's wall time / B; the reference still decodes one prompt at a time (as the
authors' code does), and the floor's rate is measured at the engine's row count (k x B rows, on the
batch's first prompt).
Asserts 1 and 2 give identical tokens (greedy); prints a table and writes JSON with seconds per
response, rollout tokens per second, peak memory and the ratios reference/engine, engine/floor.

Settings:
  synthetic  the synthetic task's SFT and DPO models, VADER reward, its held-out prompts
  smollm2    SmolLM2-135M-Instruct (packaged GGUF) as SFT and baseline, VADER reward,
             HH-style prompts of 150-300 tokens, k=10, rollouts of 20, 32 new tokens

  python scripts/bench_decode.py --setting smollm2 --prompts 2 --repeats 3 --json outputs/bench/smollm2.json
  python scripts/bench_decode.py --setting smollm2 --prompts 4 --batch-size 4 --json outputs/bench/smollm2_b4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Multi-turn HH-style conversations; repeated turns bring each prompt to 150-300 tokens.
TURNS = [
    (
        "I just moved to a new city for work and I don't know anyone here. The apartment is small, the neighbourhood is loud at night, and my commute is almost an hour each way.",
        "That sounds like a lot of change at once. Moving for work can feel isolating at first, especially when the daily routine is tiring.",
    ),
    (
        "Yesterday my team lead criticised my report in front of everyone. I worked on it for two weeks and I thought it was good. Now I feel embarrassed and I am not sure how to face them tomorrow.",
        "Being criticised in public is hard, and it is natural to feel embarrassed after putting so much effort into something.",
    ),
    (
        "My sister and I had an argument about our parents' anniversary party. She wants a big event and I think a quiet dinner would be better, because our dad has been unwell this year.",
        "It sounds like you both care about your parents and want the celebration to be right for them.",
    ),
    (
        "I have been trying to learn to cook, but everything I make turns out bland or burnt. Last night I ruined a simple pasta dish and ended up ordering takeaway again.",
        "Learning to cook takes practice, and almost everyone has a few ruined dishes along the way.",
    ),
]
FOLLOW_UPS = [
    "What would you suggest I do this week to feel a bit better about all of this?",
    "Can you give me some honest advice on how to handle it?",
    "How should I think about this, and what should I say?",
    "Any tips on what I should try next?",
]


def hh_prompts(tokenizer, count: int, low: int = 150, high: int = 300) -> list[str]:
    prompts = []
    for i in range(count):
        human, assistant = TURNS[i % len(TURNS)]
        other_h, other_a = TURNS[(i + 1) % len(TURNS)]
        follow_up = FOLLOW_UPS[(i + 2 * (i // len(TURNS))) % len(FOLLOW_UPS)]  # 8 distinct prompts, all 150-300 tokens
        text = f"\n\nHuman: {human}\n\nAssistant: {assistant}\n\nHuman: {other_h}\n\nAssistant: {other_a}"
        text += f"\n\nHuman: {follow_up}\n\nAssistant:"
        n = len(tokenizer(text)["input_ids"])
        if not low <= n <= high:
            raise SystemExit(f"bench prompt {i} has {n} tokens, outside {low}-{high}")
        prompts.append(text)
    return prompts


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide, monotone


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_setting(name: str, device: str, dtype: str, prompt_count: int):
    from omegaconf import OmegaConf

    from tqstar.models import load_model
    from tqstar.rewards import VaderReward

    if name == "smollm2":
        model_cfg = OmegaConf.create({"name_or_path": "packaged:smollm2", "dtype": dtype, "device": device})
        sft = load_model(model_cfg, device)
        baseline = sft
        prompts = hh_prompts(sft.tokenizer, prompt_count)
        knobs = dict(top_k=10, rollout_max_new_tokens=20, max_new_tokens=32)
    elif name == "synthetic":
        from tqstar.data import load_prompts
        from tqstar.synthetic import ensure_built

        task = ensure_built()
        sft = load_model(OmegaConf.create({"name_or_path": "synthetic:sft", "dtype": dtype, "device": device}), device, task)
        baseline = load_model(OmegaConf.create({"name_or_path": "synthetic:rho0.1", "dtype": dtype, "device": device}), device, task)
        data = load_prompts(OmegaConf.create({"name": "synthetic", "split": "test", "limit": prompt_count}), synthetic_dir=task)
        prompts = [p.text for p in data.prompts]
        knobs = dict(top_k=10, rollout_max_new_tokens=20, max_new_tokens=32)
    else:
        raise SystemExit(f"unknown setting {name!r}: synthetic or smollm2")
    return sft, baseline, prompts, VaderReward(stop_strings=["\n\nHuman:"]), knobs


def floor_seconds(model, tokenizer, prompt: str, token_ids: list[int], k: int, length: int, device, stride: int = 1) -> tuple[float, int]:
    """Seconds for generate() to make k x length tokens per response step from an already-filled cache
    (k rows: the candidate rows of one response step), on every `stride`-th response step."""
    import torch
    from transformers import DynamicCache

    from tqstar.decoding.kv import _cache_argument

    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    full = torch.cat([prompt_ids, torch.tensor([token_ids], device=device)], dim=1)
    with torch.no_grad():
        out = model(input_ids=full, use_cache=True, **{_cache_argument(type(model)): DynamicCache()})
    filled = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    layers = [(layer.keys, layer.values) for layer in filled.layers]
    elapsed, tokens = 0.0, 0
    for t in range(0, len(token_ids), stride):
        prefix = prompt_ids.shape[1] + t
        # The filled cache's first `prefix` positions, one copy per candidate row (not timed: setup).
        cache = DynamicCache(
            ddp_cache_data=[(key[:, :, :prefix].repeat(k, 1, 1, 1), value[:, :, :prefix].repeat(k, 1, 1, 1)) for key, value in layers]
        )
        rows = full[:, : prefix + 1].repeat(k, 1)
        sync(device)
        start = time.perf_counter()
        generated = model.generate(
            input_ids=rows,
            attention_mask=torch.ones_like(rows),
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **{_cache_argument(type(model)): cache},
        )
        sync(device)
        elapsed += time.perf_counter() - start
        tokens += (generated.shape[1] - rows.shape[1]) * k
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("--setting", choices=["synthetic", "smollm2"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=2, help="prompts (each decoded by every method)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of engine and floor per prompt (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of the (slow) reference per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts the engine decodes together (decoder.batch_size)")
    parser.add_argument(
        "--reference-prompts", type=int, default=None, help="run the reference on the first N prompts of each batch only (default: all)"
    )
    parser.add_argument(
        "--floor-stride", type=int, default=1, help="time the floor on every N-th response step (its rate varies little along the response)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the setting's response length")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    import torch

    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.reference import reference_decode
    from tqstar.decoding.settings import DecoderSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    sft, baseline, prompts, reward, knobs = load_setting(args.setting, args.device, args.dtype, args.prompts)
    if args.max_new_tokens:
        knobs["max_new_tokens"] = args.max_new_tokens
    settings = DecoderSettings(method="tqstar", alpha=1.0, batch_size=args.batch_size, **knobs)
    device = sft.device
    tokenizer = sft.tokenizer
    per_batch = []
    for b0 in range(0, len(prompts), args.batch_size):
        batch = prompts[b0 : b0 + args.batch_size]
        n_prompt = [len(tokenizer(prompt)["input_ids"]) for prompt in batch]
        engine_times, counters = [], None
        reset_peak(device)
        for _ in range(args.repeats):
            decoder = Decoder(sft.model, tokenizer, reward=reward, baseline_model=baseline.model, settings=settings)
            sync(device)
            start = time.perf_counter()
            generations = decoder.decode(batch)
            sync(device)
            engine_times.append(time.perf_counter() - start)
            counters = dict(decoder.counters)
        engine_peak = peak_memory_mb(device)
        label = f"prompts {b0}-{b0 + len(batch) - 1}" if len(batch) > 1 else f"prompt {b0}"
        print(
            f"{label}: engine runs {[round(x, 2) for x in engine_times]} s, {[g.num_tokens for g in generations]} tokens, "
            f"{counters['rollout_tokens']} rollout tokens",
            flush=True,
        )
        reset_peak(device)
        reference_times, identical = [], []
        for prompt, generation in list(zip(batch, generations))[: args.reference_prompts]:
            runs = []
            for _ in range(args.reference_repeats):
                sync(device)
                start = time.perf_counter()
                text, ids = reference_decode(prompt, sft.model, tokenizer, reward, settings, baseline.model)
                sync(device)
                runs.append(time.perf_counter() - start)
            reference_times.append(statistics.median(runs))
            identical.append(ids == generation.token_ids)
            if not identical[-1]:
                print(f"  engine:    {generation.token_ids}\n  reference: {ids}", file=sys.stderr)
        reference_peak = peak_memory_mb(device)
        print(f"{label}: reference runs {[round(x, 2) for x in reference_times]} s", flush=True)
        reset_peak(device)
        rows = settings.top_k * len(batch)
        floor_runs = [
            floor_seconds(
                baseline.model,
                tokenizer,
                batch[0],
                generations[0].token_ids,
                rows,
                settings.rollout_max_new_tokens,
                device,
                args.floor_stride,
            )
            for _ in range(args.repeats)
        ]
        floor_peak = peak_memory_mb(device)
        floor_rate = statistics.median(tokens / seconds for seconds, tokens in floor_runs)
        engine_s = statistics.median(engine_times) / len(batch)  # per response
        floor_equivalent = counters["rollout_tokens"] / floor_rate / len(batch)  # floor time for the engine's own rollout tokens
        row = {
            "prompts": list(range(b0, b0 + len(batch))),
            "prompt_tokens": n_prompt,
            "response_tokens": [g.num_tokens for g in generations],
            "identical_tokens": all(identical),
            "reference_prompts": len(reference_times),
            "engine_s": engine_s,
            "engine_runs_s": engine_times,
            "reference_s": statistics.mean(reference_times),
            "reference_runs_s": reference_times,
            "floor_s": floor_equivalent,
            "floor_rows": rows,
            "floor_tokens_per_s": floor_rate,
            "rollout_tokens": counters["rollout_tokens"],
            "engine_rollout_tokens_per_s": counters["rollout_tokens"] / statistics.median(engine_times),
            "reward_calls": counters["reward_calls"],
            "peak_mb": {"engine": engine_peak, "reference": reference_peak, "floor": floor_peak},
        }
        row["reference_over_engine"] = row["reference_s"] / engine_s
        row["engine_over_floor"] = engine_s / floor_equivalent
        per_batch.append(row)
        print(
            f"{label}: {n_prompt} prompt tokens, {row['response_tokens']} new; per response: engine {engine_s:.2f}s, "
            f"reference {row['reference_s']:.2f}s, floor {floor_equivalent:.2f}s; identical={all(identical)}",
            flush=True,
        )

    summary = {
        "setting": args.setting,
        "device": str(device),
        "dtype": str(sft.model.dtype),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "settings": {
            "top_k": settings.top_k,
            "rollout_max_new_tokens": settings.rollout_max_new_tokens,
            "max_new_tokens": settings.max_new_tokens,
            "rollout_num": settings.rollout_num,
        },
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "reference_repeats": args.reference_repeats,
        "reference_prompts_per_batch": args.reference_prompts,
        "floor_stride": args.floor_stride,
        "engine_s_per_response": statistics.median(r["engine_s"] for r in per_batch),
        "reference_s_per_response": statistics.median(r["reference_s"] for r in per_batch),
        "floor_s_per_response": statistics.median(r["floor_s"] for r in per_batch),
        "engine_rollout_tokens_per_s": statistics.median(r["engine_rollout_tokens_per_s"] for r in per_batch),
        "floor_rollout_tokens_per_s": statistics.median(r["floor_tokens_per_s"] for r in per_batch),
        "reference_over_engine": statistics.median(r["reference_over_engine"] for r in per_batch),
        "engine_over_floor": statistics.median(r["engine_over_floor"] for r in per_batch),
        "all_identical": all(r["identical_tokens"] for r in per_batch),
        "per_batch": per_batch,
    }
    print()
    print(f"{'':28s}{'s/response':>12s}{'rollout tok/s':>15s}{'peak MB':>10s}")
    peaks = {k: max(r["peak_mb"][k] for r in per_batch) for k in ("engine", "reference", "floor")}
    print(f"{'1 engine':28s}{summary['engine_s_per_response']:12.2f}{summary['engine_rollout_tokens_per_s']:15.0f}{peaks['engine']:10.0f}")
    print(f"{'2 reference (authors)':28s}{summary['reference_s_per_response']:12.2f}{'':>15s}{peaks['reference']:10.0f}")
    print(
        f"{'3 floor (generate, cached)':28s}{summary['floor_s_per_response']:12.2f}{summary['floor_rollout_tokens_per_s']:15.0f}{peaks['floor']:10.0f}"
    )
    print(
        f"ratio 2/1 = {summary['reference_over_engine']:.2f}x   ratio 1/3 = {summary['engine_over_floor']:.2f}x   identical tokens: {summary['all_identical']}"
    )
    print(f"device {summary['device']} ({summary['dtype']}), {summary['machine']}, torch threads {summary['torch_threads']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not summary["all_identical"]:
        raise SystemExit("engine and reference disagree under greedy decoding")


if __name__ == "__main__":
    main()
