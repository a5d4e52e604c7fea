"""Training the synthetic task's models: a small Llama, its SFT loop, and reward-weighted distillation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .corpus import Dialogue
from .params import BuildParams
from .tokenizer import vocab_size_of


def make_model(tokenizer, params: BuildParams, seed: int):
    """A freshly initialised (seeded) ``LlamaForCausalLM`` sized by ``params``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size_of(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        max_position_embeddings=params.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _set_generation_config(model, tokenizer)
    return model


def _set_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.max_new_tokens = 64
    model.config.pad_token_id = tokenizer.pad_token_id


def save_model(model, tokenizer, folder: Path) -> None:
    """An HF model folder: config, weights, generation config and tokenizer."""
    _set_generation_config(model, tokenizer)
    for key in ("is_local", "local_files_only"):  # load-time flags that from_pretrained leaves behind
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_saved(folder: Path):
    """A saved model of the task, in float32, ready to train."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _length_bucketed_batches(lengths: list[int], bs: int, gen) -> list[list[int]]:
    """A seeded shuffle into batches of similar lengths (less padding): shuffle, sort within
    chunks of 16 batches, cut, shuffle the batches."""
    import torch

    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = bs * 16
    batches: list[list[int]] = []
    for c0 in range(0, len(order), chunk):
        part = sorted(order[c0 : c0 + chunk], key=lambda i: lengths[i])
        batches += [part[k : k + bs] for k in range(0, len(part), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _fit(
    model,
    lengths: list[int],
    batch_loss: Callable,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    seed: int,
    update: Callable[..., None],
) -> list[float]:
    """AdamW over seeded length-bucketed batches with a (warmup +) cosine schedule and gradient
    clipping at 1; ``batch_loss(indices)`` gives each batch's loss. Returns the losses."""
    import torch

    n, chunk = len(lengths), batch_size * 16
    steps_per_epoch = sum(math.ceil(min(chunk, n - c0) / batch_size) for c0 in range(0, n, chunk))
    total = steps_per_epoch * epochs
    warmup = max(1, int(total * warmup_frac))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    update(completed=0, total=total)
    step = 0
    for _ in range(epochs):
        for batch_idx in _length_bucketed_batches(lengths, batch_size, gen):
            loss = batch_loss(batch_idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            update(completed=step)
    model.eval()
    return losses


def train_sft(
    model, tokenizer, dialogues: list[Dialogue], params: BuildParams, seed: int, update: Callable[..., None] = lambda **k: None
) -> list[float]:
    """Next-token training on ``<s> prompt response </s>`` (loss on every real token). Returns losses.

    Batches are right-padded and run without an attention mask: under the causal mask no real
    token sees the padding after it, and the padded positions carry no loss, so this is exact
    (and takes SDPA's fast causal path).
    """
    import torch

    enc = [ids + [tokenizer.eos_token_id] for ids in tokenizer([d.text for d in dialogues])["input_ids"]]

    def batch_loss(batch_idx):
        batch = [enc[i] for i in batch_idx]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(x)] = torch.tensor(x)
        return model(input_ids=ids, labels=labels).loss

    return _fit(
        model,
        [len(x) for x in enc],
        batch_loss,
        batch_size=params.sft_batch_size,
        epochs=params.sft_epochs,
        lr=params.sft_lr,
        weight_decay=0.01,
        warmup_frac=params.sft_warmup_frac,
        seed=seed,
        update=update,
    )


def train_weighted(
    model, tokenizer, rows: list[dict], params: BuildParams, seed: int, update: Callable[..., None] = lambda **k: None
) -> list[float]:
    """Weighted maximum likelihood of responses given prompts (reward-weighted distillation).

    ``rows``: ``{"prompt", "response", "weight"}``. The loss of a batch is
    sum_r w_r · (-log p(response_r | prompt_r)) / sum_r w_r, the log-likelihood summed over the
    response tokens and EOS (prompt tokens carry no loss), so its optimum is the weighted empirical
    distribution of the responses. Same batching as `train_sft`; cosine schedule, no warmup. Returns losses.
    """
    import torch

    texts = [Dialogue(id="", prompt=r["prompt"], response=r["response"]).text for r in rows]
    prompt_lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    enc = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    weights = [float(r["weight"]) for r in rows]
    lengths = [len(x) for x in enc]

    def batch_loss(batch_idx):
        width = max(lengths[i] for i in batch_idx)
        ids = torch.full((len(batch_idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch_idx), width), dtype=torch.float32)
        for r, i in enumerate(batch_idx):
            ids[r, : lengths[i]] = torch.tensor(enc[i])
            mask[r, prompt_lengths[i] : lengths[i]] = 1.0  # the response tokens and EOS
        logits = model(input_ids=ids).logits[:, :-1].float()
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sequence_nll = -(token_logprobs * mask[:, 1:]).sum(-1)
        w = torch.tensor([weights[i] for i in batch_idx])
        return (w * sequence_nll).sum() / w.sum()

    # warmup_frac=0: the first step's factor min(1, 1/1) = 1, so the schedule is the plain cosine of the v5 build
    return _fit(
        model,
        lengths,
        batch_loss,
        batch_size=params.distill_batch_size,
        epochs=params.distill_epochs,
        lr=params.distill_lr,
        weight_decay=0.0,
        warmup_frac=0.0,
        seed=seed,
        update=update,
    )
