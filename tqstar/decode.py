"""The decode job: composed config -> models, reward, prompts -> a run folder of generations.

Used by `tqstar decode` and by sweeps (which call `run_decode` once per grid point in one process,
so models loaded for one point are reused by the next).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import validate
from .errors import ConfigError
from .methods import spec
from .rows import GenerationRow
from .runs import RunFolder, machine_load, provenance
from .testbeds import block_of, get, names, prefix_of


@dataclass
class DecodeResult:
    run: RunFolder
    rows: list[dict]
    new_rows: int
    seconds: float
    skipped: dict


MOUNTS = ("sft", "baseline")


def mounts_used(cfg: DictConfig) -> dict[str, list[str]]:
    """The model and reward mounts this config's method loads: {'models': [...], 'rewards': [...]}."""
    settings_spec = spec(str(cfg.decoder.method))
    models = ["sft"] + (["baseline"] if settings_spec.needs_baseline else [])
    # The target reward scores every response (run rows carry it), whatever the method.
    rewards = ["reward"] + (["baseline_reward"] if settings_spec.needs_baseline_reward(str(cfg.decoder.get("transfer"))) else [])
    return {"models": models, "rewards": rewards}


def check_sources(cfg: DictConfig) -> None:
    """Every path and name the config points at (models, rewards, data), checked before anything loads:
    a typo costs milliseconds, not minutes of loading the other models first. A `<testbed>:<name>` is checked
    by its testbed (`tqstar.testbeds`) against the build the config selects, which is not built here."""
    from .data.sources import check_dataset_config
    from .hub import check_source
    from .models import config_key, resolve_source
    from .rewards import load_callable

    used = mounts_used(cfg)
    for mount in used["models"]:
        model_cfg = cfg[mount]
        source = str(model_cfg.name_or_path)
        prefix = prefix_of(source)
        if prefix:
            get(prefix).check_model(source.split(":", 1)[1], cfg.get(prefix), f"{mount}.name_or_path={source!r}")
            continue
        resolved, _ = resolve_source(model_cfg)  # packaged:<name>, gguf_file inside a folder
        check_source(resolved, config_key(model_cfg, "name_or_path"))
    if cfg.get("reward") is None:
        raise ConfigError("reward is not set: choose one, e.g. reward=vader")
    spec(str(cfg.decoder.method)).check_needs(
        cfg.decoder.get("transfer"),
        reward=True,
        baseline=cfg.get("baseline") is not None,
        baseline_reward=cfg.get("baseline_reward") is not None,
    )
    for mount in used["rewards"]:
        reward_cfg = cfg[mount]
        if reward_cfg.type == "hf":
            for key in ("name_or_path", "tokenizer"):
                value = str(reward_cfg.get(key) or "")
                prefix = prefix_of(value)
                if prefix:
                    get(prefix).check_reward(value.split(":", 1)[1], cfg.get(prefix), f"{mount}.{key}={value!r}")
                elif value:
                    check_source(value, f"{mount}.{key}", "reward model")
        elif reward_cfg.type == "callable":
            load_callable(reward_cfg.function, f"{mount}.function")
    if cfg.dataset.name not in names():
        check_dataset_config(cfg.dataset)


def resolve_reward(reward_cfg: DictConfig | None, cfg: Any = None) -> DictConfig | None:
    """The reward config to load. A reward model a testbed trains (type hf, `name_or_path: <testbed>:<name>`, e.g.
    the learned proxy of conf/reward/*_proxy.yaml) becomes a copy naming its folder, next to the build that
    `cfg`'s block of that testbed selects (built on first use); any other config is returned as it is. Like
    `<testbed>:<model>` models, the reward loader never builds anything: it gets the folder."""
    if reward_cfg is None or reward_cfg.get("type") != "hf":
        return reward_cfg
    prefix = prefix_of(reward_cfg.get("name_or_path"))
    if prefix is None:
        return reward_cfg
    return get(prefix).resolve_reward(reward_cfg, block_of(cfg, prefix))


def testbeds_used(cfg: DictConfig) -> list[str]:
    """The testbeds whose builds a decode of this config reads: its dataset's, and those of the `<testbed>:<name>`
    models its method loads (a reward model a testbed trains is found by `resolve_reward`)."""
    models = [str(cfg[m].name_or_path) for m in mounts_used(cfg)["models"]]
    return [name for name in names() if cfg.dataset.name == name or any(prefix_of(source) == name for source in models)]


def builds(cfg: DictConfig) -> dict[str, Path]:
    """Each testbed the config reads -> its build's folder, found in the cache or built now (once): what the
    loaders (`load_prompts`, `load_model`, `tokenizer_for`) get to resolve `<testbed>:<name>` and the testbed datasets."""
    return {name: get(name).ensure(cfg.get(name), num_threads=cfg.get("num_threads")) for name in testbeds_used(cfg)}


def build_evaluation(cfg: DictConfig, rows: list[dict]) -> list[dict]:
    """The build's own evaluation of the config's models on exactly the prompts a run decoded (its testbed's
    `references`: e.g. a build's greedy rewards of its SFT model and the baseline, `make demo`), else []."""
    name = str(cfg.dataset.name)
    return get(name).references(cfg, rows) if name in names() else []


def build_decoder(cfg: DictConfig, builds: dict[str, Path] | None = None):
    """Load what the config names (shared across calls) and build the engine. ``builds``: testbed -> build folder
    (`builds(cfg)`), for the `<testbed>:<name>` models the config uses."""
    from .decoding.engine import Decoder
    from .decoding.settings import DecoderSettings
    from .models import check_same_vocab, load_model
    from .rewards import build_reward

    settings = DecoderSettings.from_config(cfg.decoder)
    models = {}
    for mount in mounts_used(cfg)["models"]:
        models[mount] = load_model(cfg[mount], cfg.device, builds)
    if "baseline" in models:
        check_same_vocab(models["sft"].tokenizer, models["baseline"].tokenizer, str(cfg.sft.name_or_path), str(cfg.baseline.name_or_path))
    reward = build_reward(resolve_reward(cfg.reward, cfg), cfg.device)
    baseline_reward = build_reward(resolve_reward(cfg.baseline_reward, cfg), cfg.device) if settings.needs_baseline_reward else None
    baseline = models.get("baseline")
    decoder = Decoder(
        models["sft"].model,
        models["sft"].tokenizer,
        reward=reward,
        baseline_model=baseline.model if baseline else None,
        baseline_reward=baseline_reward,
        settings=settings,
    )
    return decoder, models["sft"]


FLOPS_NOTE = (
    "flops = 2 x parameters x tokens for each model that reads them (forward passes only): SFT and baseline "
    "forward tokens (rollouts included) and reward-model tokens; a reward that is not a network (VADER, a Python "
    "function) counts 0 FLOPs"
)


def model_sizes(decoder) -> dict:
    """Parameter counts behind the FLOPs estimate: {'sft', 'baseline', 'reward'} (0 for a reward that is no network)."""

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters()) if model is not None else 0

    return {"sft": count(decoder.sft), "baseline": count(decoder.baseline), "reward": int(decoder.reward.num_parameters)}


def response_cost(engine_cost: dict, final_reward_tokens: int, sizes: dict) -> dict:
    """A response's cost: the engine's counts plus the final scoring of the response, and its FLOPs."""
    cost = dict(engine_cost)
    cost["reward_calls"] = cost.get("reward_calls", 0) + 1
    cost["reward_tokens"] = cost.get("reward_tokens", 0) + int(final_reward_tokens)
    cost["flops"] = 2 * (
        sizes["sft"] * cost.get("sft_forward_tokens", 0)
        + sizes["baseline"] * cost.get("baseline_forward_tokens", 0)
        + sizes["reward"] * cost["reward_tokens"]
    )
    return cost


def _format(prompt: str, sft) -> str:
    from .models import format_prompt

    return format_prompt(sft.tokenizer, prompt, sft.prompt_format)


def run_decode(cfg: DictConfig, progress: Any = None) -> DecodeResult:
    """Decode every selected prompt not yet in the run folder; resumable and crash-safe."""
    import torch

    from .data import load_prompts
    from .models import tokenizer_for

    validate(cfg)
    check_sources(cfg)
    torch.manual_seed(int(cfg.seed))
    if cfg.get("num_threads"):  # tiny CPU models decode several times faster on 1 thread when the cores are shared
        torch.set_num_threads(int(cfg.num_threads))
    run = RunFolder.for_config(cfg)
    started = time.perf_counter()

    def prompts():
        # Prompts first: a dataset problem should not wait for minutes of model loading.
        folders = builds(cfg)  # the testbeds' builds the config reads (built on first use)
        tokenizer = tokenizer_for(cfg.sft, folders) if cfg.dataset.get("max_prompt_tokens") else None
        return folders, load_prompts(cfg.dataset, tokenizer, folders)

    with run:
        rows = run.read_rows(repair=True)
        done = {row["prompt_id"] for row in rows}
        previous = run.status()
        if previous.get("status") == "completed":
            # a finished run asked again (a resumed sweep): nothing to decode leaves its record as it was made (git
            # commit, threads, load, timings) and loads no model
            folders, prompt_set = prompts()
            if all(prompt.id in done for prompt in prompt_set.prompts):
                rows.sort(key=lambda r: r["index"])
                return DecodeResult(run, rows, 0, time.perf_counter() - started, prompt_set.skipped)
        run.update_status(
            status="running", method=str(cfg.decoder.method), error=None, **provenance(str(cfg.device), int(cfg.decoder.seed))
        )
        try:
            folders, prompt_set = prompts()
            decoder, sft = build_decoder(cfg, folders)
            run.update_status(device=str(sft.device))
            todo = [(prompt.index, prompt) for prompt in prompt_set.prompts if prompt.id not in done]
            counters = dict(previous.get("counters") or {})
            sizes = model_sizes(decoder)
            run.update_status(
                num_prompts=len(prompt_set), skipped=prompt_set.skipped, dataset=prompt_set.source, parameters=sizes, flops_note=FLOPS_NOTE
            )
            task = progress.add_task("decoding", total=len(prompt_set), completed=len(prompt_set) - len(todo)) if progress else None
            new_rows = 0
            batch = int(cfg.decoder.batch_size)
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                texts = [_format(p.text, sft) for _, p in chunk]
                raw = [p.text for _, p in chunk]  # the reward sees the prompt as written, the models the formatted one
                generations = decoder.decode(texts, [index for index, _ in chunk], reward_prompts=raw)
                rewards = decoder.reward(raw, [g.response for g in generations])
                final_tokens = decoder.reward.last_tokens if decoder.reward.num_parameters else None
                for number, ((index, prompt), generation, reward) in enumerate(zip(chunk, generations, rewards)):
                    cost = response_cost(generation.cost, final_tokens[number] if final_tokens else 0, sizes)
                    row = GenerationRow(
                        index=index,
                        prompt_id=prompt.id,
                        prompt=prompt.text,
                        response=generation.response,
                        num_tokens=generation.num_tokens,
                        seconds=round(generation.seconds, 4),
                        reward=reward,
                        stop_reason=generation.stop_reason,
                        token_ids=generation.token_ids,
                        sft_logprobs=[round(v, 6) for v in generation.sft_logprobs],
                        policy_logprobs=None if generation.policy_logprobs is None else [round(v, 6) for v in generation.policy_logprobs],
                        cost=cost,
                        trace=generation.trace,
                        value_diagnostics=None
                        if generation.diagnostics is None
                        else {key: round(value, 6) for key, value in generation.diagnostics.items()},
                        **generation.extra,  # a method's own fields (best-of-n's), each a field of the schema
                    ).to_json()
                    run.append(row)
                    rows.append(row)
                    new_rows += 1
                    for key, value in cost.items():  # the run's counters are the sum of its responses' costs
                        counters[key] = counters.get(key, 0) + value
                run.update_status(counters=counters, rows=len(rows))
                if task is not None:
                    progress.advance(task, len(chunk))
            seconds = time.perf_counter() - started
            timings = dict(previous.get("timings") or {})
            timings["decode_seconds"] = round(timings.get("decode_seconds", 0.0) + seconds, 3)
            run.update_status(status="completed", rows=len(rows), timings=timings, load_at_end=machine_load())
        except KeyboardInterrupt:
            run.update_status(status="interrupted", error="KeyboardInterrupt")
            raise
        except BaseException as exc:
            run.update_status(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20))
            raise
    rows.sort(key=lambda r: r["index"])
    return DecodeResult(run, rows, new_rows, time.perf_counter() - started, prompt_set.skipped)
