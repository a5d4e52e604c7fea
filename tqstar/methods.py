"""The method registry: what each decoding method needs and how the engine runs it.

Ground module (imports only tqstar.errors): config validation, DecoderSettings, the engine, the
reference oracle, decode (what to load) and evaluate (labels) all read this one table. Adding a
token-level method is one `MethodSpec` entry here plus, when it values candidates in a new way,
one estimator in `tqstar/decoding/values.py` (see docs/architecture.md).

Every token-level method is the same loop (tqstar/decoding/engine.py): propose the top-k tokens of
the proposer, value them (`value`: the name of an estimator in decoding/values.py, or None for
plain decoding of the proposer), score log p + alpha * Q, select, append.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    needs_reward: bool = False  # the target reward r is used while decoding
    needs_baseline: bool = False  # the baseline model rho_bl is loaded
    proposer: str = "sft"  # "sft" | "baseline": the model whose distribution proposes the next token
    rollout: str | None = None  # None | "sft" | "baseline": the model rolled out after each candidate
    value: str | None = None  # estimator of Q in decoding/values.py; None = plain decoding (Q = 0, full vocabulary)
    response_level: bool = False  # best-of-n: whole responses are sampled and ranked, not tokens
    sampled: bool = False  # draws samples whatever decoder.selection says (best-of-n)
    # Rollouts record each token's log-prob under the target pi_k (pi_sft, truncated to decoder.rollout.top_k) and under
    # the proposal q they were drawn from (decoder.rollout.proposal), so values can be importance-weighted towards pi_k
    # (soft transfer: decoding/rollouts.py steps the SFT model beside the rollout model).
    weighs_rollouts: bool = False

    @property
    def uses_values(self) -> bool:
        """Candidates are valued and alpha matters."""
        return self.value is not None

    @property
    def uses_rollouts(self) -> bool:
        return self.rollout is not None

    def needs_baseline_reward(self, transfer: str) -> bool:
        """Indirect transfer reweights rollouts of a baseline aligned to r_bl, so it needs r_bl."""
        return self.value == "transfer" and transfer == "indirect"

    def check_needs(self, transfer: str | None, *, reward: bool, baseline: bool, baseline_reward: bool) -> None:
        """The one check that what this method needs is there (the engine asks it of the objects it was given, decode
        of the config's mounts before anything loads): a ConfigError naming what is missing and how to set it."""
        if self.needs_reward and not reward:
            raise ConfigError(f"decoder.method={self.name!r} needs a reward r (reward=...)")
        if self.needs_baseline and not baseline:
            raise ConfigError(f"decoder.method={self.name!r} needs a baseline model rho_bl (baseline=...)")
        if self.needs_baseline_reward(str(transfer)) and not baseline_reward:
            raise ConfigError(
                "decoder.transfer='indirect' needs a baseline reward r_bl (a baseline_reward config: reward@baseline_reward=...)"
            )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("sft", "plain decoding of pi_sft (greedy or sampled)"),
        MethodSpec(
            "baseline", "plain decoding of the baseline rho_bl (e.g. the DPO model alone)", needs_baseline=True, proposer="baseline"
        ),
        MethodSpec(
            "best_of_n",
            "n samples of pi_sft; keep the one the target reward scores highest",
            needs_reward=True,
            response_level=True,
            sampled=True,
        ),
        MethodSpec("args", "ARGS: Q = reward of the partial response [y_<t, z]", needs_reward=True, value="partial_reward"),
        MethodSpec(
            "cd",
            "controlled decoding: Q = mean reward of pi_sft rollouts after each candidate",
            needs_reward=True,
            rollout="sft",
            value="rollout_mean",
        ),
        MethodSpec(
            "tqstar",
            "Transfer Q*: Q from rollouts of the aligned baseline (direct, or importance-weighted indirect)",
            needs_reward=True,
            needs_baseline=True,
            rollout="baseline",
            value="transfer",
        ),
        MethodSpec(
            "soft_transfer",
            "soft transfer: the soft value beta log E_pi_k[e^{r/beta}] estimated by importance sampling with the aligned "
            "baseline (or a mixture with pi_k) as the proposal of the rollouts",
            needs_reward=True,
            needs_baseline=True,
            rollout="baseline",
            value="soft_importance",
            weighs_rollouts=True,
        ),
    )
}
METHOD_NAMES = tuple(METHODS)
SELECTIONS = ("greedy", "sample")
VALUES = ("mean", "soft")  # how rollout rewards become Q: their mean, or the soft value beta log mean e^{r/beta}
TRANSFERS = ("direct", "indirect")
# soft_transfer: where rollouts are drawn from; the target is pi_k whichever it is (decoder.rollout.proposal)
PROPOSALS = ("baseline", "mixture", "sft")


def spec(method: str) -> MethodSpec:
    """The spec of a method name (KeyError names the allowed ones)."""
    try:
        return METHODS[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; allowed: {', '.join(METHOD_NAMES)}") from None
