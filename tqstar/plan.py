"""`tqstar plan`: what a decode of this config will hold in memory, per device, before anything loads.

Reads each model's config.json only (a local folder, a testbed's build when built, the packaged GGUF's metadata, the
local Hugging Face cache, else the published configs of the presets' hub models in `PUBLISHED`); never downloads and
never loads weights. Estimates, per device: the weights (parameters x bytes of the resolved dtype), the KV caches of
the engine's working set (decoding/kv.py, rollouts.py, cascade.py: one stream per model of the accepted prefixes,
the rollout chunk's rows, the kept greedy-rollout tails), the largest transient activations (a prefill, a reward
batch), and on the CPU the process itself (`PROCESS_BASELINE_BYTES`). FLOPs per response use the run's own formula
(`decode.response_cost`: 2 x parameters x tokens of every forward pass) on token counts that are an upper bound (every
response runs to max_new_tokens, every candidate is rolled out: no pruning, no rollout reuse).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig

from .decode import mounts_used, response_cost
from .errors import ConfigError
from .testbeds import block_of, get, prefix_of

GB = 10**9
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The process before any model loads: python + torch + transformers + tqstar's decode imports (cli, decode, models, engine,
# rewards, data, VADER). Measured by scripts/plan_check.py as the ru_maxrss of a process that makes those imports and
# nothing else: 372 MiB (torch 2.13+cpu, transformers 5.25, Python 3.11, Linux x86-64; 2026-12-05).
PROCESS_BASELINE_BYTES = 372 * 2**20
# Prompt length when the dataset sets no dataset.max_prompt_tokens (stated in the plan; --prompt-tokens overrides).
DEFAULT_PROMPT_TOKENS = 256
# Loading a GGUF holds more than the model at its peak (the mapped file, its dequantised state dict, conversions):
# this fraction of the weights. Calibrated once on SmolLM2-135M Q4_1 -> float32 (scripts/plan_check.py, first run:
# peak RSS 1286 MiB - process 372 MiB - weights 513 MiB = 401 MiB, 0.78 of the weights); one measurement, not a law.
GGUF_LOAD_FACTOR = 0.78
# On the CPU the decode phase's resident memory exceeds its live tensors: each decode step frees its rollout chunk's
# caches and the next step allocates slightly longer ones, and glibc's heap keeps the freed blocks resident (a
# malloc_trim between chunks did not return them). Measured with scripts/plan_check.py on SmolLM2-135M, 256 copied
# rollout rows, 2 decode steps (live tensors at the peak counted through the garbage collector): peak RSS 2.60-2.88
# GiB for 2.18 GiB of process, weights and live tensors, i.e. 0.35-0.50 of the decode phase's KV caches; the plan adds
# this fraction of them on the CPU (validated on other configurations in docs/bench/plan_check_*.json).
CPU_ALLOCATOR_SLACK = 0.4
DECODE_PHASE = ("KV ", "kept ", "largest decode", "allocator ")

_PYTHIA_6_9B = {
    "model_type": "gpt_neox",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 16384,
    "vocab_size": 50432,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}
# The published config.json of the presets' hub models (conf/model/pythia_*.yaml, conf/reward/pythia_rm.yaml), used
# when the local Hugging Face cache does not hold it: the plan never downloads.
PUBLISHED = {
    "lomahony/eleuther-pythia6.9b-hh-sft": _PYTHIA_6_9B,
    "lomahony/eleuther-pythia6.9b-hh-dpo": _PYTHIA_6_9B,
    "usvsnsp/pythia-6.9b-rm-full-hh-rlhf": {**_PYTHIA_6_9B, "architectures": ["GPTNeoXForSequenceClassification"], "num_labels": 1},
}


@dataclass
class Arch:
    """The sizes of one network, from its config.json (or GGUF metadata)."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    classifier: bool = False  # a sequence classifier: a score head of num_labels instead of the LM head
    num_labels: int = 1
    extra: dict = field(default_factory=dict)  # family-specific sizes (gpt2: positions; llama: biases)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one position, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def arch_from_config(config: dict) -> Arch:
    """The sizes of a Llama / GPT-NeoX / GPT-2 config.json (other families: their Llama-like keys, stated as such)."""
    family = str(config.get("model_type") or "")
    classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1) if classifier else 1
    if family == "gpt2":
        hidden = int(config["n_embd"])
        heads = int(config["n_head"])
        return Arch(
            family,
            hidden,
            int(config["n_layer"]),
            heads,
            heads,
            hidden // heads,
            int(config.get("n_inner") or 4 * hidden),
            int(config["vocab_size"]),
            bool(config.get("tie_word_embeddings", True)),
            classifier,
            labels,
            {"positions": int(config.get("n_positions", 1024))},
        )
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return Arch(
        family,
        hidden,
        int(config["num_hidden_layers"]),
        heads,
        int(config.get("num_key_value_heads") or heads),
        head_dim,
        int(config.get("intermediate_size") or 4 * hidden),
        int(config["vocab_size"]),
        bool(config.get("tie_word_embeddings", family != "gpt_neox")),
        classifier,
        labels,
        {"attention_bias": bool(config.get("attention_bias", False)), "mlp_bias": bool(config.get("mlp_bias", False))},
    )


def count_parameters(arch: Arch) -> int:
    """Parameters of the network (tied embeddings counted once), from its sizes: Llama (and Llama-like), GPT-NeoX, GPT-2."""
    h, i, v = arch.hidden, arch.intermediate, arch.vocab
    head = arch.num_labels * h if arch.classifier else (0 if arch.tied else v * h)
    if arch.family == "gpt2":
        layer = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
        return v * h + arch.extra["positions"] * h + arch.layers * layer + 2 * h + head
    if arch.family == "gpt_neox":
        layer = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
        return v * h + arch.layers * layer + 2 * h + head
    kv = arch.kv_heads * arch.head_dim
    q = arch.heads * arch.head_dim
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if arch.extra.get("attention_bias") else 0)
    mlp = 3 * h * i + ((2 * i + h) if arch.extra.get("mlp_bias") else 0)
    return v * h + arch.layers * (attention + mlp + 2 * h) + h + head


def safetensors_parameters(folder: Path) -> int | None:
    """Exact parameter count from the safetensors headers of a local folder (None when it has none)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        total += sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")
    return total


def gguf_parameters(path: Path) -> int:
    """Exact parameter count of a GGUF file (its tensors' element counts), from its metadata."""
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors))


@lru_cache(maxsize=8)
def _gguf_source(folder: str, gguf_file: str) -> tuple[dict, int]:
    """The config transformers reads from a GGUF's metadata, and its exact parameter count (read once a process)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file).to_dict(), gguf_parameters(Path(folder) / gguf_file)


@dataclass
class Source:
    config: dict | None
    parameters: int | None  # exact, when the files say so; else counted from the architecture
    where: str  # where the config came from, for the table


def _hub_config(repo: str, revision: str | None) -> Source:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an odd id or cache: fall back to the table
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return Source(json.loads(Path(cached).read_text()), None, "HF cache")
    if repo in PUBLISHED:
        return Source(dict(PUBLISHED[repo]), None, "published config (not in the HF cache)")
    return Source(None, None, "not in the HF cache, no published config known")


def model_source(mount: str, source: str, gguf_file: str | None, revision: str | None, cfg: DictConfig) -> Source:
    """The config.json (and exact parameter count where cheap) of a model or reward model named `source`."""
    prefix = prefix_of(source)
    if prefix:
        folder = get(prefix).find(block_of(cfg, prefix))
        if folder is None:
            return Source(None, None, f"{prefix} build not built")
        path = folder / source.split(":", 1)[1]
        if not (path / "config.json").is_file():
            return Source(None, None, f"{prefix} build has no model {path.name!r}")
        return Source(json.loads((path / "config.json").read_text()), safetensors_parameters(path), f"{prefix} build")
    if source.startswith("packaged:") or gguf_file:
        from .models import resolve_source

        if source.startswith("packaged:"):
            from omegaconf import OmegaConf

            folder, gguf_file = resolve_source(OmegaConf.create({"name_or_path": source}))
        else:
            folder = source
        config, parameters = _gguf_source(str(folder), str(gguf_file))
        return Source(dict(config), parameters, "GGUF metadata")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Source(None, None, "local folder without config.json")
        return Source(json.loads((path / "config.json").read_text()), safetensors_parameters(path), "local folder")
    return _hub_config(source, revision)


@dataclass
class ModelPlan:
    mounts: list[str]
    source: str
    where: str
    device: str
    dtype: str
    parameters: int | None
    weight_bytes: int | None
    arch: Arch | None = None
    split: dict[str, int] | None = None  # device_map="auto": layers per device


def parse_memory(values: list[str] | None) -> dict[str, int]:
    """`cuda:0=80GB`, `cuda=24GiB` (every cuda device not named), `cpu=16GB` -> bytes."""
    memory: dict[str, int] = {}
    for value in values or []:
        name, _, amount = str(value).partition("=")
        match = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|MB|MiB|TB)?\s*", amount, re.IGNORECASE)
        if not name or not match:
            raise ConfigError(f"--memory {value!r} is not allowed: DEVICE=SIZE, e.g. --memory cuda:0=80GB --memory cuda:1=24GB")
        unit = (match.group(2) or "GB").lower()
        scale = {"gb": GB, "gib": GIB, "mb": 10**6, "mib": 2**20, "tb": 10**12}[unit]
        memory[name.strip()] = int(float(match.group(1)) * scale)
    return memory


def detected_memory(device: str) -> int | None:
    """Total memory of a device on this machine: the GPU's when torch sees it, the RAM for the CPU; else None."""
    if device == "cpu":
        try:
            import os

            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            if index < torch.cuda.device_count():
                return int(torch.cuda.get_device_properties(index).total_memory)
    return None


def _device_of(node, cfg: DictConfig, cuda: bool) -> str:
    name = str(node.get("device") or cfg.device or "auto")
    if name == "auto":
        return "cuda:0" if cuda else "cpu"
    if name == "cuda":
        return "cuda:0"
    return name


def _dtype_of(node, device: str, bf16: bool) -> str:
    name = str(node.get("dtype") or "auto")
    if name != "auto":
        return name
    return ("bfloat16" if bf16 else "float16") if device.startswith("cuda") or device == "auto_split" else "float32"


def build_plan(cfg: DictConfig, memory: dict[str, int] | None = None, prompt_tokens: int | None = None) -> dict:
    """The plan of a composed, validated config: models, per-device memory, FLOPs per response and verdicts."""
    from .decoding.settings import DecoderSettings

    try:
        import torch

        cuda = torch.cuda.is_available()
        bf16 = torch.cuda.is_bf16_supported() if cuda else True
    except Exception:  # noqa: BLE001
        cuda, bf16 = False, True
    settings = DecoderSettings.from_config(cfg.decoder)
    used = mounts_used(cfg)
    notes: list[str] = []
    # --- models, one entry per distinct load (models.load_model shares a checkpoint asked for twice)
    models: dict[tuple, ModelPlan] = {}
    roles: dict[str, ModelPlan] = {}
    for mount in used["models"] + [m for m in used["rewards"] if cfg[m] is not None and cfg[m].get("type") == "hf"]:
        node = cfg[mount]
        device = _device_of(node, cfg, cuda)
        dtype = _dtype_of(node, device, bf16)
        source = str(node.name_or_path)
        key = (source, node.get("gguf_file"), node.get("revision"), device, dtype, mount in used["models"])
        if key in models:
            models[key].mounts.append(mount)
            roles[mount] = models[key]
            continue
        found = model_source(mount, source, node.get("gguf_file"), node.get("revision"), cfg)
        arch = arch_from_config(found.config) if found.config else None
        if arch is not None and mount in used["rewards"] and not arch.classifier:
            arch.classifier, arch.num_labels = True, 1
        parameters = found.parameters or (count_parameters(arch) if arch else None)
        bytes_per = DTYPE_BYTES.get(dtype, 4)
        plan = ModelPlan([mount], source, found.where, device, dtype, parameters, parameters * bytes_per if parameters else None, arch)
        models[key] = plan
        roles[mount] = plan
    for mount in used["rewards"]:
        node = cfg[mount]
        if node is not None and node.get("type") != "hf":
            notes.append(f"{mount}: type {node.get('type')} is no network (no weights, 0 FLOPs)")

    # --- lengths
    if prompt_tokens is None:
        limit = cfg.dataset.get("max_prompt_tokens")
        prompt_tokens = int(limit) if limit else DEFAULT_PROMPT_TOKENS
        if not limit:
            notes.append(f"prompt length: assumed {DEFAULT_PROMPT_TOKENS} tokens (no dataset.max_prompt_tokens; --prompt-tokens N to set)")
    P, T, L = prompt_tokens, settings.max_new_tokens, settings.rollout_max_new_tokens
    B, k, n = settings.batch_size, settings.top_k, settings.rollout_num
    limit = cfg.dataset.get("limit")
    if limit and int(limit) < B:  # a batch holds at most the prompts there are
        B = int(limit)
        notes.append(f"batch: {B} prompts (dataset.limit={limit} < decoder.batch_size={settings.batch_size})")
    spec = settings.spec
    rollout_rows = B * k * n if spec.uses_rollouts else 0
    chunk = min(rollout_rows, settings.max_batch_rows)

    per_device: dict[str, dict[str, int]] = {}

    def add(device: str, what: str, amount: int) -> None:
        per_device.setdefault(device, {})
        per_device[device][what] = per_device[device].get(what, 0) + int(amount)

    for plan in models.values():
        if plan.weight_bytes is not None:
            add(plan.device, f"weights {'/'.join(plan.mounts)}", plan.weight_bytes)
        else:
            add(plan.device, f"weights {'/'.join(plan.mounts)} (unknown: {plan.where})", 0)

    # --- the engine's KV streams (engine._Batch): the proposer's; the SFT model's when another proposes; the rollout
    # model's unless it is the proposer's object. Every row is left-padded to the batch's longest prompt.
    streams = [spec.proposer]
    if spec.proposer != "sft":
        streams.append("sft")
    if spec.rollout and roles.get(spec.rollout) is not roles.get(spec.proposer):
        streams.append(spec.rollout)
    rows_of_stream = B * (settings.n if spec.response_level else 1)
    for role in streams:
        plan = roles.get(role)
        if plan is None or plan.arch is None:
            continue
        per_token = plan.arch.kv_bytes_per_token(DTYPE_BYTES.get(plan.dtype, 4))
        add(plan.device, f"KV {role}: {rows_of_stream} rows x {P + T} positions", rows_of_stream * (P + T) * per_token)
    activations: dict[str, list[tuple[str, int]]] = {}
    for role in dict.fromkeys(streams):
        plan = roles.get(role)
        if plan is None or plan.arch is None:
            continue
        a, b = plan.arch, DTYPE_BYTES.get(plan.dtype, 4)
        # the prefill: a layer's hidden states and MLP (B x P x (4h + 2i)), its attention scores (B x heads x P x P),
        # and the last position's logits in float32
        prefill = rows_of_stream * P * (4 * a.hidden + 2 * a.intermediate) * b + rows_of_stream * a.heads * P * P * b
        activations.setdefault(plan.device, []).append((f"prefill {role}", prefill + rows_of_stream * a.vocab * 4))
    if spec.uses_rollouts:
        plan = roles.get(spec.rollout)
        if plan is not None and plan.arch is not None:
            per_token = plan.arch.kv_bytes_per_token(DTYPE_BYTES.get(plan.dtype, 4))
            shared = settings.shared_prefix and plan.arch.family in ("llama", "gpt_neox", "gpt2")
            positions = L if shared else P + T + L
            how = "shared prefix" if shared else "prefix copied into every row"
            add(
                plan.device,
                f"KV rollout chunk: {chunk} of {rollout_rows} rows x {positions} positions ({how})",
                chunk * positions * per_token,
            )
            if settings.reuses_rollouts:
                add(plan.device, f"kept rollout tails: {B * k} rows x {L - 1} positions", B * k * max(L - 1, 0) * per_token)
            a, b = plan.arch, DTYPE_BYTES.get(plan.dtype, 4)
            step = chunk * (4 * a.hidden + 2 * a.intermediate) * b + chunk * a.vocab * 4 * 2 + chunk * a.heads * (P + T + L) * b
            activations.setdefault(plan.device, []).append(("rollout step", step))
    # --- reward models: a batch of reward.batch_size texts of prompt + response (+ rollout); its prefix cache (B rows)
    for mount in used["rewards"]:
        plan = roles.get(mount)
        if plan is None or plan.arch is None:
            continue
        a, b = plan.arch, DTYPE_BYTES.get(plan.dtype, 4)
        rb = int(cfg[mount].get("batch_size") or 16)
        length = P + T + L
        batch = rb * length * (4 * a.hidden + 2 * a.intermediate) * b + rb * a.heads * length * length * b
        activations.setdefault(plan.device, []).append((f"{mount} batch: {rb} texts x {length} tokens", batch))
        if cfg[mount].get("prefix_cache") is not False and a.family in ("llama", "gpt_neox", "gpt2") and spec.uses_values:
            add(plan.device, f"KV {mount} prefix cache: {B} rows x {P + T} positions", B * (P + T) * a.kv_bytes_per_token(b))
    add("cpu", "process (python, torch, transformers; measured)", PROCESS_BASELINE_BYTES)
    for plan in models.values():
        if plan.where == "GGUF metadata" and plan.device == "cpu" and plan.weight_bytes:
            # transformers dequantises the GGUF into a state dict, then copies it into the model (freed after the load)
            what = f"loading {'/'.join(plan.mounts)} (its GGUF state dict; freed before decoding)"
            add("cpu", f"load phase: {what}", int(GGUF_LOAD_FACTOR * plan.weight_bytes))

    for device, items in activations.items():  # transients (a prefill, a rollout step, a reward batch, a load) come one at a time
        what, amount = max(items, key=lambda item: item[1])
        add(device, f"largest decode transient: {what}", amount)
    if "cpu" in per_device:
        kv = sum(amount for what, amount in per_device["cpu"].items() if what.startswith(("KV ", "kept ")))
        if kv:
            add(
                "cpu",
                f"allocator slack: {CPU_ALLOCATOR_SLACK:.0%} of the KV caches (freed blocks glibc keeps; measured)",
                CPU_ALLOCATOR_SLACK * kv,
            )

    # --- <mount>.device=auto_split (device_map="auto"): the model's layers over the GPUs --memory names, in proportion to
    # their memory (accelerate fills them in order; the proportion is the plan's approximation); its weights, KV and
    # transients are spread the same way
    for plan in models.values():
        if plan.device == "auto_split" and plan.arch is not None:
            plan.split = split_layers(plan.arch.layers, memory or {})
    shares = next((p.split for p in models.values() if p.split), None)
    if shares and "auto_split" in per_device:
        for what, amount in per_device.pop("auto_split").items():
            for device, layers in shares.items():
                add(device, f"{what} ({layers} layers here)", amount * layers // sum(shares.values()))

    # --- FLOPs per response (decode.response_cost), an upper bound: full-length responses, no pruning, no reuse
    sizes = {"sft": 0, "baseline": 0, "reward": 0}
    for role in ("sft", "baseline", "reward"):
        plan = roles.get(role)
        if plan is not None and plan.parameters and (role != "baseline" or spec.needs_baseline):
            sizes[role] = plan.parameters
    cost = {"sft_forward_tokens": 0, "baseline_forward_tokens": 0, "reward_tokens": 0}
    if spec.response_level:
        cost["sft_forward_tokens"] = settings.n * (P + T)
        cost["reward_tokens"] = (settings.n - 1) * (P + T)
    else:
        cost[f"{spec.proposer}_forward_tokens"] += P + T
        if spec.proposer != "sft":
            cost["sft_forward_tokens"] += P + T
        if spec.rollout:
            if spec.rollout not in (spec.proposer, "sft") and roles.get(spec.rollout) is not roles.get(spec.proposer):
                cost[f"{spec.rollout}_forward_tokens"] += P + T  # its own stream of the accepted prefix
            cost[f"{spec.rollout}_forward_tokens"] += T * k * n * L
        if spec.uses_values and sizes["reward"]:
            if not spec.uses_rollouts:  # ARGS: k partial responses a step
                cost["reward_tokens"] = T * k * (P + T + 1)
            else:  # k x n texts a step; with the reward's prefix cache only each text's rollout (and candidate) is read
                read = (L + 1) if cfg.reward.get("prefix_cache") is not False else P + T + L
                cost["reward_tokens"] = T * k * n * read
    flops = response_cost(cost, P + T if sizes["reward"] else 0, sizes)

    # --- verdicts
    memory = dict(memory or {})
    devices = []
    refused = []
    for device, items in per_device.items():
        peak = peak_of(items)
        available = memory.get(device) or (memory.get("cuda") if device.startswith("cuda") else None) or detected_memory(device)
        if device == "auto_split":
            notes.append("auto_split: give each GPU's memory (--memory cuda:0=80GB --memory cuda:1=80GB) to see the split")
        verdict = "unknown (give --memory)" if available is None else ("fits" if peak <= 0.9 * available else "does not fit")
        if verdict == "fits" and any("(unknown:" in what for what in items):
            verdict = "fits what is known (a model's size is unknown)"
        if verdict == "does not fit":
            refused.append(device)
        devices.append({"device": device, "peak_bytes": peak, "memory_bytes": available, "verdict": verdict, "items": items})
    if spec.uses_rollouts and settings.prunes and (cfg.reward.get("bounds") or cfg.reward.get("output") == "probability"):
        notes.append("the rollout chunk is planned full: decoder.prune (greedy, a bounded reward) may roll out far fewer rows")
    return {
        "experiment": str(cfg.get("experiment_name") or ""),
        "method": settings.method,
        "lengths": {"prompt_tokens": P, "max_new_tokens": T, "rollout_tokens": L if spec.uses_rollouts else 0},
        "rows": {"batch_size": B, "top_k": k, "rollout_num": n, "rollout_rows": rollout_rows, "chunk_rows": chunk},
        "models": [
            {**{key: value for key, value in asdict(p).items() if key != "arch"}, "family": p.arch.family if p.arch else None}
            for p in models.values()
        ],
        "devices": devices,
        "flops_per_response": flops["flops"],
        "flops_tokens": cost,
        "notes": notes
        + [
            "FLOPs: decode.response_cost (2 x parameters x tokens) on an upper bound of the tokens: every response runs to "
            "max_new_tokens, every candidate is rolled out (no pruning, no rollout reuse)",
            "a device fits when the planned peak is at most 90% of its memory",
        ],
        "refused": refused,
        "suggestion": suggestion(cfg, settings, refused, per_device) if refused else None,
    }


def peak_of(items: dict[str, int]) -> int:
    """A device's peak: what stays (weights, the process) plus the larger of the load phase (its transients, freed
    before decoding) and the decode phase (KV caches, the largest decode transient and, on the CPU, the allocator's slack)."""
    load = max((amount for what, amount in items.items() if what.startswith("load phase")), default=0)
    decode = sum(amount for what, amount in items.items() if what.startswith(DECODE_PHASE))
    stays = sum(amount for what, amount in items.items() if not what.startswith(("load phase", *DECODE_PHASE)))
    return stays + max(load, decode)


def split_layers(layers: int, memory: dict[str, int]) -> dict[str, int]:
    """Layers per cuda device for device_map="auto", in proportion to the devices' memory (--memory)."""
    gpus = {d: v for d, v in memory.items() if d.startswith("cuda:")}
    if not gpus:
        return {}
    total = sum(gpus.values())
    shares = {d: layers * v // total for d, v in gpus.items()}
    for d in sorted(gpus, key=gpus.get, reverse=True)[: layers - sum(shares.values())]:
        shares[d] += 1
    return shares


def suggestion(cfg, settings, refused: list[str], per_device: dict) -> str:
    ideas = []
    if settings.batch_size > 1:
        ideas.append(f"decoder.batch_size={max(1, settings.batch_size // 2)}")
    if settings.uses_rollouts and settings.max_batch_rows > 1:
        ideas.append(f"decoder.max_batch_rows={max(1, min(settings.max_batch_rows, settings.batch_size * settings.top_k) // 2)}")
    weights = any(what.startswith("weights") and amount for d in refused for what, amount in per_device[d].items())
    if weights:
        ideas.append("another device for one model (e.g. baseline.device=cuda:1), or <mount>.device=auto_split (layers over the GPUs)")
    if any(cfg[m].get("dtype") in (None, "auto", "float32") for m in ("sft", "baseline") if cfg.get(m) is not None):
        ideas.append("a lower dtype (sft.dtype=bfloat16 baseline.dtype=bfloat16)")
    return f"{', '.join(refused)} will run out of memory; try " + ", or ".join(ideas)


def human(amount: int | None) -> str:
    if amount is None:
        return "?"
    return f"{amount / GIB:.2f} GiB" if amount >= 2**26 else f"{amount / 2**20:.1f} MiB"
