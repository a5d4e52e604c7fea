"""Rollouts of every candidate from a fork of the accepted prefix's KV cache.

Rows are (prompt b, candidate i, rollout j) in that order, processed in chunks of at most
`max_batch_rows` (halved and retried on out-of-memory, then kept). Each chunk forks the prefix
cache, so nothing before the candidate is recomputed (a shared fork, without copying the prefix,
where the model allows: decoder.shared_prefix, decoding/cascade.py); the candidate tokens are fed in
one batched step; rows finish at EOS or a stop string.

Greedy rollout reuse (decoder.reuse_rollouts; docs/architecture.md): the greedy rollout
[tau_1, ..., tau_L] of the token z chosen at step t is, from tau_2 on, the greedy rollout of the
candidate tau_1 at step t+1 from [y, z], short of its last token. `run` returns every rollout it makes
when the request asks (`RolloutRequest.keep`; `Rollouts.kept`: each a `GreedyTail`, its tokens and the rollout
model's keys/values of tau_1..tau_{L-1}); the engine carries the chosen candidate's to the next step, where the
candidate equal to tau_1 takes tau_2..tau_L and computes only tau_{L+1}, one token on the accepted prefix's cache
grafted with the kept keys/values (or nothing, when the rollout ends earlier).
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from .kv import KVStream
from .sampling import sample_index
from .settings import DecoderSettings
from .stops import StopChecker

logger = logging.getLogger("tqstar")


@dataclass
class GreedyTail:
    """A candidate's greedy rollout kept for the next step (decoder.reuse_rollouts): its tokens tau_1..tau_m and, when
    it ran the full L tokens, the rollout model's keys/values of tau_1..tau_{L-1}, per layer (1, H, L - 1, D)."""

    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class RolloutRequest:
    """One call of `RolloutRunner.run`: roll out [prefix_b, z_bi] rollout.num times for every candidate z_bi.

    Rows are (prompt b, candidate i, rollout j), row = (b * k + i) * n + j."""

    parent: KVStream  # the rollout model's stream of the accepted prefixes, one row per prompt b
    prefixes: list[list[int]]  # accepted response ids of each prompt b
    candidates: list[list[int]]  # (B, k) candidate ids
    indices: list[int]  # each prompt's index: with the step t, it seeds sampled rollouts' noise
    t: int
    # The (b, i) candidates to roll out; the others' rows stay empty. None: all. A row's continuation does not
    # depend on which other rows run (its sampling noise is its own).
    pairs: list[tuple[int, int]] | None = None
    # Greedy rollouts, one per candidate (decoder.reuse_rollouts): carried[b] is the `GreedyTail` of the token prompt b
    # chose at the previous step (or None), which the candidate equal to its first token continues instead of
    # rolling out again.
    carried: list[GreedyTail | None] | None = None
    keep: bool = False  # return every rollout made here as a `GreedyTail` (Rollouts.kept), for the next step
    # The SFT model's stream of the accepted prefixes, stepped beside the rollout model's when the method weighs its
    # rollouts (soft_transfer: MethodSpec.weighs_rollouts): each rollout token's log-prob under pi_k comes from it.
    target: KVStream | None = None
    # charge(b, key, amount): receives each prompt's rollout and forward tokens (optional).
    charge: Callable[[int, str, int], None] | None = None

    @property
    def k(self) -> int:
        return len(self.candidates[0])

    def charge_to(self, b: int, key: str, amount: int) -> None:
        if self.charge is not None:
            self.charge(b, key, amount)


@dataclass
class Rollouts:
    """What one call made: the continuation of every row (b, i, j), [] where not rolled out, and, when the request
    asked to keep them, row b * k + i -> `GreedyTail` of every rollout made."""

    continuations: list[list[int]]
    kept: dict[int, GreedyTail] | None = None
    # Weighed rollouts (soft_transfer), per row, summed over its tokens: log pi_k(tau) (the target: pi_sft renormalised
    # over its top rollout.top_k tokens at every position) and log q(tau) (the density it was drawn from: the
    # baseline's, pi_k's, or under rollout.proposal=mixture the mixture's); None where not rolled out.
    log_target: list[float | None] | None = None
    log_proposal: list[float | None] | None = None

    def keep(self, row: int, tokens: list[int], kv=None) -> None:
        if self.kept is not None:
            self.kept[row] = GreedyTail(list(tokens), kv)


def _rows_left(last: bool, members: list[int], done: list[bool], streams: list[KVStream], nxt: torch.Tensor):
    """After a rollout step: None when the rollouts are over (the last step, or every row finished); else the rows to
    go on with, (members, done, next tokens). A row that finishes stays in the batch (its outputs ignored) until a
    quarter of the rows have finished: dropping rows copies the whole cache, which costs more than carrying a few
    finished rows for the remaining steps."""
    finished = sum(done)
    if last or finished == len(members):
        return None
    if 4 * finished < len(members):
        return members, done, nxt
    keep = [position for position, is_done in enumerate(done) if not is_done]
    for stream in streams:
        stream.keep(torch.tensor(keep, device=stream.mask.device))
    return [members[p] for p in keep], [False] * len(keep), nxt[torch.tensor(keep, device=nxt.device)]


class RolloutRunner:
    """Runs rollouts for the engine. Its only state lasts across calls: the chunk size (halved on out-of-memory,
    then kept) and the engine's counters; what one call needs and makes travels in `RolloutRequest` and `Rollouts`."""

    def __init__(self, settings: DecoderSettings, stops: StopChecker, counters: dict):
        self.settings = settings
        self.stops = stops
        self.counters = counters  # the engine's: rollout tokens and forward tokens are added here
        self.chunk_rows = settings.max_batch_rows  # halved on out-of-memory, then kept
        self.oom_retries = 0

    def run(self, request: RolloutRequest) -> Rollouts:
        """Continue [prefix, z_i] for rollout.max_new_tokens tokens, rollout.num times per candidate (the rows
        `request.pairs` names), in chunks of `chunk_rows`; take over carried rollouts where they apply."""
        s, r = self.settings, request
        B, k, n = len(r.candidates), r.k, s.rollout_num
        total = B * k * n
        todo = list(range(total)) if r.pairs is None else [(b * k + i) * n + j for b, i in r.pairs for j in range(n)]
        out = Rollouts([[] for _ in range(total)], {} if r.keep else None)
        if s.spec.weighs_rollouts:
            out.log_target, out.log_proposal = [None] * total, [None] * total
        if r.carried is not None:
            assert n == 1 and s.rollout_selection == "greedy", "only one greedy rollout per candidate is reused"
            todo = self._reuse(r, todo, out)
        noise = self._noise(r) if s.rollout_selection == "sample" else None
        start = 0
        while start < len(todo):
            rows = todo[start : start + self.chunk_rows]
            try:
                self._chunk(r, rows, noise, out)
            except torch.OutOfMemoryError:
                if self.chunk_rows == 1:
                    raise
                # Too many rows for the accelerator: halve the chunk, retry this one, keep the smaller size.
                for row in rows:
                    out.continuations[row] = []
                self.chunk_rows = max(1, self.chunk_rows // 2)
                self.oom_retries += 1
                logger.warning("out of memory with %d rollout rows; retrying with %d", len(rows), self.chunk_rows)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(rows)
        return out

    def _noise(self, r: RolloutRequest) -> torch.Tensor:
        """One noise table per (prompt, step), (B * k * n, L): draws do not depend on chunking or batch makeup."""
        s = self.settings
        rows, L = r.k * s.rollout_num, s.rollout_max_new_tokens
        # CPU generators (the same draws on any accelerator); each table is made on its generator's device
        generators = [torch.Generator().manual_seed((s.seed * 1_000_003 + r.indices[b]) * 10_007 + r.t) for b in range(len(r.candidates))]
        return torch.cat([torch.rand((rows, L), generator=g, device=g.device) for g in generators])

    def _ends(self, tail: list[int]) -> bool:
        """The rollout whose tail (the prefix's last tokens, the candidate, the rollout so far) this is stops here."""
        return self.stops.is_eos(tail[-1]) or self.stops.hits_stop(tail)

    def _reuse(self, r: RolloutRequest, rows: list[int], out: Rollouts) -> list[int]:
        """Fill the rows whose candidate is the first token tau_1 of their prompt's carried rollout: tau_2.. up to
        where this rollout ends (checked on its own tail, as `_chunk` checks), plus, when it runs the full L
        tokens, tau_{L+1} from one forward. Returns the rows left to roll out as usual."""
        k, L = r.k, self.settings.rollout_max_new_tokens
        rest, extend = [], []
        for row in rows:
            b = row // k
            old, candidate = r.carried[b], r.candidates[b][row % k]
            if old is None or not old.tokens or old.tokens[0] != candidate:
                rest.append(row)
                continue
            tail = r.prefixes[b][-self.stops.tail_tokens :] + [candidate]
            if self._ends(tail):  # the candidate ends the response: nothing to roll out (as `_chunk` decides)
                rest.append(row)
                continue
            tokens, ended = [], False
            for token in old.tokens[1:]:
                tokens.append(token)
                tail.append(token)
                if self._ends(tail):
                    ended = True
                    break
            if not ended and (len(old.tokens) < L or old.kv is None):
                rest.append(row)  # the old rollout stopped where this one does not: roll out afresh
                continue
            out.continuations[row] = tokens
            r.charge_to(b, "rollout_tokens_reused", len(tokens))
            self.counters["rollout_tokens_reused"] += len(tokens)
            if ended:
                out.keep(row, tokens)
            else:
                extend.append(row)
        if extend:
            self._last_tokens(r, extend, out)
        return rest

    def _last_tokens(self, r: RolloutRequest, rows: list[int], out: Rollouts) -> None:
        """tau_{L+1} of each row: feed tau_L on the accepted prefix's cache grafted with the kept keys/values of
        tau_1..tau_{L-1} (the positions the row's rollout fed after the candidate at the previous step)."""
        k, L = r.k, self.settings.rollout_max_new_tokens
        owners = [row // k for row in rows]
        tails = [r.carried[b] for b in owners]
        device = r.parent.mask.device
        suffix = [
            (torch.cat([tail.kv[layer][0] for tail in tails]), torch.cat([tail.kv[layer][1] for tail in tails]))
            for layer in range(len(tails[0].kv))
        ]
        stream = r.parent.graft(torch.tensor(owners, device=device), suffix, share=self._share(r.parent))
        nxt = stream.step(torch.tensor([tail.tokens[-1] for tail in tails], device=device)).argmax(-1).tolist()
        forward_key = f"{self.settings.spec.rollout}_forward_tokens"
        for row, b, token in zip(rows, owners, nxt):
            out.continuations[row].append(token)
            r.charge_to(b, forward_key, 1)
            r.charge_to(b, "rollout_tokens", 1)
        self.counters["rollout_tokens"] += len(rows)
        self.counters[forward_key] += len(rows)
        if out.kept is not None:
            kv = stream.tail(L - 1)
            for position, row in enumerate(rows):
                out.keep(
                    row,
                    out.continuations[row],
                    [(keys[position : position + 1], values[position : position + 1]) for keys, values in kv],
                )

    def _share(self, parent: KVStream) -> bool:
        """Rollout rows attend to one copy of the prefix (decoder.shared_prefix) where the rollout model allows."""
        return self.settings.shared_prefix and parent.shareable

    def _chunk(self, r: RolloutRequest, rows: list[int], noise, out: Rollouts) -> None:
        """Roll out global rows `rows` (prompt b, candidate i, rollout j) from a fork of the prefix cache."""
        s = self.settings
        k, n, L = r.k, s.rollout_num, s.rollout_max_new_tokens
        continuations = out.continuations
        tails = {
            row: r.prefixes[row // (k * n)][-self.stops.tail_tokens :] + [r.candidates[row // (k * n)][(row // n) % k]] for row in rows
        }
        # A candidate that ends the response (EOS, or completes a stop string) has nothing to roll out.
        alive = [row for row in rows if not self._ends(tails[row])]
        if not alive:
            for row in rows:
                out.keep(row, [])
            self._weights_of_ended(rows, out)
            return
        living = set(alive)
        self._weights_of_ended([row for row in rows if row not in living], out)
        if s.spec.weighs_rollouts:
            self._weighed_chunk(r, alive, tails, noise, out)
            return
        device = r.parent.mask.device
        stream = r.parent.fork(torch.tensor([row // (k * n) for row in alive], device=device), share=self._share(r.parent))
        current = torch.tensor([tails[row][-1] for row in alive], device=device)
        # Stream row p rolls out global row members[p]; finished rows leave as `_rows_left` says.
        members, done = alive, [False] * len(alive)
        fed = generated = 0
        forward_key = f"{s.spec.rollout}_forward_tokens"
        with stream.steps():  # a shared-prefix stream switches its model's attention once for the L steps
            for step in range(L):
                logits = stream.step(current)
                fed += len(members)
                for row in members:  # carried finished rows are fed too: they cost a forward like any other
                    r.charge_to(row // (k * n), forward_key, 1)
                if noise is None:
                    nxt = logits.argmax(-1)
                else:
                    uniform = noise[torch.tensor(members, device=noise.device), step].to(logits.device)
                    if s.rollout_top_k is None:
                        nxt = sample_index(torch.softmax(logits / s.rollout_temperature, dim=-1), uniform)
                    else:  # top-k sampling: the draw is among the k most likely tokens, renormalised
                        top_logits, top_ids = logits.topk(min(s.rollout_top_k, logits.shape[-1]), dim=-1)
                        pick = sample_index(torch.softmax(top_logits / s.rollout_temperature, dim=-1), uniform)
                        nxt = top_ids.gather(1, pick[:, None]).squeeze(1)
                for position, (row, token) in enumerate(zip(members, nxt.tolist())):
                    if done[position]:
                        continue
                    continuations[row].append(token)
                    tails[row].append(token)
                    generated += 1
                    r.charge_to(row // (k * n), "rollout_tokens", 1)
                    done[position] = self._ends(tails[row])
                left = _rows_left(step == L - 1, members, done, [stream], nxt)
                if left is None:
                    break
                members, done, current = left
        self.counters["rollout_tokens"] += generated
        self.counters[f"{s.spec.rollout}_forward_tokens"] += fed  # the rollout model's, even when it shares the proposer's cache
        if out.kept is not None:
            # A rollout of the full L tokens fed [z, tau_1, ..., tau_{L-1}]: keep the keys/values of tau_1..tau_{L-1}.
            full = {row: p for p, row in enumerate(members) if len(continuations[row]) == L}
            kv = stream.tail(L - 1) if full else []
            for row in rows:
                p = full.get(row)
                out.keep(row, continuations[row], None if p is None else [(keys[p : p + 1], values[p : p + 1]) for keys, values in kv])

    # ------------------------------------------------------------------ weighed rollouts (soft transfer)
    def _weights_of_ended(self, rows: list[int], out: Rollouts) -> None:
        """A candidate that ends the response has an empty rollout: probability 1 under every density."""
        if out.log_target is not None:
            for row in rows:
                out.log_target[row] = out.log_proposal[row] = 0.0

    def _weighed_chunk(self, r: RolloutRequest, alive: list[int], tails: dict, noise, out: Rollouts) -> None:
        """Sampled rollouts of rows `alive` (`tails`: each row's stop-check tail, from `_chunk`) whose tokens carry their log-probs under pi_k and under the proposal.

        The SFT model's stream (`r.target`) steps beside the baseline's (`r.parent`; not needed when every row draws
        from pi_k). At each position S is pi_sft's top rollout.top_k tokens (the whole vocabulary when unset); pi_k is
        pi_sft renormalised over S; a row draws from q_sft = softmax(sft logits / T) over S (rollout j < mixture_rows
        of its candidate) or q_bl = softmax(baseline logits / T) over S, with the row's own noise. Every row
        accumulates log pi_k, log q_sft and log q_bl of its tokens; its proposal density is the one it was drawn from,
        or under rollout.proposal=mixture the mixture's, sum_c (n_c / n) q_c (the balance heuristic)."""
        s = self.settings
        k, n, L = r.k, s.rollout_num, s.rollout_max_new_tokens
        from_sft_rows, T = s.mixture_rows, s.rollout_temperature
        device = r.target.mask.device
        owners = torch.tensor([row // (k * n) for row in alive], device=device)
        streams = {"sft": r.target.fork(owners, share=self._share(r.target))}
        if from_sft_rows < n:
            streams["baseline"] = r.parent.fork(owners.to(r.parent.mask.device), share=self._share(r.parent))
        sums = {row: [0.0, 0.0, 0.0] for row in alive}  # log pi_k, log q_sft, log q_bl
        current = torch.tensor([tails[row][-1] for row in alive], device=device)
        members, done = alive, [False] * len(alive)
        fed = dict.fromkeys(streams, 0)
        with ExitStack() as contexts:
            for stream in streams.values():
                contexts.enter_context(stream.steps())
            for step in range(L):
                logits = {role: stream.step(current.to(stream.mask.device)).to(device) for role, stream in streams.items()}
                for role in streams:
                    fed[role] += len(members)
                    for row in members:
                        r.charge_to(row // (k * n), f"{role}_forward_tokens", 1)
                sft = logits["sft"]
                if s.rollout_top_k is None:
                    ids, sft_top = None, sft
                else:
                    sft_top, ids = sft.topk(min(s.rollout_top_k, sft.shape[-1]), dim=-1)
                base_top = None if "baseline" not in logits else (logits["baseline"] if ids is None else logits["baseline"].gather(1, ids))
                uniform = noise[torch.tensor(members, device=noise.device), step].to(device)
                from_sft = torch.tensor([row % n < from_sft_rows for row in members], device=device)
                probs = torch.softmax(sft_top / T, dim=-1)  # the same draw as an SFT rollout (decoder=cd) for rows of pi_k
                if base_top is not None:
                    probs = torch.where(from_sft[:, None], probs, torch.softmax(base_top / T, dim=-1))
                pick = sample_index(probs, uniform)
                nxt = pick if ids is None else ids.gather(1, pick[:, None]).squeeze(1)
                at = pick[:, None]
                log_pi_k = torch.log_softmax(sft_top, dim=-1).gather(1, at).squeeze(1).tolist()
                log_q_sft = torch.log_softmax(sft_top / T, dim=-1).gather(1, at).squeeze(1).tolist()
                log_q_bl = (
                    [0.0] * len(members) if base_top is None else torch.log_softmax(base_top / T, dim=-1).gather(1, at).squeeze(1).tolist()
                )
                for position, (row, token) in enumerate(zip(members, nxt.tolist())):
                    if done[position]:
                        continue
                    out.continuations[row].append(token)
                    tails[row].append(token)
                    total = sums[row]
                    total[0] += log_pi_k[position]
                    total[1] += log_q_sft[position]
                    total[2] += log_q_bl[position]
                    r.charge_to(row // (k * n), "rollout_tokens", 1)
                    self.counters["rollout_tokens"] += 1
                    done[position] = self._ends(tails[row])
                left = _rows_left(step == L - 1, members, done, list(streams.values()), nxt)
                if left is None:
                    break
                members, done, current = left
        for role, tokens in fed.items():
            self.counters[f"{role}_forward_tokens"] += tokens
        share = from_sft_rows / n
        for row, (log_pi_k, log_q_sft, log_q_bl) in sums.items():
            out.log_target[row] = log_pi_k
            if share == 1:
                out.log_proposal[row] = log_q_sft
            elif share == 0:
                out.log_proposal[row] = log_q_bl
            else:
                out.log_proposal[row] = float(
                    torch.logsumexp(torch.tensor([math.log(share) + log_q_sft, math.log(1 - share) + log_q_bl], dtype=torch.float64), 0)
                )
