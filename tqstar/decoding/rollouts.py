"""Rollouts of every candidate from a fork of the accepted prefix's KV cache.

Rows are (prompt b, candidate i, rollout j) in that order, processed in chunks of at most
`max_batch_rows` (halved and retried on out-of-memory, then kept). Each chunk forks the prefix
cache, so nothing before the candidate is recomputed (a shared fork, without copying the prefix,
where the model allows: decoder.shared_prefix, decoding/cascade.py); the candidate tokens are fed in
one batched step; rows finish at EOS or a stop string.

Greedy rollout reuse (decoder.reuse_rollouts; docs/architecture.md): the greedy rollout
[tau_1, ..., tau_L] of the token z chosen at step t is, from tau_2 on, the greedy rollout of the
candidate tau_1 at step t+1 from [y, z], short of its last token. `run` keeps every rollout it makes
(`GreedyTail`: its tokens and the rollout model's keys/values of tau_1..tau_{L-1}); the engine carries
the chosen candidate's to the next step, where the candidate equal to tau_1 takes tau_2..tau_L and
computes only tau_{L+1}, one token on the accepted prefix's cache grafted with the kept keys/values
(or nothing, when the rollout ends earlier).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


class RolloutRunner:
    def __init__(self, settings: DecoderSettings, stops: StopChecker, counters: dict):
        self.settings = settings
        self.stops = stops
        self.counters = counters  # the engine's: rollout tokens and forward tokens are added here
        self.chunk_rows = settings.max_batch_rows  # halved on out-of-memory, then kept
        self.oom_retries = 0

    def run(self, parent: KVStream, prefixes, candidates, indices, t, charge=None, pairs=None, carried=None, kept=None) -> list[list[int]]:
        """Continue [prefix, z_i] for rollout.max_new_tokens tokens, rollout.num times per candidate.
        `charge(b, key, amount)` (optional) receives each prompt row's rollout and forward tokens.
        `pairs` (optional): the (b, i) candidates to roll out; the others' rows stay empty. A row's
        continuation does not depend on which other rows run (its sampling noise is its own).
        Greedy rollouts, one per candidate (decoder.reuse_rollouts): `carried[b]` is the `GreedyTail` of the
        token prompt row b chose at the previous step (or None), which the candidate equal to its first token
        continues instead of rolling out again; `kept` (a dict, filled when given) receives row -> `GreedyTail`
        of every rollout made here, row = b * k + i."""
        self.charge = charge or (lambda b, key, amount: None)
        s = self.settings
        B, k, n, L = len(candidates), len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        total = B * k * n
        todo = list(range(total)) if pairs is None else [(b * k + i) * n + j for b, i in pairs for j in range(n)]
        continuations: list[list[int]] = [[] for _ in range(total)]
        self.kept = kept
        if carried is not None:
            assert n == 1 and s.rollout_selection == "greedy", "only one greedy rollout per candidate is reused"
            todo = self._reuse(parent, todo, prefixes, candidates, carried, continuations)
        noise = None
        if s.rollout_selection == "sample":
            # One noise table per (prompt, step): draws do not depend on chunking or batch makeup.
            noise = torch.cat(
                [
                    torch.rand((k * n, L), generator=torch.Generator().manual_seed((s.seed * 1_000_003 + indices[b]) * 10_007 + t))
                    for b in range(B)
                ]
            )
        start = 0
        while start < len(todo):
            rows = todo[start : start + self.chunk_rows]
            try:
                self._chunk(parent, rows, prefixes, candidates, noise, continuations)
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
            start += len(rows)
        return continuations

    def _ends(self, tail: list[int]) -> bool:
        """The rollout whose tail (the prefix's last tokens, the candidate, the rollout so far) this is stops here."""
        return self.stops.is_eos(tail[-1]) or self.stops.hits_stop(tail)

    def _reuse(self, parent: KVStream, rows: list[int], prefixes, candidates, carried, continuations) -> list[int]:
        """Fill the rows whose candidate is the first token tau_1 of their prompt's carried rollout: tau_2.. up to
        where this rollout ends (checked on its own tail, as `_chunk` checks), plus, when it runs the full L
        tokens, tau_{L+1} from one forward. Returns the rows left to roll out as usual."""
        k, L = len(candidates[0]), self.settings.rollout_max_new_tokens
        rest, extend = [], []
        for row in rows:
            b = row // k
            old, candidate = carried[b], candidates[b][row % k]
            if old is None or not old.tokens or old.tokens[0] != candidate:
                rest.append(row)
                continue
            tail = prefixes[b][-self.stops.tail_tokens :] + [candidate]
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
            continuations[row] = tokens
            self.charge(b, "rollout_tokens_reused", len(tokens))
            self.counters["rollout_tokens_reused"] += len(tokens)
            if ended:
                self._keep(row, tokens)
            else:
                extend.append(row)
        if extend:
            self._last_tokens(parent, extend, k, L, carried, continuations)
        return rest

    def _last_tokens(self, parent: KVStream, rows: list[int], k: int, L: int, carried, continuations) -> None:
        """tau_{L+1} of each row: feed tau_L on the accepted prefix's cache grafted with the kept keys/values of
        tau_1..tau_{L-1} (the positions the row's rollout fed after the candidate at the previous step)."""
        owners = [row // k for row in rows]
        tails = [carried[b] for b in owners]
        device = parent.mask.device
        suffix = [
            (torch.cat([tail.kv[layer][0] for tail in tails]), torch.cat([tail.kv[layer][1] for tail in tails]))
            for layer in range(len(tails[0].kv))
        ]
        stream = parent.graft(torch.tensor(owners, device=device), suffix, share=self._share(parent))
        nxt = stream.step(torch.tensor([tail.tokens[-1] for tail in tails], device=device)).argmax(-1).tolist()
        forward_key = f"{self.settings.spec.rollout}_forward_tokens"
        for row, b, token in zip(rows, owners, nxt):
            continuations[row].append(token)
            self.charge(b, forward_key, 1)
            self.charge(b, "rollout_tokens", 1)
        self.counters["rollout_tokens"] += len(rows)
        self.counters[forward_key] += len(rows)
        if self.kept is not None:
            kv = stream.tail(L - 1)
            for position, row in enumerate(rows):
                self._keep(
                    row, continuations[row], [(keys[position : position + 1], values[position : position + 1]) for keys, values in kv]
                )

    def _share(self, parent: KVStream) -> bool:
        """Rollout rows attend to one copy of the prefix (decoder.shared_prefix) where the rollout model allows."""
        return self.settings.shared_prefix and parent.shareable

    def _keep(self, row: int, tokens: list[int], kv=None) -> None:
        if self.kept is not None:
            self.kept[row] = GreedyTail(list(tokens), kv)

    def _chunk(self, parent: KVStream, rows: list[int], prefixes, candidates, noise, continuations) -> None:
        """Roll out global rows `rows` (prompt b, candidate i, rollout j) from a fork of the prefix cache."""
        s = self.settings
        k, n, L = len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        tails = {r: prefixes[r // (k * n)][-self.stops.tail_tokens :] + [candidates[r // (k * n)][(r // n) % k]] for r in rows}
        # A candidate that ends the response (EOS, or completes a stop string) has nothing to roll out.
        alive = [r for r in rows if not self._ends(tails[r])]
        if not alive:
            for row in rows:
                self._keep(row, [])
            return
        device = parent.mask.device
        stream = parent.fork(torch.tensor([r // (k * n) for r in alive], device=device), share=self._share(parent))
        current = torch.tensor([tails[r][-1] for r in alive], device=device)
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
                    self.charge(row // (k * n), forward_key, 1)
                if noise is None:
                    nxt = logits.argmax(-1)
                else:
                    uniform = noise[torch.tensor(members), step].to(logits.device)
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
                    self.charge(row // (k * n), "rollout_tokens", 1)
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
        if self.kept is not None:
            # A rollout of the full L tokens fed [z, tau_1, ..., tau_{L-1}]: keep the keys/values of tau_1..tau_{L-1}.
            full = {row: p for p, row in enumerate(members) if len(continuations[row]) == L}
            kv = stream.tail(L - 1) if full else []
            for row in rows:
                p = full.get(row)
                self._keep(row, continuations[row], None if p is None else [(keys[p : p + 1], values[p : p + 1]) for keys, values in kv])
