"""A deterministic toy causal LM: next-token log-probs depend only on the last token (a table).

It speaks the same interface the engine uses on real models (attention_mask, position_ids, a
DynamicCache passed as `cache`, logits out), so Q values and choices can be computed by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from transformers import DynamicCache


class ToyLM(torch.nn.Module):
    def __init__(self, vocab_size: int, transitions: dict[int, dict[int, float]], default: dict[int, float]):
        """transitions[last_token] = {next_token: probability}; unlisted tokens share the rest equally."""
        super().__init__()
        table = torch.empty(vocab_size, vocab_size, dtype=torch.float64)
        for last in range(vocab_size):
            probs = transitions.get(last, default)
            rest = max(1.0 - sum(probs.values()), 1e-9) / max(vocab_size - len(probs), 1)
            row = torch.full((vocab_size,), math.log(rest), dtype=torch.float64)
            for token, p in probs.items():
                row[token] = math.log(p)
            table[last] = row
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **_):
        batch, length = input_ids.shape
        if cache is None:
            cache = DynamicCache()
        dummy = torch.zeros(batch, 1, length, 1, dtype=torch.float64)
        cache.update(dummy, dummy, 0)  # keeps the cache shaped like a real one (rows, length)
        return SimpleNamespace(logits=self.table[input_ids], cache=cache)
