"""The row schema of a run's generations.jsonl: one row per decoded prompt, defined once here.

`decode.run_decode` writes each row as `GenerationRow(...).to_json()`; readers (`evaluate`, `runs`, scripts) parse
one with `GenerationRow.from_json(row)` or, on raw dicts, use the field names below as constants. The file on disk
is what json.dumps makes of `to_json()`: keys in the order of FIELDS, the method-specific ones (best-of-n's, the
trace) only when set. Rows written before some field existed (e.g. `cost`) stay readable: every field but
REQUIRED may be missing, and reads as None. Ground level: no tqstar import but errors, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

INDEX = "index"  # the prompt's position in the unsplit prompt list: the order of rows and the seed of its sampling
PROMPT_ID = "prompt_id"
PROMPT = "prompt"  # as written in the dataset (the models may see it formatted, e.g. by a chat template)
RESPONSE = "response"  # decoded, cut at the first stop string
NUM_TOKENS = "num_tokens"
SECONDS = "seconds"
REWARD = "reward"  # the target reward of the response
STOP_REASON = "stop_reason"  # eos | stop_string | max_new_tokens
TOKEN_IDS = "token_ids"
SFT_LOGPROBS = "sft_logprobs"  # log pi_sft of each generated token
POLICY_LOGPROBS = "policy_logprobs"  # log p_decoder of each token when selection samples (or another model proposes); else null
COST = "cost"  # forward tokens per model role, rollout tokens, reward calls and tokens, candidates, flops
BEST_OF_N_REWARDS = "best_of_n_rewards"  # best-of-n only: the reward of each of the n samples
BEST_OF_N_CHOSEN = "best_of_n_chosen"  # best-of-n only: which sample is the response
TRACE = "trace"  # decoder.trace only: one entry per step (candidates, log-probs, Q, scores, chosen)
# The value's diagnostics. Weighed rollouts (soft_transfer): means over the response's steps of ess_fraction (the
# weights' effective sample size / n), log_weight_var (the variance of the log weights) and value_spread (the standard
# deviation of Q over the valued candidates). The sampled soft value with n >= 2 rollouts (the optimal decoder, soft
# transfer): kl_jensen_gap, summed over steps, what the recorded log-probs overstate the KL by (the delta method)
VALUE_DIAGNOSTICS = "value_diagnostics"

# Every field, in the order of the keys on disk.
FIELDS = (
    INDEX,
    PROMPT_ID,
    PROMPT,
    RESPONSE,
    NUM_TOKENS,
    SECONDS,
    REWARD,
    STOP_REASON,
    TOKEN_IDS,
    SFT_LOGPROBS,
    POLICY_LOGPROBS,
    COST,
    BEST_OF_N_REWARDS,
    BEST_OF_N_CHOSEN,
    VALUE_DIAGNOSTICS,
    TRACE,
)
# What every row has (a reader cannot do without them); rows of older versions may lack any other field.
REQUIRED = (PROMPT_ID, PROMPT, RESPONSE)
# Written only when set (by the method or decoder.trace); every other field is always written, null when unknown.
WHEN_SET = (BEST_OF_N_REWARDS, BEST_OF_N_CHOSEN, VALUE_DIAGNOSTICS, TRACE)


@dataclass(kw_only=True)
class GenerationRow:
    """One line of generations.jsonl (field names and order: FIELDS)."""

    index: int | None = None
    prompt_id: str | int
    prompt: str
    response: str
    num_tokens: int | None = None
    seconds: float | None = None
    reward: float | None = None
    stop_reason: str | None = None
    token_ids: list[int] | None = None
    sft_logprobs: list[float] | None = None
    policy_logprobs: list[float] | None = None
    cost: dict[str, Any] | None = None
    best_of_n_rewards: list[float] | None = None
    best_of_n_chosen: int | None = None
    value_diagnostics: dict[str, float] | None = None
    trace: list[dict] | None = None
    # Keys this version does not know (a row of a later version): kept, and written back after the known ones.
    unknown: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The row as written: every field in FIELDS order, those in WHEN_SET only when set, then any unknown keys."""
        out = {name: getattr(self, name) for name in FIELDS if name not in WHEN_SET or getattr(self, name) is not None}
        out.update(self.unknown)
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str = "a generations row") -> "GenerationRow":
        """A parsed line of generations.jsonl; ConfigError naming `where` when a REQUIRED field is missing."""
        missing = [name for name in REQUIRED if name not in row]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}")
        known = set(FIELDS)
        return cls(
            **{name: value for name, value in row.items() if name in known},
            unknown={name: value for name, value in row.items() if name not in known},
        )
