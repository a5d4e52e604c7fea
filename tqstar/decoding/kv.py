"""Batched KV-cached token streams over one causal LM, through transformers' public cache API.

A `KVStream` holds B left-padded rows: their attention mask, the position of each row's next token
and a `DynamicCache` of everything fed so far. `step` feeds one token per row; `keep` drops finished
rows in place; `fork` copies chosen rows (repeats allowed) into an independent stream, which is how
the accepted prefix's cache reaches the k x n candidate rows without recomputing it; `graft` forks rows
followed by keys/values computed earlier (a rollout kept from the previous step), and `tail` copies
the last positions' keys/values out. With `share=True` a fork does not copy: its rows attend to one
copy of their prompt's prefix through cascade attention (decoding/cascade.py, decoder.shared_prefix).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import cascade


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
    if isinstance(cache, cascade.SharedPrefixCache):
        inputs["shared_prefix"] = cache  # read by cascade attention (a forward kwarg the model passes on to attention)
    with cascade.cascade(model) if isinstance(cache, cascade.SharedPrefixCache) else nullcontext():
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
        self._shareable: bool | None = None

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

    @property
    def shareable(self) -> bool:
        """Forks of this stream can share its cache instead of copying it (`fork(..., share=True)`): a model cascade
        attention supports (decoding/cascade.py) and a cache of plain full-attention layers."""
        if self._shareable is None:
            self._shareable = cascade.unsupported(self.model) is None and all(type(layer) is DynamicLayer for layer in self.cache.layers)
        return self._shareable

    def fork(self, rows: torch.Tensor, share: bool = False) -> "KVStream":
        """A new stream whose row r copies row `rows[r]` of this one (cache included). With `share` (see `shareable`)
        the rows attend to this stream's cache, one copy per prompt, and keep only their own new positions."""
        return self.graft(rows, None, share)

    def graft(self, rows: torch.Tensor, suffix: list[tuple[torch.Tensor, torch.Tensor]] | None, share: bool = False) -> "KVStream":
        """`fork`, each new row followed by `suffix`: per layer, the keys and values (R, H, S, D) of S more tokens at
        the next positions, already computed (a kept rollout, decoder.reuse_rollouts); None: nothing more."""
        rows = rows.to(self.mask.device)
        length = suffix[0][0].shape[2] if suffix else 0
        if share:
            cache = cascade.shared_fork(self.cache, self.mask, rows.tolist(), suffix)
        else:
            # One layer at a time: DynamicCache copies what it is given into its own tensors, so a list of every layer's
            # selected rows would hold a second copy of the whole forked cache until the fork returns (measured: +0.8 GB
            # at 256 rows of SmolLM2-135M, the decode's peak RSS); a generator frees each layer's rows once copied.
            def layers():
                for index, layer in enumerate(self.cache.layers):
                    keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
                    if suffix:
                        keys, values = torch.cat([keys, suffix[index][0]], dim=2), torch.cat([values, suffix[index][1]], dim=2)
                    yield keys, values

            cache = DynamicCache(ddp_cache_data=layers())
        mask = self.mask.index_select(0, rows)
        if length:
            mask = torch.cat([mask, torch.ones((mask.shape[0], length), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = self.logits.index_select(0, rows) if (self.logits is not None and not length) else None
        return KVStream(self.model, cache, mask, self.next_position.index_select(0, rows) + length, logits, self.role)

    def steps(self):
        """A context for a run of `step`s: a shared stream switches its model's attention once for all of them."""
        return cascade.cascade(self.model) if isinstance(self.cache, cascade.SharedPrefixCache) else nullcontext()

    def tail(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, a copy of the keys and values (B, H, length, D) of the last `length` positions of every row."""
        return [
            (layer.keys[:, :, layer.keys.shape[2] - length :].clone(), layer.values[:, :, layer.values.shape[2] - length :].clone())
            for layer in self.cache.layers
        ]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]
