"""The synthetic task: corpus, tokenizer, rewards, cache logic (fast); the full build (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tqstar.synthetic import build, cache, distill, training
from tqstar.synthetic import tokenizer as T
from tqstar.synthetic.corpus import (
    ASSISTANT,
    HUMAN,
    TOPICS,
    generate_corpus,
    generate_prompts,
    tokenizer_texts,
)
from tqstar.synthetic.params import DEFAULT_BASELINE, MODEL_NAMES, VERSION, BuildParams
from tqstar.synthetic.rewards import baseline_reward, on_topic, target_reward

# ----------------------------------------------------------------------------- corpus


def test_corpus_same_seed_same_dialogues():
    a, b = generate_corpus(0, 200), generate_corpus(0, 200)
    assert [(d.id, d.prompt, d.response) for d in a] == [(d.id, d.prompt, d.response) for d in b]


def test_corpus_different_seed_different_dialogues():
    a, b = generate_corpus(0, 200), generate_corpus(1, 200)
    assert [d.text for d in a] != [d.text for d in b]


def test_corpus_is_hh_format_and_varied():
    corpus = generate_corpus(3, 500)
    for d in corpus:
        assert d.prompt.startswith(HUMAN + " ")
        assert d.prompt.endswith(ASSISTANT)
        assert d.text == d.prompt + " " + d.response
        assert d.response and d.response == d.response.strip()
        assert HUMAN not in d.response and ASSISTANT not in d.response
        assert 3 <= len(d.response.split()) <= 45
    structures = {d.meta["structure"] for d in corpus}
    endings = {d.meta["ending"] for d in corpus}
    assert structures == {"plain", "turn", "info"}
    assert endings == {"pos", "neg", "neu"}
    assert len({d.meta["topic"] for d in corpus}) == len(TOPICS)
    assert any(d.prompt.count(HUMAN) == 2 for d in corpus)  # some multi-turn prompts


def test_turns_flip_sentiment():
    """Long-range structure: a bad start can end well (and the reverse)."""
    corpus = [d for d in generate_corpus(0, 400) if d.meta["structure"] == "turn"]
    assert corpus
    good = [d for d in corpus if d.meta["ending"] == "pos"]
    bad = [d for d in corpus if d.meta["ending"] == "neg"]
    assert good and bad
    first = [d.response.split(", but ", 1) for d in good if ", but " in d.response]
    # the part before "but" is negative and the whole response still scores positive on average
    assert sum(target_reward([""] * len(first), [f[0] for f in first])) < 0
    assert sum(target_reward([""] * len(good), [d.response for d in good])) > 0
    assert sum(target_reward([""] * len(bad), [d.response for d in bad])) < 0


def test_prompts_distinct_and_held_out():
    corpus = generate_corpus(0, 300)
    seen = {d.prompt for d in corpus}
    test = generate_prompts(0, 64, "test", exclude=seen)
    assert len(test) == 64
    assert len({p["prompt"] for p in test}) == 64
    assert not seen & {p["prompt"] for p in test}
    assert all(p["prompt"].endswith(ASSISTANT) for p in test)
    assert test == generate_prompts(0, 64, "test", exclude=seen)
    assert [p["id"] for p in test][:2] == ["test-0000", "test-0001"]


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = generate_corpus(0, 300)
    return corpus, T.train_tokenizer(tokenizer_texts(corpus))


def test_tokenizer_deterministic(corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    again = T.train_tokenizer(tokenizer_texts(generate_corpus(0, 300)))
    assert tok.get_vocab() == again.get_vocab()
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()


def test_tokenizer_round_trip(corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    for d in corpus[:100]:
        ids = tok(d.text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == d.text
        assert tok.decode(ids) == T.BOS + d.text
        # a response decoded alone reads as the response (words separated by spaces)
        prompt_len = len(tok(d.prompt)["input_ids"])
        assert ids[:prompt_len] == tok(d.prompt)["input_ids"]  # prompt tokens are a prefix
        assert tok.decode(ids[prompt_len:] + [tok.eos_token_id], skip_special_tokens=True) == d.response


def test_tokenizer_special_ids(corpus_and_tokenizer):
    _, tok = corpus_and_tokenizer
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(HUMAN) == 4 and tok.convert_tokens_to_ids(ASSISTANT) == 5
    assert tok.decode([4, 5]) == HUMAN + ASSISTANT
    assert T.vocab_size_of(tok) == max(tok.get_vocab().values()) + 1


def test_tokenizer_saves_and_loads(corpus_and_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    corpus, tok = corpus_and_tokenizer
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = corpus[0].text
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (T.EOS, T.PAD, T.BOS)


# ----------------------------------------------------------------------------- rewards


def test_target_reward_prefers_positive_text():
    pos, neg = "The food was wonderful. I would recommend it.", "The food was awful. It was a waste of time."
    r = target_reward(["p", "p"], [pos, neg])
    assert r[0] > 0.5 and r[1] < -0.5
    assert target_reward(["p"], [""]) == [0.0]
    turn = target_reward(["p"], ["At first the movie seemed awful, but in the end it was wonderful."])[0]
    assert turn > 0


def test_baseline_reward_correlated_but_different():
    prompt = f"{HUMAN} How was the hotel?{ASSISTANT}"
    on, off = "The staff was wonderful.", "It was wonderful."
    rb = baseline_reward([prompt, prompt], [on, off])
    rt = target_reward([prompt, prompt], [on, off])
    assert on_topic(prompt, on) == 1.0 and on_topic(prompt, off) == 0.0
    assert rb[0] > rb[1]  # topic bonus
    assert rt[0] == pytest.approx(rt[1])  # target reward ignores the topic
    assert rb[0] == pytest.approx(0.75 * rt[0] + 0.25)
    bad = baseline_reward([prompt], ["The staff was terrible."])[0]
    assert bad < rb[1]  # sentiment still dominates


def test_rewards_check_lengths():
    with pytest.raises(ValueError):
        target_reward(["a"], ["b", "c"])
    with pytest.raises(ValueError):
        baseline_reward(["a", "b"], ["c"])


# ----------------------------------------------------------------------------- build helpers


def test_resampled_rows_follow_softmax_of_reward_over_beta_per_prompt():
    prompts = ["p0", "p1"]
    samples = [
        {"prompt_index": 0, "response": "a", "finished": True, "r": 1.0},
        {"prompt_index": 0, "response": "b", "finished": True, "r": 0.0},
        {"prompt_index": 0, "response": "c", "finished": False, "r": 5.0},  # unfinished: left out
        {"prompt_index": 1, "response": "d", "finished": True, "r": 0.3},
        {"prompt_index": 1, "response": "e", "finished": True, "r": -9.0},  # weight ~e^-18.6: never drawn
    ]
    rows = distill.resampled_rows(prompts, samples, "r", beta=0.5, draws=20000, seed=0)
    e = math.exp(2.0)
    assert [(r["prompt"], r["response"]) for r in rows] == [("p0", "a"), ("p0", "b"), ("p1", "d")]
    assert [r["weight"] for r in rows] == pytest.approx([e / (e + 1), 1 / (e + 1), 1.0], abs=0.01)  # 4 s.e. at 20000 draws
    assert rows == distill.resampled_rows(prompts, samples, "r", beta=0.5, draws=20000, seed=0)  # seeded
    few = distill.resampled_rows(prompts, samples, "r", beta=1e6, draws=3, seed=1)
    for prompt in prompts:  # every prompt carries total weight one
        assert sum(r["weight"] for r in few if r["prompt"] == prompt) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="no finished samples"):
        distill.resampled_rows(prompts, [dict(s, finished=False) for s in samples], "r", beta=1.0, draws=4, seed=0)


def test_weighted_training_masks_the_prompt_and_follows_the_weights(corpus_and_tokenizer):
    """Weighted MLE moves the model towards the heavy response and away from none of the prompt tokens."""
    import torch

    corpus, tok = corpus_and_tokenizer
    params = BuildParams(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, distill_epochs=150, distill_lr=1e-2)
    model = training.make_model(tok, params, seed=0)
    prompt = corpus[0].prompt
    good, bad = "great", "awful"
    rows = [{"prompt": prompt, "response": good, "weight": 0.9}, {"prompt": prompt, "response": bad, "weight": 0.1}]
    training.train_weighted(model, tok, rows, params, seed=0)
    ids = tok([prompt])["input_ids"][0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    next_id = {w: tok([f"{prompt} {w}"])["input_ids"][0][len(ids)] for w in (good, bad)}  # the response's first token
    assert next_id[good] != next_id[bad] and tok.unk_token_id not in next_id.values()
    p_good, p_bad = (logprobs[next_id[w]].exp().item() for w in (good, bad))
    assert p_good + p_bad > 0.9 and p_good / p_bad == pytest.approx(9.0, rel=0.3)


def test_cache_key_and_location(tmp_path, monkeypatch):
    p = BuildParams()
    assert cache.task_dir(0, tmp_path) == cache.task_dir(0, tmp_path)
    assert cache.task_dir(0, tmp_path) != cache.task_dir(1, tmp_path)
    assert cache.task_dir(0, tmp_path, p) != cache.task_dir(0, tmp_path, BuildParams(ladder_betas=(1.0, 0.2)))
    name = cache.task_dir(0, tmp_path).name
    assert name.startswith(f"v{VERSION}-") and len(name.split("-")[1]) == 8
    assert cache.task_dir(0, tmp_path).parent == tmp_path / "synthetic"
    monkeypatch.setenv("TQSTAR_CACHE", str(tmp_path / "env"))
    assert cache.task_dir(0).parent == tmp_path / "env" / "synthetic"


def test_cache_key_covers_library_versions(tmp_path, monkeypatch):
    """A different library stack (or Python minor version) never reuses another stack's build."""
    here = cache.task_dir(0, tmp_path)
    real = cache._versions()
    assert set(real) == {"python", *cache.KEYED_LIBRARIES} and all(real[k] for k in cache.KEYED_LIBRARIES)
    for key, other in (("transformers", "0.0.1"), ("torch", "0.0.1"), ("trl", None), ("python", "2.7.0")):
        monkeypatch.setattr(cache, "_versions", lambda key=key, other=other: {**real, key: other})
        assert cache.task_dir(0, tmp_path) != here, key
    major, minor, *_ = real["python"].split(".")
    monkeypatch.setattr(cache, "_versions", lambda: {**real, "python": f"{major}.{minor}.999"})
    assert cache.task_dir(0, tmp_path) == here  # a Python patch release keeps the key


def _no_build(*args, **kwargs):
    raise AssertionError("rebuilt a cached task")


def test_ensure_built_returns_cached_folder_without_building(tmp_path, monkeypatch):
    folder = cache.task_dir(5, tmp_path)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"seed": 5}))
    monkeypatch.setattr(build, "_build", _no_build)
    assert build.ensure_built(seed=5, cache_dir=tmp_path, progress=False) == folder
    assert cache.load_manifest(folder) == {"seed": 5}


def test_build_once_writes_manifest_last_and_renames(tmp_path):
    final = tmp_path / "synthetic" / "v0-test"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("left by a killed build")  # no manifest: not trusted
    calls = []

    def make(tmp):
        calls.append(tmp)
        assert tmp.parent == final.parent and tmp != final and not (tmp / "manifest.json").exists()
        (tmp / "data.txt").write_text("x")
        return {"ok": True}

    assert cache.build_once(final, make) == final
    assert cache.build_once(final, _no_build) == final  # built: never called again
    assert len(calls) == 1 and not calls[0].exists()
    assert sorted(p.name for p in final.iterdir()) == ["data.txt", "manifest.json"]
    assert cache.load_manifest(final) == {"ok": True}
    assert [p.name for p in final.parent.iterdir() if p.is_dir()] == ["v0-test"]


def test_build_once_failure_leaves_nothing_that_looks_built(tmp_path):
    final = tmp_path / "synthetic" / "v0-test"

    def make(tmp):
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cache.build_once(final, make)
    assert not final.exists() and not cache.is_built(final)
    assert [p.name for p in final.parent.iterdir() if p.is_dir()] == []


def test_importing_the_package_is_cheap_and_stays_in_its_layer():
    code = (
        "import sys\n"
        "import tqstar.synthetic\n"
        "from tqstar.synthetic import build, cache, distill, evaluation, generation, params, tokenizer, training\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'tqstar.decode', 'tqstar.models', "
        "'tqstar.decoding.engine') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_through_engine_is_seeded_and_batch_independent(corpus_and_tokenizer):
    from tqstar.synthetic.generation import generate
    from tqstar.synthetic.training import make_model

    corpus, tok = corpus_and_tokenizer
    model = make_model(tok, BuildParams(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2), seed=0).eval()
    prompts = [d.prompt for d in corpus[:5]]
    kwargs = dict(max_new_tokens=6, selection="sample", samples_per_prompt=3, seed=7)
    rows = generate(model, tok, prompts, batch_size=64, **kwargs)
    other = generate(model, tok, prompts, batch_size=2, **kwargs)

    def drawn(rs):
        return [{k: v for k, v in r.items() if "logprob" not in k} for r in rs]

    assert drawn(rows) == drawn(other)  # draws follow the row index; log-probs agree up to padding's rounding
    assert [r["sft_logprob"] for r in rows] == pytest.approx([r["sft_logprob"] for r in other], abs=1e-4)
    assert [r["prompt_index"] for r in rows] == [i for i in range(5) for _ in range(3)]
    assert rows != generate(model, tok, prompts, batch_size=64, **{**kwargs, "seed": 8})
    for r in rows:
        assert set(r) == {"prompt_index", "response", "n_tokens", "finished", "sft_logprob", "logprob"}
        assert 1 <= r["n_tokens"] <= 6
        assert r["finished"] or r["n_tokens"] == 6  # unfinished only when max_new_tokens ran out
        assert HUMAN not in r["response"] and r["response"] == r["response"].strip()
    greedy = generate(model, tok, prompts, max_new_tokens=6)
    assert len(greedy) == 5 and drawn(greedy) == drawn(generate(model, tok, prompts, max_new_tokens=6, batch_size=1))
    assert tok.padding_side == "right"  # the engine's left padding does not leak out


# ----------------------------------------------------------------------------- full build (slow)


def _clearly_higher(a: dict, b: dict, n_se: float = 3.0) -> bool:
    return a["mean"] - b["mean"] > n_se * math.sqrt(a["se"] ** 2 + b["se"] ** 2)


@pytest.mark.slow
def test_tiny_build_end_to_end(tmp_path):
    """The whole pipeline on a toy recipe (no quality check): layout, manifest, loadable models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = BuildParams(
        n_corpus=300,
        n_train_prompts=32,
        n_test_prompts=8,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        sft_epochs=3,
        n_distill_prompts=16,
        samples_per_prompt=4,
        sample_max_new_tokens=48,
        ladder_betas=(1.0, 0.1),
        distill_epochs=1,
        distill_batch_size=8,
        eval_max_new_tokens=8,
        premise_sft_samples=4,
        premise_policy_samples=2,
    )
    folder = build.ensure_built(seed=1, cache_dir=tmp_path, progress=False, params=params)
    manifest = cache.load_manifest(folder)
    assert manifest["params"] == params.to_dict() and manifest["seed"] == 1
    assert manifest["version"] == VERSION and manifest["key"] == folder.name.split("-")[1]
    assert set(manifest["versions"]) == {"python", *cache.KEYED_LIBRARIES}
    assert manifest["sizes"]["samples"] == 16 * 4
    assert params.model_names == ("sft", "rho1", "rho0.1", "rho_bl") and set(manifest["premise"]) == set(params.model_names)
    for name in params.model_names:
        tok = AutoTokenizer.from_pretrained(folder / name)
        model = AutoModelForCausalLM.from_pretrained(folder / name)
        assert model.get_input_embeddings().num_embeddings >= T.vocab_size_of(tok)
    assert not list(tmp_path.glob("synthetic/.*building*"))


@pytest.mark.slow
def test_full_build(full_build_cache, monkeypatch):
    """The default recipe, built once per test session (conftest.full_build_cache) and checked here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache.task_dir(0, full_build_cache)
    assert cache.is_built(folder)
    for name in MODEL_NAMES:
        assert (folder / name / "config.json").is_file()
        assert (folder / name / "tokenizer.json").is_file()
    for name in ("corpus.jsonl", "distill_data/samples.jsonl"):
        assert (folder / name).is_file()
    test = [json.loads(line) for line in (folder / "prompts" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (folder / "prompts" / "train.jsonl").read_text().splitlines()]
    assert len(test) >= 64 and all(set(p) == {"id", "prompt"} and p["prompt"].endswith(ASSISTANT) for p in test)
    assert not {p["prompt"] for p in test} & {p["prompt"] for p in train}

    m = cache.load_manifest(folder)
    assert m["seed"] == 0 and m["params"] == BuildParams().to_dict()
    assert set(m["seconds"]) >= {"corpus", "tokenizer", "sft", "samples", *MODEL_NAMES[1:], "evaluate", "premise", "total"}
    ev, checks = m["eval"], m["premise"]
    assert ev["sft"]["finished_frac"] > 0.9
    # the strongest rung is clearly aligned, in sampled (T=1) reward; rho_bl likewise for r_bl
    assert _clearly_higher(checks[DEFAULT_BASELINE]["sampled_reward"], checks["sft"]["target_reward"])
    assert _clearly_higher(checks["rho_bl"]["sampled_reward"], checks["sft"]["baseline_reward"])
    for name in MODEL_NAMES[1:]:
        c = checks[name]
        assert c["kl"]["mean"] > 0 and c["optimum_kl"]["mean"] > 0 and c["implied_reward_slope"]["slope"] is not None
    # the premise: the strongest rung's sampled reward is within max(0.05, 2 s.e.) of the IS estimate of E_rho*[r]
    strongest = checks[DEFAULT_BASELINE]
    combined_se = math.sqrt(strongest["sampled_reward"]["se"] ** 2 + strongest["optimum_reward"]["se"] ** 2)
    assert abs(strongest["sampled_reward"]["mean"] - strongest["optimum_reward"]["mean"]) <= max(0.05, 2 * combined_se)
    curve = checks["sft"]["optimum_curve"]["target_reward"]
    assert [p["kl"] for p in curve] == sorted(p["kl"] for p in curve) and len(curve[0]["reward_by_prompt"]) == len(test)

    # all three share one vocabulary; the models load through the plain HF path
    toks = [AutoTokenizer.from_pretrained(folder / n) for n in MODEL_NAMES]
    assert all(t.get_vocab() == toks[0].get_vocab() for t in toks)
    model = AutoModelForCausalLM.from_pretrained(folder / "sft")
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6

    monkeypatch.setattr(build, "_build", _no_build)  # cached: a second call cannot rebuild
    assert build.ensure_built(seed=0, cache_dir=full_build_cache, progress=False) == folder
