"""Preference pairs from the SFT samples, and DPO with TRL's DPOTrainer on exactly those samples.

Pairs (`label_pairs`): per train prompt, chosen = the sample with the highest reward, rejected = the
lowest; a prompt whose two differ by less than ``min_gap`` is a near-tie and gives no pair (its
preference would be noise). Samples cut at a stop string are left out, since their token ids hold the
stop string's tokens and the text alone would be re-tokenised differently. With ``finished_only``
(``pairs_finished_only``), samples cut at ``max_new_tokens`` are left out too: both sides of every pair are
whole answers, so a reward earned by a fragment (often the longer, the more positive words) teaches no
preference for running past the cap.

Training (`train_dpo`) feeds TRL the token ids the engine sampled (the prompt encoded as the engine
encodes it, the response ids with their EOS when the sample ended there, none when it hit
``max_new_tokens``) and, as the reference log-probs, log pi_sft of each response that the engine
already measured while sampling (the SFT model *is* the reference): TRL needs no reference model and
no reference forward pass, which is a third of a step's time on a CPU. Two small overrides of
DPOTrainer's dataset hooks do that (`_SampledPairsTrainer`); the loss, optimiser and schedule are TRL's.

With ``lora_rank`` set (`Smollm2Params`), DPO trains LoRA adapters (peft, passed to TRL as its
``peft_config``) on the blocks' linear layers (``lora_target_modules``; with ``train_layers``, only in the
top blocks) instead of the weights: no gradient or Adam state for the 135M weights, only for the
adapters. The reference log-probs are still the sampled ones (TRL would otherwise take the
adapter-disabled base as the reference: the same model). With ``ld_alpha`` (LD-DPO) the reference log-probs are
weighted as TRL weighs the policy's (`reference_logps`), from the per-token log-probs the samples keep. After training the adapters are merged into
the weights (``merge_and_unload``) and a plain model folder is saved, which decoding loads as any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .params import Smollm2Params


def usable(sample: dict, finished_only: bool = False) -> bool:
    """A sample that can be trained on as sampled: a response, not ended by a stop string (nor, with
    ``finished_only``, cut at max_new_tokens)."""
    reason = sample.get("stop_reason")
    return bool(sample.get("response")) and reason != "stop_string" and not (finished_only and reason == "max_new_tokens")


def label_pairs(samples: list[dict], key: str, min_gap: float, finished_only: bool = False) -> tuple[list[dict], dict]:
    """(pairs, counts). ``samples``: rows with ``prompt_index`` and the reward ``key``. A pair is
    ``{"prompt_index", "chosen", "rejected", "chosen_reward", "rejected_reward", "gap"}`` with
    ``chosen`` / ``rejected`` indices into ``samples`` (the first of equal rewards wins); counts says
    how many prompts gave a pair, were near-ties, or had fewer than two usable samples (`usable`)."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(int(s["prompt_index"]), []).append(i)
    pairs: list[dict] = []
    counts = {"prompts": len(groups), "pairs": 0, "near_ties": 0, "too_few_usable": 0, "unusable_samples": 0}
    for index in sorted(groups):
        members = [i for i in groups[index] if usable(samples[i], finished_only)]
        counts["unusable_samples"] += len(groups[index]) - len(members)
        if len(members) < 2:
            counts["too_few_usable"] += 1
            continue
        best = max(members, key=lambda i: samples[i][key])  # max / min keep the first of equal values
        worst = min(members, key=lambda i: samples[i][key])
        gap = samples[best][key] - samples[worst][key]
        if gap < min_gap or best == worst:
            counts["near_ties"] += 1
            continue
        pairs.append(
            {
                "prompt_index": index,
                "chosen": best,
                "rejected": worst,
                "chosen_reward": samples[best][key],
                "rejected_reward": samples[worst][key],
                "gap": gap,
            }
        )
    counts["pairs"] = len(pairs)
    return pairs, counts


def reference_logps(chosen: dict, rejected: dict, ld_alpha: float | None) -> tuple[float, float]:
    """log pi_sft of the chosen and the rejected sample as DPO's reference (measured while sampling). With LD-DPO's
    ``ld_alpha``, weighted as TRL weighs the policy's: the first min(len chosen, len rejected) tokens at 1, the rest at
    ``ld_alpha`` (so at step 1, policy = reference, the margin is 0 as in plain DPO); per-token log-probs needed."""
    if ld_alpha is None:
        return float(chosen["sft_logprob"]), float(rejected["sft_logprob"])
    tokens = [s.get("sft_token_logprobs") for s in (chosen, rejected)]
    if any(t is None or len(t) != len(s["token_ids"]) for t, s in zip(tokens, (chosen, rejected))):
        raise RuntimeError("smollm2 build: ld_alpha needs each sample's per-token log pi_sft (sft_token_logprobs)")
    shared = min(len(t) for t in tokens)
    return tuple(float(sum(t[:shared]) + ld_alpha * sum(t[shared:])) for t in tokens)


def lora_config(params: Smollm2Params, n_blocks: int):
    """peft's LoraConfig of the recipe: rank ``lora_rank`` adapters on ``lora_target_modules`` of every block,
    or of the top ``train_layers`` of the ``n_blocks``."""
    from peft import LoraConfig

    top = None if params.train_layers is None else list(range(max(0, n_blocks - params.train_layers), n_blocks))
    return LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=params.lora_modules,
        layers_to_transform=top,
        layers_pattern=None if top is None else "layers",
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_dpo(
    sft_dir: Path,
    out: Path,
    prompt_ids: list[list[int]],
    samples: list[dict],
    pairs: list[dict],
    params: Smollm2Params,
    beta: float,
    seed: int,
    update: Callable[..., None] = lambda **k: None,
) -> dict:
    """DPO of the SFT model in ``sft_dir`` on ``pairs`` of ``samples`` (rows with ``token_ids`` and
    ``sft_logprob``; ``prompt_ids[prompt_index]`` the encoded chat prompt); saves a plain HF folder
    (weights, generation config, tokenizer) to ``out`` and returns the training record."""
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ..builds import quiet_cpu_trainer_args, without_printed_logs

    class _SampledPairsTrainer(DPOTrainer):
        """DPOTrainer on pairs that arrive tokenised, with their reference log-probs (see the module docstring)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # prompt_ids / chosen_ids / rejected_ids: the engine's own ids

        def _precompute_ref_logps(self, dataset, *args, **kwargs):
            return dataset  # ref_chosen_logps / ref_rejected_logps: log pi_sft measured while sampling

    if not pairs:
        raise RuntimeError("smollm2 build: no preference pairs to train on (every prompt was a near-tie); lower the min_gap")
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "ref_chosen_logps": [], "ref_rejected_logps": []}
    for pair in pairs:
        chosen, rejected = samples[pair["chosen"]], samples[pair["rejected"]]
        rows["prompt_ids"].append(list(prompt_ids[pair["prompt_index"]]))
        rows["chosen_ids"].append(list(chosen["token_ids"]))
        rows["rejected_ids"].append(list(rejected["token_ids"]))
        ref_chosen, ref_rejected = reference_logps(chosen, rejected, params.ld_alpha)
        rows["ref_chosen_logps"].append(ref_chosen)
        rows["ref_rejected_logps"].append(ref_rejected)
    dataset = Dataset.from_dict(rows)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    peft_config = lora_config(params, len(model.get_decoder().layers)) if params.lora_rank is not None else None
    # With LoRA, peft freezes every weight and trains the adapters (in the top train_layers blocks only, if set).
    if peft_config is None and not params.train_embeddings:
        # The (tied) embedding / LM-head matrix is the costliest gradient on a CPU; DPO moves the layers.
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            if embedding is not None:
                embedding.weight.requires_grad_(False)
    if peft_config is None and params.train_layers is not None:
        # Blocks below the top train_layers are frozen: the backward pass stops at the lowest trained block.
        blocks = model.get_decoder().layers
        for block in blocks[: max(0, len(blocks) - params.train_layers)]:
            block.requires_grad_(False)
    trainable = None if peft_config is not None else sum(p.numel() for p in model.parameters() if p.requires_grad)

    class _Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            update(completed=0, total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            update(completed=state.global_step)

    with tempfile.TemporaryDirectory(prefix="tqstar-smollm2-dpo-") as scratch:
        config = DPOConfig(
            output_dir=scratch,
            beta=beta,
            loss_type=["sigmoid"] + (["sft"] if params.rpo_alpha else []),  # the DPO loss (RPO: + NLL of the chosen)
            loss_weights=[1.0, params.rpo_alpha] if params.rpo_alpha else None,
            num_train_epochs=params.epochs,
            max_steps=params.max_steps or -1,
            per_device_train_batch_size=params.batch_size,
            learning_rate=params.lr,
            lr_scheduler_type="cosine",
            warmup_steps=params.warmup_ratio,  # a fraction of the steps
            weight_decay=0.0,
            max_length=None,  # responses are at most max_new_tokens long
            precompute_ref_log_probs=True,  # read from the dataset (see _SampledPairsTrainer)
            ld_alpha=params.ld_alpha,  # LD-DPO's weight of the tokens past the shorter response (None: plain DPO)
            # TRL zeroes every dropout (LoRA's too) unless asked not to; SmolLM2's own dropout is 0
            disable_dropout=not (peft_config is not None and params.lora_dropout > 0),
            **{**quiet_cpu_trainer_args(seed, logging_steps=1), "bf16": params.bf16},
        )
        trainer = without_printed_logs(
            _SampledPairsTrainer(
                model=model,
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[_Steps()],
                peft_config=peft_config,
            )
        )
        if trainable is None:
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = trainer.train()
        seconds["train"] = time.perf_counter() - t0
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    t0 = time.perf_counter()
    model = trainer.model.eval()
    if peft_config is not None:
        model = model.merge_and_unload()  # W + (alpha / r) B A: a plain model of the SFT model's architecture
    for key in ("is_local", "local_files_only"):  # load-time flags that from_pretrained leaves behind
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds["save"] = time.perf_counter() - t0

    def mean_of(key: str, entries: list[dict]) -> float | None:
        values = [e[key] for e in entries if key in e]
        return round(sum(values) / len(values), 4) if values else None

    tail = logs[-max(1, len(logs) // 5) :]  # the last fifth of the steps
    return {
        "pairs": len(pairs),
        "beta": beta,
        "steps": int(trainer.state.global_step),
        "trainable_params": trainable,
        "lora": None if peft_config is None else {"rank": params.lora_rank, "alpha": params.lora_alpha, "modules": params.lora_modules},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},  # load (model, trainer), train, save (merge)
        "train_loss": round(float(result.training_loss), 4),
        "seconds_per_step": round(float(result.metrics.get("train_runtime", 0.0)) / max(1, trainer.state.global_step), 2),
        "final_loss": mean_of("loss", tail),
        "final_accuracy": mean_of("rewards/accuracies", tail),
        "final_margin": mean_of("rewards/margins", tail),
        "log": [
            {
                "step": int(e.get("step", i + 1)),
                "loss": round(float(e["loss"]), 4),
                "accuracy": None if "rewards/accuracies" not in e else round(float(e["rewards/accuracies"]), 4),
                "margin": None if "rewards/margins" not in e else round(float(e["rewards/margins"]), 4),
            }
            for i, e in enumerate(logs)
        ],
    }
