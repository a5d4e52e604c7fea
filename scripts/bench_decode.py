#!/usr/bin/env python
"""Benchmark the TQ* engine against the reference implementation and a generate() floor.

In one process, on the same models, prompts and settings:
  1. engine     tqstar.decoding.engine.Decoder (KV caches kept across steps, candidates batched,
                and the savings below)
  2. reference  tqstar.decoding.reference.reference_decode, the authors' structure (re-encode
                everything each step, k candidates rolled out from scratch with generate(),
                reward on decoded text, a reward model re-reading every text whole); the oracle of
                the test suite
  3. floor      the same number of rollout tokens produced by model.generate() from an
                already-filled cache (k x batch rows, L tokens per response token)
With --batch-size B the engine decodes B prompts together (decoder.batch_size) and its seconds per
response are the batch's wall time / B; the reference still decodes one prompt at a time (as the
authors' code does), and the floor's rate is measured at the engine's row count (k x B rows, on the
batch's first prompt).

The engine's savings, each on by default and switched off by a flag:
  exact bound pruning    decoder.prune            --no-prune          (VADER's bounds; a reward model's logit has none,
                                                                      its probability (--rm-output probability) [0, 1])
  greedy rollout reuse   decoder.reuse_rollouts   --no-reuse
  shared-prefix rollouts decoder.shared_prefix    --no-shared-prefix  (cascade attention, no prefix copies)
  reward prefix cache    reward.prefix_cache      --no-prefix-cache   (--reward rm)
A savings pass (skip it with --no-savings-pass) decodes each batch once more with every saving off,
untimed for the ratios, to count exactly what they saved: rollout tokens (pruning and reuse apart),
reward-model tokens read, peak memory, and to check that the tokens are the same.
Asserts 1 and 2 give identical tokens (greedy); prints a table and writes JSON with seconds per
response, rollout tokens per second, peak memory, savings and the ratios reference/engine, engine/floor.

Settings (--setting), prompts (--prompt-tokens) and reward (--reward):
  smollm2    SmolLM2-135M-Instruct (packaged GGUF) as SFT and baseline, k=10, rollouts of 20,
             32 new tokens
  synthetic  the synthetic task's SFT and DPO models and its held-out prompts
  tiny       a 2-layer random Llama with SmolLM2's tokenizer: checks the script end to end in
             seconds (its numbers mean nothing)
  --prompt-tokens 170   multi-turn HH-style prompts of 150-180 tokens (the script's TURNS)
  --prompt-tokens 600 / 1200   long dialogues of about that many tokens: TURNS and the packaged HH
             prompts' questions, ending with a packaged HH question
  --reward vader        VADER, bounds [-1, 1] (pruning applies)
  --reward rm           a SmolLM2-size reward model: the setting's SFT body (packaged:smollm2 read
             in float32 on the CPU) as AutoModelForSequenceClassification with a one-logit score
             head initialised with --rm-seed, saved once to outputs/bench/rm-<setting>-seed<N>/ and
             loaded by path through tqstar.rewards.hf.HFClassifierReward (unbounded: no pruning)
  --reward rm --rm-output probability   the same model scored by the sigmoid of its logit
             (reward.output=probability, bounds [0, 1]: pruning applies; another reward, so other tokens)

  python scripts/bench_decode.py --setting smollm2 --prompts 8 --batch-size 8 --json outputs/bench/smollm2_vader_b8.json
  python scripts/bench_decode.py --setting smollm2 --reward rm --prompts 8 --batch-size 8 --json outputs/bench/smollm2_rm_b8.json
  python scripts/bench_decode.py --setting smollm2 --prompt-tokens 1200 --prompts 8 --batch-size 8 --no-shared-prefix
  python scripts/bench_decode.py --setting tiny --reward rm --prompts 2 --batch-size 2 --max-new-tokens 3
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
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STOPS = ["\n\nHuman:"]
BENCH_DIR = Path("outputs/bench")

# Multi-turn HH-style conversations; two turns and a follow-up bring each prompt to 150-180 tokens (SmolLM2's tokenizer).
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


def hh_prompts(tokenizer, count: int, low: int = 150, high: int = 180) -> list[str]:
    prompts = []
    for i in range(count):
        human, assistant = TURNS[i % len(TURNS)]
        other_h, other_a = TURNS[(i + 1) % len(TURNS)]
        follow_up = FOLLOW_UPS[(i + 2 * (i // len(TURNS))) % len(FOLLOW_UPS)]  # 8 distinct prompts, all 150-180 tokens
        text = f"\n\nHuman: {human}\n\nAssistant: {assistant}\n\nHuman: {other_h}\n\nAssistant: {other_a}"
        text += f"\n\nHuman: {follow_up}\n\nAssistant:"
        n = len(tokenizer(text)["input_ids"])
        if not low <= n <= high:
            raise SystemExit(f"bench prompt {i} has {n} tokens, outside {low}-{high}")
        prompts.append(text)
    return prompts


# Replies to the packaged HH questions inside long dialogues (their content does not matter, their length does).
REPLIES = [
    "Good question. It depends on your situation, but a few simple steps usually help: start small, be patient with yourself, and ask for help when you need it.",
    "There are a few ways to look at this. The most useful one is usually to focus on what you can change this week, and let the rest wait.",
    "Many people find that a routine makes this easier. Try one thing for a few days, notice what works, and adjust from there.",
]


def packaged_questions() -> list[str]:
    """The questions of the HH prompts tqstar ships (tqstar/data/hh_prompts.jsonl), without their turn markers."""
    from tqstar.data.sources import PACKAGED_DIR

    rows = [json.loads(line) for line in (PACKAGED_DIR / "hh_prompts.jsonl").read_text().splitlines() if line.strip()]
    return [row["prompt"].split("Human:", 1)[1].rsplit("\n\nAssistant:", 1)[0].strip() for row in rows]


def long_prompts(tokenizer, count: int, target: int) -> list[str]:
    """Dialogues of about `target` tokens (target - 100 .. target + 50): alternating the script's TURNS and packaged
    HH questions (answered by REPLIES) until the next exchange would pass the target, then a packaged HH question."""
    questions = packaged_questions()
    exchanges = []
    for j in range(max(len(TURNS), len(questions))):
        exchanges.append(TURNS[j % len(TURNS)])
        exchanges.append((questions[j % len(questions)], REPLIES[j % len(REPLIES)]))
    prompts = []
    for i in range(count):
        ending = f"\n\nHuman: {questions[(i + 7) % len(questions)]}\n\nAssistant:"
        text, j = "", i
        while True:
            human, assistant = exchanges[j % len(exchanges)]
            longer = f"{text}\n\nHuman: {human}\n\nAssistant: {assistant}"
            if len(tokenizer(longer + ending)["input_ids"]) > target:
                break
            text, j = longer, j + 1
        text += ending
        n = len(tokenizer(text)["input_ids"])
        if not target - 100 <= n <= target + 50:
            raise SystemExit(f"long bench prompt {i} has {n} tokens, outside {target - 100}-{target + 50}")
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


def tiny_models(device: str):
    """Two 2-layer random Llamas (SFT, baseline) with SmolLM2's tokenizer: the pipeline in seconds, numbers meaningless."""
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from tqstar.models import resolve_device, tokenizer_for

    tokenizer = tokenizer_for(OmegaConf.create({"name_or_path": "packaged:smollm2"}))
    where = resolve_device(None if device == "auto" else device, "auto")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(SimpleNamespace(model=LlamaForCausalLM(config).to(where).eval(), tokenizer=tokenizer, device=where))
    return models


def load_setting(name: str, device: str, dtype: str, prompt_count: int, prompt_tokens: int):
    from omegaconf import OmegaConf

    from tqstar.models import load_model

    knobs = dict(top_k=10, rollout_max_new_tokens=20, max_new_tokens=32)
    if name in ("smollm2", "tiny"):
        if name == "smollm2":
            model_cfg = OmegaConf.create({"name_or_path": "packaged:smollm2", "dtype": dtype, "device": device})
            sft = load_model(model_cfg, device)
            baseline = sft
        else:
            sft, baseline = tiny_models(device)
        if prompt_tokens == 170:
            prompts = hh_prompts(sft.tokenizer, prompt_count, 150, 180)
        else:
            prompts = long_prompts(sft.tokenizer, prompt_count, prompt_tokens)
    elif name == "synthetic":
        from tqstar.data import load_prompts
        from tqstar.synthetic import ensure_built

        if prompt_tokens != 170:
            raise SystemExit("--prompt-tokens applies to the smollm2 and tiny settings (the synthetic task has its own prompts)")
        task = ensure_built()
        sft = load_model(OmegaConf.create({"name_or_path": "synthetic:sft", "dtype": dtype, "device": device}), device, {"synthetic": task})
        baseline = load_model(
            OmegaConf.create({"name_or_path": "synthetic:rho0.1", "dtype": dtype, "device": device}), device, {"synthetic": task}
        )
        data = load_prompts(OmegaConf.create({"name": "synthetic", "split": "test", "limit": prompt_count}), builds={"synthetic": task})
        prompts = [p.text for p in data.prompts]
    else:
        raise SystemExit(f"unknown setting {name!r}: smollm2, synthetic or tiny")
    return sft, baseline, prompts, knobs


def reward_model_folder(setting: str, sft, seed: int) -> Path:
    """The bench's reward model, built once: the setting's SFT body (SmolLM2 read in float32 on the CPU, so the folder
    does not depend on the bench's device or dtype) under a one-logit score head initialised with `seed`."""
    import copy

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification

    folder = BENCH_DIR / f"rm-{setting}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    if setting == "smollm2":
        from tqstar.models import load_model

        lm = load_model(OmegaConf.create({"name_or_path": "packaged:smollm2", "dtype": "float32", "device": "cpu"}), "cpu")
        body_model, tokenizer = lm.model, lm.tokenizer
    else:
        body_model, tokenizer = sft.model, sft.tokenizer
    config = copy.deepcopy(body_model.config)
    for attribute in ("quantization_config",):  # the GGUF read's: the folder holds plain float32 weights
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    config.architectures = None
    torch.manual_seed(seed)
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    body = getattr(classifier, classifier.base_model_prefix)
    body.load_state_dict({k: v.float().cpu() for k, v in getattr(body_model, body_model.base_model_prefix).state_dict().items()})
    head = classifier.score if hasattr(classifier, "score") else classifier.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, config.initializer_range, generator=torch.Generator().manual_seed(seed))
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")
    classifier.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def build_rewards(kind: str, setting: str, sft, device: str, dtype: str, seed: int, batch_size: int, output: str = "logit"):
    """(reward for a run: (prefix_cache, clock=None) -> Reward, the loaded reward model's path or None); a reward model
    times its own forward passes on `clock` (a PhaseClock) when given."""
    from tqstar.rewards import VaderReward

    if kind == "vader":
        vader = VaderReward(stop_strings=STOPS, bounds=(-1.0, 1.0))
        return (lambda prefix_cache, clock=None: vader), None
    if setting == "synthetic":
        raise SystemExit("--reward rm is built for the smollm2 and tiny settings")
    from omegaconf import OmegaConf

    from tqstar.rewards import build_reward
    from tqstar.rewards.hf import HFClassifierReward

    folder = reward_model_folder(setting, sft, seed)
    cfg = {"type": "hf", "name_or_path": str(folder), "dtype": dtype, "device": None if device == "auto" else device}
    loaded = build_reward(OmegaConf.create({**cfg, "stop_strings": STOPS, "batch_size": batch_size}), device)

    class TimedClassifierReward(HFClassifierReward):
        """The reward model, with its own forward passes timed by `clock` (a PhaseClock) when one is set."""

        clock = None

        def _timed(self, method, *args, **kwargs):
            if self.clock is None:
                return method(*args, **kwargs)
            with self.clock("reward-model forward"):
                return method(*args, **kwargs)

        def _forward(self, *args, **kwargs):  # on cached prefixes
            return self._timed(super()._forward, *args, **kwargs)

        def _score_whole(self, *args, **kwargs):  # texts encoded whole
            return self._timed(super()._score_whole, *args, **kwargs)

    def fresh(prefix_cache: bool, clock=None):
        # A new reward object per run on the loaded model: the prefix cache starts empty and its counters at zero.
        reward = TimedClassifierReward(
            loaded.model,
            loaded.tokenizer,
            batch_size=batch_size,
            stop_strings=STOPS,
            name=str(folder),
            prefix_cache=prefix_cache,
            output=output,
        )
        reward.clock = clock
        return reward

    return fresh, str(folder)


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
    parser.add_argument("--setting", choices=["smollm2", "synthetic", "tiny"], default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, choices=[170, 600, 1200], default=170, help="prompt length (smollm2, tiny)")
    parser.add_argument("--reward", choices=["vader", "rm"], default="vader")
    parser.add_argument("--rm-seed", type=int, default=0, help="seed of the reward model's score head")
    parser.add_argument(
        "--rm-output",
        choices=["logit", "probability"],
        default="logit",
        help="reward.output of --reward rm: the raw logit (unbounded, no pruning) or its sigmoid (bounds [0, 1]: pruning applies)",
    )
    parser.add_argument("--reward-batch-size", type=int, default=80, help="texts per reward-model forward (reward.batch_size)")
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
    parser.add_argument("--top-k", type=int, default=None, help="override the setting's candidates per step (k)")
    parser.add_argument("--rollout-tokens", type=int, default=None, help="override the setting's rollout length (L)")
    parser.add_argument("--no-prune", action="store_true", help="decoder.prune=false")
    parser.add_argument("--no-reuse", action="store_true", help="decoder.reuse_rollouts=false")
    parser.add_argument("--no-shared-prefix", action="store_true", help="decoder.shared_prefix=false")
    parser.add_argument("--no-prefix-cache", action="store_true", help="reward.prefix_cache=false (--reward rm)")
    parser.add_argument("--no-savings-pass", action="store_true", help="skip the untimed pass with every saving off")
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
    sft, baseline, prompts, knobs = load_setting(args.setting, args.device, args.dtype, args.prompts, args.prompt_tokens)
    for key, value in (("max_new_tokens", args.max_new_tokens), ("top_k", args.top_k), ("rollout_max_new_tokens", args.rollout_tokens)):
        if value:
            knobs[key] = value
    reward_for, reward_model = build_rewards(
        args.reward, args.setting, sft, args.device, args.dtype, args.rm_seed, args.reward_batch_size, args.rm_output
    )
    savings = dict(prune=not args.no_prune, reuse_rollouts=not args.no_reuse, shared_prefix=not args.no_shared_prefix)
    prefix_cache = not args.no_prefix_cache
    settings = DecoderSettings(method="tqstar", alpha=1.0, batch_size=args.batch_size, stop_strings=STOPS, **knobs, **savings)
    all_off = DecoderSettings(**{**settings.__dict__, "prune": False, "reuse_rollouts": False, "shared_prefix": False})
    device = sft.device
    tokenizer = sft.tokenizer
    reference_reward = reward_for(False)  # the authors' structure: every text re-read whole

    def engine_run(run_settings, cache: bool, clock=None):
        reward = reward_for(cache, clock)
        decoder = Decoder(sft.model, tokenizer, reward=reward, baseline_model=baseline.model, settings=run_settings, on_stage=clock)
        sync(device)
        start = time.perf_counter()
        generations = decoder.decode(batch)
        sync(device)
        return time.perf_counter() - start, generations, dict(decoder.counters), getattr(reward, "prefix_tokens_saved", 0), decoder

    per_batch = []
    for b0 in range(0, len(prompts), args.batch_size):
        batch = prompts[b0 : b0 + args.batch_size]
        n_prompt = [len(tokenizer(prompt)["input_ids"]) for prompt in batch]
        label = f"prompts {b0}-{b0 + len(batch) - 1}" if len(batch) > 1 else f"prompt {b0}"
        engine_times, phase_runs = [], []
        reset_peak(device)
        for _ in range(args.repeats):
            clock = PhaseClock(device)
            seconds, generations, counters, rm_saved, decoder = engine_run(settings, prefix_cache, clock)
            engine_times.append(seconds)
            phase_runs.append(clock.shares(seconds))
        engine_peak = peak_memory_mb(device)
        shares = settings.shared_prefix and _shareable(decoder)
        print(
            f"{label}: engine runs {[round(x, 2) for x in engine_times]} s, {[g.num_tokens for g in generations]} tokens, "
            f"{counters['rollout_tokens']} rollout tokens (+{counters['rollout_tokens_reused']} reused), "
            f"{counters['candidates_pruned']} candidates pruned, shared prefix {shares}",
            flush=True,
        )
        off = None
        if not args.no_savings_pass:
            reset_peak(device)
            off_seconds, off_generations, off_counters, _, _ = engine_run(all_off, False)
            off = {
                "engine_s": off_seconds / len(batch),
                "peak_mb": peak_memory_mb(device),
                "counters": off_counters,
                "identical_tokens": [g.token_ids for g in off_generations] == [g.token_ids for g in generations],
            }
            print(f"{label}: engine with every saving off {off_seconds:.2f} s, same tokens: {off['identical_tokens']}", flush=True)
        reset_peak(device)
        reference_times, identical = [], []
        for prompt, generation in list(zip(batch, generations))[: args.reference_prompts]:
            runs = []
            for _ in range(args.reference_repeats):
                sync(device)
                start = time.perf_counter()
                text, ids = reference_decode(prompt, sft.model, tokenizer, reference_reward, settings, baseline.model)
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
            # where the engine's time went, in the run whose time is the median
            "engine_phases": phase_runs[engine_times.index(statistics.median_low(engine_times))],
            "reference_s": statistics.mean(reference_times) if reference_times else None,
            "reference_runs_s": reference_times,
            "floor_s": floor_equivalent,
            "floor_rows": rows,
            "floor_tokens_per_s": floor_rate,
            "counters": counters,
            "rollout_tokens": counters["rollout_tokens"],
            "engine_rollout_tokens_per_s": counters["rollout_tokens"] / statistics.median(engine_times),
            "reward_calls": counters["reward_calls"],
            "shared_prefix_used": shares,
            "reward_prefix_tokens_saved": rm_saved,
            "peak_mb": {"engine": engine_peak, "reference": reference_peak, "floor": floor_peak},
            "all_savings_off": off,
        }
        if off is not None:
            generated, reused = counters["rollout_tokens"], counters["rollout_tokens_reused"]
            row["saved"] = {
                "rollout_tokens": off["counters"]["rollout_tokens"] - generated,
                "rollout_tokens_by_pruning": off["counters"]["rollout_tokens"] - generated - reused,
                "rollout_tokens_by_reuse": reused,
                "reward_tokens": off["counters"]["reward_tokens"] - counters["reward_tokens"],
                "reward_calls": off["counters"]["reward_calls"] - counters["reward_calls"],
                "peak_mb": off["peak_mb"] - engine_peak,
            }
        row["reference_over_engine"] = row["reference_s"] / engine_s if reference_times else None
        row["engine_over_floor"] = engine_s / floor_equivalent
        per_batch.append(row)
        reference_text = f"{row['reference_s']:.2f}s" if reference_times else "not run"
        print(
            f"{label}: {n_prompt} prompt tokens, {row['response_tokens']} new; per response: engine {engine_s:.2f}s, "
            f"reference {reference_text}, floor {floor_equivalent:.2f}s; identical={all(identical)}",
            flush=True,
        )

    def median_of(key):
        values = [r[key] for r in per_batch if r[key] is not None]
        return statistics.median(values) if values else None

    def total(key, where=lambda r: r["counters"]):
        return sum(where(r)[key] for r in per_batch)

    summary = {
        "setting": args.setting,
        "prompt_tokens": args.prompt_tokens,
        "reward": args.reward,
        "reward_model": reward_model,
        "reward_output": args.rm_output if args.reward == "rm" else None,
        "device": str(device),
        "dtype": str(sft.model.dtype),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "settings": {
            "top_k": settings.top_k,
            "rollout_max_new_tokens": settings.rollout_max_new_tokens,
            "max_new_tokens": settings.max_new_tokens,
            "rollout_num": settings.rollout_num,
            **savings,
            "reward_prefix_cache": prefix_cache if args.reward == "rm" else None,
        },
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "reference_repeats": args.reference_repeats,
        "reference_prompts_per_batch": args.reference_prompts,
        "floor_stride": args.floor_stride,
        "engine_s_per_response": median_of("engine_s"),
        "reference_s_per_response": median_of("reference_s"),
        "floor_s_per_response": median_of("floor_s"),
        "engine_rollout_tokens_per_s": median_of("engine_rollout_tokens_per_s"),
        "floor_rollout_tokens_per_s": median_of("floor_tokens_per_s"),
        "reference_over_engine": median_of("reference_over_engine"),
        "engine_over_floor": median_of("engine_over_floor"),
        "all_identical": all(r["identical_tokens"] for r in per_batch),
        "counters": {key: total(key) for key in per_batch[0]["counters"]},
        "reward_prefix_tokens_saved": sum(r["reward_prefix_tokens_saved"] for r in per_batch),
        "per_batch": per_batch,
    }
    if not args.no_savings_pass:
        summary["all_savings_off"] = {
            "engine_s_per_response": statistics.median(r["all_savings_off"]["engine_s"] for r in per_batch),
            "identical_tokens": all(r["all_savings_off"]["identical_tokens"] for r in per_batch),
            "counters": {key: total(key, lambda r: r["all_savings_off"]["counters"]) for key in per_batch[0]["counters"]},
        }
        summary["saved"] = {key: sum(r["saved"][key] for r in per_batch) for key in per_batch[0]["saved"] if key != "peak_mb"}
        summary["saved"]["peak_mb"] = max(r["all_savings_off"]["peak_mb"] for r in per_batch) - max(
            r["peak_mb"]["engine"] for r in per_batch
        )
    print()
    print(f"{'':30s}{'s/response':>12s}{'rollout tok/s':>15s}{'peak MB':>10s}")
    peaks = {k: max(r["peak_mb"][k] for r in per_batch) for k in ("engine", "reference", "floor")}

    def show(value, width, digits):
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"

    print(
        f"{'1 engine':30s}{show(summary['engine_s_per_response'], 12, 2)}{show(summary['engine_rollout_tokens_per_s'], 15, 0)}{peaks['engine']:10.0f}"
    )
    if "all_savings_off" in summary:
        off_peak = max(r["all_savings_off"]["peak_mb"] for r in per_batch)
        print(
            f"{'1b engine, every saving off':30s}{show(summary['all_savings_off']['engine_s_per_response'], 12, 2)}{'':>15s}{off_peak:10.0f}"
        )
    print(f"{'2 reference (authors)':30s}{show(summary['reference_s_per_response'], 12, 2)}{'':>15s}{peaks['reference']:10.0f}")
    print(
        f"{'3 floor (generate, cached)':30s}{show(summary['floor_s_per_response'], 12, 2)}{show(summary['floor_rollout_tokens_per_s'], 15, 0)}{peaks['floor']:10.0f}"
    )
    print(
        f"ratio 2/1 = {show(summary['reference_over_engine'], 0, 2)}x   ratio 1/3 = {show(summary['engine_over_floor'], 0, 2)}x   "
        f"identical tokens: {summary['all_identical']}"
    )
    c = summary["counters"]
    line = (
        f"rollout tokens {c['rollout_tokens']} generated + {c['rollout_tokens_reused']} reused; candidates {c['candidates_valued']} valued, "
        f"{c['candidates_pruned']} pruned; reward calls {c['reward_calls']}, reward-model tokens read {c['reward_tokens']} "
        f"(prefix cache saved {summary['reward_prefix_tokens_saved']})"
    )
    print(line)
    if "saved" in summary:
        saved = summary["saved"]
        print(
            f"saved vs every saving off: rollout tokens {saved['rollout_tokens']} (pruning {saved['rollout_tokens_by_pruning']}, "
            f"reuse {saved['rollout_tokens_by_reuse']}), reward-model tokens {saved['reward_tokens']}, reward calls {saved['reward_calls']}, "
            f"peak MB {saved['peak_mb']:.0f}; same tokens: {summary['all_savings_off']['identical_tokens']}"
        )
    print(f"device {summary['device']} ({summary['dtype']}), {summary['machine']}, torch threads {summary['torch_threads']}")
    phases = per_batch[0]["engine_phases"]
    print("where the engine's time goes (first batch): " + ", ".join(f"{p} {v['fraction']:.0%}" for p, v in phases.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not summary["all_identical"]:
        raise SystemExit("engine and reference disagree under greedy decoding")


class PhaseClock:
    """Where the engine's time goes: wall seconds inside each phase of the token loop. The engine calls it around
    every stage (`Decoder(..., on_stage=clock)`: a `tqstar.decoding.engine.StageTimer`, a few thousand calls per run,
    so timing costs nothing measurable); the bench's reward model calls it around its own forward passes. Phases:
    prefill (prompt caches), propose (the SFT model's next-token step and top-k), rollouts (the baseline's
    continuations: forks, model forward passes, stop checks), reward (scoring the rollout texts; "reward-model
    forward" is the part spent in the reward model itself, the rest is tokenising and the prefix bookkeeping),
    append (advancing the caches by the chosen token, and the trace); the rest of the loop (Q from rewards, scores,
    selection) is "other". The engine's other stages (value, score, select) are not timed: value holds rollouts
    and reward, and a device sync around the others would only slow the run."""

    PHASES = ("prefill", "propose", "rollouts", "reward", "append")

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        if stage not in (*self.PHASES, "reward-model forward"):
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def shares(self, total: float) -> dict[str, dict[str, float]]:
        """Seconds and fraction of `total` per phase; "reward-model forward" is part of "reward"."""
        top = self.PHASES
        out = {phase: self.seconds.get(phase, 0.0) for phase in (*top, "reward-model forward")}
        out["other"] = max(total - sum(out[p] for p in top), 0.0)
        return {phase: {"s": round(seconds, 3), "fraction": round(seconds / total, 4) if total else 0.0} for phase, seconds in out.items()}


def _shareable(decoder) -> bool:
    """Whether the rollouts ran on a shared prefix (the rollout model is one cascade attention supports)."""
    from tqstar.decoding.cascade import unsupported

    return unsupported(decoder.model(decoder.spec.rollout)) is None


if __name__ == "__main__":
    main()
