"""Build (once) and cache the synthetic task: corpus, tokenizer, SFT model, DPO baselines.

``ensure_built(seed)`` returns a folder holding::

    sft/  dpo/  dpo_bl/          HF model folders (config, weights, generation config, tokenizer)
    prompts/train.jsonl          {"id", "prompt"} per line (DPO pairs are sampled on these)
    prompts/test.jsonl           held-out prompts (none of them occurs in the SFT corpus)
    corpus.jsonl                 the SFT dialogues
    dpo_data/samples.jsonl       the SFT samples on the train prompts, with both rewards
    dpo_data/dpo.jsonl           the preference pairs of ``dpo`` (target reward) ...
    dpo_data/dpo_bl.jsonl        ... and of ``dpo_bl`` (baseline reward)
    manifest.json                written last: seed, parameters, sizes, seconds, evaluation

Recipe: seeded HH-format corpus (corpus.py) -> WordLevel tokenizer -> small Llama (~0.9M
parameters) trained on prompt+response+eos -> ``samples_per_prompt`` sampled responses per
train prompt (sampled once) -> (best, worst) and (2nd best, 2nd worst) pairs under the target
reward (``dpo``, direct transfer) and under the baseline reward (``dpo_bl``, indirect
transfer), each trained with TRL's DPOTrainer against the SFT model -> greedy evaluation on
the test prompts. 158 s measured on 2 idle CPU cores (SFT 99 s of it).

The folder is ``<cache>/synthetic/v<VERSION>-<hash8>``, the hash covering the seed, every
build parameter and VERSION; ``<cache>`` is ``cache_dir``, ``$TQSTAR_CACHE`` or
``~/.cache/tqstar``. A build goes to a temp folder next to it and is renamed into place only
when complete, so a killed build never leaves a folder that looks finished; a lock file makes a
concurrent second caller wait for the first build instead of repeating it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..metrics import mean_and_stderr
from ..runs import write_json_atomic
from .corpus import ASSISTANT, HUMAN, Dialogue, generate_corpus, generate_prompts, tokenizer_texts

VERSION = 3  # bump whenever the recipe changes (new cache folder)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
ROLE_TOKENS = (HUMAN, ASSISTANT)
STOP_STRINGS = (HUMAN,)
MODEL_NAMES = ("sft", "dpo", "dpo_bl")


@dataclass(frozen=True)
class BuildParams:
    """Every knob of the recipe (all of them enter the cache key)."""

    # data
    n_corpus: int = 6000  # SFT dialogues
    n_train_prompts: int = 512  # prompts/train.jsonl; the first n_pair_prompts get DPO samples
    n_test_prompts: int = 128  # prompts/test.jsonl (held out)
    # model (LlamaConfig)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    # SFT
    sft_epochs: int = 6
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup_frac: float = 0.05
    # preference pairs (sampled once, labelled by each reward)
    n_pair_prompts: int = 512
    samples_per_prompt: int = 6
    sample_temperature: float = 1.0
    sample_max_new_tokens: int = 48
    min_reward_gap: float = 0.1
    pairs_per_prompt: int = 2
    # DPO (TRL)
    dpo_beta: float = 0.1
    dpo_lr: float = 1.25e-4
    dpo_epochs: int = 2
    dpo_batch_size: int = 32
    # evaluation (greedy, on the test prompts)
    eval_max_new_tokens: int = 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$TQSTAR_CACHE``, else ``~/.cache/tqstar``."""
    root = cache_dir or os.environ.get("TQSTAR_CACHE") or Path.home() / ".cache" / "tqstar"
    return Path(root).expanduser()


def build_key(seed: int, params: BuildParams) -> str:
    blob = json.dumps({"version": VERSION, "seed": int(seed), "params": params.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def task_dir(seed: int = 0, cache_dir: str | os.PathLike | None = None, params: BuildParams | None = None) -> Path:
    """Where the build for (seed, params) lives (whether or not it is built yet)."""
    params = params or BuildParams()
    return cache_root(cache_dir) / "synthetic" / f"v{VERSION}-{build_key(seed, params)}"


def is_built(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "manifest.json").is_file()


# ----------------------------------------------------------------------------- progress

class _Progress:
    """rich progress bars for the stages, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn())
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        """Add a stage; returns ``update(completed=None, total=None)``."""
        if self._progress is None:
            return lambda completed=None, total=None: None
        tid = self._progress.add_task(description, total=total)

        def update(completed=None, total=None):
            kwargs = {}
            if completed is not None:
                kwargs["completed"] = completed
            if total is not None:
                kwargs["total"] = total
            self._progress.update(tid, **kwargs)

        return update


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers / TRL / datasets chatter during a build, then restore it."""
    import datasets
    import transformers

    old_tf = transformers.logging.get_verbosity()
    old_ds = datasets.logging.get_verbosity()
    old_bar = datasets.is_progress_bar_enabled()
    old_tf_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(old_tf)
        datasets.logging.set_verbosity(old_ds)
        if old_bar:
            datasets.enable_progress_bar()
        if old_tf_bar:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n or min(4, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str]):
    """A WordLevel tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Words are split on spaces (Metaspace, so decode puts the spaces back) and punctuation is
    isolated; "\\n\\nHuman:" and "\\n\\nAssistant:" are added (non-special) tokens that decode
    to exactly themselves; ``<s>`` is prepended on encode. Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>,
    4 "\\n\\nHuman:", 5 "\\n\\nAssistant:", then words by frequency. Deterministic for the same texts.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    # role markers are reserved in the trainer (fixed ids 4, 5) and never seen in the texts
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS) + list(ROLE_TOKENS), min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in ROLE_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                 clean_up_tokenization_spaces=False, model_max_length=1024)
    return hf


def vocab_size_of(tokenizer) -> int:
    """Embedding rows needed: the largest id + 1 (a WordLevel vocab can report one short)."""
    return max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))


# ----------------------------------------------------------------------------- models

def make_model(tokenizer, params: BuildParams, seed: int):
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


def _save(model, tokenizer, folder: Path) -> None:
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
        part = sorted(order[c0:c0 + chunk], key=lambda i: lengths[i])
        batches += [part[k:k + bs] for k in range(0, len(part), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train_sft(model, tokenizer, dialogues: list[Dialogue], params: BuildParams, seed: int,
              update: Callable[..., None] = lambda **k: None) -> list[float]:
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


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, num_return_sequences: int = 1, batch_size: int = 128, seed: int = 0,
             update: Callable[..., None] = lambda **k: None) -> list[dict]:
    """Decode responses (stop at eos or "\\n\\nHuman:"). One dict per (prompt, sample):
    ``{"prompt_index", "response", "n_tokens", "finished"}``, response text without stop strings."""
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    human_id = tokenizer.convert_tokens_to_ids(HUMAN)
    stop_ids = [tokenizer.eos_token_id, human_id]
    out: list[dict] = []
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                if do_sample:
                    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                else:
                    kwargs = dict(do_sample=False)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                     eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
                new = gen[:, enc["input_ids"].shape[1]:].tolist()
                for j, ids in enumerate(new):
                    cut = next((k for k, t in enumerate(ids) if t in stop_ids), None)
                    body = ids if cut is None else ids[:cut]
                    text = tokenizer.decode(body, skip_special_tokens=True)
                    for s in STOP_STRINGS:
                        text = text.split(s, 1)[0]
                    out.append({"prompt_index": start + j // num_return_sequences, "response": text.strip(),
                                "n_tokens": len(body) + (cut is not None), "finished": cut is not None})
                update(completed=min(len(prompts), start + batch_size))
    finally:
        tokenizer.padding_side = old_side
    return out


def make_pairs(prompts: list[str], samples: list[dict], reward_key: str, min_gap: float,
               pairs_per_prompt: int = 1) -> list[dict]:
    """Preference pairs under ``sample[reward_key]``: per prompt, its finished samples sorted by
    reward give (best, worst), then (second best, second worst), ... up to ``pairs_per_prompt``
    pairs, each kept when chosen - rejected >= ``min_gap``."""
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        if s["finished"] and s["response"]:
            by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = []
    for i in sorted(by_prompt):
        group = sorted(by_prompt[i], key=lambda s: s[reward_key])  # stable: ties keep sample order
        for k in range(min(pairs_per_prompt, len(group) // 2)):
            worst, best = group[k], group[-1 - k]
            if best[reward_key] - worst[reward_key] >= min_gap:
                pairs.append({"prompt": prompts[i], "chosen": " " + best["response"],
                              "rejected": " " + worst["response"]})
    return pairs


def train_dpo(sft_dir: Path, pairs: list[dict], out_dir: Path, params: BuildParams, seed: int, work_dir: Path,
              update: Callable[..., None] = lambda **k: None) -> dict:
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
        output_dir=str(work_dir), seed=seed, data_seed=seed, use_cpu=True,
        per_device_train_batch_size=params.dpo_batch_size, num_train_epochs=params.dpo_epochs,
        learning_rate=params.dpo_lr, lr_scheduler_type="linear", warmup_steps=0,
        beta=params.dpo_beta, max_length=params.max_positions, gradient_checkpointing=False,
        bf16=False, fp16=False, report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[_Cb()])
    trainer.remove_callback(PrinterCallback)  # our progress bar instead of printed logs / tqdm
    trainer.remove_callback(ProgressCallback)
    result = trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    trained = trainer.model
    trained.eval()
    _save(trained, tokenizer, out_dir)
    last = history[-1] if history else {}
    return {
        "train_loss": float(result.training_loss),
        "steps": int(trainer.state.global_step),
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "final_reward_margin": last.get("rewards/margins"),
    }


def _mean_se(xs: list[float]) -> dict:
    mean, se = mean_and_stderr(xs)
    return {"mean": None if mean is None else round(mean, 4), "se": None if se is None else round(se, 4), "n": len(xs)}


def evaluate_folder(folder: Path, prompts: list[str], max_new_tokens: int,
                    update: Callable[..., None] = lambda **k: None) -> dict:
    """Greedy decoding of one saved model on ``prompts``: rewards (mean, s.e.), lengths, samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rewards import baseline_reward, target_reward

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False, update=update)
    responses = [o["response"] for o in outs]
    return {
        "target_reward": _mean_se(target_reward(prompts, responses)),
        "baseline_reward": _mean_se(baseline_reward(prompts, responses)),
        "mean_new_tokens": round(sum(o["n_tokens"] for o in outs) / len(outs), 2),
        "mean_words": round(sum(len(r.split()) for r in responses) / len(responses), 2),
        "finished_frac": round(sum(o["finished"] for o in outs) / len(outs), 4),
        "samples": [{"prompt": p, "response": r} for p, r in list(zip(prompts, responses))[:3]],
    }


# ----------------------------------------------------------------------------- the build

def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "tokenizers": tokenizers.__version__}


def _build(out: Path, seed: int, params: BuildParams, bar: _Progress) -> dict:
    from .rewards import baseline_reward, target_reward

    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. corpus and prompt splits
    t0 = time.perf_counter()
    up = bar.task("corpus + prompts", 1)
    corpus = generate_corpus(seed, params.n_corpus, prefix="train")
    seen = {d.prompt for d in corpus}
    test = generate_prompts(seed, params.n_test_prompts, prefix="test", exclude=seen)
    train = generate_prompts(seed, params.n_train_prompts, prefix="train",
                             exclude={p["prompt"] for p in test})
    _write_jsonl(out / "corpus.jsonl", (d.to_dict() for d in corpus))
    _write_jsonl(out / "prompts" / "train.jsonl", train)
    _write_jsonl(out / "prompts" / "test.jsonl", test)
    up(completed=1)
    seconds["corpus"] = time.perf_counter() - t0

    # 2. tokenizer (every prompt is covered, so no <unk> in any split)
    t0 = time.perf_counter()
    up = bar.task("tokenizer", 1)
    tok_texts = tokenizer_texts(corpus) + tokenizer_texts(
        [Dialogue(id=p["id"], prompt=p["prompt"], response="") for p in train + test]
    )
    tokenizer = train_tokenizer(tok_texts)
    up(completed=1)
    seconds["tokenizer"] = time.perf_counter() - t0

    # 3. SFT
    t0 = time.perf_counter()
    model = make_model(tokenizer, params, seed)
    n_params = sum(p.numel() for p in model.parameters())
    losses = train_sft(model, tokenizer, corpus, params, seed, update=bar.task("SFT training", None))
    _save(model, tokenizer, out / "sft")
    seconds["sft"] = time.perf_counter() - t0

    # 4. preference samples (once), labelled by both rewards
    t0 = time.perf_counter()
    pair_prompts = [p["prompt"] for p in train[: params.n_pair_prompts]]
    samples = generate(model, tokenizer, pair_prompts, max_new_tokens=params.sample_max_new_tokens, do_sample=True,
                       temperature=params.sample_temperature, num_return_sequences=params.samples_per_prompt,
                       batch_size=64, seed=seed, update=bar.task("sampling preference data", len(pair_prompts)))
    sp = [pair_prompts[s["prompt_index"]] for s in samples]
    sr = [s["response"] for s in samples]
    for s, r, rb in zip(samples, target_reward(sp, sr), baseline_reward(sp, sr)):
        s["target_reward"], s["baseline_reward"] = r, rb
    _write_jsonl(out / "dpo_data" / "samples.jsonl",
                 ({"prompt": pair_prompts[s["prompt_index"]], **s} for s in samples))
    pairs = {name: make_pairs(pair_prompts, samples, key, params.min_reward_gap, params.pairs_per_prompt)
             for name, key in (("dpo", "target_reward"), ("dpo_bl", "baseline_reward"))}
    for name, rows in pairs.items():
        if not rows:
            finished = sum(s["finished"] for s in samples)
            raise RuntimeError(
                f"synthetic build: no preference pairs for {name!r} ({finished} of {len(samples)} samples ended "
                f"within sample_max_new_tokens={params.sample_max_new_tokens}); train the SFT model longer or "
                "raise sample_max_new_tokens / samples_per_prompt"
            )
        _write_jsonl(out / "dpo_data" / f"{name}.jsonl", rows)
    seconds["sample_pairs"] = time.perf_counter() - t0
    del model

    # 5. DPO baselines
    dpo_stats = {}
    for name, label in (("dpo", "DPO (target reward)"), ("dpo_bl", "DPO (baseline reward)")):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out) as work:
            dpo_stats[name] = train_dpo(out / "sft", pairs[name], out / name, params, seed, Path(work),
                                        update=bar.task(label, None))
        seconds[name] = time.perf_counter() - t0

    # 6. evaluation: greedy decoding on the test prompts
    t0 = time.perf_counter()
    test_prompts = [p["prompt"] for p in test]
    evaluation = {name: evaluate_folder(out / name, test_prompts, params.eval_max_new_tokens,
                                        update=bar.task(f"evaluating {name}", len(test_prompts)))
                  for name in MODEL_NAMES}
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    n_tokens = [len(x) for x in tokenizer([d.text for d in corpus])["input_ids"]]
    return {
        "task": "synthetic",
        "version": VERSION,
        "key": build_key(seed, params),
        "seed": seed,
        "params": params.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {name: name for name in MODEL_NAMES},
        "prompts": {"train": "prompts/train.jsonl", "test": "prompts/test.jsonl"},
        "stop_strings": list(STOP_STRINGS),
        "rewards": {"target": "tqstar.synthetic.rewards:target_reward",
                    "baseline": "tqstar.synthetic.rewards:baseline_reward"},
        "sizes": {
            "vocab_size": vocab_size_of(tokenizer),
            "n_params": n_params,
            "corpus_dialogues": len(corpus),
            "corpus_tokens_mean": round(sum(n_tokens) / len(n_tokens), 1),
            "corpus_tokens_max": max(n_tokens),
            "train_prompts": len(train),
            "test_prompts": len(test),
            "pair_prompts": len(pair_prompts),
            "samples": len(samples),
            "samples_finished": sum(s["finished"] for s in samples),
            "dpo_pairs": len(pairs["dpo"]),
            "dpo_bl_pairs": len(pairs["dpo_bl"]),
        },
        "training": {"sft_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), **{
            f"{k}_{m}": v for k, st in dpo_stats.items() for m, v in st.items()}},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "eval": evaluation,
        "eval_settings": {"decoding": "greedy", "max_new_tokens": params.eval_max_new_tokens,
                          "stop": ["</s>", *STOP_STRINGS], "prompts": "prompts/test.jsonl"},
        "versions": _versions(),
    }


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still protects the folder
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(seed: int = 0, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 params: BuildParams | None = None, num_threads: int | None = None) -> Path:
    """Build the synthetic task for ``seed`` unless a complete build is cached; return its folder.

    ``params`` overrides the recipe (part of the cache key); ``num_threads`` sets torch's CPU
    threads during the build (default min(4, cpu count); not part of the key).
    """
    params = params or BuildParams()
    final = task_dir(seed, cache_dir, params)
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f"{final.name}.lock"):
        if is_built(final):  # another process built it while we waited
            return final
        if final.exists():  # a stray incomplete folder (no manifest): never trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
        try:
            with _quiet_libraries(), _torch_threads(num_threads), _Progress(progress) as bar:
                manifest = _build(tmp, seed, params, bar)
            write_json_atomic(tmp / "manifest.json", manifest)  # last file written
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_manifest(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
