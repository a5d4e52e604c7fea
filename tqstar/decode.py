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
from .errors import ConfigError, did_you_mean
from .methods import spec
from .runs import RunFolder, machine_load, provenance


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
    a typo costs milliseconds, not minutes of loading the other models first."""
    from .data.sources import check_dataset_config
    from .hub import check_source
    from .models import config_key, resolve_source
    from .rewards import load_callable
    from .smollm2 import MODEL_NAMES as SMOLLM2_MODELS
    from .synthetic import MODEL_NAMES

    used = mounts_used(cfg)
    for mount in used["models"]:
        model_cfg = cfg[mount]
        source = str(model_cfg.name_or_path)
        built = {"synthetic": ("synthetic task", MODEL_NAMES), "smollm2": ("SmolLM2 build", SMOLLM2_MODELS)}
        prefix, _, name = source.partition(":")
        if name and prefix in built:
            what, names = built[prefix]
            if name not in names:
                raise ConfigError(f"{mount}.name_or_path={source!r}: the {what} has no model {name!r}; {did_you_mean(name, names)}")
            if prefix == "synthetic":
                check_synthetic_size(cfg.get("synthetic"), name, f"{mount}.name_or_path={source!r}")
            continue
        resolved, _ = resolve_source(model_cfg)  # packaged:<name>, gguf_file inside a folder
        check_source(resolved, config_key(model_cfg, "name_or_path"))
    for mount in used["rewards"]:
        reward_cfg = cfg.get(mount)
        if reward_cfg is None:
            if mount == "baseline_reward":
                raise ConfigError("decoder.transfer='indirect' needs a baseline_reward config (reward@baseline_reward=...)")
            raise ConfigError(f"{mount} is not set: choose one, e.g. reward=vader")
        if reward_cfg.type == "hf":
            for key in ("name_or_path", "tokenizer"):
                value = str(reward_cfg.get(key) or "")
                if value.startswith("synthetic:"):
                    check_synthetic_reward(value, f"{mount}.{key}")
                    check_synthetic_size(cfg.get("synthetic"), None, f"{mount}.{key}={value!r}")
                elif value:
                    check_source(value, f"{mount}.{key}", "reward model")
        elif reward_cfg.type == "callable":
            load_callable(reward_cfg.function, f"{mount}.function")
    if cfg.dataset.name not in ("synthetic", "smollm2"):
        check_dataset_config(cfg.dataset)


def check_synthetic_reward(source: str, key: str) -> None:
    """`synthetic:<name>` as a reward model: <name> must be one the synthetic task trains (`synthetic:proxy`)."""
    from .synthetic.proxy import SYNTHETIC_REWARDS

    name = source.split(":", 1)[1]
    if name not in SYNTHETIC_REWARDS:
        raise ConfigError(f"{key}={source!r}: the synthetic task has no reward model {name!r}; {did_you_mean(name, SYNTHETIC_REWARDS)}")


def synthetic_params(synthetic: DictConfig | None):
    """The recipe (`BuildParams`) of the synthetic build a config's `synthetic` block names (`synthetic.size`)."""
    from .synthetic.params import params_for

    return params_for(synthetic.get("size") if synthetic is not None else None)


def check_synthetic_size(synthetic: DictConfig | None, model: str | None, what: str) -> None:
    """A named size of the synthetic build other than full holds only some models and no proxy reward
    (``model`` None): one line naming what is missing and how to get the full build."""
    from .synthetic.params import DEFAULT_SIZE

    size = str(synthetic.get("size") or DEFAULT_SIZE) if synthetic is not None else DEFAULT_SIZE
    if size == DEFAULT_SIZE:
        return
    names = synthetic_params(synthetic).model_names
    if model is not None and model in names:
        return
    missing = f"no model {model!r}" if model is not None else "no proxy reward"
    raise ConfigError(
        f"{what}: the {size} build of the synthetic task (synthetic={size}) has {missing}, only {', '.join(names)}; "
        "use the full build: synthetic=default (built ahead by `tqstar prepare synthetic`)"
    )


def resolve_reward(reward_cfg: DictConfig | None, synthetic: DictConfig | None = None) -> DictConfig | None:
    """The reward config to load. A reward model named `synthetic:<name>` (type hf: `synthetic:proxy`,
    conf/reward/synthetic_proxy.yaml) becomes a copy naming its folder, the proxy trained next to the build
    of `synthetic` (seed, cache_dir), built on first use; any other config is returned as it is. Like
    `synthetic:<model>` models, the reward loader never builds anything: it gets the folder."""
    if reward_cfg is None or reward_cfg.get("type") != "hf":
        return reward_cfg
    source = str(reward_cfg.get("name_or_path") or "")
    if not source.startswith("synthetic:"):
        return reward_cfg
    from omegaconf import OmegaConf

    from .models import config_key
    from .synthetic.proxy import ensure_proxy

    check_synthetic_reward(source, config_key(reward_cfg, "name_or_path"))
    check_synthetic_size(synthetic, None, f"{config_key(reward_cfg, 'name_or_path')}={source!r}")
    folder = ensure_proxy(
        seed=int(synthetic.seed) if synthetic is not None else 0,
        cache_dir=synthetic.cache_dir if synthetic is not None else None,
        build_params=synthetic_params(synthetic),
    )
    data = OmegaConf.to_container(reward_cfg, resolve=True)
    data["name_or_path"] = str(folder)
    if str(data.get("tokenizer") or "").startswith("synthetic:"):
        data["tokenizer"] = str(folder)
    mount = config_key(reward_cfg, "name_or_path").rpartition(".")[0] or "reward"
    return OmegaConf.create({mount: data})[mount]  # mounted as before: error messages keep naming `reward.<key>`


def synthetic_dir(cfg: DictConfig) -> Path | None:
    """The built synthetic task's folder when the config uses it (built once and cached), else None."""
    used = cfg.dataset.name == "synthetic" or any(str(cfg[m].name_or_path).startswith("synthetic:") for m in mounts_used(cfg)["models"])
    if not used:
        return None
    from .synthetic import ensure_built

    synthetic = cfg.get("synthetic")
    return ensure_built(
        seed=int(synthetic.seed) if synthetic is not None else 0,
        cache_dir=synthetic.cache_dir if synthetic is not None else None,
        params=synthetic_params(synthetic),
        num_threads=cfg.get("num_threads"),
    )


def build_evaluation(cfg: DictConfig, rows: list[dict]) -> list[dict]:
    """The synthetic build's own greedy evaluation of its SFT model and of the config's baseline, when the run
    decoded exactly the prompts the build evaluated them on (all of its held-out prompts; `make demo` does):
    ``[{"model", "prompts", "reward": {"mean", "se", "n"}, "tokens", "max_new_tokens"}]``, else []. Reads only
    the cached build's files (never builds)."""
    if cfg.dataset.name != "synthetic" or str(cfg.dataset.get("split", "test")) != "test" or not rows:
        return []
    from .files import read_jsonl
    from .synthetic.cache import is_built, load_manifest, task_dir

    synthetic = cfg.get("synthetic")
    folder = task_dir(
        seed=int(synthetic.seed) if synthetic is not None else 0,
        cache_dir=synthetic.cache_dir if synthetic is not None else None,
        params=synthetic_params(synthetic),
    )
    if not is_built(folder) or not (folder / "prompts" / "test.jsonl").is_file():
        return []
    if sorted(str(p["id"]) for p in read_jsonl(folder / "prompts" / "test.jsonl")) != sorted(str(r["prompt_id"]) for r in rows):
        return []
    manifest = load_manifest(folder)
    evaluation = manifest.get("eval") or {}
    names = ["sft"]
    baseline = str(cfg.baseline.name_or_path) if cfg.get("baseline") is not None else ""
    if baseline.startswith("synthetic:") and baseline.split(":", 1)[1] != "sft":
        names.append(baseline.split(":", 1)[1])
    return [
        {
            "model": name,
            "prompts": evaluation[name]["target_reward"]["n"],
            "reward": evaluation[name]["target_reward"],
            "tokens": evaluation[name].get("mean_new_tokens"),
            "max_new_tokens": (manifest.get("eval_settings") or {}).get("max_new_tokens"),
        }
        for name in names
        if name in evaluation
    ]


def smollm2_dir(cfg: DictConfig) -> Path | None:
    """The SmolLM2 build's folder when the config uses it (built once and cached), else None."""
    used = cfg.dataset.name == "smollm2" or any(str(cfg[m].name_or_path).startswith("smollm2:") for m in mounts_used(cfg)["models"])
    if not used:
        return None
    from .smollm2 import ensure_built, params_from_config

    block = cfg.get("smollm2")
    return ensure_built(
        seed=int(block.seed) if block is not None else 0,
        cache_dir=block.cache_dir if block is not None else None,
        params=params_from_config(block.get("params") if block is not None else None),
        num_threads=cfg.get("num_threads"),
    )


def build_decoder(cfg: DictConfig, task_dir: Path | None = None, smollm2: Path | None = None):
    """Load what the config names (shared across calls) and build the engine. ``task_dir`` / ``smollm2``:
    the built synthetic task's and SmolLM2 experiment's folders, when the config uses them."""
    from .decoding.engine import Decoder
    from .decoding.settings import DecoderSettings
    from .models import check_same_vocab, load_model
    from .rewards import build_reward

    settings = DecoderSettings.from_config(cfg.decoder)
    models = {}
    for mount in mounts_used(cfg)["models"]:
        models[mount] = load_model(cfg[mount], cfg.device, task_dir, smollm2)
    if "baseline" in models:
        check_same_vocab(models["sft"].tokenizer, models["baseline"].tokenizer, str(cfg.sft.name_or_path), str(cfg.baseline.name_or_path))
    synthetic = cfg.get("synthetic")
    reward = build_reward(resolve_reward(cfg.reward, synthetic), cfg.device)
    baseline_reward = build_reward(resolve_reward(cfg.baseline_reward, synthetic), cfg.device) if settings.needs_baseline_reward else None
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
    with run:
        rows = run.read_rows(repair=True)
        done = {row["prompt_id"] for row in rows}
        previous = run.status()
        run.update_status(
            status="running", method=str(cfg.decoder.method), error=None, **provenance(str(cfg.device), int(cfg.decoder.seed))
        )
        try:
            # Prompts first: a dataset problem should not wait for minutes of model loading.
            task_dir, smollm2 = synthetic_dir(cfg), smollm2_dir(cfg)
            tokenizer = tokenizer_for(cfg.sft, task_dir, smollm2) if cfg.dataset.get("max_prompt_tokens") else None
            prompt_set = load_prompts(cfg.dataset, tokenizer, task_dir, smollm2)
            decoder, sft = build_decoder(cfg, task_dir, smollm2)
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
                    row = {
                        "index": index,
                        "prompt_id": prompt.id,
                        "prompt": prompt.text,
                        "response": generation.response,
                        "num_tokens": generation.num_tokens,
                        "seconds": round(generation.seconds, 4),
                        "reward": reward,
                        "stop_reason": generation.stop_reason,
                        "token_ids": generation.token_ids,
                        "sft_logprobs": [round(v, 6) for v in generation.sft_logprobs],
                        "policy_logprobs": None
                        if generation.policy_logprobs is None
                        else [round(v, 6) for v in generation.policy_logprobs],
                        "cost": cost,
                    }
                    if generation.extra:
                        row.update(generation.extra)
                    if generation.trace is not None:
                        row["trace"] = generation.trace
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
