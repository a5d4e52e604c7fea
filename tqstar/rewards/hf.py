"""A Hugging Face sequence classifier as a reward: one logit (or a chosen label) per (prompt, response)."""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

from ..errors import ConfigError
from .base import HF_OUTPUTS as OUTPUTS
from .base import Reward

OVERFLOW_POLICIES = ("truncate_left", "skip", "error")
# Prompts whose prefix cache is kept between calls (least recently used dropped first); the prompts of the
# current call are never dropped, so this is a floor: max(this, prompts of the call) caches stay.
PREFIX_CACHE_PROMPTS = 32

logger = logging.getLogger(__name__)


class HFClassifierReward(Reward):
    """Scores `template.format(prompt=..., response=...)` with the classifier's own tokenizer.

    The default template, prompt then response, is what HH reward models were trained on
    ('\\n\\nHuman: ...\\n\\nAssistant: <response>'). Texts are scored in batches of `batch_size`.

    Inputs longer than the model accepts (`max_length`, default the tokenizer's limit) follow
    `overflow`, never silently:
    - 'truncate_left' drops tokens from the start (the oldest turns), keeping the response; counted
      in `truncated`.
    - 'skip' does not score the pair: it gets `skip_value`, counted in `skipped`; with
      `skip_value=None` it raises instead. Inside decoding (ARGS / CD / TQ*) a skipped candidate's
      value is that constant: when all k candidates overflow (the usual case, since they share the
      prompt) they tie and the step falls back to the SFT log-probs; when only some do, pick a
      `skip_value` that ranks them as you intend (e.g. a very low value to avoid them).
    - 'error' stops with a message naming the length and the limit.

    Prefix cache (`prefix_cache`, config `reward.prefix_cache`; None = on for causal-LM classifiers such
    as Llama, GPT-NeoX, GPT-2, Mistral, Qwen2, off with one log line for bidirectional encoders such as
    BERT; True on a model where it cannot apply is a ConfigError). In decoding, the rows of one prompt
    (k candidates x n rollouts) share prompt + accepted response, and that shared part grows by one
    token a step. Rows of one prompt string are grouped; the longest common prefix of their token ids
    (held back by one token, so every row has a token left to read its score at) is encoded once and
    its key/value cache kept per prompt; each row then reads only its own remaining tokens on top of
    it, and the score is the classifier's own logit at the row's last token, as in full re-encoding
    (equal within float tolerance). At the next call a prompt's remembered prefix is reused as far as
    the new prefix's token ids agree with it (compared as ids: re-tokenisation may merge across the
    old boundary) and only the rest is fed. Caches of at most max(32, prompts of the call) prompts
    are kept (least recently used dropped). Rows that overflow `max_length`, texts of one token and texts of
    pad tokens only are encoded whole, as without the cache. A prompt with a single row is cached too in a
    call of at most 32 prompts (the same tokens read; under pruning a decoding step often values one candidate,
    and the next step reuses it); in a larger call, such as scoring a finished run, it is encoded whole.
    `last_tokens` counts the tokens the model actually read per pair: a group's prefix tokens (those
    fed this call) are charged once, to the group's first row; `prefix_tokens_saved` counts the
    tokens not re-read thanks to the cache.

    Output (`output`, config `reward.output`): 'logit' (default) scores with the classifier's raw logit
    at `label`, unbounded, as HH reward models are used; 'probability' scores with the label's
    probability (sigmoid of a one-logit head, softmax over the labels otherwise), as classifier rewards
    such as sentiment or toxicity models are often used. A probability lies in [0, 1], so those are its
    bounds unless `bounds` says otherwise, and greedy cd / tqstar can prune candidates (decoder.prune).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        label=None,
        template: str = "{prompt}{response}",
        batch_size: int = 16,
        max_length: int | None = None,
        overflow: str = "truncate_left",
        skip_value: float | None = None,
        stop_strings: Sequence[str] = (),
        name: str = "hf",
        bounds: Sequence[float] | None = None,
        prefix_cache: bool | None = None,
        output: str = "logit",
    ):
        if output not in OUTPUTS:
            raise ConfigError(f"reward.output={output!r} is not allowed; allowed: {', '.join(OUTPUTS)}")
        if output == "probability" and bounds is None:
            bounds = (0.0, 1.0)
        super().__init__(stop_strings, bounds)
        self.output = output
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"reward.overflow={overflow!r} is not allowed; allowed: {', '.join(OVERFLOW_POLICIES)}")
        if int(batch_size) < 1:
            raise ConfigError(f"reward.batch_size={batch_size!r} is not allowed: must be an integer >= 1")
        try:
            template.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"reward.template={template!r} is not allowed: only {{prompt}} and {{response}} may appear ({exc})") from None
        if skip_value is not None and not math.isfinite(float(skip_value)):
            raise ConfigError(f"reward.skip_value={skip_value!r} is not allowed: a finite number or null")
        if prefix_cache is not None and not isinstance(prefix_cache, bool):
            raise ConfigError(f"reward.prefix_cache={prefix_cache!r} is not allowed: null (auto), true or false")
        self.template, self.batch_size, self.overflow = template, int(batch_size), overflow
        self.skip_value = None if skip_value is None else float(skip_value)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.truncated = 0  # pairs scored on a left-truncated text
        self.skipped = 0  # pairs given skip_value instead of a score
        self.prefix_tokens_saved = 0  # tokens the prefix cache spared the model (not re-read)
        self.label_index = self._label_index(model.config, label, name)
        limit = max_length or getattr(tokenizer, "model_max_length", None)
        if not limit or limit > 10**6:  # tokenizers without a limit report ~1e30
            limit = getattr(model.config, "max_position_embeddings", None) or 512
        self.max_length = int(limit)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            # Sequence classifiers read the logit at the last non-pad token; without a pad id they refuse batches.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.prefix_cache = self._prefix_cache_setting(prefix_cache)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()  # prompt -> its cached prefix

    def _prefix_cache_setting(self, wanted: bool | None) -> bool:
        if wanted is False:
            return False
        why_not = prefix_cache_unsupported(self.model)
        if why_not is None:
            return True
        if wanted:
            raise ConfigError(
                f"reward.prefix_cache=true is not allowed for {self.name!r}: {why_not}; set reward.prefix_cache=null (auto) or false"
            )
        logger.info("reward %s: prefix cache off (%s); every text is encoded whole", self.name, why_not)
        return False

    @staticmethod
    def _label_index(config, label, name: str) -> int:
        num_labels = int(config.num_labels)
        labels = [str(config.id2label[i]) for i in range(num_labels)] if getattr(config, "id2label", None) else []
        if label is None:
            if num_labels != 1:
                raise ConfigError(
                    f"reward model {name!r} has {num_labels} outputs ({', '.join(labels)}); set reward.label to one of them (a name or an index)"
                )
            return 0
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < num_labels:
                raise ConfigError(f"reward.label={label} is not allowed: {name!r} has outputs 0..{num_labels - 1}")
            return label
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if str(label) not in label2id:
            raise ConfigError(f"reward.label={label!r} is not a label of {name!r}; allowed: {', '.join(label2id) or 'an index'}")
        return label2id[str(label)]

    def score(self, prompts, responses):
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        scores: list[float | None] = [None] * len(texts)
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths = [len(ids) for ids in encoded]
        keep = []
        for i, n in enumerate(lengths):
            if n <= self.max_length:
                keep.append(i)
            elif self.overflow == "error":
                raise ConfigError(
                    f"reward input of {n} tokens exceeds {self.name}'s limit of {self.max_length}; "
                    "set reward.overflow=truncate_left or reward.overflow=skip"
                )
            elif self.overflow == "skip":
                if self.skip_value is None:
                    raise ConfigError(
                        f"reward input of {n} tokens exceeds {self.name}'s limit of {self.max_length} and "
                        "reward.overflow=skip with reward.skip_value=null; set reward.skip_value to a number"
                    )
                scores[i] = self.skip_value
                self.skipped += 1
            else:
                keep.append(i)
                self.truncated += 1
        self.last_tokens = [min(n, self.max_length) if (scores[i] is None) else 0 for i, n in enumerate(lengths)]
        whole = keep
        if self.prefix_cache:
            # Left truncation changes a text's start, so rows that overflow are encoded whole, exactly as before.
            fits = [i for i in keep if lengths[i] <= self.max_length]
            whole = sorted(self._score_with_prefixes(prompts, encoded, fits, scores) + [i for i in keep if lengths[i] > self.max_length])
        self._score_whole(texts, whole, scores)
        return scores

    def _score_whole(self, texts: list[str], rows: list[int], scores: list) -> None:
        """Each text of `rows` encoded in full (right-padded batches, left-truncated to max_length)."""
        import torch

        device = next(self.model.parameters()).device
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in chunk], return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            for i, value in zip(chunk, self._values(logits)):
                scores[i] = value

    def _values(self, logits) -> list[float]:
        """Each row's score from the classifier's logits (rows, labels): the label's logit or its probability."""
        logits = logits.float()
        if self.output == "logit":
            picked = logits[:, self.label_index]
        elif logits.shape[-1] == 1:
            picked = logits[:, 0].sigmoid()
        else:
            picked = logits.softmax(-1)[:, self.label_index]
        return picked.cpu().tolist()

    # ------------------------------------------------------------------ prefix cache
    def _score_with_prefixes(self, prompts: Sequence[str], encoded: list[list[int]], rows: list[int], scores: list) -> list[int]:
        """Score `rows` (none overflows) on top of their prompt's cached prefix; returns the rows left to encode whole."""
        pad = _pad_token_id(self.model)
        groups: dict[str, list[int]] = {}
        tokens: dict[int, list[int]] = {}
        whole = []
        for i in rows:
            ids = encoded[i]
            end = len(ids)
            # The classifier reads the last non-pad token; by causality nothing after it changes the score.
            while end and ids[end - 1] == pad:
                end -= 1
            if end == 0:
                whole.append(i)  # only pad tokens: the classifier's own rule for that case applies
                continue
            tokens[i] = ids[:end]
            groups.setdefault(prompts[i], []).append(i)
        plans = []
        for prompt, members in groups.items():
            seqs = [tokens[i] for i in members]
            # Held back by one token from the shortest row, so every row has a token to read its score at.
            length = min(len(os.path.commonprefix(seqs)), min(map(len, seqs)) - 1)
            target = tuple(seqs[0][:length])
            known = self._prefixes.get(prompt)
            shared = len(os.path.commonprefix([known.ids, target])) if known is not None else 0
            # A single row with nothing cached reads as many tokens as its text whole; its prefix is kept anyway when the
            # call is one of decoding's (a batch of at most PREFIX_CACHE_PROMPTS prompts), so the prompt's next call (the
            # next step, where pruning often values one candidate) reads only new tokens. A larger call (scoring a whole
            # run) encodes such rows whole: nothing would reuse their caches, and keeping them all would cost memory.
            if length < 1 or (len(members) < 2 and shared < 1 and len(groups) > PREFIX_CACHE_PROMPTS):
                whole.extend(members)
                continue
            plans.append(_Plan(prompt, members, target, known, shared))
        if not plans:
            return whole

        # 1. Each group's prefix: the remembered one as far as it agrees, the rest fed now (batched over groups).
        grow = sorted((p for p in plans if len(p.target) > p.shared), key=lambda p: len(p.target) - p.shared, reverse=True)
        for start in range(0, len(grow), self.batch_size):
            chunk = grow[start : start + self.batch_size]
            items = [(p.known.kv if p.shared else None, p.shared, p.target[p.shared :]) for p in chunk]
            _, caches = self._forward(items, keep_cache=True)
            for plan, kv in zip(chunk, caches):
                plan.kv = kv
        for plan in plans:
            if plan.kv is None:  # the new prefix lies within the remembered one
                plan.kv = [(k[:, :, : len(plan.target)], v[:, :, : len(plan.target)]) for k, v in plan.known.kv]
            self._prefixes[plan.prompt] = _Prefix(plan.target, plan.kv)
            self._prefixes.move_to_end(plan.prompt)
        while len(self._prefixes) > max(PREFIX_CACHE_PROMPTS, len(plans)):
            self._prefixes.popitem(last=False)  # least recently used first; this call's prompts were just touched

        # 2. Every row reads only its tokens after its group's prefix.
        items, owners = [], []
        for plan in plans:
            P = len(plan.target)
            for i in plan.members:
                items.append((plan.kv, P, tokens[i][P:]))
                owners.append(i)
            read = [len(tokens[i]) - P for i in plan.members]
            read[0] += P - plan.shared  # the prefix tokens fed this call, charged once to the group's first row
            for i, n in zip(plan.members, read):
                self.last_tokens[i] = n
            self.prefix_tokens_saved += sum(len(encoded[i]) for i in plan.members) - sum(read)
        for start in range(0, len(items), self.batch_size):
            values, _ = self._forward(items[start : start + self.batch_size], keep_cache=False)
            for i, value in zip(owners[start : start + self.batch_size], values):
                scores[i] = value
        return whole

    def _forward(self, items, keep_cache: bool):
        """One classifier pass over rows `(prefix kv | None, prefix length p, new token ids)`.

        Prefixes are right-aligned in a left-padded cache of the longest one, new tokens right-padded
        after it; the attention mask covers each row's prefix and real tokens, position ids continue from
        p. Returns each row's score (the classifier's logit at its last token, which is not a pad id)
        and, with keep_cache, each row's prefix + new tokens as a per-layer [(keys, values)] of batch 1."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        pad = _pad_token_id(self.model)
        rows = len(items)
        P = max(p for _, p, _ in items)
        S = max(len(new) for _, _, new in items)
        filler = pad if pad is not None else 0
        input_ids = torch.tensor([[*new, *[filler] * (S - len(new))] for _, _, new in items], dtype=torch.long, device=device)
        mask = torch.tensor(
            [[0] * (P - p) + [1] * (p + len(new)) + [0] * (S - len(new)) for _, p, new in items], dtype=torch.long, device=device
        )
        positions = torch.tensor([p for _, p, _ in items], dtype=torch.long, device=device)[:, None] + torch.arange(S, device=device)
        cache = DynamicCache()
        if P:
            # Rows of one group share one prefix object: one copy per group and layer.
            groups: dict[int, tuple[list, int, list[int]]] = {}
            for r, (kv, p, _) in enumerate(items):
                if p:
                    groups.setdefault(id(kv), (kv, p, []))[2].append(r)
            reference = next(iter(groups.values()))[0]

            def layers():  # one layer at a time: DynamicCache copies each, so a list would hold the whole cache twice
                for layer, (k0, v0) in enumerate(reference):
                    padded_keys = k0.new_zeros((rows, k0.shape[1], P, k0.shape[3]))
                    padded_values = v0.new_zeros((rows, v0.shape[1], P, v0.shape[3]))
                    for kv, p, members in groups.values():
                        index = torch.tensor(members, device=padded_keys.device)
                        padded_keys[index, :, P - p :] = kv[layer][0][:, :, :p]
                        padded_values[index, :, P - p :] = kv[layer][1][:, :, :p]
                    yield padded_keys, padded_values

            cache = DynamicCache(ddp_cache_data=layers())
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{_cache_argument(type(self.model)): cache},
            )
        values = self._values(out.logits)
        if not keep_cache:
            return values, None
        grown = getattr(out, "cache", None)
        grown = cache if grown is None else grown  # the cache passed in, grown in place
        kept = []
        for r, (_, p, new) in enumerate(items):
            span = slice(P - p, P + len(new))
            kept.append([(layer.keys[r : r + 1, :, span].clone(), layer.values[r : r + 1, :, span].clone()) for layer in grown.layers])
        return values, kept


class _Prefix:
    """A prompt's cached prefix: its token ids and, per layer, (keys, values) of batch 1 over those ids."""

    __slots__ = ("ids", "kv")

    def __init__(self, ids: tuple[int, ...], kv: list):
        self.ids, self.kv = ids, kv


class _Plan:
    """One group of rows (one prompt) of a call: its prefix ids, what was cached and how much of it agrees."""

    __slots__ = ("prompt", "members", "target", "known", "shared", "kv")

    def __init__(self, prompt: str, members: list[int], target: tuple[int, ...], known: _Prefix | None, shared: int):
        self.prompt, self.members, self.target, self.known, self.shared = prompt, members, target, known, shared
        self.kv: list | None = None


@lru_cache(maxsize=None)
def _cache_argument(model_class) -> str | None:
    """The name of a forward's cache argument (`cache` in transformers >= 5.2x, `past_key_values` before), or None."""
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _pad_token_id(model):
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "pad_token_id", None)


def prefix_cache_unsupported(model) -> str | None:
    """None when the prefix cache applies to this classifier (a decoder whose forward takes a key/value
    cache and position ids, every layer plain or sliding-window attention); else why not, in a few words."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kind = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder"
    parameters = inspect.signature(type(model).forward).parameters
    if _cache_argument(type(model)) is None:
        return f"{kind} takes no past key values (a bidirectional encoder)"
    if "position_ids" not in parameters:
        return f"{kind} takes no position ids"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "is_causal", True):
        return f"{kind} attends both ways"
    if getattr(text, "attention_chunk_size", None) is not None or "chunked_attention" in (getattr(text, "layer_types", None) or ()):
        return f"{kind} has chunked attention"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # noqa: BLE001 - an unknown layout: encode whole
        return f"its cache layout is unknown ({type(exc).__name__})"
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return f"{kind} has layers without a plain key/value cache"
    return None
