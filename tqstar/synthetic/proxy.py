"""A learned proxy of the target reward r: a reward model of the synthetic task's own architecture.

The gold rewards (rewards.py) are Python functions; real experiments steer with a learned reward
model instead. The proxy is one: a ``LlamaForSequenceClassification`` with one logit, its body
initialised from the SFT model (same tokenizer, pad token set), trained by TRL's ``RewardTrainer``
(Bradley-Terry loss) on preference pairs labelled by r: two SFT samples of the same train prompt
(``distill_data/samples.jsonl``, already written by the build), chosen = the higher r, pairs whose
rewards differ by less than ``min_gap`` left out (near-ties carry no preference).

It is measured on the build's held-out test prompts: ``test_samples_per_prompt`` fresh SFT samples per
prompt (the build's own sampling helper), every within-prompt pair with ``|dr| >= min_gap``; the
held-out pairwise accuracy is the fraction of those pairs the proxy orders like r (a tie counts as
wrong), and the correlation of proxy score with r over the samples (Pearson and Spearman).

Cached next to the build it was trained from, without touching the build or its key::

    <cache>/synthetic/v<VERSION>-<build key>/                      the build (unchanged)
    <cache>/synthetic/v<VERSION>-<build key>-proxy-<proxy key>/    a plain HF folder: config, weights, tokenizer,
                                                                  heldout.jsonl, manifest.json (written last)

``<proxy key>`` hashes ``PROXY_VERSION`` and `ProxyParams`; the build's folder name already covers
its seed, recipe and library stack. The folder is written by ``cache.build_once`` (temp folder, lock,
rename; tqstar.builds), so a killed build leaves nothing that looks finished and a concurrent caller waits.

It loads through the same path as any reward model: ``reward=synthetic_proxy`` (conf/reward/
synthetic_proxy.yaml) is ``type: hf`` with ``name_or_path: synthetic:proxy``, which `tqstar.decode`
resolves to this folder (building it on first use) before `tqstar.rewards.build_reward` loads it.

Torch-free at import, like the rest of the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..builds import build_once, first_use_line, is_built, load_manifest
from ..files import read_jsonl, write_jsonl
from ..stats import pearson, spearman
from .cache import _versions, task_dir
from .params import STOP_STRINGS, BuildParams

# Bump whenever the recipe changes what a proxy build writes (a new proxy folder; the build is untouched).
PROXY_VERSION = 1
PROXY_NAME = "proxy"
SYNTHETIC_REWARDS = (PROXY_NAME,)  # `synthetic:<name>` reward models: reward.name_or_path=synthetic:proxy
TEMPLATE = "{prompt}{response}"  # the text the proxy reads; conf/reward/synthetic_proxy.yaml's template must match
HELDOUT_SEED_OFFSET = 2  # held-out samples are drawn with seed + 2 (the build used seed for its samples, seed + 1 for the premise)


@dataclass(frozen=True)
class ProxyParams:
    """Every knob of the proxy's recipe (all of them enter the proxy's key, none the build's)."""

    n_pairs: int = 4096  # training pairs, spread evenly over the train prompts that have samples
    min_gap: float = 0.05  # pairs with |r_chosen - r_rejected| below this are near-ties: skipped (train and held out)
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 32  # pairs per step (each step reads 2 x batch_size texts)
    seed: int = 0  # pair draws and the score head's initialisation
    center_coef: float = 0.01  # RewardConfig.center_rewards_coefficient: keeps the scores near mean zero
    test_samples_per_prompt: int = 8  # held-out SFT samples per test prompt (accuracy and correlation)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Wall seconds of a proxy build (default ProxyParams, on the full build) on a 2-core CPU machine: 250-335 s measured
# for seeds 0, 1, 2 (README). What its first-use line quotes.
PROXY_BUILD_SECONDS = 300


def proxy_key(params: ProxyParams | None = None) -> str:
    params = params or ProxyParams()
    blob = json.dumps({"version": PROXY_VERSION, "params": params.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def proxy_dir(task: str | os.PathLike, params: ProxyParams | None = None) -> Path:
    """Where the proxy of the build in ``task`` lives: a sibling folder ``<build name>-proxy-<proxy key>``."""
    task = Path(task)
    return task.parent / f"{task.name}-proxy-{proxy_key(params)}"


def find_proxy(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, params: ProxyParams | None = None, build_params: BuildParams | None = None
) -> Path | None:
    """The proxy's folder when it is built, else None (builds nothing)."""
    folder = proxy_dir(task_dir(seed, cache_dir, build_params), params)
    return folder if is_built(folder) else None


def ensure_proxy(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    params: ProxyParams | None = None,
    build_params: BuildParams | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> Path:
    """Build the proxy reward model of the synthetic task for ``seed`` unless it is cached; return its folder.

    Builds (or finds) the task first (`ensure_built`, same arguments); ``params`` sets the proxy's recipe.
    """
    from ..builds import Progress, quiet_libraries, torch_threads
    from .build import ensure_built

    params = params or ProxyParams()
    task = ensure_built(seed=seed, cache_dir=cache_dir, progress=progress, params=build_params, num_threads=num_threads)

    def build(tmp: Path) -> dict:
        with quiet_libraries(), torch_threads(num_threads), Progress(progress) as bar:
            return _build_proxy(tmp, task, seed, params, bar)

    announce = first_use_line(
        f"the learned proxy reward of the synthetic task (reward=synthetic_proxy, next to {task.name})"
        + ("" if params == ProxyParams() else ", custom params"),
        PROXY_BUILD_SECONDS if params == ProxyParams() else None,
        "tqstar prepare synthetic --proxy",
    )
    return build_once(proxy_dir(task, params), build, announce=announce if progress else None)


# ----------------------------------------------------------------------------- pairs and measures (pure)


def preference_pairs(samples: list[dict], n_pairs: int, min_gap: float, rng: random.Random) -> list[dict]:
    """Up to ``n_pairs`` ``{"prompt_index", "chosen", "rejected", "gap"}`` pairs of responses to the same prompt.

    ``samples``: rows with ``prompt_index``, ``response`` and ``target_reward``. Per prompt, pairs are
    drawn without replacement from those whose rewards differ by at least ``min_gap`` (chosen = the
    higher reward), ``ceil(n_pairs / prompts)`` per prompt, then shuffled and cut to ``n_pairs``."""
    groups: dict[int, list[dict]] = {}
    for s in samples:
        groups.setdefault(int(s["prompt_index"]), []).append(s)
    if not groups or n_pairs < 1:
        return []
    per_prompt = math.ceil(n_pairs / len(groups))
    pairs: list[dict] = []
    for index in sorted(groups):
        group = groups[index]
        usable = [
            (i, j)
            for i in range(len(group))
            for j in range(i + 1, len(group))
            if abs(group[i]["target_reward"] - group[j]["target_reward"]) >= min_gap
        ]
        for i, j in rng.sample(usable, min(per_prompt, len(usable))):
            a, b = (group[i], group[j]) if group[i]["target_reward"] > group[j]["target_reward"] else (group[j], group[i])
            pairs.append(
                {"prompt_index": index, "chosen": a["response"], "rejected": b["response"], "gap": a["target_reward"] - b["target_reward"]}
            )
    rng.shuffle(pairs)
    return pairs[:n_pairs]


def pairwise_accuracy(groups: list[int], rewards: list[float], scores: list[float], min_gap: float) -> tuple[float | None, int]:
    """(accuracy, pairs): over every pair of items in the same group whose rewards differ by at least
    ``min_gap``, the fraction the scores order like the rewards (a tie in score counts as wrong)."""
    by_group: dict[int, list[int]] = {}
    for k, g in enumerate(groups):
        by_group.setdefault(g, []).append(k)
    right = total = 0
    for members in by_group.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                dr = rewards[i] - rewards[j]
                if abs(dr) < min_gap:
                    continue
                total += 1
                right += (scores[i] - scores[j]) * dr > 0
    return (right / total if total else None), total


# ----------------------------------------------------------------------------- the proxy build


def _build_params(task: Path) -> BuildParams:
    """The recipe the build in ``task`` was made with (its manifest's ``params``)."""
    stored = load_manifest(task).get("params") or {}
    fields = {f.name for f in dataclasses.fields(BuildParams)}
    return BuildParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields})


def _tokenize(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
    """Token ids of TEMPLATE exactly as tqstar.rewards.hf.HFClassifierReward reads them (BOS, no EOS, left-truncated)."""
    texts = [TEMPLATE.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    tokenizer.truncation_side = "left"
    return tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def train_proxy(task: Path, out: Path, prompts: list[str], pairs: list[dict], params: ProxyParams, bar) -> dict:
    """Train the sequence classifier from ``task``/sft on ``pairs`` with TRL's RewardTrainer; save it to ``out``."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from ..builds import quiet_cpu_trainer_args, without_printed_logs

    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    torch.manual_seed(params.seed)  # the score head is the only newly initialised weight
    model = AutoModelForSequenceClassification.from_pretrained(task / "sft", num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    max_length = int(model.config.max_position_embeddings)
    chosen = _tokenize(tokenizer, [prompts[p["prompt_index"]] for p in pairs], [p["chosen"] for p in pairs], max_length)
    rejected = _tokenize(tokenizer, [prompts[p["prompt_index"]] for p in pairs], [p["rejected"] for p in pairs], max_length)
    # Already tokenized (chosen_ids / rejected_ids): RewardTrainer then adds no EOS, so the proxy is trained on
    # exactly the token ids HFClassifierReward scores at decoding time.
    dataset = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    update = bar.task("proxy reward training", None)

    class _Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            update(completed=0, total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            update(completed=state.global_step)

    with tempfile.TemporaryDirectory(prefix="tqstar-proxy-trainer-") as scratch:
        config = RewardConfig(
            output_dir=scratch,
            num_train_epochs=params.epochs,
            per_device_train_batch_size=params.batch_size,
            learning_rate=params.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.0,
            center_rewards_coefficient=params.center_coef or None,
            max_length=None,  # truncated above, like the reward class does
            **quiet_cpu_trainer_args(params.seed, logging_steps=10),
        )
        trainer = without_printed_logs(
            RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[_Steps()])
        )
        result = trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.model.eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = max_length  # the reward class truncates (left) to what the model was built for
    for key in ("is_local", "local_files_only"):  # load-time flags that from_pretrained leaves behind
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = logs[-3:]
    return {
        "steps": int(trainer.state.global_step),
        "train_loss": round(float(result.training_loss), 4),
        "final_loss": round(sum(e["loss"] for e in tail) / len(tail), 4) if tail else None,
        "final_accuracy": round(sum(e.get("accuracy", 0.0) for e in tail) / len(tail), 4) if tail else None,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def score_folder(folder: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """The proxy's scores through the same reward class decoding uses (tqstar.rewards.hf.HFClassifierReward)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..rewards.hf import HFClassifierReward

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    reward = HFClassifierReward(model, AutoTokenizer.from_pretrained(folder), template=TEMPLATE, batch_size=64, stop_strings=STOP_STRINGS)
    return reward(prompts, responses)


def _build_proxy(out: Path, task: Path, seed: int, params: ProxyParams, bar) -> dict:
    """Fill ``out`` with the proxy (HF folder) and its held-out samples; return the manifest."""
    from transformers import AutoTokenizer

    from .distill import sample_responses
    from .training import load_saved

    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    build_params = _build_params(task)
    train_prompts = [p["prompt"] for p in read_jsonl(task / "prompts" / "train.jsonl")]
    test = read_jsonl(task / "prompts" / "test.jsonl")

    # 1. training pairs from the build's SFT samples on the train prompts, labelled by r
    samples = read_jsonl(task / "distill_data" / "samples.jsonl")
    rng = random.Random(f"tqstar-proxy-pairs-{seed}-{params.seed}")
    pairs = preference_pairs(samples, params.n_pairs, params.min_gap, rng)
    if not pairs:
        raise RuntimeError(f"synthetic proxy: no pair of SFT samples of one prompt differs in r by min_gap={params.min_gap} or more")

    # 2. the reward model: the SFT body with a one-logit head, trained by TRL's RewardTrainer
    t0 = time.perf_counter()
    training = train_proxy(task, out, train_prompts, pairs, params, bar)
    seconds["train"] = time.perf_counter() - t0

    # 3. held out: fresh SFT samples on the test prompts (the build's sampler), scored by r and by the proxy
    t0 = time.perf_counter()
    test_prompts = [p["prompt"] for p in test]
    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    rows = sample_responses(
        load_saved(task / "sft").eval(),
        tokenizer,
        test_prompts,
        build_params,
        seed + HELDOUT_SEED_OFFSET,
        params.test_samples_per_prompt,
        update=bar.task("proxy held-out samples", len(test_prompts)),
    )
    prompts = [test_prompts[r["prompt_index"]] for r in rows]
    scores = score_folder(out, prompts, [r["response"] for r in rows])
    rewards = [r["target_reward"] for r in rows]
    groups = [r["prompt_index"] for r in rows]
    accuracy, n_heldout_pairs = pairwise_accuracy(groups, rewards, scores, params.min_gap)
    write_jsonl(
        out / "heldout.jsonl",
        (
            {
                "prompt_id": test[r["prompt_index"]]["id"],
                "prompt_index": r["prompt_index"],
                "response": r["response"],
                "finished": r["finished"],
                "target_reward": r["target_reward"],
                "proxy_reward": s,
            }
            for r, s in zip(rows, scores)
        ),
    )
    seconds["heldout"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    def rounded(x):
        return None if x is None else round(x, 4)

    return {
        "task": "synthetic-proxy",
        "version": PROXY_VERSION,
        "key": proxy_key(params),
        "build": task.name,
        "seed": seed,
        "params": params.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "architecture": "LlamaForSequenceClassification (1 logit), body from sft/",
        "template": TEMPLATE,
        "pairs": {
            "train": len(pairs),
            "train_prompts": len({p["prompt_index"] for p in pairs}),
            "train_mean_gap": rounded(sum(p["gap"] for p in pairs) / len(pairs)),
            "heldout": n_heldout_pairs,
        },
        "training": training,
        "heldout": {
            "prompts": len(test_prompts),
            "samples": len(rows),
            "pairs": n_heldout_pairs,
            "accuracy": rounded(accuracy),
            "pearson": rounded(pearson(scores, rewards)),
            "spearman": rounded(spearman(scores, rewards)),
            "proxy_mean": rounded(sum(scores) / len(scores)),
            "target_reward_mean": rounded(sum(rewards) / len(rewards)),
            "file": "heldout.jsonl",
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "versions": _versions(),
    }
