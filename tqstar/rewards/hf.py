"""A Hugging Face sequence classifier as a reward: one logit (or a chosen label) per (prompt, response)."""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import ConfigError
from .base import Reward

OVERFLOW_POLICIES = ("truncate_left", "skip", "error")


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
    ):
        super().__init__(stop_strings, bounds)
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
        self.template, self.batch_size, self.overflow = template, int(batch_size), overflow
        self.skip_value = None if skip_value is None else float(skip_value)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.truncated = 0  # pairs scored on a left-truncated text
        self.skipped = 0  # pairs given skip_value instead of a score
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
        import torch

        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        scores: list[float | None] = [None] * len(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
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
        device = next(self.model.parameters()).device
        for start in range(0, len(keep), self.batch_size):
            rows = keep[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            for i, value in zip(rows, logits[:, self.label_index].float().cpu().tolist()):
                scores[i] = value
        return scores
