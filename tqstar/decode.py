"""The decode job: composed config -> models, reward, prompts -> a run folder of generations.

Used by `tqstar decode` and by sweeps (which call `run_decode` once per grid point in one process,
so models loaded for one point are reused by the next).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from .config import ConfigError, validate
from .runs import RunFolder, provenance


@dataclass
class DecodeResult:
    run: RunFolder
    rows: list[dict]
    new_rows: int
    seconds: float
    skipped: dict


def needs_baseline(cfg: DictConfig) -> bool:
    return cfg.decoder.method in ("baseline", "tqstar")


def build_decoder(cfg: DictConfig):
    """Load what the config names (shared across calls) and build the engine."""
    from .decoding.engine import Decoder
    from .decoding.settings import DecoderSettings
    from .models import check_same_vocab, load_model
    from .rewards import build_reward

    settings = DecoderSettings.from_config(cfg.decoder)
    sft = load_model(cfg.sft, cfg.device, cfg.get("synthetic"))
    baseline = None
    if needs_baseline(cfg):
        baseline = load_model(cfg.baseline, cfg.device, cfg.get("synthetic"))
        check_same_vocab(sft.tokenizer, baseline.tokenizer, str(cfg.sft.name_or_path), str(cfg.baseline.name_or_path))
    reward = build_reward(cfg.reward, cfg.device)
    baseline_reward = None
    if settings.method == "tqstar" and settings.transfer == "indirect":
        if cfg.get("baseline_reward") is None:
            raise ConfigError("decoder.transfer='indirect' needs a baseline_reward config (reward@baseline_reward=...)")
        baseline_reward = build_reward(cfg.baseline_reward, cfg.device)
    decoder = Decoder(sft.model, sft.tokenizer, reward=reward, baseline_model=baseline.model if baseline else None,
                      baseline_reward=baseline_reward, settings=settings)
    return decoder, sft


def _format(prompt: str, sft) -> str:
    from .models import format_prompt

    return format_prompt(sft.tokenizer, prompt, sft.prompt_format)


def run_decode(cfg: DictConfig, progress: Any = None) -> DecodeResult:
    """Decode every selected prompt not yet in the run folder; resumable and crash-safe."""
    import torch

    from .data import load_prompts
    from .models import tokenizer_for

    validate(cfg)
    torch.manual_seed(int(cfg.seed))
    run = RunFolder.for_config(cfg)
    started = time.perf_counter()
    with run:
        rows = run.read_rows(repair=True)
        done = {row["prompt_id"] for row in rows}
        previous = run.status()
        run.update_status(status="running", method=str(cfg.decoder.method), error=None,
                          **provenance(str(cfg.device), int(cfg.decoder.seed)))
        try:
            # Prompts first: a dataset problem should not wait for minutes of model loading.
            tokenizer = tokenizer_for(cfg.sft, cfg.get("synthetic")) if cfg.dataset.get("max_prompt_tokens") else None
            prompt_set = load_prompts(cfg.dataset, tokenizer, cfg.get("synthetic"))
            decoder, sft = build_decoder(cfg)
            run.update_status(device=str(sft.device))
            todo = [(prompt.index, prompt) for prompt in prompt_set.prompts if prompt.id not in done]
            counters = dict(previous.get("counters") or {})
            run.update_status(num_prompts=len(prompt_set), skipped=prompt_set.skipped, dataset=prompt_set.source)
            task = progress.add_task("decoding", total=len(prompt_set), completed=len(prompt_set) - len(todo)) if progress else None
            new_rows = 0
            batch = int(cfg.decoder.batch_size)
            for start in range(0, len(todo), batch):
                chunk = todo[start:start + batch]
                texts = [_format(p.text, sft) for _, p in chunk]
                before = dict(decoder.counters)
                raw = [p.text for _, p in chunk]  # the reward sees the prompt as written, the models the formatted one
                generations = decoder.decode(texts, [index for index, _ in chunk], reward_prompts=raw)
                rewards = decoder.reward(raw, [g.response for g in generations])
                for (index, prompt), generation, reward in zip(chunk, generations, rewards):
                    row = {
                        "index": index, "prompt_id": prompt.id, "prompt": prompt.text, "response": generation.response,
                        "num_tokens": generation.num_tokens, "seconds": round(generation.seconds, 4), "reward": reward,
                        "stop_reason": generation.stop_reason, "token_ids": generation.token_ids,
                        "sft_logprobs": [round(v, 6) for v in generation.sft_logprobs],
                        "policy_logprobs": None if generation.policy_logprobs is None else [round(v, 6) for v in generation.policy_logprobs],
                    }
                    if generation.extra:
                        row.update(generation.extra)
                    if generation.trace is not None:
                        row["trace"] = generation.trace
                    run.append(row)
                    rows.append(row)
                    new_rows += 1
                for key, value in decoder.counters.items():
                    counters[key] = counters.get(key, 0) + value - before.get(key, 0)
                counters["reward_calls"] = counters.get("reward_calls", 0) + len(rewards)
                run.update_status(counters=counters, rows=len(rows))
                if task is not None:
                    progress.advance(task, len(chunk))
            seconds = time.perf_counter() - started
            timings = dict(previous.get("timings") or {})
            timings["decode_seconds"] = round(timings.get("decode_seconds", 0.0) + seconds, 3)
            run.update_status(status="completed", rows=len(rows), timings=timings)
        except KeyboardInterrupt:
            run.update_status(status="interrupted", error="KeyboardInterrupt")
            raise
        except BaseException as exc:
            run.update_status(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20))
            raise
    rows.sort(key=lambda r: r["index"])
    return DecodeResult(run, rows, new_rows, time.perf_counter() - started, prompt_set.skipped)
