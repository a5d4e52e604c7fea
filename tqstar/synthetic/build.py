"""Build (once) and cache the synthetic task: corpus, tokenizer, SFT model, DPO baselines.

``ensure_built(seed)`` returns a folder holding::

    sft/  dpo/  dpo_bl/          HF model folders (config, weights, generation config, tokenizer)
    prompts/train.jsonl          {"id", "prompt"} per line (DPO pairs are sampled on these)
    prompts/test.jsonl           held-out prompts (none of them occurs in the SFT corpus)
    corpus.jsonl                 the SFT dialogues
    dpo_data/samples.jsonl       the SFT samples on the train prompts, with both rewards
    dpo_data/dpo.jsonl           the preference pairs of ``dpo`` (target reward) ...
    dpo_data/dpo_bl.jsonl        ... and of ``dpo_bl`` (baseline reward)
    manifest.json                written last: seed, parameters, sizes, seconds, evaluation, versions

Recipe (v4, BuildParams):
  1. corpus.py: a seeded HH-format corpus of ``n_corpus`` dialogues; train and test prompts
     drawn apart from it (test prompts never occur in the corpus nor among the train prompts);
  2. tokenizer.py: a WordLevel tokenizer on the corpus and all prompts (no <unk> anywhere);
  3. training.py: a small Llama (~0.9M parameters at the defaults) trained on
     ``<s> prompt response </s>``;
  4. pairs.py: ``samples_per_prompt`` responses per train prompt, sampled once from the SFT model
     through tqstar.decoding.engine (method "sft", selection "sample", row index
     prompt_index * samples_per_prompt + j, so draws do not depend on batching), scored by both
     rewards; (best, worst), (2nd best, 2nd worst), ... pairs under the target reward (``dpo``,
     direct transfer) and under the baseline reward (``dpo_bl``, indirect transfer);
  5. training.py: each pair set trained with TRL's DPOTrainer against the SFT model;
  6. evaluation.py: greedy decoding of sft, dpo, dpo_bl on the test prompts through the same
     engine, rewards as mean and standard error.
The manifest's ``seconds`` records each stage's time. Measured once (v4, seed 0, defaults, 2 CPU
cores shared with other jobs, load average ~4): 576 s in all, of which SFT 494 s, sampling 12.5 s,
DPO 44 s + 25 s, evaluation 1.2 s.

Where a build lives, its cache key (recipe version, seed, parameters, library versions) and the
lock / temp-folder / rename that keep it safe: cache.py.

Module order (each imports only from those before it): corpus, rewards, params, tokenizer ->
cache -> training, generation -> pairs, evaluation -> build.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

from ..files import write_jsonl
from .cache import _versions, build_key, build_once, task_dir
from .corpus import Dialogue, generate_corpus, generate_prompts, tokenizer_texts
from .evaluation import evaluate_folder
from .pairs import PAIR_REWARDS, preference_pairs, sample_preference_data
from .params import MODEL_NAMES, STOP_STRINGS, VERSION, BuildParams
from .tokenizer import train_tokenizer, vocab_size_of
from .training import make_model, save_model, train_dpo, train_sft

# ----------------------------------------------------------------------------- progress and quiet


class _Progress:
    """rich progress bars for the stages, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
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


# ----------------------------------------------------------------------------- the build


def _build(out: Path, seed: int, params: BuildParams, bar: _Progress) -> dict:
    """Fill ``out`` with every file of the layout but the manifest; return the manifest."""
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. corpus and prompt splits
    t0 = time.perf_counter()
    up = bar.task("corpus + prompts", 1)
    corpus = generate_corpus(seed, params.n_corpus, prefix="train")
    seen = {d.prompt for d in corpus}
    test = generate_prompts(seed, params.n_test_prompts, prefix="test", exclude=seen)
    train = generate_prompts(seed, params.n_train_prompts, prefix="train", exclude={p["prompt"] for p in test})
    write_jsonl(out / "corpus.jsonl", (d.to_dict() for d in corpus))
    write_jsonl(out / "prompts" / "train.jsonl", train)
    write_jsonl(out / "prompts" / "test.jsonl", test)
    up(completed=1)
    seconds["corpus"] = time.perf_counter() - t0

    # 2. tokenizer (every prompt is covered, so no <unk> in any split)
    t0 = time.perf_counter()
    up = bar.task("tokenizer", 1)
    tok_texts = tokenizer_texts(corpus) + tokenizer_texts([Dialogue(id=p["id"], prompt=p["prompt"], response="") for p in train + test])
    tokenizer = train_tokenizer(tok_texts)
    up(completed=1)
    seconds["tokenizer"] = time.perf_counter() - t0

    # 3. SFT
    t0 = time.perf_counter()
    model = make_model(tokenizer, params, seed)
    n_params = sum(p.numel() for p in model.parameters())
    losses = train_sft(model, tokenizer, corpus, params, seed, update=bar.task("SFT training", None))
    save_model(model, tokenizer, out / "sft")
    seconds["sft"] = time.perf_counter() - t0

    # 4. preference samples (once, through the engine), labelled by both rewards, and the pairs
    t0 = time.perf_counter()
    pair_prompts = [p["prompt"] for p in train[: params.n_pair_prompts]]
    samples = sample_preference_data(
        model, tokenizer, pair_prompts, params, seed, update=bar.task("sampling preference data", len(pair_prompts))
    )
    write_jsonl(out / "dpo_data" / "samples.jsonl", ({"prompt": pair_prompts[s["prompt_index"]], **s} for s in samples))
    pairs = preference_pairs(pair_prompts, samples, params)
    for name, rows in pairs.items():
        write_jsonl(out / "dpo_data" / f"{name}.jsonl", rows)
    seconds["sample_pairs"] = time.perf_counter() - t0
    del model

    # 5. DPO baselines
    dpo_stats = {}
    for name, label in (("dpo", "DPO (target reward)"), ("dpo_bl", "DPO (baseline reward)")):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out) as work:
            dpo_stats[name] = train_dpo(out / "sft", pairs[name], out / name, params, seed, Path(work), update=bar.task(label, None))
        seconds[name] = time.perf_counter() - t0

    # 6. evaluation: greedy decoding on the test prompts
    t0 = time.perf_counter()
    test_prompts = [p["prompt"] for p in test]
    evaluation = {
        name: evaluate_folder(
            out / name, test_prompts, params.eval_max_new_tokens, update=bar.task(f"evaluating {name}", len(test_prompts))
        )
        for name in MODEL_NAMES
    }
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
        "rewards": {"target": "tqstar.synthetic.rewards:target_reward", "baseline": "tqstar.synthetic.rewards:baseline_reward"},
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
            **{f"{name}_pairs": len(pairs[name]) for name in PAIR_REWARDS},
        },
        "training": {
            "sft_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            **{f"{k}_{m}": v for k, st in dpo_stats.items() for m, v in st.items()},
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "eval": evaluation,
        "eval_settings": {
            "decoding": "greedy",
            "max_new_tokens": params.eval_max_new_tokens,
            "stop": ["</s>", *STOP_STRINGS],
            "prompts": "prompts/test.jsonl",
        },
        "versions": _versions(),
    }


def ensure_built(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    params: BuildParams | None = None,
    num_threads: int | None = None,
) -> Path:
    """Build the synthetic task for ``seed`` unless a complete build is cached; return its folder.

    ``params`` overrides the recipe (part of the cache key); ``num_threads`` sets torch's CPU
    threads during the build (default min(4, cpu count); not part of the key).
    """
    params = params or BuildParams()

    def build(tmp: Path) -> dict:
        with _quiet_libraries(), _torch_threads(num_threads), _Progress(progress) as bar:
            return _build(tmp, seed, params, bar)

    return build_once(task_dir(seed, cache_dir, params), build)
