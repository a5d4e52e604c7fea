"""The synthetic task's recipe knobs (`BuildParams`), its version and the names it builds.

Torch-free: the cache key is computed from these without importing any model library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.hh import HUMAN

# Bump whenever the recipe changes what a build writes (a new cache folder). v4: preference
# samples and the greedy evaluation decode through tqstar.decoding.engine instead of HF generate().
VERSION = 4

MODEL_NAMES = ("sft", "dpo", "dpo_bl")
STOP_STRINGS = (HUMAN,)  # a response ends at EOS or at the next human turn


@dataclass(frozen=True)
class BuildParams:
    """Every knob of the recipe (all of them enter the cache key)."""

    # data
    n_corpus: int = 6000  # SFT dialogues
    n_train_prompts: int = 512  # prompts/train.jsonl; the first n_pair_prompts get DPO samples
    n_test_prompts: int = 128  # prompts/test.jsonl (held out)
    # model (LlamaConfig)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    # SFT
    sft_epochs: int = 6
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup_frac: float = 0.05
    # preference pairs (sampled once, labelled by each reward)
    n_pair_prompts: int = 512
    samples_per_prompt: int = 6
    sample_temperature: float = 1.0
    sample_max_new_tokens: int = 48
    min_reward_gap: float = 0.1
    pairs_per_prompt: int = 2
    # DPO (TRL)
    dpo_beta: float = 0.1
    dpo_lr: float = 1.25e-4
    dpo_epochs: int = 2
    dpo_batch_size: int = 32
    # evaluation (greedy, on the test prompts)
    eval_max_new_tokens: int = 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
