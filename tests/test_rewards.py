"""Rewards: a tiny HF sequence classifier with its own (different) tokenizer, VADER, and callables."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from tqstar.config import ConfigError
from tqstar.rewards import build_reward, load_callable

# The reward model's vocabulary: other words, other ids, no pad token (like GPT-NeoX reward models).
RM_WORDS = "<eos> <unk> ! , . great good the a bad awful it was is and movie food love hate day".split()


def make_reward_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(RM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def save_reward_model(folder, num_labels: int = 1, max_positions: int = 64, seed: int = 3):
    """A tiny GPT-NeoX sequence classifier (the pythia reward model's architecture), saved by path."""
    from conftest import tiny_model

    tokenizer = make_reward_tokenizer()
    labels = {0: "negative", 1: "positive"} if num_labels == 2 else {0: "score"}
    model = tiny_model(
        "gpt_neox",
        len(RM_WORDS),
        seed,
        head="classifier",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=None,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm2") / "rm2", num_labels=2)


def hf_cfg(path, **extra):
    base = {
        "type": "hf",
        "name_or_path": str(path),
        "tokenizer": None,
        "revision": None,
        "label": None,
        "template": "{prompt}{response}",
        "batch_size": 16,
        "max_length": None,
        "overflow": "truncate_left",
        "skip_value": None,
        "dtype": "float32",
        "device": "cpu",
        "trust_remote_code": False,
        "stop_strings": ["\n\nHuman:"],
    }
    base.update(extra)
    return OmegaConf.create({"reward": base}).reward


PROMPTS = ["the movie was", "the food", "it was a day and the movie was"]
RESPONSES = [" great !", " bad . awful . bad", " good"]


def test_hf_reward_scores_each_pair_as_if_alone(reward_model_dir):
    """Right padding plus the pad id set on the model: batching does not change any score."""
    reward = build_reward(hf_cfg(reward_model_dir, batch_size=3))
    together = reward(PROMPTS, RESPONSES)
    alone = [reward([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert all(math.isfinite(v) for v in together)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in together)) == 3
    assert reward.calls == 6


def test_hf_reward_batch_size_does_not_change_scores(reward_model_dir):
    big = build_reward(hf_cfg(reward_model_dir, batch_size=16))(PROMPTS, RESPONSES)
    small = build_reward(hf_cfg(reward_model_dir, batch_size=1))(PROMPTS, RESPONSES)
    assert big == pytest.approx(small, abs=1e-5)


def test_hf_reward_uses_the_template_and_cuts_at_stop_strings(reward_model_dir):
    plain = build_reward(hf_cfg(reward_model_dir))
    templated = build_reward(hf_cfg(reward_model_dir, template="{response}"))
    assert templated(["ignored prompt"], [" good movie"]) == pytest.approx(plain([""], [" good movie"]))
    assert plain(["the"], [" good\n\nHuman: bad bad"]) == pytest.approx(plain(["the"], [" good"]))


def test_hf_reward_needs_a_label_when_the_model_has_several_outputs(two_label_dir):
    with pytest.raises(ConfigError, match=r"has 2 outputs \(negative, positive\); set reward.label"):
        build_reward(hf_cfg(two_label_dir))
    by_name = build_reward(hf_cfg(two_label_dir, label="positive"))
    by_index = build_reward(hf_cfg(two_label_dir, label=1))
    assert by_name(PROMPTS, RESPONSES) == pytest.approx(by_index(PROMPTS, RESPONSES))
    with pytest.raises(ConfigError, match="not a label.*allowed: negative, positive"):
        build_reward(hf_cfg(two_label_dir, label="happy"))
    with pytest.raises(ConfigError, match="outputs 0..1"):
        build_reward(hf_cfg(two_label_dir, label=5))


def test_overflow_truncate_left_keeps_the_response_and_counts(reward_model_dir):
    reward = build_reward(hf_cfg(reward_model_dir, max_length=6))
    long_prompt = "the movie was bad and the food was bad and it was a bad day"
    truncated = reward([long_prompt], [" great good love"])
    assert reward.truncated == 1
    # Left truncation keeps the last 6 tokens: exactly the score of those 6 tokens alone.
    tail = " ".join((long_prompt + " great good love").split()[-6:])
    assert truncated == pytest.approx(reward([""], [tail]), abs=1e-5)


def test_overflow_skip_gives_the_configured_value_and_counts(reward_model_dir):
    reward = build_reward(hf_cfg(reward_model_dir, max_length=6, overflow="skip", skip_value=-5.0))
    values = reward(["the movie was bad and the food was bad", "the"], [" good", " good"])
    assert values[0] == -5.0 and values[1] != -5.0
    assert reward.skipped == 1 and reward.truncated == 0


def test_overflow_skip_without_a_value_and_error_policy_raise(reward_model_dir):
    long = ["the movie was bad and the food was bad"]
    with pytest.raises(ConfigError, match="skip_value=null; set reward.skip_value"):
        build_reward(hf_cfg(reward_model_dir, max_length=6, overflow="skip"))(long, [" good"])
    with pytest.raises(ConfigError, match="exceeds .* limit of 6"):
        build_reward(hf_cfg(reward_model_dir, max_length=6, overflow="error"))(long, [" good"])
    with pytest.raises(ConfigError, match="reward.overflow='drop' is not allowed; allowed: truncate_left, skip, error"):
        build_reward(hf_cfg(reward_model_dir, overflow="drop"))


def test_max_length_defaults_to_the_model_positions(reward_model_dir):
    reward = build_reward(hf_cfg(reward_model_dir))
    assert reward.max_length == 64  # the tokenizer has no limit, the model has 64 positions


def test_hf_reward_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"reward.name_or_path='.*nothing-here': path does not exist"):
        build_reward(hf_cfg(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="reward.name_or_path='nobody/no-such-rm' is not a local folder and this machine is offline"):
        build_reward(hf_cfg("nobody/no-such-rm"))
    with pytest.raises(ConfigError, match="reward.template=.* only \\{prompt\\} and \\{response\\}"):
        from tqstar.rewards.hf import HFClassifierReward

        HFClassifierReward.__init__(object.__new__(HFClassifierReward), None, None, template="{prompt}{reply}")


def test_vader_prefers_positive_text_and_ignores_what_follows_a_stop():
    reward = build_reward(OmegaConf.create({"type": "vader", "stop_strings": ["\n\nHuman:"]}))
    good, bad, cut = reward(["x", "x", "x"], [" I love it, wonderful!", " awful, I hate it", " I love it\n\nHuman: awful hate"])
    assert good > 0.5 > -0.5 > bad
    assert cut == pytest.approx(reward(["x"], [" I love it"])[0])


def test_callable_reward_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward(OmegaConf.create({"type": "callable", "function": "my_rewards:length", "stop_strings": []}))
    assert reward(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]
    with pytest.raises(ConfigError, match="must be 'module:function'"):
        load_callable("my_rewards.length")
    with pytest.raises(ConfigError, match="has no 'width'"):
        load_callable("my_rewards:width")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f")
