"""The token-level decoding engine: one loop, many methods (docs/architecture.md, "One engine").

Per step, for every unfinished prompt (`Decoder._token_loop`, one block each):
  1. propose  the top-k tokens z_i of pi_sft(.|s_t) with log-probs l_i (plain decoding: the whole vocabulary)
  2. value    Q_i from the method's estimator (tqstar.methods names it; decoding/values.py computes it);
              with decoder.prune, candidates that provably cannot win are never valued (`Decoder.value`)
  3. score    l_i + alpha * Q_i
  4. select   argmax (greedy) or a draw from softmax(score / temperature)  (decoding/sampling.py)
  5. append   and stop at EOS, a stop string, or max_new_tokens             (decoding/stops.py)

Speed: the SFT and rollout-model caches of the accepted prefix live across steps (one token fed
per step; decoding/kv.py); rollouts fork the prefix cache into k x n rows in chunks of at most
`max_batch_rows` (decoding/rollouts.py), the rows attending to one copy of the prefix where the model
allows (decoder.shared_prefix: decoding/cascade.py); with greedy rollouts, the chosen token's rollout is
reused at the next step (decoder.reuse_rollouts: `_Batch.carried`). `tqstar.decoding.reference` is the slow oracle this must
match token for token under greedy decoding.

A step's stages fill one `Step` record (the proposal, Q, scores, the pick, the chosen tokens), which the trace is
made from. `Decoder(..., on_stage=timer)` (a `StageTimer`) is called around every stage with its name (STAGES),
e.g. to see where the time goes (scripts/bench_decode.py); it cannot change what is decoded.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol, Sequence

import torch

from ..premise import predicted_jensen_gap
from ..rewards.base import FunctionReward, Reward, cut_at_stop
from .kv import KVStream
from .rollouts import GreedyTail, RolloutRequest, RolloutRunner, Rollouts
from .sampling import select
from .settings import DecoderSettings
from .stops import StopChecker
from .values import ESTIMATORS, ValueContext


@dataclass
class Generation:
    """One decoded response and what it cost."""

    prompt: str
    response: str  # decoded, cut at the first stop string
    token_ids: list[int]  # generated ids (including a final EOS / stop-string tokens)
    sft_logprobs: list[float]  # log pi_sft(y_t | s_t) of each generated token
    policy_logprobs: list[float] | None  # log p_decoder(y_t | s_t) when selection samples, else None
    stop_reason: str  # eos | stop_string | max_new_tokens
    seconds: float = 0.0
    trace: list[dict] | None = None
    extra: dict = field(default_factory=dict)
    # What this response cost: forward tokens per model role, rollout tokens, reward calls and tokens
    # (COST_KEYS); a batch's shared passes are charged to the prompt each row belongs to.
    cost: dict = field(default_factory=dict)
    # The value's diagnostics (rows.VALUE_DIAGNOSTICS): weighed rollouts' importance weights, means over steps; the soft
    # value's Jensen gap of the recorded KL, summed over steps
    diagnostics: dict | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Proposal:
    """Step 1's output for the active rows: candidates, their proposer log-probs and base scores."""

    ids: torch.Tensor | None  # (B, k) candidate ids; None = every token of the vocabulary (plain decoding)
    logprobs: torch.Tensor  # (B, k) or (B, V): log p_proposer of each candidate
    scores: torch.Tensor  # what alpha * Q is added to: the top-k log-probs, or the logits when plain

    def token(self, pick: torch.Tensor) -> torch.Tensor:
        return pick if self.ids is None else self.ids.gather(1, pick[:, None]).squeeze(1)

    def logprob(self, pick: torch.Tensor) -> torch.Tensor:
        return self.logprobs.gather(1, pick[:, None]).squeeze(1)


@dataclass
class Step:
    """One step of the token loop, filled stage by stage; rows are the batch's active rows (B) at the step's start."""

    t: int
    last: bool  # the step at max_new_tokens: append records the chosen tokens and feeds nothing
    proposal: Proposal | None = None  # 1. propose
    values: torch.Tensor | None = None  # 2. value: Q (B, k), NaN where pruned; None for plain decoding
    details: dict | None = None  # 2. value: per candidate and rollout: the rewards behind Q (for the trace)
    pruned: torch.Tensor | None = None  # 2. value: (B, k) bool, candidates never valued (decoder.prune), or None
    kept: dict[int, GreedyTail] | None = None  # 2. value: rollouts made this step, row b * k + i (decoder.reuse_rollouts)
    scores: torch.Tensor | None = None  # 3. score: l_i + alpha * Q_i (-inf where pruned)
    pick: torch.Tensor | None = None  # 4. select: (B,) index of the chosen candidate
    policy: torch.Tensor | None = None  # 4. select: (B,) log p_decoder of it, when selection samples or another model proposes
    chosen: torch.Tensor | None = None  # 5. append: (B,) the chosen token ids
    chosen_sft: torch.Tensor | None = None  # 5. append: (B,) log pi_sft of them


# Stage names a StageTimer sees: prefill (the prompts' caches), the five stages of a step, and inside "value" the
# rollouts and every reward call ("reward" also times best-of-n's ranking of its samples).
STAGES = ("prefill", "propose", "value", "rollouts", "reward", "score", "select", "append")


class StageTimer(Protocol):
    """`Decoder(..., on_stage=timer)`: the engine runs each stage inside `with timer(name):` (name in STAGES)."""

    def __call__(self, stage: str) -> AbstractContextManager: ...


def _untimed(stage: str) -> AbstractContextManager:
    return nullcontext()


COST_KEYS = (
    "sft_forward_tokens",
    "baseline_forward_tokens",
    "rollout_tokens",  # tokens the rollouts generated
    "rollout_tokens_reused",  # rollout tokens taken from the previous step's rollout instead (decoder.reuse_rollouts)
    "reward_calls",
    "reward_tokens",
    "candidates_valued",  # candidates whose Q was computed (k per step without pruning)
    "candidates_pruned",  # candidates skipped by exact bound pruning (decoder.prune): they could not win
)
# Candidates valued per prompt in the first round of pruning; the survivors are valued in a second round.
PRUNE_FIRST_ROUND = 1
# Slack added to the reward's upper bound before pruning, so that floating-point rounding of a mean of
# rewards (which can exceed the bound by an ulp) never prunes a candidate that could win.
_BOUND_SLACK = 1e-6


def _as_reward(reward: Any, stop_strings: Sequence[str]) -> Reward | None:
    if reward is None or isinstance(reward, Reward):
        return reward
    if callable(reward):
        return FunctionReward(reward, stop_strings=stop_strings)
    raise TypeError(f"a reward must be callable(prompts, responses) -> list[float], got {type(reward).__name__}")


class Decoder:
    """TQ* and the methods it is compared with, over already-loaded models.

    >>> decoder = Decoder(sft_model, tokenizer, reward=my_reward, baseline_model=dpo_model,
    ...                   settings=DecoderSettings(method="tqstar", alpha=1.0, top_k=10))
    >>> generations = decoder.decode(["\\n\\nHuman: hi\\n\\nAssistant:"])

    `reward(prompts, responses) -> list[float]` is the target reward r; `baseline_reward` is r_bl
    (indirect transfer only). The baseline model must share the SFT tokenizer. `on_stage` (a `StageTimer`)
    is called around every stage of the loop with its name, e.g. to time them (scripts/bench_decode.py).
    """

    def __init__(
        self,
        sft_model,
        tokenizer,
        reward: Callable | Reward | None = None,
        baseline_model=None,
        baseline_reward: Callable | Reward | None = None,
        settings: DecoderSettings | None = None,
        on_stage: StageTimer | None = None,
        **overrides,
    ):
        if settings is None:
            settings = DecoderSettings(**overrides)
        elif overrides:
            settings = DecoderSettings(**{**settings.__dict__, **overrides})
        self.settings = s = settings
        self.spec = spec = s.spec
        self.sft = sft_model
        self.baseline = baseline_model
        self.tokenizer = tokenizer
        self.on_stage: StageTimer = on_stage or _untimed
        self.reward = _as_reward(reward, s.stop_strings)
        self.baseline_reward = _as_reward(baseline_reward, s.stop_strings)
        # tqstar.methods: the one check of what a method needs (a ConfigError, a ValueError)
        spec.check_needs(
            s.transfer, reward=self.reward is not None, baseline=self.baseline is not None, baseline_reward=self.baseline_reward is not None
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.stops = StopChecker(tokenizer, s.stop_strings)
        self.device = next(sft_model.parameters()).device
        self.counters = dict.fromkeys(COST_KEYS, 0)
        self.rollouts = RolloutRunner(s, self.stops, self.counters)
        self.estimate = ESTIMATORS[spec.value] if spec.value else None
        # Exact bound pruning: every Q <= the target reward's upper bound (None: prune nothing).
        bounds = getattr(self.reward, "bounds", None)
        self.q_upper = bounds[1] + _BOUND_SLACK * (1.0 + abs(bounds[1])) if (s.prunes and bounds is not None) else None

    @property
    def chunk_rows(self) -> int:
        """Rollout rows per forward pass now (max_batch_rows, halved on out-of-memory)."""
        return self.rollouts.chunk_rows

    @property
    def oom_retries(self) -> int:
        return self.rollouts.oom_retries

    def model(self, role: str):
        """The model playing `role` ("sft" or "baseline") in the method spec."""
        return self.sft if role == "sft" else self.baseline

    # ------------------------------------------------------------------ public
    def decode(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, reward_prompts: Sequence[str] | None = None
    ) -> list[Generation]:
        """Decode prompts in batches of `batch_size`.

        `indices` (default 0..n-1) seed each prompt's sampling, so a prompt's result does not depend
        on which batch it lands in. `reward_prompts` (default: the prompts) is the prompt text the
        reward sees, when the models see a formatted one (e.g. a chat template).
        """
        indices = list(range(len(prompts))) if indices is None else list(indices)
        reward_prompts = list(prompts) if reward_prompts is None else list(reward_prompts)
        size = self.settings.batch_size
        results: list[Generation] = []
        for start in range(0, len(prompts), size):
            window = slice(start, start + size)
            results += self._decode_batch(list(prompts[window]), indices[window], reward_prompts[window])
        return results

    def _decode_batch(self, prompts: list[str], indices: list[int], reward_prompts: list[str]) -> list[Generation]:
        started = time.perf_counter()
        if self.spec.response_level:
            results = self._best_of_n(prompts, indices, reward_prompts)
        else:
            results = self._token_loop(prompts, indices, reward_prompts)
        per_prompt = (time.perf_counter() - started) / max(len(prompts), 1)
        for generation in results:
            generation.seconds = per_prompt
        return results

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def _token_loop(
        self,
        prompts: list[str],
        indices: list[int],
        reward_prompts: list[str],
        selection: str | None = None,
        temperature: float | None = None,
    ) -> list[Generation]:
        s, stage = self.settings, self.on_stage
        selection, temperature = selection or s.selection, temperature or s.temperature
        with stage("prefill"):
            batch = _Batch(self, prompts, indices, reward_prompts)
        for t in range(s.max_new_tokens):
            step = Step(t, last=t == s.max_new_tokens - 1)
            with stage("propose"):  # 1. propose
                step.proposal = batch.propose(top_k=s.top_k if self.estimate else s.sample_top_k)
            if self.estimate:
                with stage("value"):  # 2. value
                    self.value(batch, step)
            with stage("score"):  # 3. score
                step.scores = candidate_scores(step.proposal.scores, s.alpha, step.values, step.pruned)
            with stage("select"):  # 4. select
                step.pick, step.policy = select(step.scores, batch.generators(), selection, temperature)
            with stage("append"):  # 5. append
                more = batch.append(step)
            if not more:
                break
        return batch.results(keep_policy=selection == "sample")

    def value(self, batch: "_Batch", step: Step) -> None:
        """Step 2: Q (B, k) into `step.values`, the trace's details into `step.details`, the pruned (B, k) bool
        candidates (or None) into `step.pruned`.

        Exact bound pruning (decoder.prune; `DecoderSettings.prunes` says where it applies: greedy
        selection, Q from rollouts within the target reward's bounds [lo, hi], alpha >= 0). The top-k
        candidates come sorted by log-prob, so the best score candidate i can reach, l_i + alpha * hi,
        falls with i. Round one values the first PRUNE_FIRST_ROUND candidates of every prompt in the
        batch; a candidate whose best reachable score is strictly below the best score already valued
        cannot be the argmax (ties are kept, so the argmax and its tie-breaking are unchanged), and nor
        can any after it. Round two values every survivor of every prompt together, in one batch of
        rollouts. Q of a pruned candidate is NaN (null in the trace); its score is -inf. Each rollout
        row uses its own sampling noise, so sampled rollouts give the same Q whichever rows run.
        """
        proposal = step.proposal
        ctx = batch.value_context(step)
        B, k = ctx.shape
        if self.q_upper is None or k <= PRUNE_FIRST_ROUND:
            step.values, step.details = self.estimate(ctx)
            batch.count_candidates([k] * B, [0] * B)
            return
        alpha, device = self.settings.alpha, proposal.scores.device
        position = torch.arange(k, device=device).expand(B, k)
        valued = torch.zeros((B, k), dtype=torch.bool, device=device)
        pruned = torch.zeros_like(valued)
        values = torch.full((B, k), float("nan"), dtype=torch.float32, device=ctx.device)
        details = None
        # The best score each candidate can reach, by the same arithmetic as its real score (monotone in Q).
        reachable = candidate_scores(proposal.scores, alpha, torch.full_like(values, self.q_upper), None)
        for first in (PRUNE_FIRST_ROUND, k):
            todo = ~valued & ~pruned & (position < first)
            ctx.select = todo.tolist()
            if not any(map(any, ctx.select)):
                break  # every candidate left was pruned
            round_values, round_details = self.estimate(ctx)
            values = torch.where(todo.to(values.device), round_values.to(values.device), values)
            details = _merge_details(details, round_details, todo)
            valued |= todo
            best = candidate_scores(proposal.scores, alpha, values, ~valued).amax(-1, keepdim=True)
            pruned |= ~valued & (reachable < best)
        batch.count_candidates(valued.sum(-1).tolist(), pruned.sum(-1).tolist())
        step.values, step.details, step.pruned = values, details, pruned

    # ------------------------------------------------------------------ helpers the batch and estimators use
    def response_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(
        self,
        reward: Reward,
        prompts: list[str],
        responses: list[str],
        owners: Sequence[int] | None = None,
        charge: Callable[[int, str, int], None] | None = None,
    ) -> list[float]:
        """reward(prompts, responses), counted: one call per pair (and the tokens a reward model read),
        charged to `owners[i]` through `charge(owner, key, amount)` when given."""
        if not prompts:
            return []
        with self.on_stage("reward"):
            values = reward(prompts, responses)
        tokens = reward.last_tokens if reward.num_parameters else None
        self.counters["reward_calls"] += len(values)
        self.counters["reward_tokens"] += sum(tokens) if tokens else 0
        if charge is not None:
            for i, owner in enumerate(owners):
                charge(owner, "reward_calls", 1)
                if tokens:
                    charge(owner, "reward_tokens", tokens[i])
        return values

    def count_forward(self, stream: KVStream, tokens: int) -> None:
        self.counters[f"{stream.role}_forward_tokens"] += int(tokens)

    def trace_rows(self, step: Step) -> list[dict]:
        """One trace entry per active row; a pruned candidate (never valued) has q, score and rollout rewards None."""
        proposal, values, scores, details, pruned = step.proposal, step.values, step.scores, step.details, step.pruned
        pick = step.pick
        rows = []
        for b in range(proposal.ids.shape[0]):
            ids = proposal.ids[b].tolist()
            skip = pruned[b].tolist() if pruned is not None else [False] * len(ids)
            known = partial(_unless, skip)
            entry = {
                "t": step.t,
                "candidates": ids,
                "tokens": [self.tokenizer.decode([i]) for i in ids],
                "logprobs": [round(float(v), 6) for v in proposal.logprobs[b]],
                "q": known([round(float(v), 6) for v in values[b]]),
                "scores": known([round(float(v), 6) for v in scores[b]]),
                "chosen": int(pick[b]),
            }
            if details:  # per candidate, per rollout: the evidence behind each Q
                entry["rollout_rewards"] = known(details["rewards"][b].tolist())
                if "weights" in details:
                    entry["rollout_baseline_rewards"] = known(details["baseline_rewards"][b].tolist())
                if "log_weights" in details:  # weighed rollouts: log pi_k(tau) - log q(tau), and Kish's effective sample size
                    entry["rollout_log_weights"] = known([[round(w, 6) for w in ws] for ws in details["log_weights"][b].tolist()])
                    entry["ess"] = known([round(float(v), 4) for v in details["ess"][b]])
            rows.append(entry)
        return rows

    # ------------------------------------------------------------------ best-of-n
    def _best_of_n(self, prompts: list[str], indices: list[int], reward_prompts: list[str]) -> list[Generation]:
        """n samples of pi_sft per prompt; keep the one the target reward scores highest."""
        s = self.settings
        repeated = [p for p in prompts for _ in range(s.n)]
        repeated_reward_prompts = [p for p in reward_prompts for _ in range(s.n)]
        sample_indices = [index * s.n + j for index in indices for j in range(s.n)]
        samples = []
        for start in range(0, len(repeated), s.max_batch_rows):
            window = slice(start, start + s.max_batch_rows)
            samples += self._token_loop(
                repeated[window], sample_indices[window], repeated_reward_prompts[window], selection="sample", temperature=s.temperature
            )

        def charge(owner: int, key: str, amount: int) -> None:
            samples[owner].cost[key] = samples[owner].cost.get(key, 0) + amount

        rewards = self.score(self.reward, repeated_reward_prompts, [g.response for g in samples], range(len(samples)), charge)
        results = []
        for b in range(len(prompts)):
            group = list(range(b * s.n, (b + 1) * s.n))
            best = max(group, key=lambda i: (rewards[i], -i))
            chosen = samples[best]
            chosen.cost = {key: sum(samples[i].cost.get(key, 0) for i in group) for key in COST_KEYS}  # all n samples
            chosen.extra = {"best_of_n_rewards": [rewards[i] for i in group], "best_of_n_chosen": best - group[0]}
            results.append(chosen)
        return results


def _unless(skip: list[bool], items: list) -> list:
    """`items` with None where `skip` is true (a pruned candidate was never valued)."""
    return [None if cut else item for item, cut in zip(items, skip)]


def candidate_scores(base: torch.Tensor, alpha: float, values: torch.Tensor | None, pruned: torch.Tensor | None) -> torch.Tensor:
    """Step 3: base + alpha * Q; -inf where a candidate was pruned (or, for `Decoder.value`, is not valued yet).
    Without Q (plain decoding) the base scores themselves."""
    if values is None:
        return base
    scores = base + alpha * values
    return scores if pruned is None else scores.masked_fill(pruned.to(scores.device), float("-inf"))


# value_diagnostics summed over a response's steps (a per-response quantity); the others are means over its steps
SUMMED_DIAGNOSTICS = ("kl_jensen_gap",)


def step_diagnostics(step: "Step", settings: DecoderSettings) -> list[dict] | None:
    """Per active row, one step's value diagnostics over its valued candidates (rows.VALUE_DIAGNOSTICS).

    Weighed rollouts (soft_transfer): the mean effective sample size / n, the mean variance of a candidate's n log
    weights (None for n = 1) and the standard deviation of Q over the candidates (None for one candidate). The soft
    value, sampled, with n >= 2 rollouts (the optimal decoder, soft transfer): `kl_jensen_gap`, by how much the step's
    recorded log p - log pi_sft overstates the KL of what the decoder draws on average over its value noise
    (`premise.predicted_jensen_gap`; docs/results/soft_transfer.md measures it). None when there is nothing to record."""
    details, values, n = step.details, step.values, settings.rollout_num
    weighed = "log_weights" in details
    gapped = settings.value == "soft" and settings.selection == "sample" and n >= 2 and "rewards" in details
    if not weighed and not gapped:
        return None
    if gapped:  # each candidate's a_j = r_j / beta + log w_j, and the step distribution the decoder drew from
        terms = details["rewards"].double() / settings.beta + (details["log_weights"].double() if weighed else 0.0)
        probs = torch.softmax(step.scores.double() / settings.temperature, dim=-1)
        scale = settings.alpha * settings.beta / settings.temperature  # one unit of log mean e^a in the sampling logits
    out = []
    for b in range(values.shape[0]):
        valued = ~torch.isnan(values[b].double())
        row = {}
        if gapped and bool(valued.any()):
            kept = valued.to(terms.device)
            row["kl_jensen_gap"] = predicted_jensen_gap(probs[b][valued.to(probs.device)].tolist(), terms[b][kept].tolist(), scale)
        if weighed and bool(valued.any()):
            log_weights, ess = details["log_weights"].double(), details["ess"].double()
            weights, q = log_weights[b][valued.to(log_weights.device)], values[b].double()[valued]
            row.update(
                ess_fraction=float(ess[b][valued.to(ess.device)].mean()) / n,
                log_weight_var=float(weights.var(dim=-1, unbiased=False).mean()) if n > 1 else None,
                value_spread=float(q.std(unbiased=False)) if q.numel() > 1 else None,
            )
        out.append(row)
    return out


def _merge_details(old: dict | None, new: dict | None, rows: torch.Tensor) -> dict | None:
    """Per-candidate trace details of a pruning round merged into the earlier rounds': `rows` (B, k) from `new`."""
    if old is None or new is None:
        return new
    return {
        key: torch.where(rows.to(value.device).view(*rows.shape, *[1] * (value.dim() - 2)), value, old[key]) for key, value in new.items()
    }


class _Batch:
    """One batch of prompts being decoded: the models' KV streams of the accepted prefixes and what
    each prompt has generated so far. Stream row r is prompt `active[r]`; finished prompts leave."""

    def __init__(self, decoder: Decoder, prompts: list[str], indices: list[int], reward_prompts: list[str]):
        self.decoder = d = decoder
        s, spec = d.settings, d.spec
        self.prompts, self.indices, self.reward_prompts = prompts, indices, reward_prompts
        d.tokenizer.padding_side = "left"
        encoded = d.tokenizer(prompts, return_tensors="pt", padding=True)
        input_ids, mask = encoded["input_ids"].to(d.device), encoded["attention_mask"].to(d.device)
        proposer = d.model(spec.proposer)
        self.cost: list[dict] = [dict.fromkeys(COST_KEYS, 0) for _ in prompts]
        self.active = list(range(len(prompts)))
        prompt_tokens = mask.sum(-1).tolist()
        self.stream = KVStream.prefill(proposer, input_ids, mask, role=spec.proposer)
        self._count_prefill(self.stream, prompt_tokens)
        # Rows record log pi_sft of every chosen token; when another model proposes (decoder=baseline),
        # the SFT model follows along one token per step to score them.
        self.sft_stream = None
        if proposer is not d.sft:
            self.sft_stream = KVStream.prefill(d.sft, input_ids, mask, role="sft")
            self._count_prefill(self.sft_stream, prompt_tokens)
        self.rollout_stream = None
        if spec.rollout is not None:
            # One model object as SFT and baseline (e.g. a preset that shares a checkpoint) shares one cache.
            rollout_model = d.model(spec.rollout)
            if rollout_model is proposer:
                self.rollout_stream = self.stream
            else:
                self.rollout_stream = KVStream.prefill(rollout_model, input_ids, mask, role=spec.rollout)
                self._count_prefill(self.rollout_stream, prompt_tokens)
        self._generators = [torch.Generator().manual_seed(s.seed * 1_000_003 + index) for index in indices]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.sft_logprobs: list[list[float]] = [[] for _ in prompts]
        self.policy_logprobs: list[list[float]] = [[] for _ in prompts]
        self.traces: list[list[dict]] = [[] for _ in prompts]
        # per prompt, the sums over steps of each value diagnostic (value_diagnostics) and their counts
        self.diagnostics: list[dict] = [{} for _ in prompts]
        self.stop_reason = ["max_new_tokens"] * len(prompts)
        # decoder.reuse_rollouts: per prompt the rollout of the token chosen at the previous step (`Step.kept` holds
        # this step's), which the next step's candidate equal to its first token continues (decoding/rollouts.py).
        self.carried: list[GreedyTail | None] = [None] * len(prompts)

    def _count_prefill(self, stream: KVStream, prompt_tokens: list[int]) -> None:
        self.decoder.count_forward(stream, stream.tokens_fed)
        for i, tokens in enumerate(prompt_tokens):
            self.cost[i][f"{stream.role}_forward_tokens"] += int(tokens)

    def charge(self, row: int, key: str, amount: int) -> None:
        """Add to the cost of the prompt in active row `row`."""
        self.cost[self.active[row]][key] += amount

    def count_candidates(self, valued: list[int], pruned: list[int]) -> None:
        """Candidates valued and pruned this step, per active row: the prompts' costs and the run's counters."""
        for row, (v, p) in enumerate(zip(valued, pruned)):
            self.charge(row, "candidates_valued", v)
            self.charge(row, "candidates_pruned", p)
        self.decoder.counters["candidates_valued"] += sum(valued)
        self.decoder.counters["candidates_pruned"] += sum(pruned)

    def generators(self) -> list[torch.Generator]:
        return [self._generators[i] for i in self.active]

    def propose(self, top_k: int | None) -> Proposal:
        """The proposer's next-token distribution: its top-k, or (top_k=None) the whole vocabulary."""
        logprobs = torch.log_softmax(self.stream.logits, dim=-1)  # (B, V)
        if top_k is None:
            return Proposal(None, logprobs, self.stream.logits)
        top_logprobs, top_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)  # (B, k)
        return Proposal(top_ids, top_logprobs, top_logprobs)

    def value_context(self, step: Step) -> ValueContext:
        d = self.decoder
        prefixes = [self.generated[i] for i in self.active]
        candidates = step.proposal.ids.tolist()
        indices = [self.indices[i] for i in self.active]
        reuse = d.settings.reuses_rollouts
        step.kept = {} if reuse else None
        carried = [self.carried[i] for i in self.active] if reuse else None

        target = self.stream if d.spec.weighs_rollouts else None  # the SFT model's stream (it proposes)

        def rollouts(pairs=None) -> Rollouts:
            request = RolloutRequest(
                self.rollout_stream,
                prefixes,
                candidates,
                indices,
                step.t,
                pairs=pairs,
                carried=carried,
                keep=reuse,
                charge=self.charge,
                target=target,
            )
            with d.on_stage("rollouts"):
                made = d.rollouts.run(request)
            if made.kept is not None:  # a pruning round's rollouts join the earlier rounds'
                step.kept.update(made.kept)
            return made

        return ValueContext(
            settings=d.settings,
            prompts=[self.reward_prompts[i] for i in self.active],
            prefixes=prefixes,
            candidates=candidates,
            text=d.response_text,
            reward=lambda p, r, owners: d.score(d.reward, p, r, owners, self.charge),
            baseline_reward=(lambda p, r, owners: d.score(d.baseline_reward, p, r, owners, self.charge))
            if d.baseline_reward is not None
            else None,
            rollouts=rollouts,
            device=step.proposal.ids.device,
        )

    # ------------------------------------------------------------------ step 5: append, one job per method
    def append(self, step: Step) -> bool:
        """Record the chosen token of every active row, carry its rollout, drop the finished rows and feed the
        rest one token. False when nothing is left to decode."""
        self._choose(step)
        self._carry(step)
        self._record(step)
        finished = self._stop()
        if step.last or len(finished) == len(self.active):
            return False
        self._feed(self._drop(finished, step.chosen))
        return True

    def _choose(self, step: Step) -> None:
        """The chosen token ids and their log pi_sft; when pi_sft does not propose, the proposer's log-prob is
        the policy's (unless selection sampled) and pi_sft's comes from the SFT stream that follows along."""
        proposal, pick = step.proposal, step.pick
        step.chosen = chosen = proposal.token(pick)
        if self.sft_stream is None:
            step.chosen_sft = proposal.logprob(pick)
            return
        step.policy = proposal.logprob(pick) if step.policy is None else step.policy
        logits = self.sft_stream.logits
        step.chosen_sft = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None].to(logits.device)).squeeze(1).to(chosen.device)

    def _carry(self, step: Step) -> None:
        """decoder.reuse_rollouts: carry each prompt's chosen candidate's rollout to the next step."""
        if step.kept is None:
            return
        k = step.proposal.ids.shape[1]
        for row, (prompt_index, choice) in enumerate(zip(self.active, step.pick.tolist())):
            self.carried[prompt_index] = step.kept.get(row * k + choice)

    def _record(self, step: Step) -> None:
        """Each active prompt's new token, its log-probs and (decoder.trace) its trace entry."""
        d = self.decoder
        traces = d.trace_rows(step) if d.settings.trace and step.values is not None else None
        # One device-to-host copy per step, not one per row.
        tokens, token_sft = step.chosen.tolist(), step.chosen_sft.tolist()
        token_policy = step.policy.tolist() if step.policy is not None else None
        diagnostics = step_diagnostics(step, d.settings) if step.details else None
        for row, prompt_index in enumerate(self.active):
            if diagnostics is not None:
                for key, value in diagnostics[row].items():
                    if value is not None:
                        total, count = self.diagnostics[prompt_index].get(key, (0.0, 0))
                        self.diagnostics[prompt_index][key] = (total + value, count + 1)
            self.generated[prompt_index].append(tokens[row])
            self.sft_logprobs[prompt_index].append(token_sft[row])
            if token_policy is not None:
                self.policy_logprobs[prompt_index].append(token_policy[row])
            if traces is not None:
                self.traces[prompt_index].append(traces[row])

    def _stop(self) -> list[int]:
        """The active rows whose prompt has just ended (EOS, a stop string), with the reason recorded."""
        finished = []
        for row, prompt_index in enumerate(self.active):
            reason = self.decoder.stops.ends(self.generated[prompt_index])
            if reason:
                self.stop_reason[prompt_index] = reason
                finished.append(row)
        return finished

    def _drop(self, rows: list[int], chosen: torch.Tensor) -> torch.Tensor:
        """Remove finished rows from every stream and the active list; the chosen tokens of the rows left."""
        if not rows:
            return chosen
        finished = set(rows)
        keep = [r for r in range(len(self.active)) if r not in finished]
        keep_index = torch.tensor(keep, device=self.decoder.device)
        for stream in self._streams():
            stream.keep(keep_index)
        self.active = [self.active[r] for r in keep]
        return chosen[keep_index]

    def _feed(self, chosen: torch.Tensor) -> None:
        """Append the chosen tokens to the accepted prefix: one token per row per model, charged to its prompt."""
        d = self.decoder
        for stream in self._streams():
            stream.step(chosen)
            d.count_forward(stream, len(self.active))
            for row in range(len(self.active)):
                self.charge(row, f"{stream.role}_forward_tokens", 1)

    def _streams(self) -> list[KVStream]:
        streams = [self.stream]
        for other in (self.rollout_stream, self.sft_stream):
            if other is not None and other is not self.stream:
                streams.append(other)
        return streams

    def results(self, keep_policy: bool) -> list[Generation]:
        d, s = self.decoder, self.decoder.settings
        results = []
        for i, prompt in enumerate(self.prompts):
            text = cut_at_stop(d.response_text(self.generated[i]), s.stop_strings)
            results.append(
                Generation(
                    prompt=prompt,
                    response=text,
                    token_ids=self.generated[i],
                    sft_logprobs=self.sft_logprobs[i],
                    policy_logprobs=self.policy_logprobs[i] if (keep_policy or self.sft_stream is not None) else None,
                    stop_reason=self.stop_reason[i],
                    trace=self.traces[i] if s.trace else None,
                    cost=self.cost[i],
                    diagnostics={
                        key: total if key in SUMMED_DIAGNOSTICS else total / count for key, (total, count) in self.diagnostics[i].items()
                    }
                    or None,
                )
            )
        return results
