"""Independent sentiment judges (issue #27, item 3): AFINN and TextBlob beside VADER, and how two judges agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tqstar.config import compose, validate
from tqstar.rewards import build_reward, judge_agreement
from tqstar.rewards.lexicons import afinn_sum, normalize_sum
from tqstar.stats import average_ranks

JUDGES = ("afinn", "textblob")
GOOD, BAD, NEUTRAL = "I love this wonderful day", "I hate this awful mess", "The meeting is at noon."


def judge(kind: str, stops=("\n\nHuman:",)):
    return build_reward(OmegaConf.create({"type": kind, "stop_strings": list(stops), "bounds": [-1.0, 1.0]}))


@pytest.mark.parametrize("kind", JUDGES)
def test_each_judge_prefers_the_obvious_sentence_and_is_zero_without_sentiment(kind):
    good, bad, neutral, empty = judge(kind)(["x"] * 4, [GOOD, BAD, NEUTRAL, ""])
    assert good > 0 > bad
    assert neutral == 0.0 and empty == 0.0


def test_hand_computed_scores():
    # AFINN-en-165: love +3, wonderful +4 -> 7; hate -3, awful -3, mess -2 -> -8; mapped by x / sqrt(x^2 + 15).
    assert afinn_sum([GOOD, BAD]) == [7.0, -8.0]
    assert judge("afinn")(["x", "x"], [GOOD, BAD]) == pytest.approx([7 / 8, -8 / math.sqrt(79)])
    # pattern lexicon: love 0.5, wonderful 1.0 -> their mean
    assert judge("textblob")(["x"], [GOOD]) == pytest.approx([0.75])
    assert normalize_sum(0.0) == 0.0 and normalize_sum(1.0) == pytest.approx(0.25)


@pytest.mark.parametrize("kind", JUDGES)
def test_bounds_hold_on_extreme_text(kind):
    extreme = ["wonderful amazing superb outstanding love " * 40 + "!!!", "awful horrible hate terrible catastrophic " * 40 + "!!!"]
    high, low = judge(kind)(["x", "x"], extreme)
    assert -1.0 <= low < -0.5 and 0.5 < high <= 1.0
    if kind == "afinn":  # a sum: long text saturates towards +-1 (textblob's polarity is a mean: it does not)
        assert high > 0.99 and low < -0.99


@pytest.mark.parametrize("kind", JUDGES)
def test_batch_shape_batching_and_stop_strings(kind):
    reward = judge(kind)
    responses = [GOOD, BAD, NEUTRAL, "", " not good at all", GOOD + "\n\nHuman: " + BAD]
    together = reward(["p"] * len(responses), responses)
    assert len(together) == len(responses) and all(isinstance(v, float) for v in together)
    assert together == [reward(["p"], [r])[0] for r in responses]
    assert together[-1] == together[0]  # what follows the stop string is not scored
    assert reward([], []) == []
    assert reward.calls == 2 * len(responses) and reward.name == kind


def test_textblob_polarity_needs_no_nltk_data_and_no_network(monkeypatch, tmp_path):
    """PatternAnalyzer reads only the lexicon textblob ships: no NLTK corpora (empty search path), no socket."""
    import socket

    import nltk

    from tqstar.rewards import lexicons

    def refuse(*args, **kwargs):
        raise AssertionError("a judge tried to open a network connection")

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(lexicons, "_PATTERN", None)
    monkeypatch.setattr(lexicons, "_AFINN", None)
    assert judge("textblob")(["x", "x"], [GOOD, BAD])[0] > 0
    assert judge("afinn")(["x"], [GOOD])[0] > 0


def test_a_missing_package_is_one_config_error(monkeypatch):
    import sys

    from tqstar.config import ConfigError
    from tqstar.rewards import lexicons

    monkeypatch.setattr(lexicons, "_AFINN", None)
    monkeypatch.setitem(sys.modules, "afinn", None)  # import afinn -> ImportError
    with pytest.raises(ConfigError, match="needs the package 'afinn'.*make setup"):
        judge("afinn")


@pytest.mark.parametrize("kind", JUDGES)
def test_configs_compose_as_reward_and_as_gold_judge(kind, hydra_clean):
    from tqstar.evaluate import RewardBank

    cfg = validate(compose([f"reward={kind}", "decoder=sft"]))
    assert cfg.reward.type == kind and list(cfg.reward.bounds) == [-1.0, 1.0]
    assert list(cfg.reward.stop_strings) == ["\n\nHuman:"]
    assert build_reward(cfg.reward)(["x"], [GOOD])[0] > 0
    ecfg = compose([f"gold_reward={kind}"], config_name="evaluate")
    assert ecfg.gold_reward.type == kind and ecfg.get("reward") is None
    assert RewardBank.describe(ecfg.gold_reward) == kind


def _run_folder(root: Path, responses: list[str]) -> Path:
    """A finished decode run as tqstar.decode writes it (config.yaml, generations.jsonl, run.json), guided by vader."""
    path = root / "run"
    path.mkdir(parents=True)
    cfg = compose(["~reward@baseline_reward", "decoder=sft", "reward=vader"])
    OmegaConf.save(cfg, path / "config.yaml")
    rows = []
    for index, response in enumerate(responses):
        tokens = len(response.split()) + 1
        rows.append(
            {
                "index": index,
                "prompt_id": f"p{index}",
                "prompt": f"\n\nHuman: Tell me about your day {index}.\n\nAssistant:",
                "response": response,
                "num_tokens": tokens,
                "seconds": 0.5,
                "reward": 0.0,
                "stop_reason": "eos",
                "token_ids": list(range(tokens)),
                "sft_logprobs": [-1.0] * tokens,
                "policy_logprobs": None,
            }
        )
    (path / "generations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "run.json").write_text(json.dumps({"status": "completed", "method": "sft", "num_prompts": len(rows), "counters": {}}))
    return path


@pytest.mark.parametrize(("option", "kind"), [("--gold-reward", "afinn"), ("-s", "gold_reward=textblob")])
def test_evaluate_scores_a_vader_run_with_an_independent_judge(tmp_path, hydra_clean, option, kind):
    from typer.testing import CliRunner

    from tqstar.cli import app

    responses = [GOOD, BAD + "\n\nHuman: " + GOOD]
    run = _run_folder(tmp_path, responses)
    args = ["evaluate", str(run), option, kind, "-s", "coherence.enabled=false", "-s", "plots=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kind = kind.split("=")[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"]["gold_reward"] == kind
    expected = judge(kind)(["x", "x"], responses)  # the stop string cuts the second response before BAD's end
    assert metrics["metrics"]["gold_reward_mean"] == pytest.approx(sum(expected) / 2)


def test_afinn_guides_a_decode(tmp_path, saved_models, hydra_clean):
    """reward=afinn as the decode target of greedy TQ* on tiny models: rows scored by AFINN, its bounds let it prune."""
    from tqstar.decode import run_decode

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"\n\nHuman: a good day {i}\n\nAssistant:"}) + "\n" for i in range(2)))
    overrides = [
        f"sft.name_or_path={saved_models['sft']}",
        f"baseline.name_or_path={saved_models['dpo']}",
        "dataset=local",
        f"dataset.path={prompts}",
        f"output_dir={tmp_path / 'out'}",
        "experiment_name=t",
        "reward=afinn",
        "decoder=tqstar",
        "decoder.top_k=3",
        "decoder.max_new_tokens=4",
        "decoder.rollout.max_new_tokens=2",
        "device=cpu",
    ]
    result = run_decode(compose(overrides))
    assert len(result.rows) == 2
    scored = judge("afinn")([r["prompt"] for r in result.rows], [r["response"] for r in result.rows])
    assert [r["reward"] for r in result.rows] == pytest.approx(scored)
    assert result.run.status()["counters"]["reward_calls"] > 2


def test_agreement_hand_computed():
    # a = [1, 2, 2, 4], b = [1, 3, 2, 2]: means 2.25 and 2; sxy = 1, sxx = 4.75, syy = 2 -> r = 1 / sqrt(9.5).
    # Ranks [1, 2.5, 2.5, 4] and [1, 4, 2.5, 2.5]: deviations (-1.5, 0, 0, 1.5), (-1.5, 1.5, 0, 0) -> rho = 2.25 / 4.5.
    out = judge_agreement([1, 2, 2, 4], [1, 3, 2, 2])
    assert out["n"] == 4
    assert out["pearson"] == pytest.approx(1 / math.sqrt(9.5))
    assert out["spearman"] == pytest.approx(0.5)
    assert out["both_positive"] == 1.0 and out["sign_agreement"] == 1.0 and out["both_negative"] == out["both_zero"] == 0.0
    assert average_ranks([3, 1, 3]) == [2.5, 1.0, 2.5]


def test_agreement_signs_missing_values_and_degenerate_cases():
    a = [0.5, -0.2, 0.0, 0.3, -0.1, None, float("nan")]
    b = [0.2, -0.4, 0.0, -0.2, 0.0, 0.7, 0.2]
    out = judge_agreement(a, b)
    assert out["n"] == 5  # the pairs with a None or NaN are dropped
    assert (out["both_positive"], out["both_negative"], out["both_zero"]) == pytest.approx((0.2, 0.2, 0.2))
    assert out["sign_agreement"] == pytest.approx(0.6)
    tolerant = judge_agreement(a, b, zero=0.15)  # -0.1 now counts as neutral: pair 4 agrees (both zero)
    assert tolerant["sign_agreement"] == pytest.approx(0.8) and tolerant["both_zero"] == pytest.approx(0.4)
    assert judge_agreement([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)
    constant = judge_agreement([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    assert constant["pearson"] is None and constant["spearman"] is None and constant["both_positive"] == 1.0
    empty = judge_agreement([], [])
    assert empty["n"] == 0 and empty["pearson"] is None and empty["sign_agreement"] is None
    with pytest.raises(ValueError, match="same responses"):
        judge_agreement([1.0], [1.0, 2.0])


def test_judges_agree_with_vader_on_obvious_sentences():
    sentences = [GOOD, BAD, NEUTRAL, "What a great, happy trip!", "This is terrible and sad."]
    vader = judge("vader")(["x"] * 5, sentences)
    for kind in JUDGES:
        out = judge_agreement(vader, judge(kind)(["x"] * 5, sentences))
        assert out["n"] == 5 and out["sign_agreement"] == 1.0 and out["spearman"] > 0.5
