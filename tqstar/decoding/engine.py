"""The token-level decoding engine: one loop, many methods (see DESIGN.md, "One engine, many methods").

Per step, for every unfinished prompt:
  1. propose  the top-k tokens z_i of pi_sft(.|s_t) with log-probs l_i
  2. value    Q_i from the method's estimator (0, partial reward, or rollouts + reward)
  3. score    l_i + alpha * Q_i
  4. select   argmax (greedy) or a draw from softmax(score / temperature)
  5. append   and stop at EOS, a stop string, or max_new_tokens

Speed (DESIGN.md "Cost"): the SFT and rollout-model caches of the accepted prefix live across steps
(one token fed per step); rollouts fork the prefix cache into k x n rows in chunks of at most
`max_batch_rows`, feed the candidate tokens in one batched step, and drop rows as they finish.
`tqstar.decoding.reference` is the slow oracle this must match token for token under greedy decoding.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..rewards.base import FunctionReward, Reward, cut_at_stop
from .kv import KVStream
from .settings import DecoderSettings

logger = logging.getLogger("tqstar")

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

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _as_reward(reward: Any, stop_strings: Sequence[str]) -> Reward | None:
    if reward is None or isinstance(reward, Reward):
        return reward
    if callable(reward):
        return FunctionReward(reward, stop_strings=stop_strings)
    raise TypeError(f"a reward must be callable(prompts, responses) -> list[float], got {type(reward).__name__}")


def _sample_index(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: probs (R, C), uniform (R,) -> indices (R,). Deterministic given the noise."""
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1).contiguous()).squeeze(-1)
    return index.clamp(max=probs.shape[-1] - 1)


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


class Decoder:
    """TQ* and the methods it is compared with, over already-loaded models.

    >>> decoder = Decoder(sft_model, tokenizer, reward=my_reward, baseline_model=dpo_model,
    ...                   settings=DecoderSettings(method="tqstar", alpha=1.0, top_k=10))
    >>> generations = decoder.decode(["\\n\\nHuman: hi\\n\\nAssistant:"])

    `reward(prompts, responses) -> list[float]` is the target reward r; `baseline_reward` is r_bl
    (indirect transfer only). The baseline model must share the SFT tokenizer.
    """

    def __init__(self, sft_model, tokenizer, reward: Callable | Reward | None = None, baseline_model=None,
                 baseline_reward: Callable | Reward | None = None, settings: DecoderSettings | None = None, **overrides):
        if settings is None:
            settings = DecoderSettings(**overrides)
        elif overrides:
            settings = DecoderSettings(**{**settings.__dict__, **overrides})
        self.settings = s = settings
        self.sft = sft_model
        self.baseline = baseline_model
        self.tokenizer = tokenizer
        self.reward = _as_reward(reward, s.stop_strings)
        self.baseline_reward = _as_reward(baseline_reward, s.stop_strings)
        if s.method in ("args", "cd", "tqstar", "best_of_n") and self.reward is None:
            raise ValueError(f"decoder.method={s.method!r} needs a reward")
        if s.method in ("baseline", "tqstar") and self.baseline is None:
            raise ValueError(f"decoder.method={s.method!r} needs a baseline model")
        if s.method == "tqstar" and s.transfer == "indirect" and self.baseline_reward is None:
            raise ValueError("decoder.transfer='indirect' needs a baseline reward r_bl")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.stops = StopChecker(tokenizer, s.stop_strings)
        self.device = next(sft_model.parameters()).device
        self.chunk_rows = s.max_batch_rows  # halved on out-of-memory, then kept
        self.oom_retries = 0
        self.counters = {"sft_forward_tokens": 0, "baseline_forward_tokens": 0, "rollout_tokens": 0, "reward_calls": 0}

    # ------------------------------------------------------------------ public
    def decode(self, prompts: Sequence[str], indices: Sequence[int] | None = None,
               reward_prompts: Sequence[str] | None = None) -> list[Generation]:
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

    # ------------------------------------------------------------------ loop
    def _decode_batch(self, prompts: list[str], indices: list[int], reward_prompts: list[str]) -> list[Generation]:
        s = self.settings
        started = time.perf_counter()
        if s.method == "best_of_n":
            results = self._best_of_n(prompts, indices, reward_prompts)
        else:
            proposer = self.baseline if s.method == "baseline" else self.sft
            results = self._token_loop(prompts, indices, proposer, reward_prompts)
        per_prompt = (time.perf_counter() - started) / max(len(prompts), 1)
        for generation in results:
            generation.seconds = per_prompt
        return results

    def _encode(self, prompts: list[str]):
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @torch.no_grad()
    def _token_loop(self, prompts: list[str], indices: list[int], proposer, reward_prompts: list[str], selection: str | None = None,
                    temperature: float | None = None) -> list[Generation]:
        s = self.settings
        selection = selection or s.selection
        temperature = temperature or s.temperature
        plain = not s.uses_values  # sft / baseline / best_of_n samples: Q = 0, full distribution
        input_ids, mask = self._encode(prompts)
        stream = KVStream.prefill(proposer, input_ids, mask, role="baseline" if s.method == "baseline" else "sft")
        self._count_forward(stream, stream.tokens_fed)
        # Rows record log pi_sft of every chosen token; when another model proposes (decoder=baseline),
        # the SFT model follows along one token per step to score them.
        sft_stream = None
        if proposer is not self.sft:
            sft_stream = KVStream.prefill(self.sft, input_ids, mask, role="sft")
            self._count_forward(sft_stream, sft_stream.tokens_fed)
        rollout_model = self._rollout_model()
        rollout_stream = None
        if rollout_model is not None:
            # One model object as SFT and baseline (e.g. a preset that shares a checkpoint) shares one cache.
            rollout_stream = stream if rollout_model is proposer else KVStream.prefill(rollout_model, input_ids, mask, role="baseline")
            if rollout_stream is not stream:
                self._count_forward(rollout_stream, rollout_stream.tokens_fed)
        generators = [torch.Generator().manual_seed(s.seed * 1_000_003 + index) for index in indices]
        generated: list[list[int]] = [[] for _ in prompts]
        sft_logprobs: list[list[float]] = [[] for _ in prompts]
        policy_logprobs: list[list[float]] = [[] for _ in prompts]
        traces: list[list[dict]] = [[] for _ in prompts]
        stop_reason = ["max_new_tokens"] * len(prompts)
        active = list(range(len(prompts)))  # batch row r of the streams is prompt active[r]

        for t in range(s.max_new_tokens):
            logprobs = torch.log_softmax(stream.logits, dim=-1)  # (B, V)
            if plain:
                chosen, chosen_sft, chosen_policy = self._select_plain(logprobs, stream.logits, [generators[i] for i in active], selection, temperature)
                step_traces = None
                if sft_stream is not None:
                    chosen_policy = chosen_sft if chosen_policy is None else chosen_policy
                    chosen_sft = torch.log_softmax(sft_stream.logits, dim=-1).gather(1, chosen[:, None].to(sft_stream.logits.device)).squeeze(1).to(chosen.device)
            else:
                top_logprobs, top_ids = logprobs.topk(min(s.top_k, logprobs.shape[-1]), dim=-1)  # (B, k)
                values, details = self._values([reward_prompts[i] for i in active], [generated[i] for i in active],
                                               top_ids, rollout_stream, [indices[i] for i in active], t)
                scores = top_logprobs + s.alpha * values  # (B, k)
                pick, chosen_policy = self._select_scores(scores, [generators[i] for i in active], selection, temperature)
                chosen = top_ids.gather(1, pick[:, None]).squeeze(1)
                chosen_sft = top_logprobs.gather(1, pick[:, None]).squeeze(1)
                step_traces = self._trace(t, top_ids, top_logprobs, values, scores, pick, details) if s.trace else None

            finished_rows = []
            # One device-to-host copy per step, not one per row.
            tokens, token_sft = chosen.tolist(), chosen_sft.tolist()
            token_policy = chosen_policy.tolist() if chosen_policy is not None else None
            for row, prompt_index in enumerate(active):
                token = tokens[row]
                generated[prompt_index].append(token)
                sft_logprobs[prompt_index].append(token_sft[row])
                if token_policy is not None:
                    policy_logprobs[prompt_index].append(token_policy[row])
                if step_traces is not None:
                    traces[prompt_index].append(step_traces[row])
                if self.stops.is_eos(token):
                    stop_reason[prompt_index] = "eos"
                    finished_rows.append(row)
                elif self.stops.hits_stop(generated[prompt_index]):
                    stop_reason[prompt_index] = "stop_string"
                    finished_rows.append(row)
            if t == s.max_new_tokens - 1:
                break
            if finished_rows:
                keep = [r for r in range(len(active)) if r not in set(finished_rows)]
                if not keep:
                    break
                keep_index = torch.tensor(keep, device=self.device)
                chosen = chosen[keep_index]
                stream.keep(keep_index)
                for other in (rollout_stream, sft_stream):
                    if other is not None and other is not stream:
                        other.keep(keep_index)
                active = [active[r] for r in keep]
            # Append the chosen tokens to the accepted prefix: one token per row per model.
            stream.step(chosen)
            self._count_forward(stream, len(active))
            for other in (rollout_stream, sft_stream):
                if other is not None and other is not stream:
                    other.step(chosen)
                    self._count_forward(other, len(active))

        results = []
        for i, prompt in enumerate(prompts):
            text = cut_at_stop(self.tokenizer.decode(generated[i], skip_special_tokens=True), s.stop_strings)
            results.append(Generation(
                prompt=prompt, response=text, token_ids=generated[i], sft_logprobs=sft_logprobs[i],
                policy_logprobs=policy_logprobs[i] if (selection == "sample" or sft_stream is not None) else None,
                stop_reason=stop_reason[i],
                trace=traces[i] if s.trace else None,
            ))
        return results

    # ------------------------------------------------------------------ selection
    def _select_plain(self, logprobs, logits, generators, selection, temperature):
        """Plain decoding of the proposer: argmax, or a draw from softmax(logits / temperature)."""
        if selection == "greedy":
            chosen = logprobs.argmax(-1)
            return chosen, logprobs.gather(1, chosen[:, None]).squeeze(1), None
        policy = torch.log_softmax(logits / temperature, dim=-1)
        uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(policy.device)
        chosen = _sample_index(policy.exp(), uniform)
        return chosen, logprobs.gather(1, chosen[:, None]).squeeze(1), policy.gather(1, chosen[:, None]).squeeze(1)

    def _select_scores(self, scores, generators, selection, temperature):
        """Pick a candidate per row from its scores; return (index, log p_decoder of it or None)."""
        if selection == "greedy":
            return scores.argmax(-1), None
        policy = torch.log_softmax(scores / temperature, dim=-1)
        uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(policy.device)
        pick = _sample_index(policy.exp(), uniform)
        return pick, policy.gather(1, pick[:, None]).squeeze(1)

    # ------------------------------------------------------------------ values
    def _rollout_model(self):
        s = self.settings
        if s.method == "cd":
            return self.sft
        if s.method == "tqstar":
            return self.baseline
        return None

    def _values(self, prompts, prefixes, top_ids, rollout_stream, indices, t):
        """Q (B, k) for the candidates `top_ids` (B, k) of each active prompt, plus per-candidate details."""
        s = self.settings
        B, k = top_ids.shape
        candidates = top_ids.tolist()
        if s.method == "args":
            texts_prompts = [prompts[b] for b in range(B) for _ in range(k)]
            responses = [self._response_text(prefixes[b] + [candidates[b][i]]) for b in range(B) for i in range(k)]
            rewards = self._score(self.reward, texts_prompts, responses)
            return torch.tensor(rewards, dtype=torch.float32, device=top_ids.device).view(B, k), None
        n = s.rollout_num
        continuations = self._rollouts(rollout_stream, prefixes, candidates, indices, t)  # B*k*n lists
        row_prompts = [prompts[b] for b in range(B) for _ in range(k * n)]
        responses = [self._response_text(prefixes[b] + [candidates[b][i]] + continuations[(b * k + i) * n + j])
                     for b in range(B) for i in range(k) for j in range(n)]
        rewards = torch.tensor(self._score(self.reward, row_prompts, responses), dtype=torch.float64).view(B, k, n)
        details = {"rewards": rewards}
        if s.method == "tqstar" and s.transfer == "indirect":
            baseline_rewards = torch.tensor(self._score(self.baseline_reward, row_prompts, responses), dtype=torch.float64).view(B, k, n)
            weights = torch.exp((rewards - baseline_rewards) / s.beta_bl)
            if s.self_normalize:
                values = (weights * rewards).sum(-1) / weights.sum(-1)
            else:
                values = (weights * rewards).mean(-1)
            details.update(baseline_rewards=baseline_rewards, weights=weights)
        else:
            values = rewards.mean(-1)
        return values.to(torch.float32).to(top_ids.device), details

    def _rollouts(self, parent: KVStream, prefixes, candidates, indices, t) -> list[list[int]]:
        """Continue [prefix, z_i] for rollout.max_new_tokens tokens, rollout.num times per candidate.

        Rows are (prompt b, candidate i, rollout j) in that order, processed in chunks of
        max_batch_rows. Each chunk forks the accepted-prefix cache; nothing before z_i is recomputed.
        """
        s = self.settings
        B, k, n, L = len(candidates), len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        total = B * k * n
        noise = None
        if s.rollout_selection == "sample":
            # One noise table per (prompt, step): draws do not depend on chunking or batch makeup.
            noise = torch.cat([torch.rand((k * n, L), generator=torch.Generator().manual_seed(
                (s.seed * 1_000_003 + indices[b]) * 10_007 + t)) for b in range(B)])
        continuations: list[list[int]] = [[] for _ in range(total)]
        start = 0
        while start < total:
            rows = range(start, min(start + self.chunk_rows, total))
            try:
                self._rollout_chunk(parent, rows, prefixes, candidates, noise, continuations)
            except torch.OutOfMemoryError:
                if self.chunk_rows == 1:
                    raise
                # Too many rows for the accelerator: halve the chunk, retry this one, keep the smaller size.
                for row in rows:
                    continuations[row] = []
                self.chunk_rows = max(1, self.chunk_rows // 2)
                self.oom_retries += 1
                logger.warning("out of memory with %d rollout rows; retrying with %d", len(rows), self.chunk_rows)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = rows.stop
        return continuations

    def _rollout_chunk(self, parent: KVStream, rows: range, prefixes, candidates, noise, continuations) -> None:
        """Roll out global rows `rows` (prompt b, candidate i, rollout j) from a fork of the prefix cache."""
        s = self.settings
        k, n, L = len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        tails = {r: prefixes[r // (k * n)][-self.stops.tail_tokens:] + [candidates[r // (k * n)][(r // n) % k]] for r in rows}
        # A candidate that ends the response (EOS, or completes a stop string) has nothing to roll out.
        alive = [r for r in rows if not (self.stops.is_eos(tails[r][-1]) or self.stops.hits_stop(tails[r]))]
        if not alive:
            return
        device = parent.mask.device
        stream = parent.fork(torch.tensor([r // (k * n) for r in alive], device=device))
        current = torch.tensor([tails[r][-1] for r in alive], device=device)
        # Stream row p rolls out global row members[p]. A row that finishes stays in the batch (its
        # outputs ignored) until a quarter of the rows have finished: dropping rows copies the whole
        # cache, which costs more than carrying a few finished rows for the remaining steps.
        members, done = alive, [False] * len(alive)
        fed = generated = 0
        for step in range(L):
            logits = stream.step(current)
            fed += len(members)
            if noise is None:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / s.rollout_temperature, dim=-1)
                nxt = _sample_index(probs, noise[torch.tensor(members), step].to(probs.device))
            for position, (row, token) in enumerate(zip(members, nxt.tolist())):
                if done[position]:
                    continue
                continuations[row].append(token)
                tails[row].append(token)
                generated += 1
                done[position] = self.stops.is_eos(token) or self.stops.hits_stop(tails[row])
            finished = sum(done)
            if step == L - 1 or finished == len(members):
                break
            if 4 * finished >= len(members):
                keep = [position for position, is_done in enumerate(done) if not is_done]
                keep_index = torch.tensor(keep, device=device)
                stream.keep(keep_index)
                nxt = nxt[keep_index]
                members, done = [members[p] for p in keep], [False] * len(keep)
            current = nxt
        self.counters["rollout_tokens"] += generated
        self.counters["sft_forward_tokens" if s.method == "cd" else "baseline_forward_tokens"] += fed

    def _response_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _score(self, reward: Reward, prompts: list[str], responses: list[str]) -> list[float]:
        values = reward(prompts, responses)
        self.counters["reward_calls"] += len(values)
        return values

    def _count_forward(self, stream: KVStream, tokens: int) -> None:
        self.counters[f"{stream.role}_forward_tokens"] += int(tokens)

    def _trace(self, t, top_ids, top_logprobs, values, scores, pick, details):
        rows = []
        for b in range(top_ids.shape[0]):
            ids = top_ids[b].tolist()
            entry = {
                "t": t,
                "candidates": ids,
                "tokens": [self.tokenizer.decode([i]) for i in ids],
                "logprobs": [round(float(v), 6) for v in top_logprobs[b]],
                "q": [round(float(v), 6) for v in values[b]],
                "scores": [round(float(v), 6) for v in scores[b]],
                "chosen": int(pick[b]),
            }
            if details:  # per candidate, per rollout: the evidence behind each Q
                entry["rollout_rewards"] = details["rewards"][b].tolist()
                if "weights" in details:
                    entry["rollout_baseline_rewards"] = details["baseline_rewards"][b].tolist()
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
            samples += self._token_loop(repeated[start:start + s.max_batch_rows], sample_indices[start:start + s.max_batch_rows],
                                        self.sft, repeated_reward_prompts[start:start + s.max_batch_rows],
                                        selection="sample", temperature=s.temperature)
        rewards = self._score(self.reward, repeated_reward_prompts, [g.response for g in samples])
        results = []
        for b in range(len(prompts)):
            group = list(range(b * s.n, (b + 1) * s.n))
            best = max(group, key=lambda i: (rewards[i], -i))
            chosen = samples[best]
            chosen.extra = {"best_of_n_rewards": [rewards[i] for i in group], "best_of_n_chosen": best - group[0]}
            results.append(chosen)
        return results


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))
