"""The plain reference implementation: the oracle the fast engine must match token for token (greedy).

It follows the authors' structure on purpose: one prompt at a time; at every step the whole sequence
is re-encoded by the SFT model (no cache kept between steps); the k candidates are rolled out from
scratch in one `model.generate` batch; the reward sees decoded text. Slow by design, and simple
enough to check by reading. Greedy selection and greedy rollouts only.
"""

from __future__ import annotations

import math

import torch

from ..rewards.base import cut_at_stop
from .settings import DecoderSettings
from .values import q_from_rollouts


@torch.no_grad()
def reference_decode(
    prompt: str, sft_model, tokenizer, reward, settings: DecoderSettings, baseline_model=None, baseline_reward=None
) -> tuple[str, list[int]]:
    """Decode one prompt; returns (response text, generated token ids)."""
    s = settings
    assert s.selection == "greedy" and s.rollout_selection == "greedy", "the oracle is greedy only"
    device = next(sft_model.parameters()).device
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    eos = tokenizer.eos_token_id
    models = {"sft": sft_model, "baseline": baseline_model}
    proposer, rollout_model = models[s.spec.proposer], models.get(s.spec.rollout)
    generated: list[int] = []

    def text_of(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    for _ in range(s.max_new_tokens):
        sequence = torch.tensor([prompt_ids + generated], device=device)
        logprobs = torch.log_softmax(proposer(input_ids=sequence).logits[0, -1].float(), dim=-1)
        if not s.uses_values:
            token = int(logprobs.argmax())
        else:
            top_logprobs, top_ids = logprobs.topk(min(s.top_k, logprobs.shape[-1]))
            candidates = top_ids.tolist()
            if s.spec.value == "partial_reward":
                values = torch.tensor(reward([prompt] * len(candidates), [text_of(generated + [z]) for z in candidates]), device=device)
            else:
                rows = torch.tensor([prompt_ids + generated + [z] for z in candidates for _ in range(s.rollout_num)], device=device)
                out = rollout_model.generate(
                    input_ids=rows,
                    attention_mask=torch.ones_like(rows),
                    max_new_tokens=s.rollout_max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = []
                for row in out[:, len(prompt_ids) + len(generated) :].tolist():
                    if row[0] == eos:  # the candidate ends the response: nothing to roll out
                        row = row[:1]
                    elif eos in row[1:]:  # row[0] is the candidate itself
                        row = row[: row.index(eos, 1)]
                    texts.append(cut_at_stop(text_of(generated + row), s.stop_strings))
                as_f64 = dict(dtype=torch.float64, device=device)
                rewards = torch.tensor(reward([prompt] * len(texts), texts), **as_f64).view(len(candidates), s.rollout_num)
                baseline_rewards = None
                if s.needs_baseline_reward:
                    baseline_rewards = torch.tensor(baseline_reward([prompt] * len(texts), texts), **as_f64).view_as(rewards)
                values = q_from_rollouts(s, rewards, baseline_rewards)
            scores = top_logprobs + s.alpha * values.to(torch.float32)
            token = candidates[int(scores.argmax())]
        generated.append(token)
        if token == eos or any(stop in text_of(generated) for stop in s.stop_strings):
            break
    return cut_at_stop(text_of(generated), s.stop_strings), generated


@torch.no_grad()
def reference_rollout_log_probs(
    prefix_ids: list[int], rollout: list[int], sft_model, baseline_model, settings: DecoderSettings
) -> tuple[float, float, float]:
    """(log pi_k, log q_sft, log q_bl) of `rollout` after `prefix_ids` (prompt, accepted response, candidate), from one
    uncached pass of each model over the whole sequence: pi_k is pi_sft renormalised over its top rollout.top_k tokens
    at each position (the whole vocabulary when unset), q_sft and q_bl the SFT's and the baseline's softmax at the
    rollout temperature over the same tokens. The slow twin of the engine's weighed rollouts (decoding/rollouts.py)."""
    if not rollout:
        return 0.0, 0.0, 0.0
    device = next(sft_model.parameters()).device
    sequence = torch.tensor([prefix_ids + rollout], device=device)
    start = len(prefix_ids) - 1  # the logits at position start + t predict rollout[t]
    sft = sft_model(input_ids=sequence).logits[0, start : start + len(rollout)].double()
    base = baseline_model(input_ids=sequence.to(next(baseline_model.parameters()).device)).logits[0, start : start + len(rollout)]
    base = base.to(sft.device).double()
    totals = [0.0, 0.0, 0.0]
    for t, token in enumerate(rollout):
        kept = torch.arange(sft.shape[-1], device=sft.device)
        if settings.rollout_top_k is not None:
            kept = sft[t].topk(min(settings.rollout_top_k, sft.shape[-1])).indices
        where = (kept == token).nonzero()
        if len(where) != 1:  # a token outside pi_sft's top k: no weight under pi_k
            return float("-inf"), float("-inf"), float("-inf")
        i = int(where[0, 0])
        T = settings.rollout_temperature
        totals[0] += float(torch.log_softmax(sft[t][kept], -1)[i])
        totals[1] += float(torch.log_softmax(sft[t][kept] / T, -1)[i])
        totals[2] += float(torch.log_softmax(base[t][kept] / T, -1)[i])
    return totals[0], totals[1], totals[2]


def reference_soft_value(rewards: list[float], logs: list[tuple[float, float, float]], settings: DecoderSettings) -> float:
    """V = beta [log sum_j exp(r_j / beta + log pi_k(tau_j) - log q(tau_j)) - log n] of one candidate's n rollouts (the
    first rollout.mixture x n drawn from pi_k under proposal=mixture), written out term by term in float64."""
    n, beta = len(rewards), settings.beta
    share = settings.mixture_rows / n
    terms, log_weights = [], []
    for r, (log_pi_k, log_q_sft, log_q_bl) in zip(rewards, logs):
        if share == 1:
            log_q = log_q_sft
        elif share == 0:
            log_q = log_q_bl
        else:
            log_q = math.log(share * math.exp(log_q_sft) + (1 - share) * math.exp(log_q_bl))
        log_weights.append(log_pi_k - log_q)
        terms.append(r / beta + log_weights[-1])
    top = max(terms)
    log_total = top + math.log(sum(math.exp(x - top) for x in terms))
    if settings.self_normalize:
        peak = max(log_weights)
        return beta * (log_total - (peak + math.log(sum(math.exp(w - peak) for w in log_weights))))
    return beta * (log_total - math.log(n))
