"""Rollouts of every candidate from a fork of the accepted prefix's KV cache.

Rows are (prompt b, candidate i, rollout j) in that order, processed in chunks of at most
`max_batch_rows` (halved and retried on out-of-memory, then kept). Each chunk forks the prefix
cache, so nothing before the candidate is recomputed; the candidate tokens are fed in one batched
step; rows finish at EOS or a stop string.
"""

from __future__ import annotations

import logging

import torch

from .kv import KVStream
from .sampling import sample_index
from .settings import DecoderSettings
from .stops import StopChecker

logger = logging.getLogger("tqstar")


class RolloutRunner:
    def __init__(self, settings: DecoderSettings, stops: StopChecker, counters: dict):
        self.settings = settings
        self.stops = stops
        self.counters = counters  # the engine's: rollout tokens and forward tokens are added here
        self.chunk_rows = settings.max_batch_rows  # halved on out-of-memory, then kept
        self.oom_retries = 0

    def run(self, parent: KVStream, prefixes, candidates, indices, t, charge=None, pairs=None) -> list[list[int]]:
        """Continue [prefix, z_i] for rollout.max_new_tokens tokens, rollout.num times per candidate.
        `charge(b, key, amount)` (optional) receives each prompt row's rollout and forward tokens.
        `pairs` (optional): the (b, i) candidates to roll out; the others' rows stay empty. A row's
        continuation does not depend on which other rows run (its sampling noise is its own)."""
        self.charge = charge or (lambda b, key, amount: None)
        s = self.settings
        B, k, n, L = len(candidates), len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        total = B * k * n
        todo = list(range(total)) if pairs is None else [(b * k + i) * n + j for b, i in pairs for j in range(n)]
        noise = None
        if s.rollout_selection == "sample":
            # One noise table per (prompt, step): draws do not depend on chunking or batch makeup.
            noise = torch.cat(
                [
                    torch.rand((k * n, L), generator=torch.Generator().manual_seed((s.seed * 1_000_003 + indices[b]) * 10_007 + t))
                    for b in range(B)
                ]
            )
        continuations: list[list[int]] = [[] for _ in range(total)]
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

    def _chunk(self, parent: KVStream, rows: list[int], prefixes, candidates, noise, continuations) -> None:
        """Roll out global rows `rows` (prompt b, candidate i, rollout j) from a fork of the prefix cache."""
        s = self.settings
        k, n, L = len(candidates[0]), s.rollout_num, s.rollout_max_new_tokens
        tails = {r: prefixes[r // (k * n)][-self.stops.tail_tokens :] + [candidates[r // (k * n)][(r // n) % k]] for r in rows}
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
        forward_key = f"{s.spec.rollout}_forward_tokens"
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
        self.counters[f"{s.spec.rollout}_forward_tokens"] += fed  # the rollout model's, even when it shares the proposer's cache
