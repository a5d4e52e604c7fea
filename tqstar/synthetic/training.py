"""Training the synthetic task's models: a small Llama, its SFT loop, and DPO through TRL."""

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


def train_sft(
    model, tokenizer, dialogues: list[Dialogue], params: BuildParams, seed: int, update: Callable[..., None] = lambda **k: None
) -> list[float]:
    """Next-token training on ``<s> prompt response </s>`` (loss on every real token). Returns losses.

    Batches are right-padded and run without an attention mask: under the causal mask no real
    token sees the padding after it, and the padded positions carry no loss, so this is exact
    (and takes SDPA's fast causal path).
    """
    import torch

    texts = [d.text for d in dialogues]
    enc = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    lengths = [len(x) for x in enc]
    n, bs = len(enc), params.sft_batch_size
    chunk = bs * 16
    steps_per_epoch = sum(math.ceil(min(chunk, n - c0) / bs) for c0 in range(0, n, chunk))
    total = steps_per_epoch * params.sft_epochs
    warmup = max(1, int(total * params.sft_warmup_frac))
    opt = torch.optim.AdamW(model.parameters(), lr=params.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    update(completed=0, total=total)
    step = 0
    for _ in range(params.sft_epochs):
        for batch_idx in _length_bucketed_batches(lengths, bs, gen):
            batch = [enc[i] for i in batch_idx]
            width = max(len(x) for x in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, x in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(x)] = torch.tensor(x)
            loss = model(input_ids=ids, labels=labels).loss
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


def train_dpo(
    sft_dir: Path,
    pairs: list[dict],
    out_dir: Path,
    params: BuildParams,
    seed: int,
    work_dir: Path,
    update: Callable[..., None] = lambda **k: None,
) -> dict:
    """DPO (TRL DPOTrainer, sigmoid loss) of the SFT model on ``pairs``; saves model + tokenizer to ``out_dir``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            update(completed=0, total=state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            update(completed=state.global_step)

    cfg = DPOConfig(
        output_dir=str(work_dir),
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        per_device_train_batch_size=params.dpo_batch_size,
        num_train_epochs=params.dpo_epochs,
        learning_rate=params.dpo_lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=params.dpo_beta,
        max_length=params.max_positions,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, callbacks=[_Cb()]
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar instead of printed logs / tqdm
    trainer.remove_callback(ProgressCallback)
    result = trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    trained = trainer.model
    trained.eval()
    save_model(trained, tokenizer, out_dir)
    last = history[-1] if history else {}
    return {
        "train_loss": float(result.training_loss),
        "steps": int(trainer.state.global_step),
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "final_reward_margin": last.get("rewards/margins"),
    }
