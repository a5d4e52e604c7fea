"""The learned proxy reward of the synthetic task (tqstar/synthetic/proxy.py): pairs, measures, cache, and
`reward=synthetic_proxy` through the HF-classifier reward path, on the tiny stand-in build (conftest)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from tqstar.config import ConfigError, compose
from tqstar.identity import config_hash
from tqstar.synthetic import cache, proxy
from tqstar.synthetic.params import BuildParams

# The default recipe: on the tiny task (12 train prompts x 8 samples, a 1-layer model) it uses every usable
# pair and trains in about a second.
DEFAULT = proxy.ProxyParams()


# ----------------------------------------------------------------------------- pure parts


def test_preference_pairs_stay_within_a_prompt_prefer_higher_r_and_skip_near_ties():
    samples = [
        {"prompt_index": 0, "response": "a", "target_reward": 0.9},
        {"prompt_index": 0, "response": "b", "target_reward": 0.88},  # a near-tie with a
        {"prompt_index": 0, "response": "c", "target_reward": -0.5},
        {"prompt_index": 1, "response": "d", "target_reward": 0.0},
        {"prompt_index": 1, "response": "e", "target_reward": 0.0},  # identical rewards: no pair
    ]
    pairs = proxy.preference_pairs(samples, n_pairs=100, min_gap=0.05, rng=random.Random(0))
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a", "c"), ("b", "c")]
    assert all(p["prompt_index"] == 0 and p["gap"] >= 0.05 for p in pairs)
    assert len(proxy.preference_pairs(samples, n_pairs=1, min_gap=0.05, rng=random.Random(0))) == 1
    assert proxy.preference_pairs(samples, n_pairs=4, min_gap=0.05, rng=random.Random(3)) == proxy.preference_pairs(
        samples, n_pairs=4, min_gap=0.05, rng=random.Random(3)
    )
    many = [{"prompt_index": i // 8, "response": str(i), "target_reward": i % 8 / 8} for i in range(64)]
    spread = proxy.preference_pairs(many, n_pairs=16, min_gap=0.05, rng=random.Random(0))
    assert len(spread) == 16 and {p["prompt_index"] for p in spread} == set(range(8))  # every prompt contributes


def test_pairwise_accuracy_and_correlations():
    groups, rewards = [0, 0, 0, 1, 1], [1.0, 0.0, 0.5, 0.2, 0.21]
    assert proxy.pairwise_accuracy(groups, rewards, [3.0, 1.0, 2.0, 0.0, 9.0], 0.05) == (1.0, 3)  # group 1 is a near-tie
    assert proxy.pairwise_accuracy(groups, rewards, [1.0, 3.0, 2.0, 0.0, 0.0], 0.05) == (0.0, 3)
    assert proxy.pairwise_accuracy(groups, rewards, [1.0, 1.0, 2.0, 0.0, 0.0], 0.05) == (pytest.approx(1 / 3), 3)  # a tie is wrong
    assert proxy.pairwise_accuracy([0, 1], [1.0, 0.0], [1.0, 0.0], 0.05) == (None, 0)  # no pair within a group
    assert proxy.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert proxy.spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)
    assert proxy.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert proxy.pearson([1, 1, 1], [1, 2, 3]) is None


def test_proxy_key_and_location_leave_the_build_key_alone(tmp_path):
    task = cache.task_dir(0, tmp_path)
    folder = proxy.proxy_dir(task)
    assert folder.parent == task.parent and folder.name == f"{task.name}-proxy-{proxy.proxy_key()}"
    assert proxy.proxy_dir(task, proxy.ProxyParams(epochs=3)) != folder
    assert proxy.proxy_dir(cache.task_dir(1, tmp_path)) != folder
    # the build's key knows nothing of the proxy: BuildParams has none of its knobs
    names = {f for f in BuildParams().to_dict()}
    assert not names & set(proxy.ProxyParams().to_dict()) - {"seed"} and "seed" not in names
    assert proxy.find_proxy(0, tmp_path) is None


# ----------------------------------------------------------------------------- the build on the tiny task (slow: TRL)


@pytest.fixture(scope="module")
def built(tiny_synthetic_cache):
    """The tiny task's proxy, built once for this module; with the build's folder before it was built."""
    task = cache.task_dir(0, tiny_synthetic_cache)
    before = {
        "task_dir": task,
        "files": sorted(str(p.relative_to(task)) for p in task.rglob("*")),
        "manifest": cache.load_manifest(task),
    }
    folder = proxy.ensure_proxy(0, tiny_synthetic_cache, progress=False, num_threads=1)
    return folder, before


@pytest.mark.slow  # the proxy is trained with TRL's RewardTrainer
def test_proxy_builds_end_to_end_and_measures_itself(built):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, before = built
    m = cache.load_manifest(folder)
    assert folder == proxy.proxy_dir(before["task_dir"], DEFAULT) and m["key"] == proxy.proxy_key(DEFAULT)
    assert m["params"] == DEFAULT.to_dict() and m["build"] == before["task_dir"].name and m["seed"] == 0
    assert 0 < m["pairs"]["train"] <= DEFAULT.n_pairs and m["pairs"]["heldout"] > 0
    held = m["heldout"]
    assert held["samples"] == 4 * DEFAULT.test_samples_per_prompt and held["pairs"] == m["pairs"]["heldout"]
    # one epoch is ceil(pairs / batch) optimiser steps: the trainer ran exactly the configured schedule
    assert m["training"]["steps"] == DEFAULT.epochs * math.ceil(m["pairs"]["train"] / DEFAULT.batch_size)
    rows = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == held["samples"]
    # the recorded correlation is the one of the rows it was computed from
    target, scored = [r["target_reward"] for r in rows], [r["proxy_reward"] for r in rows]
    assert held["pearson"] == pytest.approx(float(np.corrcoef(target, scored)[0, 1]), abs=1e-3)
    assert proxy.pairwise_accuracy(
        [r["prompt_index"] for r in rows], [r["target_reward"] for r in rows], [r["proxy_reward"] for r in rows], DEFAULT.min_gap
    )[0] == pytest.approx(held["accuracy"], abs=1e-4)
    # a plain HF folder: one-logit Llama classifier, the SFT model's tokenizer, a pad token
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    sft_tok = AutoTokenizer.from_pretrained(before["task_dir"] / "sft")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert tok.get_vocab() == sft_tok.get_vocab() and tok.model_max_length == model.config.max_position_embeddings
    assert not list(folder.parent.glob(".*building*"))


@pytest.mark.slow  # the proxy is trained with TRL's RewardTrainer
def test_second_call_finds_the_cache_and_the_build_is_untouched(built, tiny_synthetic_cache, monkeypatch):
    folder, before = built

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached proxy")

    monkeypatch.setattr(proxy, "_build_proxy", no_build)
    assert proxy.ensure_proxy(0, tiny_synthetic_cache, params=DEFAULT, progress=False) == folder
    assert proxy.find_proxy(0, tiny_synthetic_cache, params=DEFAULT) == folder
    task = cache.task_dir(0, tiny_synthetic_cache)
    assert task == before["task_dir"]  # the main build's cache key is unchanged by the proxy
    assert sorted(str(p.relative_to(task)) for p in task.rglob("*")) == before["files"]
    assert cache.load_manifest(task) == before["manifest"]
    assert not folder.is_relative_to(task)


# ----------------------------------------------------------------------------- reward=synthetic_proxy


@pytest.fixture
def default_proxy(built):
    """The folder `synthetic:proxy` names (default ProxyParams) in the tiny cache."""
    return built[0]


@pytest.mark.slow  # the proxy is trained with TRL's RewardTrainer
def test_reward_synthetic_proxy_scores_through_the_hf_classifier(default_proxy, tiny_synthetic_cache, hydra_clean):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tqstar.decode import check_sources, resolve_reward
    from tqstar.rewards import build_reward
    from tqstar.rewards.hf import HFClassifierReward

    cfg = compose(["reward=synthetic_proxy", f"synthetic.cache_dir={tiny_synthetic_cache}", "decoder=sft"])
    assert cfg.reward.type == "hf" and cfg.reward.name_or_path == "synthetic:proxy"
    assert cfg.reward.template == proxy.TEMPLATE  # what the proxy was trained on
    check_sources(cfg)
    resolved = resolve_reward(cfg.reward, cfg)
    assert resolved.name_or_path == str(default_proxy) and cfg.reward.name_or_path == "synthetic:proxy"
    reward = build_reward(resolved, "cpu")
    assert isinstance(reward, HFClassifierReward)

    prompts = [
        json.loads(line)["prompt"] for line in (cache.task_dir(0, tiny_synthetic_cache) / "prompts" / "test.jsonl").read_text().splitlines()
    ]
    responses = ["It was wonderful.", "It was awful, really terrible.", "The staff was fine.\n\nHuman: and?", ""]
    scores = reward(prompts, responses)

    # the saved classifier called directly, one text at a time
    model = AutoModelForSequenceClassification.from_pretrained(default_proxy, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(default_proxy)
    direct = []
    for p, r in zip(prompts, responses):
        ids = tok(p + r.split("\n\nHuman:")[0], return_tensors="pt")
        with torch.no_grad():
            direct.append(model(**ids).logits[0, 0].item())
    assert scores == pytest.approx(direct, abs=1e-5)
    # and the manifest's held-out scores are what the reward class gives
    rows = [json.loads(line) for line in (default_proxy / "heldout.jsonl").read_text().splitlines()][:6]
    by_id = {
        json.loads(line)["id"]: json.loads(line)["prompt"]
        for line in (cache.task_dir(0, tiny_synthetic_cache) / "prompts" / "test.jsonl").read_text().splitlines()
    }
    again = reward([by_id[r["prompt_id"]] for r in rows], [r["response"] for r in rows])
    assert again == pytest.approx([r["proxy_reward"] for r in rows], abs=1e-5)


def test_synthetic_reward_names_are_checked_early(hydra_clean):
    from tqstar.decode import check_sources

    cfg = compose(["reward=synthetic_proxy", "reward.name_or_path=synthetic:proxxy", "decoder=sft"])
    with pytest.raises(
        ConfigError, match=r"reward.name_or_path='synthetic:proxxy': the synthetic task has no reward model 'proxxy'.*proxy"
    ):
        check_sources(cfg)


def test_run_hash_covers_the_proxy_key(hydra_clean, monkeypatch):
    base = compose(["reward=synthetic_proxy", "decoder=sft"])
    vader = compose(["reward=vader", "decoder=sft"])
    before, before_vader = config_hash(base), config_hash(vader)
    monkeypatch.setattr(proxy, "proxy_key", lambda params=None: "00000000")
    assert config_hash(base) != before  # another proxy recipe: another run folder
    assert config_hash(vader) == before_vader  # configs without the proxy hash as before


@pytest.mark.slow  # the proxy is trained with TRL's RewardTrainer
def test_decode_and_evaluate_with_the_proxy_reward(default_proxy, tiny_synthetic_cache, tmp_path, hydra_clean):
    from tqstar.decode import run_decode
    from tqstar.evaluate import evaluate_runs

    overrides = [
        "decoder=args",
        "reward=synthetic_proxy",
        f"synthetic.cache_dir={tiny_synthetic_cache}",
        "dataset.limit=2",
        "decoder.max_new_tokens=4",
        "decoder.top_k=3",
        "device=cpu",
        f"output_dir={tmp_path}",
    ]
    result = run_decode(compose(overrides))
    assert len(result.rows) == 2
    assert result.run.status()["parameters"]["reward"] > 0  # a network reward: its parameters are counted
    reward = build_default_proxy_reward(default_proxy)
    assert [r["reward"] for r in result.rows] == pytest.approx(
        reward([r["prompt"] for r in result.rows], [r["response"] for r in result.rows]), abs=1e-5
    )
    table = evaluate_runs([result.run.path], overrides=["coherence.enabled=false", "plots=false"])
    assert table["reward_mean"].iloc[0] == pytest.approx(sum(r["reward"] for r in result.rows) / 2, abs=1e-5)


def build_default_proxy_reward(folder):
    from tqstar.rewards import build_reward

    cfg = OmegaConf.load(_conf("reward/synthetic_proxy.yaml"))
    cfg.name_or_path = str(folder)
    return build_reward(cfg, "cpu")


def _conf(name):
    from tqstar.config import conf_dir

    return conf_dir() / name


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow  # the proxy is trained with TRL's RewardTrainer
def test_prepare_synthetic_builds_and_reports_the_proxy(default_proxy, tiny_synthetic_cache, hydra_clean, monkeypatch):
    from typer.testing import CliRunner

    from tqstar.cli import app

    result = CliRunner().invoke(app, ["prepare", "synthetic", "--proxy", f"synthetic.cache_dir={tiny_synthetic_cache}"])
    assert result.exit_code == 0, result.output
    accuracy = cache.load_manifest(default_proxy)["heldout"]["accuracy"]
    assert "proxy reward (reward=synthetic_proxy)" in result.output and f"held-out pairwise accuracy vs r {accuracy:.3f}" in result.output
    other = CliRunner().invoke(app, ["prepare", "synthetic", f"synthetic.cache_dir={tiny_synthetic_cache}", "synthetic.seed=0"])
    assert other.exit_code == 0 and "held-out pairwise accuracy" in other.output


def test_importing_the_proxy_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tqstar.synthetic import proxy\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'tqstar.decode') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
