"""The HF reward's prefix cache: scores equal full re-encoding, fewer tokens read, on tiny random classifiers."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from omegaconf import OmegaConf

from tqstar.config import ConfigError, compose, validate
from tqstar.decoding.engine import Decoder
from tqstar.decoding.settings import DecoderSettings
from tqstar.rewards import build_reward
from tqstar.rewards import hf as hf_module
from tqstar.rewards.hf import HFClassifierReward

from conftest import ASSISTANT, HUMAN, WORDS

ARCHITECTURES = ("llama", "gpt_neox", "gpt2")
ATOL = 1e-4  # float32
PROMPT = "the movie was bad and the food was awful but then the service was fine"


def make_bpe_tokenizer():
    """A subword (BPE) tokenizer trained in memory on the test words, no pad token: 'goo' is ['▁g', 'oo'] but
    'good' is ['▁g', 'ood'], so a text's tokens need not extend those of its own start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<eos>", "<unk>"], show_progress=False)
    core.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def make_classifier(arch: str, vocab_size: int, seed: int = 0, layers: int = 2, labels: int = 1):
    """A tiny causal-LM sequence classifier with random weights (one logit unless `labels` says otherwise)."""
    from conftest import tiny_model

    common = dict(num_labels=labels, pad_token_id=None, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
    elif arch == "gpt_neox":
        sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=128)
    else:
        sizes = dict(n_embd=16, n_layer=layers, n_head=2, n_positions=128)
    return tiny_model(arch, vocab_size, seed, head="classifier", **sizes, **common)


def pair(arch: str, **kwargs):
    """The same classifier as a reward with the prefix cache on (auto) and off."""
    tokenizer = make_bpe_tokenizer()
    model = make_classifier(arch, len(tokenizer))
    on = HFClassifierReward(model, make_bpe_tokenizer(), **kwargs)
    off = HFClassifierReward(model, make_bpe_tokenizer(), prefix_cache=False, **kwargs)
    assert on.prefix_cache and not off.prefix_cache
    return on, off


def ids(reward_or_tokenizer, text: str) -> list[int]:
    tokenizer = getattr(reward_or_tokenizer, "tokenizer", reward_or_tokenizer)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rows_sharing_a_prefix_score_as_full_encoding(arch):
    """k x n rows of a prompt plus rows of two other prompts in one call (batches mix groups with prefixes of
    different lengths): the same scores as encoding every text whole, fewer tokens read."""
    on, off = pair(arch, batch_size=5)
    accepted = " the food was good and"
    prompts = [PROMPT] * 8 + ["the day"] * 3 + ["it was"]
    tails = [" great", " bad day", " fine , the movie", " hate", " love it", " poor", " nice trip", " sad"]
    responses = [accepted + t for t in tails] + [" good", " bad", " awful hotel"] + [" fine"]
    cached, whole = on(prompts, responses), off(prompts, responses)
    assert cached == pytest.approx(whole, abs=ATOL)
    assert len({round(v, 5) for v in whole}) == len(whole)  # the rows really differ
    assert sum(off.last_tokens) == sum(len(ids(off, p + r)) for p, r in zip(prompts, responses))
    assert sum(on.last_tokens) < sum(off.last_tokens) / 2
    assert on.prefix_tokens_saved == sum(off.last_tokens) - sum(on.last_tokens)
    assert set(on._prefixes) == {PROMPT, "the day", "it was"}  # a single row is cached too, for the next call
    assert on.calls == off.calls == len(prompts)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_prefix_grown_by_one_token_reuses_the_cache(arch):
    """Decoding's pattern: the next call's shared prefix is the previous one plus a token; only that token is fed."""
    on, off = pair(arch)
    first = [" love", " hate it", " fine trip"]
    on([PROMPT] * 3, [" the" + t for t in first])
    remembered = on._prefixes[PROMPT].ids
    responses = [" the hotel" + t for t in first]
    cached = on([PROMPT] * 3, responses)
    fresh = HFClassifierReward(on.model, make_bpe_tokenizer())
    assert cached == pytest.approx(off([PROMPT] * 3, responses), abs=ATOL)
    assert cached == pytest.approx(fresh([PROMPT] * 3, responses), abs=ATOL)
    grown = on._prefixes[PROMPT].ids
    assert grown[: len(remembered)] == remembered and len(grown) > len(remembered)
    assert sum(fresh.last_tokens) - sum(on.last_tokens) == len(remembered)  # the remembered prefix was not re-read
    assert on.last_tokens[0] == len(grown) - len(remembered) + (len(ids(on, PROMPT + responses[0])) - len(grown))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_row_equal_to_the_shared_prefix(arch):
    """A row that is the common prefix itself: the prefix is held back a token, so that row still reads one."""
    on, off = pair(arch)
    prompts, responses = [PROMPT] * 3, ["", " good", " good day"]
    assert on(prompts, responses) == pytest.approx(off(prompts, responses), abs=ATOL)
    assert on._prefixes[PROMPT].ids == tuple(ids(on, PROMPT)[:-1])
    assert on.last_tokens[0] == len(ids(on, PROMPT))  # the prefix but its last token, then that token
    # and a single row whose text is the previous call's prefix plus nothing: reads only what is not cached
    assert on([PROMPT], [""]) == pytest.approx(off([PROMPT], [""]), abs=ATOL)
    assert on.last_tokens == [1]


def test_retokenisation_that_does_not_extend_the_prefix_rebuilds_it():
    """' goo' ends in 'oo', ' good' in 'ood': the new prefix's tokens do not extend the remembered ones. The cache
    keeps the part whose ids agree, recomputes the rest, and the scores stay exact."""
    on, off = pair("llama")
    on([PROMPT] * 2, [" goo great", " goo bad"])
    before = on._prefixes[PROMPT].ids
    responses = [" good great", " good bad"]
    assert on([PROMPT] * 2, responses) == pytest.approx(off([PROMPT] * 2, responses), abs=ATOL)
    after = on._prefixes[PROMPT].ids
    assert after[: len(before)] != before  # re-tokenisation really changed a remembered token
    shared = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert after == tuple(ids(on, PROMPT + " good great")[: len(after)])
    fresh = HFClassifierReward(on.model, make_bpe_tokenizer())
    fresh([PROMPT] * 2, responses)
    assert sum(fresh.last_tokens) - sum(on.last_tokens) == shared


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_truncation_is_exact(arch):
    """Rows over max_length are truncated and encoded whole, as without the cache; the rows that fit share a prefix."""
    on, off = pair(arch, max_length=len(ids(make_bpe_tokenizer(), PROMPT + " the food")) + 2)
    prompts = [PROMPT] * 5
    responses = [" the food", " the food was", " the food was great , the day was fine", " the food is bad", " the food was awful and sad"]
    cached, whole = on(prompts, responses), off(prompts, responses)
    assert cached == pytest.approx(whole, abs=ATOL)
    assert on.truncated == off.truncated == 3
    assert on.last_tokens[2:] == off.last_tokens[2:] == [on.max_length] * 3
    assert sum(on.last_tokens[:2]) < sum(off.last_tokens[:2])


def test_a_text_ending_in_pad_tokens_is_read_where_the_classifier_reads_it():
    """Without a pad token the pad is <eos>: the classifier reads the last token that is not one, whatever follows."""
    on, off = pair("gpt_neox")
    prompts, responses = [PROMPT] * 3, [" good<eos>", " good<eos><eos>", " bad<eos>"]
    cached = on(prompts, responses)
    assert cached == pytest.approx(off(prompts, responses), abs=ATOL)
    assert cached[0] == pytest.approx(cached[1], abs=ATOL) == pytest.approx(off([PROMPT], [" good"])[0], abs=ATOL)


def test_prefix_cache_false_is_the_old_path(monkeypatch):
    tokenizer = make_bpe_tokenizer()
    model = make_classifier("llama", len(tokenizer))
    reward = HFClassifierReward(model, tokenizer, prefix_cache=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the prefix cache ran")

    monkeypatch.setattr(HFClassifierReward, "_score_with_prefixes", refuse)
    prompts, responses = [PROMPT] * 3, [" good", " bad day", " fine"]
    values = reward(prompts, responses)
    for text, value in zip([p + r for p, r in zip(prompts, responses)], values):
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        assert value == pytest.approx(alone, abs=1e-5)
    assert reward.last_tokens == [len(ids(reward, p + r)) for p, r in zip(prompts, responses)]
    assert reward.prefix_tokens_saved == 0 and not reward._prefixes


def test_caches_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(hf_module, "PREFIX_CACHE_PROMPTS", 2)
    on, off = pair("gpt2")
    for prompt in ("the day", "the food", "the hotel", "the trip"):
        on([prompt] * 2, [" good", " bad"])
    assert list(on._prefixes) == ["the hotel", "the trip"]  # least recently used dropped
    prompts = [p for p in ("the movie", "the day", "the service") for _ in range(2)]
    responses = [" good", " bad"] * 3
    assert on(prompts, responses) == pytest.approx(off(prompts, responses), abs=ATOL)
    assert set(on._prefixes) == {"the movie", "the day", "the service"}  # a call's own prompts are all kept


def bert_classifier(tokenizer):
    from conftest import tiny_model

    return tiny_model("bert", len(tokenizer), seed=0, head="classifier", num_labels=1)


def test_a_bidirectional_encoder_falls_back_and_refuses_true(caplog):
    tokenizer = make_bpe_tokenizer()
    with caplog.at_level(logging.INFO, logger="tqstar.rewards.hf"):
        reward = HFClassifierReward(bert_classifier(tokenizer), tokenizer, name="tiny-bert")
        values = reward([PROMPT] * 3, [" good", " bad", " fine"])
        reward([PROMPT] * 3, [" good day", " bad day", " fine day"])
    assert not reward.prefix_cache and len(values) == 3 and reward.prefix_tokens_saved == 0
    lines = [r.getMessage() for r in caplog.records if "prefix cache off" in r.getMessage()]
    assert lines == [
        "reward tiny-bert: prefix cache off (BertForSequenceClassification takes no past key values (a bidirectional encoder)); every text is encoded whole"
    ]
    with pytest.raises(ConfigError, match=r"^reward.prefix_cache=true is not allowed for 'tiny-bert': BertForSequenceClassification"):
        HFClassifierReward(bert_classifier(tokenizer), tokenizer, name="tiny-bert", prefix_cache=True)


def test_the_config_key(tmp_path):
    tokenizer = make_bpe_tokenizer()
    make_classifier("gpt_neox", len(tokenizer)).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    def build(value):
        node = {"type": "hf", "name_or_path": str(tmp_path / "rm"), "dtype": "float32", "device": "cpu", "prefix_cache": value}
        return build_reward(OmegaConf.create({"reward": node}).reward)

    assert build(None).prefix_cache and build(True).prefix_cache and not build(False).prefix_cache
    with pytest.raises(ConfigError, match=r"^reward.prefix_cache='yes' is not allowed: null \(auto\), true or false$"):
        build("yes")
    assert compose(["reward=hf"]).reward.prefix_cache is None
    for name in ("pythia_rm", "synthetic_proxy"):
        assert compose([f"reward={name}"]).reward.prefix_cache is None
    with pytest.raises(ConfigError, match=r"reward.prefix_cache=1 is not allowed: null \(auto\), true or false"):
        validate(compose(["reward=hf", "reward.name_or_path=some/rm", "reward.prefix_cache=1"]))


def test_decoding_with_the_cache_picks_the_same_tokens_and_reads_fewer(sft_model, tokenizer):
    """Greedy cd with an HF classifier reward (its own tokenizer): identical tokens with the cache on and off,
    fewer reward tokens read with it on (run.json's reward_tokens counter)."""
    prompts = [f"{HUMAN} the movie was bad{ASSISTANT}", f"{HUMAN} at first the food was awful but then it was great{ASSISTANT}"]
    classifier = make_classifier("gpt_neox", len(make_bpe_tokenizer()), seed=5).double()
    results = {}
    for cache in (True, False):
        reward = HFClassifierReward(classifier, make_bpe_tokenizer(), prefix_cache=cache, stop_strings=[HUMAN])
        settings = DecoderSettings(method="cd", top_k=4, alpha=2.0, max_new_tokens=8, rollout_max_new_tokens=3, batch_size=2)
        decoder = Decoder(sft_model, tokenizer, reward=reward, settings=settings)
        tokens = [g.token_ids for g in decoder.decode(prompts)]
        results[cache] = tokens, decoder.counters["reward_tokens"], decoder.counters["reward_calls"], reward.prefix_tokens_saved
    (on, read_on, calls_on, saved_on), (off, read_off, calls_off, saved_off) = results[True], results[False]
    assert on == off and sum(map(len, on)) > 4
    assert calls_on == calls_off and saved_off == 0
    assert read_on < read_off and read_on + saved_on == read_off


@pytest.mark.parametrize("labels", [1, 3])
def test_probability_output_is_the_labels_probability_with_bounds(labels):
    """reward.output=probability: sigmoid of one logit, softmax over several, the same with the prefix cache on and
    off, and declared bounds [0, 1] (so decoding can prune); the default scores with the raw logit, unbounded."""
    tokenizer = make_bpe_tokenizer()
    model = make_classifier("llama", len(tokenizer), seed=3, labels=labels)
    label = None if labels == 1 else 2
    prompts = [PROMPT] * 4
    responses = [" the food was good and" + t for t in (" great", " bad day", " fine", " love it")]
    logit = HFClassifierReward(model, make_bpe_tokenizer(), label=label, prefix_cache=False)
    assert logit.bounds is None and logit.output == "logit"
    raw = torch.tensor(logit(prompts, responses))
    with torch.no_grad():
        batch = logit.tokenizer([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True)
        full = model(**batch).logits
    expected = full[:, 0].sigmoid() if labels == 1 else full.softmax(-1)[:, 2]
    for cache in (False, True):
        reward = HFClassifierReward(model, make_bpe_tokenizer(), label=label, prefix_cache=cache, output="probability")
        assert reward.bounds == (0.0, 1.0)
        assert reward(prompts, responses) == pytest.approx(expected.tolist(), abs=ATOL)
    if labels == 1:
        assert expected.tolist() == pytest.approx(raw.sigmoid().tolist(), abs=ATOL)
    declared = HFClassifierReward(model, make_bpe_tokenizer(), label=label, output="probability", bounds=(0.0, 0.99))
    assert declared.bounds == (0.0, 0.99)  # a declaration of the user's is kept
    with pytest.raises(ConfigError, match=r"^reward.output='odds' is not allowed; allowed: logit, probability$"):
        HFClassifierReward(model, make_bpe_tokenizer(), label=label, output="odds")


def test_the_output_key_in_configs():
    """reward.output is checked at validation; its default (logit) leaves run hashes as they were before the key."""
    from tqstar.identity import same_run

    base = ["reward=hf", "reward.name_or_path=some/rm"]
    assert compose(base).reward.output == "logit"
    validate(compose([*base, "reward.output=probability"]))
    with pytest.raises(ConfigError, match=r"^reward.output='odds' is not allowed"):
        validate(compose([*base, "reward.output=odds"]))
    without = OmegaConf.to_container(compose(base))
    del without["reward"]["output"], without["choices"]
    assert same_run(without, compose(base))
    assert not same_run(without, compose([*base, "reward.output=probability"]))


def test_a_probability_reward_prunes_greedy_decoding_and_keeps_its_tokens(sft_model, tokenizer):
    """Greedy cd guided by a classifier's probability: its bounds [0, 1] let decoding skip candidates that cannot
    win; the tokens are those of decoding without pruning."""
    prompts = [f"{HUMAN} the movie was bad{ASSISTANT}", f"{HUMAN} at first the food was awful but then it was great{ASSISTANT}"]
    classifier = make_classifier("gpt_neox", len(make_bpe_tokenizer()), seed=5).double()
    results = {}
    for prune in (True, False):
        reward = HFClassifierReward(classifier, make_bpe_tokenizer(), output="probability", stop_strings=[HUMAN])
        settings = DecoderSettings(method="cd", top_k=6, alpha=1.0, max_new_tokens=8, rollout_max_new_tokens=3, batch_size=2, prune=prune)
        decoder = Decoder(sft_model, tokenizer, reward=reward, settings=settings)
        results[prune] = [g.token_ids for g in decoder.decode(prompts)], decoder.counters["candidates_pruned"]
    (pruned_tokens, pruned), (full_tokens, none) = results[True], results[False]
    assert pruned_tokens == full_tokens and sum(map(len, full_tokens)) > 4
    assert pruned > 0 and none == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_single_row_is_cached_for_the_next_call(arch):
    """Pruned decoding often values one candidate a step: a prompt's single row is cached, and the next call (the
    response one token longer) reads only the tokens after the part they share; scores equal full encoding."""
    on, off = pair(arch)
    first, second = [" the food was good and great"], [" the food was good and fine trip"]
    for responses in (first, second):
        assert on([PROMPT], responses) == pytest.approx(off([PROMPT], responses), abs=ATOL)
    shared = len(os.path.commonprefix([ids(on, PROMPT + first[0]), ids(on, PROMPT + second[0])]))
    assert on.last_tokens == [len(ids(on, PROMPT + second[0])) - shared]
    assert on.last_tokens[0] < off.last_tokens[0]


def test_single_rows_of_a_large_call_are_encoded_whole(monkeypatch):
    """Scoring a finished run (one row per prompt, many prompts) keeps no caches: nothing would reuse them."""
    monkeypatch.setattr(hf_module, "PREFIX_CACHE_PROMPTS", 2)
    on, off = pair("llama")
    prompts = [PROMPT, "the day", "it was"]
    responses = [" good", " bad trip", " fine"]
    assert on(prompts, responses) == pytest.approx(off(prompts, responses), abs=ATOL)
    assert on.last_tokens == off.last_tokens and not on._prefixes
    on(prompts[:2], responses[:2])  # a call of at most PREFIX_CACHE_PROMPTS prompts caches its single rows
    assert set(on._prefixes) == {PROMPT, "the day"}
