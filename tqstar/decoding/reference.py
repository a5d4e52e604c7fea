"""The plain reference implementation: the oracle the fast engine must match token for token (greedy).

It follows the authors' structure on purpose: one prompt at a time; at every step the whole sequence
is re-encoded by the SFT model (no cache kept between steps); the k candidates are rolled out from
scratch in one `model.generate` batch; the reward sees decoded text. Slow by design, and simple
enough to check by reading. Greedy selection and greedy rollouts only.
"""

from __future__ import annotations

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
