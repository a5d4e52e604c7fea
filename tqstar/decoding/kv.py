"""Batched KV-cached token streams over one causal LM, through transformers' public cache API.

A `KVStream` holds B left-padded rows: their attention mask, the position of each row's next token
and a `DynamicCache` of everything fed so far. `step` feeds one token per row; `keep` drops finished
rows in place; `fork` copies chosen rows (repeats allowed) into an independent stream, which is how
the accepted prefix's cache reaches the k x n candidate rows without recomputing it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@lru_cache(maxsize=None)
def _keeps_last_logits(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _forward(model, cache, **inputs):
    if _keeps_last_logits(type(model)):
        inputs["logits_to_keep"] = 1  # only the last position's logits are used: skip the LM head elsewhere
    out = model(**inputs, **{_cache_argument(type(model)): cache}, use_cache=True)
    new_cache = getattr(out, "cache", None)
    return out, (new_cache if new_cache is not None else out.past_key_values)


class KVStream:
    def __init__(self, model, cache, mask: torch.Tensor, next_position: torch.Tensor, logits: torch.Tensor | None, role: str = "sft"):
        self.model = model
        self.role = role  # "sft" or "baseline": which counter its forward tokens go to
        self.cache = cache
        self.mask = mask  # (B, T) 1 = real token, 0 = left padding
        self.next_position = next_position  # (B,) position id of each row's next token
        self.logits = logits  # (B, V) float32 next-token logits after the last token fed
        self.tokens_fed = 0

    @classmethod
    @torch.no_grad()
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str = "sft") -> "KVStream":
        """Run the left-padded prompts once; keep their cache and last-position logits."""
        device = next(model.parameters()).device  # models may sit on different devices
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out, cache = _forward(model, DynamicCache(), input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        stream = cls(model, cache, attention_mask, positions[:, -1] + 1, out.logits[:, -1, :].float(), role)
        stream.tokens_fed = int(attention_mask.sum())
        return stream

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns and stores the next-token logits (B, V)."""
        tokens = tokens.to(self.mask.device)
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out, self.cache = _forward(
            self.model, self.cache, input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position[:, None]
        )
        self.next_position = self.next_position + 1
        self.logits = out.logits[:, -1, :].float()
        self.tokens_fed += tokens.shape[0]
        return self.logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch), in place: finished rows stop costing compute."""
        rows = rows.to(self.mask.device)
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]
        if self.logits is not None:
            self.logits = self.logits[rows]

    def fork(self, rows: torch.Tensor) -> "KVStream":
        """A new stream whose row r copies row `rows[r]` of this one (cache included)."""
        rows = rows.to(self.mask.device)
        data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in self.cache.layers]
        cache = DynamicCache(ddp_cache_data=data)
        logits = self.logits.index_select(0, rows) if self.logits is not None else None
        return KVStream(self.model, cache, self.mask.index_select(0, rows), self.next_position.index_select(0, rows), logits, self.role)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]
