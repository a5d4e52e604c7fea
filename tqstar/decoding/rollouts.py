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

    def keep(self, row: int, tokens: list[int], kv=None) -> None:
        if self.kept is not None:
            self.kept[row] = GreedyTail(list(tokens), kv)


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
            return
        device = r.parent.mask.device
        stream = r.parent.fork(torch.tensor([row // (k * n) for row in alive], device=device), share=self._share(r.parent))
        current = torch.tensor([tails[row][-1] for row in alive], device=device)
        # Stream row p rolls out global row members[p]. A row that finishes stays in the batch (its
        # outputs ignored) until a quarter of the rows have finished: dropping rows copies the whole
        # cache, which costs more than carrying a few finished rows for the remaining steps.
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
        self.counters[f"{s.spec.rollout}_forward_tokens"] += fed  # the rollout model's, even when it shares the proposer's cache
        if out.kept is not None:
            # A rollout of the full L tokens fed [z, tau_1, ..., tau_{L-1}]: keep the keys/values of tau_1..tau_{L-1}.
            full = {row: p for p, row in enumerate(members) if len(continuations[row]) == L}
            kv = stream.tail(L - 1) if full else []
            for row in rows:
                p = full.get(row)
                out.keep(row, continuations[row], None if p is None else [(keys[p : p + 1], values[p : p + 1]) for keys, values in kv])
