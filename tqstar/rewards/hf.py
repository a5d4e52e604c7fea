"""A Hugging Face sequence classifier as a reward: one logit (or a chosen label) per (prompt, response)."""

from __future__ import annotations

from typing import Sequence

from ..config import ConfigError
from .base import Reward


class HFClassifierReward(Reward):
    """Scores `template.format(prompt=..., response=...)` with the classifier's own tokenizer.

    Inputs longer than the model accepts follow `overflow`: 'truncate_left' keeps the end of the
    text (where the response is), 'error' stops with a clear message; truncations are counted.
    """

    def __init__(self, model, tokenizer, *, label=None, template: str = "{prompt}{response}", batch_size: int = 16,
                 max_length: int | None = None, overflow: str = "truncate_left", stop_strings: Sequence[str] = (), name: str = "hf"):
        super().__init__(stop_strings)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.template, self.batch_size, self.overflow = template, batch_size, overflow
        self.truncated = 0
        num_labels = model.config.num_labels
        if label is None:
            if num_labels != 1:
                raise ConfigError(f"reward model {name!r} has {num_labels} outputs; set reward.label to one of {list(model.config.id2label.values())}")
            self.label_index = 0
        elif isinstance(label, int):
            self.label_index = label
        else:
            label2id = {str(k): v for k, v in model.config.label2id.items()}
            if str(label) not in label2id:
                raise ConfigError(f"reward.label={label!r} is not a label of {name!r}; allowed: {', '.join(label2id)}")
            self.label_index = label2id[str(label)]
        limit = max_length or getattr(tokenizer, "model_max_length", None)
        if not limit or limit > 10**6:
            limit = getattr(model.config, "max_position_embeddings", 512)
        self.max_length = int(limit)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, prompts, responses):
        import torch

        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            lengths = [len(ids) for ids in self.tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
            if too_long and self.overflow == "error":
                raise ConfigError(f"reward input of {lengths[too_long[0]]} tokens exceeds {self.name}'s limit of {self.max_length}; set reward.overflow=truncate_left")
            self.truncated += len(too_long)
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length).to(device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            scores.extend(logits[:, self.label_index].float().cpu().tolist())
        return scores
