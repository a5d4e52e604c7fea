"""Shared-prefix rollouts: rollout rows attend to one copy of their prompt's accepted prefix (decoder.shared_prefix).

The k x n rollout rows of a prompt share its accepted prefix (prompt + response so far). Copying that
prefix's keys/values into every row costs memory and copying time that grow with the prompt length;
here the rows keep only their own keys/values, and attention reads the prefix once per prompt.

- `SharedPrefixCache`, a `transformers.cache_utils.Cache` of `SuffixLayer`s: per layer, the prompts'
  prefix keys/values (B, H, P, D), shared and never written (the accepted prefix's own cache tensors,
  not a copy), and each row's keys/values after it (rows, H, S, D), grown by `update` like a
  `DynamicLayer`; `owner[r]` is row r's prompt; `prefix_mask` (B, P) marks the prompts' left padding.
  `update` returns the row's own keys/values only, so the model's usual attention would silently
  ignore the prefix: the cache is only ever read by
- `cascade_attention`, registered through transformers' public `AttentionInterface` as
  `attn_implementation="tqstar_cascade"` and reached with the cache passed as a model-forward kwarg
  (`shared_prefix=cache`; models that use the AttentionInterface pass forward kwargs on to it). It
  scores each row's queries against its prompt's prefix (the rows of one prompt stacked as extra query
  positions of one sequence, so no row gets a copy of the prefix) and against its own keys, takes one
  softmax over [prefix ; suffix] (the log-sum-exp of both blocks), and adds the two blocks' weighted
  values. No attention mask is registered for the name: transformers then passes none, and the
  function builds its own from the cache (padding of the prefix; causal within the suffix).
- `cascade(model)`: a context manager that switches the model to that implementation with the public
  `set_attn_implementation` and back; `decoding.kv` enters it around the forwards of a shared stream.

`unsupported(model)` says why a model cannot use it (None when it can): the families checked against
the copying path (tests/test_engine.py): Llama (SmolLM2, the offline testbed models), GPT-NeoX (Pythia), GPT-2.
Elsewhere the engine copies the prefix as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

CASCADE = "tqstar_cascade"
# Families whose attention goes through the AttentionInterface with forward kwargs passed on, with one full-attention
# KV layer per decoder layer and no attention-score modifiers (soft-capping, sliding windows, sinks, ALiBi).
SUPPORTED_MODEL_TYPES = ("llama", "gpt_neox", "gpt2")
# Attention kwargs that change the scores; refused rather than ignored.
_SCORE_MODIFIERS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias")


def unsupported(model) -> str | None:
    """Why `model` cannot run shared-prefix rollouts (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one cascade attention is checked on ({', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "add_cross_attention", False):
        return "the model has cross-attention"
    if not hasattr(model, "set_attn_implementation"):
        return "the model cannot switch its attention implementation"
    return None


class SuffixLayer(DynamicLayer):
    """One layer of a `SharedPrefixCache`: `prefix_keys` / `prefix_values` (B, H, P, D) of the prompts, shared and
    read-only, and in `keys` / `values` (rows, H, S, D) each row's own positions after the prefix."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, keys=None, values=None):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        if keys is not None:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[2] + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.keys.numel():
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]


@dataclass
class _Layout:
    """Where each row's queries go in the per-prompt stacks (computed once per change of rows, shared by the layers)."""

    first: int  # the prompts used are first .. first + prompts - 1
    prompts: int
    width: int  # rows of the prompt with the most rows
    owner: torch.Tensor | None  # (rows,) prompt - first; None when row r is stack (r // width, r % width)
    slot: torch.Tensor | None  # (rows,) place among its prompt's rows
    padding: torch.Tensor | None  # (rows, 1, 1, P) True where the prefix position is left padding; None: no padding


class SharedPrefixCache(Cache):
    """Rollout rows over one shared copy of their prompts' prefix (see the module docstring)."""

    def __init__(self, prefix, prefix_mask: torch.Tensor, owner: list[int], suffix=None):
        suffix = suffix or [(None, None)] * len(prefix)
        super().__init__(layers=[SuffixLayer(k, v, sk, sv) for (k, v), (sk, sv) in zip(prefix, suffix)])
        self.prefix_mask = prefix_mask.bool()  # (B, P) 1 = real token
        self.owner = [int(b) for b in owner]
        self._layout: _Layout | None = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.owner = [self.owner[i] for i in indices.tolist()]
        self._layout = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPrefixCache rows are chosen by KVStream.fork / graft")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SharedPrefixCache rows are chosen by KVStream.fork / graft")

    def layout(self) -> _Layout:
        if self._layout is None:
            device = self.prefix_mask.device
            first, last = min(self.owner), max(self.owner)
            counts: dict[int, int] = {}
            slots = []
            for b in self.owner:
                slots.append(counts.get(b, 0))
                counts[b] = slots[-1] + 1
            width, prompts = max(counts.values()), last - first + 1
            # The common case, every prompt's rows together and as many for each: the stacks are a reshape of the rows.
            regular = len(self.owner) == prompts * width and all(
                b == first + r // width and s == r % width for r, (b, s) in enumerate(zip(self.owner, slots))
            )
            owner = torch.tensor(self.owner, device=device)
            self._layout = _Layout(
                first=first,
                prompts=prompts,
                width=width,
                owner=None if regular else owner - first,
                slot=None if regular else torch.tensor(slots, device=device),
                padding=None
                if bool(self.prefix_mask[first : last + 1].all())
                else ~self.prefix_mask.index_select(0, owner)[:, None, None, :],
            )
        return self._layout


def _stack(rows: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(rows, *rest) -> (prompts, width, *rest): each prompt's rows in its stack, zeros in unused places."""
    if layout.owner is None:
        return rows.view(layout.prompts, layout.width, *rows.shape[1:])
    stacks = rows.new_zeros((layout.prompts, layout.width, *rows.shape[1:]))
    stacks[layout.owner, layout.slot] = rows
    return stacks


def _unstack(stacks: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(prompts, width, *rest) -> (rows, *rest), the inverse of `_stack`."""
    if layout.owner is None:
        return stacks.reshape(layout.prompts * layout.width, *stacks.shape[2:])
    return stacks[layout.owner, layout.slot]


def cascade_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefixCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of rows over [their prompt's shared prefix ; their own keys], one softmax over both blocks.

    query (rows, Hq, q, D); key / value (rows, Hkv, S, D): the rows' own positions, the q new ones last (what
    `SuffixLayer.update` returned). Returns (rows, q, Hq, D) like transformers' attention functions. Scores are
    computed in the inputs' dtype and normalised in float32 at least, as transformers' eager attention does."""
    if shared_prefix is None:
        raise RuntimeError(f"attn_implementation={CASCADE!r} reads the prefix from a SharedPrefixCache passed as `shared_prefix=`")
    modifiers = [name for name in _SCORE_MODIFIERS if kwargs.get(name) is not None]
    if modifiers or dropout:
        raise NotImplementedError(f"cascade attention does not implement {', '.join(modifiers) or 'dropout'}")
    layer = shared_prefix.layers[module.layer_idx]
    layout = shared_prefix.layout()
    rows, heads, q, dim = query.shape
    kv_heads, suffix_length = key.shape[1], key.shape[2]
    group = heads // kv_heads  # grouped-query attention: query head h reads key/value head h // group
    scaling = dim**-0.5 if scaling is None else scaling
    window = slice(layout.first, layout.first + layout.prompts)
    prefix_keys, prefix_values = layer.prefix_keys[window], layer.prefix_values[window]  # views, never copies
    prefix_length = prefix_keys.shape[2]
    # Each key/value head's queries of a row, as one block of group * q query positions (scaled once for both blocks).
    grouped = query.reshape(rows, kv_heads, group * q, dim) * scaling
    # Prefix block: the rows of a prompt stacked as extra query positions of the prompt's one sequence.
    stacks = _stack(grouped, layout).transpose(1, 2).reshape(layout.prompts, kv_heads, layout.width * group * q, dim)
    prefix_scores = torch.matmul(stacks, prefix_keys.transpose(2, 3))
    prefix_scores = _unstack(prefix_scores.view(layout.prompts, kv_heads, layout.width, group * q, prefix_length).transpose(1, 2), layout)
    if layout.padding is not None:
        prefix_scores = prefix_scores.masked_fill(layout.padding, float("-inf"))
    # Suffix block: each row's own keys, causal among the q new positions.
    suffix_scores = torch.matmul(grouped, key.transpose(2, 3))  # (rows, Hkv, group * q, S)
    if q > 1:
        position = torch.arange(q, device=query.device).repeat(group)[:, None] + (suffix_length - q)
        suffix_scores = suffix_scores.masked_fill(torch.arange(suffix_length, device=query.device)[None, :] > position, float("-inf"))
    scores = torch.cat([prefix_scores, suffix_scores], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    prefix_weights, suffix_weights = weights.split([prefix_length, suffix_length], dim=-1)
    weight_stacks = _stack(prefix_weights, layout).transpose(1, 2).reshape(layout.prompts, kv_heads, -1, prefix_length)
    from_prefix = torch.matmul(weight_stacks, prefix_values).view(layout.prompts, kv_heads, layout.width, group * q, dim)
    output = _unstack(from_prefix.transpose(1, 2), layout) + torch.matmul(suffix_weights, value)
    return output.reshape(rows, heads, q, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(CASCADE, cascade_attention)


@contextmanager
def cascade(model):
    """Run `model` with cascade attention inside the block (the public `set_attn_implementation`, undone after)."""
    previous = model.config._attn_implementation
    if previous == CASCADE:
        yield
        return
    model.set_attn_implementation(CASCADE)
    try:
        if model.config._attn_implementation != CASCADE:
            raise RuntimeError(f"{type(model).__name__} did not switch to attn_implementation={CASCADE!r}")
        yield
    finally:
        model.set_attn_implementation(previous)


def shared_fork(cache: DynamicCache, mask: torch.Tensor, owner: list[int], suffix=None) -> SharedPrefixCache:
    """A `SharedPrefixCache` over `cache`'s tensors (no copy): rows owned by `owner`, optionally with `suffix` keys/values."""
    return SharedPrefixCache([(layer.keys, layer.values) for layer in cache.layers], mask, owner, suffix)
