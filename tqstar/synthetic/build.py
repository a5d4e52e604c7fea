"""Build (once) and cache the synthetic task: corpus, tokenizer, SFT model, baselines checked against rho*_beta.

``ensure_built(seed)`` returns a folder holding::

    sft/                          the SFT model pi_sft (HF folders: config, weights, generation config, tokenizer)
    rho1/ rho0.5/ rho0.25/ rho0.1/  baselines of the target reward r, distilled towards rho*_beta (a ladder of beta)
    rho_bl/                       the indirect-transfer baseline, distilled towards rho*_beta of r_bl (none when
                                  baseline_reward_beta is None: the demo build, params.SIZES)
    prompts/train.jsonl           {"id", "prompt"} per line (the distillation samples are drawn on these)
    prompts/test.jsonl            held-out prompts (none of them occurs in the SFT corpus)
    corpus.jsonl                  the SFT dialogues
    distill_data/samples.jsonl    the SFT samples on the train prompts, with both rewards
    manifest.json                 written last: seed, parameters, sizes, seconds, evaluation, premise checks, versions

Recipe (v5, BuildParams):
  1. corpus.py: a seeded HH-format corpus of ``n_corpus`` dialogues; train and test prompts
     drawn apart from it (test prompts never occur in the corpus nor among the train prompts);
  2. tokenizer.py: a WordLevel tokenizer on the corpus and all prompts (no <unk> anywhere);
  3. training.py: a small Llama (~0.9M parameters at the defaults) trained on ``<s> prompt response </s>``;
  4. distill.py: ``samples_per_prompt`` responses per train prompt, sampled once from the SFT model at
     temperature 1 through tqstar.decoding.engine (row index prompt_index * samples_per_prompt + j, so
     draws do not depend on batching), scored by both rewards;
  5. training.py: for each beta of ``ladder_betas`` (target reward) and ``baseline_reward_beta`` (r_bl),
     the SFT model fine-tuned by weighted maximum likelihood on ``distill_draws`` rows per prompt
     resampled from those samples by softmax(r / beta): reward-weighted distillation, whose optimum is
     the importance-sampling approximation of rho*_beta ∝ pi_sft · e^{r/beta} (so beta, not a step
     count, sets the strength);
  6. evaluation.py: greedy decoding of every model on the test prompts, and the premise checks of
     each baseline against rho*_beta (sampled reward vs importance-sampled E_{rho*}[r], KL vs
     KL(rho* || pi_sft), implied-reward slope), written to the manifest's ``premise``, with rho*_beta's
     reward-KL curve over a grid of beta (``premise.sft.optimum_curve``).
The manifest's ``seconds`` records each stage's time.

Where a build lives and its cache key (recipe version, seed, parameters, library versions): cache.py; the
lock / temp-folder / rename that keep it safe, the progress bars and the engine sampling: tqstar.builds.

Module order (each imports only from those before it): corpus, rewards, params, tokenizer ->
cache -> training, generation -> distill -> evaluation -> build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from ..builds import Progress, build_once, first_use_line, quiet_libraries, torch_threads
from ..files import write_jsonl
from .cache import _versions, build_key, task_dir
from .corpus import Dialogue, generate_corpus, generate_prompts, tokenizer_texts
from .distill import resampled_rows, sample_responses
from .evaluation import evaluate_folder, premise_checks
from .params import BUILD_SECONDS, DEFAULT_BASELINE, STOP_STRINGS, VERSION, BuildParams, size_of
from .tokenizer import train_tokenizer, vocab_size_of
from .training import load_saved, make_model, save_model, train_sft, train_weighted

# ----------------------------------------------------------------------------- the build


class _SftStage(NamedTuple):
    """What steps 1-4 of the build leave behind for the rest of it (and for tests' stand-in builds)."""

    corpus: list
    train: list[dict]
    test: list[dict]
    tokenizer: object
    model: object
    n_params: int
    losses: list[float]
    distill_prompts: list[str]
    samples: list[dict]


def _sft_stage(out: Path, seed: int, params: BuildParams, bar: Progress, seconds: dict[str, float]) -> _SftStage:
    """Steps 1-4: corpus and prompt splits, tokenizer, SFT model, SFT samples on the train prompts, written to
    ``out`` (corpus.jsonl, prompts/, sft/, distill_data/samples.jsonl); each step's time into ``seconds``."""
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

    # 4. SFT samples on the train prompts (once, through the engine), scored by both rewards
    t0 = time.perf_counter()
    distill_prompts = [p["prompt"] for p in train[: params.n_distill_prompts]]
    samples = sample_responses(
        model, tokenizer, distill_prompts, params, seed, params.samples_per_prompt, update=bar.task("SFT samples", len(distill_prompts))
    )
    write_jsonl(out / "distill_data" / "samples.jsonl", ({"prompt": distill_prompts[s["prompt_index"]], **s} for s in samples))
    seconds["samples"] = time.perf_counter() - t0

    return _SftStage(corpus, train, test, tokenizer, model, n_params, losses, distill_prompts, samples)


def _build(out: Path, seed: int, params: BuildParams, bar: Progress) -> dict:
    """Fill ``out`` with every file of the layout but the manifest; return the manifest."""
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    corpus, train, test, tokenizer, model, n_params, losses, distill_prompts, samples = _sft_stage(out, seed, params, bar, seconds)

    # 5. baselines: reward-weighted distillation of the SFT model towards rho*_beta (a ladder for r, one for r_bl)
    baselines = {name: ("target_reward", beta) for name, beta in params.rungs.items()}
    if params.baseline_reward_beta is not None:  # None: no indirect-transfer baseline (the demo build)
        baselines["rho_bl"] = ("baseline_reward", params.baseline_reward_beta)
    distill_stats = {}
    for name, (key, beta) in baselines.items():
        t0 = time.perf_counter()
        rows = resampled_rows(distill_prompts, samples, key, beta, params.distill_draws, seed)
        model = load_saved(out / "sft")
        losses_b = train_weighted(model, tokenizer, rows, params, seed, update=bar.task(f"distilling {name} (beta={beta:g})", None))
        save_model(model, tokenizer, out / name)
        distill_stats[name] = {
            "reward": key,
            "beta": beta,
            "rows": len(rows),
            "first_loss": round(losses_b[0], 4),
            "final_loss": round(sum(losses_b[-10:]) / len(losses_b[-10:]), 4),
        }
        seconds[name] = time.perf_counter() - t0
    del model

    # 6. evaluation on the test prompts: greedy rewards, and each baseline against rho*_beta
    t0 = time.perf_counter()
    test_prompts = [p["prompt"] for p in test]
    names = params.model_names
    evaluation = {
        name: evaluate_folder(
            out / name, test_prompts, params.eval_max_new_tokens, update=bar.task(f"evaluating {name}", len(test_prompts))
        )
        for name in names
    }
    seconds["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    premise = premise_checks(out, test_prompts, baselines, params, seed + 1, task=bar.task)
    seconds["premise"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    n_tokens = [len(x) for x in tokenizer([d.text for d in corpus])["input_ids"]]
    return {
        "task": "synthetic",
        "version": VERSION,
        "key": build_key(seed, params),
        "seed": seed,
        "params": params.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {name: name for name in names},
        "baselines": {name: {"reward": key, "beta": beta} for name, (key, beta) in baselines.items()},
        "default_baseline": DEFAULT_BASELINE,
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
            "distill_prompts": len(distill_prompts),
            "samples": len(samples),
            "samples_finished": sum(s["finished"] for s in samples),
        },
        "training": {
            "sft_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "distill": distill_stats,
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "eval": evaluation,
        "premise": premise,
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
        with quiet_libraries(), torch_threads(num_threads), Progress(progress) as bar:
            return _build(tmp, seed, params, bar)

    return build_once(task_dir(seed, cache_dir, params), build, announce=build_line(params) if progress else None)


def build_line(params: BuildParams) -> str:
    """The line a build of ``params`` prints when it starts: what, how long on 2 cores, how to build it ahead."""
    size = size_of(params)
    if size is None:
        return first_use_line(f"the synthetic task (recipe v{VERSION}, custom params)", None, "tqstar.synthetic.ensure_built(params=...)")
    if size == "full":
        what = f"the synthetic testbed (recipe v{VERSION}: SFT, 64 samples per train prompt, five distilled baselines, premise checks)"
        return first_use_line(what, BUILD_SECONDS[size], "tqstar prepare synthetic")
    what = f"the {size}-sized synthetic testbed (recipe v{VERSION} at {size} size: {', '.join(params.model_names)} only)"
    return first_use_line(what, BUILD_SECONDS[size], f"tqstar prepare synthetic experiment={size}")
