"""Preference pairs from the SFT samples, and DPO with TRL's DPOTrainer on exactly those samples.

Pairs (`label_pairs`): per train prompt, chosen = the sample with the highest reward, rejected = the
lowest; a prompt whose two differ by less than ``min_gap`` is a near-tie and gives no pair (its
preference would be noise). Samples cut at a stop string are left out, since their token ids hold the
stop string's tokens and the text alone would be re-tokenised differently.

Training (`train_dpo`) feeds TRL the token ids the engine sampled (the prompt encoded as the engine
encodes it, the response ids with their EOS when the sample ended there, none when it hit
``max_new_tokens``) and, as the reference log-probs, log pi_sft of each response that the engine
already measured while sampling (the SFT model *is* the reference): TRL needs no reference model and
no reference forward pass, which is a third of a step's time on a CPU. Two small overrides of
DPOTrainer's dataset hooks do that (`_SampledPairsTrainer`); the loss, optimiser and schedule are TRL's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .params import Smollm2Params


def usable(sample: dict) -> bool:
    """A sample that can be trained on as sampled: a response, not ended by a stop string."""
    return bool(sample.get("response")) and sample.get("stop_reason") != "stop_string"


def label_pairs(samples: list[dict], key: str, min_gap: float) -> tuple[list[dict], dict]:
    """(pairs, counts). ``samples``: rows with ``prompt_index`` and the reward ``key``. A pair is
    ``{"prompt_index", "chosen", "rejected", "chosen_reward", "rejected_reward", "gap"}`` with
    ``chosen`` / ``rejected`` indices into ``samples`` (the first of equal rewards wins); counts says
    how many prompts gave a pair, were near-ties, or had fewer than two usable samples."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(int(s["prompt_index"]), []).append(i)
    pairs: list[dict] = []
    counts = {"prompts": len(groups), "pairs": 0, "near_ties": 0, "too_few_usable": 0, "unusable_samples": 0}
    for index in sorted(groups):
        members = [i for i in groups[index] if usable(samples[i])]
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
        rows["ref_chosen_logps"].append(float(chosen["sft_logprob"]))
        rows["ref_rejected_logps"].append(float(rejected["sft_logprob"]))
    dataset = Dataset.from_dict(rows)

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    if not params.train_embeddings:
        # The (tied) embedding / LM-head matrix is the costliest gradient on a CPU; DPO moves the layers.
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            if embedding is not None:
                embedding.weight.requires_grad_(False)
    if params.train_layers is not None:
        # Blocks below the top train_layers are frozen: the backward pass stops at the lowest trained block.
        blocks = model.get_decoder().layers
        for block in blocks[: max(0, len(blocks) - params.train_layers)]:
            block.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class _Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            update(completed=0, total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            update(completed=state.global_step)

    with tempfile.TemporaryDirectory(prefix="tqstar-smollm2-dpo-") as scratch:
        config = DPOConfig(
            output_dir=scratch,
            beta=beta,
            loss_type=["sigmoid"],  # the DPO loss
            num_train_epochs=params.epochs,
            max_steps=params.max_steps or -1,
            per_device_train_batch_size=params.batch_size,
            learning_rate=params.lr,
            lr_scheduler_type="cosine",
            warmup_steps=params.warmup_ratio,  # a fraction of the steps
            weight_decay=0.0,
            max_length=None,  # responses are at most max_new_tokens long
            precompute_ref_log_probs=True,  # read from the dataset (see _SampledPairsTrainer)
            **quiet_cpu_trainer_args(seed, logging_steps=1),
        )
        trainer = without_printed_logs(
            _SampledPairsTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[_Steps()])
        )
        result = trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.model.eval()
    for key in ("is_local", "local_files_only"):  # load-time flags that from_pretrained leaves behind
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    def mean_of(key: str, entries: list[dict]) -> float | None:
        values = [e[key] for e in entries if key in e]
        return round(sum(values) / len(values), 4) if values else None

    tail = logs[-max(1, len(logs) // 5) :]  # the last fifth of the steps
    return {
        "pairs": len(pairs),
        "beta": beta,
        "steps": int(trainer.state.global_step),
        "trainable_params": trainable,
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
