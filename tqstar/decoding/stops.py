"""Where a response (or a rollout) ends: EOS, or a stop string such as "\\n\\nHuman:"."""

from __future__ import annotations

from typing import Sequence


class StopChecker:
    """Detects EOS and stop strings; decodes text only after a token that could complete a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.eos_ids = set()
        for value in (tokenizer.eos_token_id, getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)):
            if isinstance(value, int):
                self.eos_ids.add(value)
            elif isinstance(value, (list, tuple)):
                self.eos_ids.update(int(v) for v in value)
        # A stop string can only be completed by a token whose text holds its last character.
        last_chars = {s[-1] for s in self.stop_strings}
        self.trigger_ids: set[int] = set()
        if last_chars:
            vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
            texts = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            for token_id, piece in enumerate(texts):
                if piece is None:
                    continue
                shown = tokenizer.convert_tokens_to_string([piece]) if piece else ""
                if any(c in shown or c in piece for c in last_chars):
                    self.trigger_ids.add(token_id)
        self.tail_tokens = max((len(s) for s in self.stop_strings), default=0) + 2

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_ids

    def hits_stop(self, ids: Sequence[int]) -> bool:
        """True if the text of `ids` (a response, or its tail plus a rollout) contains a stop string."""
        if not self.stop_strings or not ids or ids[-1] not in self.trigger_ids:
            return False
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)

    def ends(self, ids: Sequence[int]) -> str | None:
        """Why a response whose last token is ids[-1] ends there ("eos", "stop_string"), or None."""
        if self.is_eos(ids[-1]):
            return "eos"
        if self.hits_stop(ids):
            return "stop_string"
        return None
