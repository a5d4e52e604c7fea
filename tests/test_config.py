"""Config composition and validation: bad values fail before any model loads, with key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tqstar.config import ConfigError, compose, group_options, validate
from tqstar.identity import config_hash, same_run
from tqstar.methods import METHOD_NAMES


@pytest.fixture(autouse=True)
def _clean(hydra_clean):
    yield


def error_of(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    return str(info.value)


def test_default_config_composes_and_validates():
    cfg = validate(compose([]))
    assert cfg.decoder.method in ("sft", "tqstar")
    assert cfg.experiment_name == "synthetic"
    assert cfg.sft.name_or_path == "synthetic:sft"


@pytest.mark.parametrize(
    "override,needles",
    [
        ("decoder.top_k=0", ["decoder.top_k", "0", ">= 1"]),
        ("decoder.alpha=-1", ["decoder.alpha", "-1", ">= 0"]),
        ("decoder.max_new_tokens=0", ["decoder.max_new_tokens", ">= 1"]),
        ("decoder.selection=beam", ["decoder.selection", "beam", "greedy, sample"]),
        ("decoder.method=tqstr", ["decoder.method", "did you mean 'tqstar'"]),
        ("decoder=tqstr", ["decoder=tqstr", "did you mean 'tqstar'", "allowed:"]),
        ("decoder.alpah=1", ["decoder.alpah", "did you mean 'alpha'"]),
        ("decoder.rollout.num=0", ["decoder.rollout.num", ">= 1"]),
        ("decoder.temperature=0", ["decoder.temperature", "> 0"]),
        ("dataset.shard=3/2", ["dataset.shard", "i/n"]),
        ("device=gpu", ["device", "gpu"]),
        ("decoder.prune=maybe", ["decoder.prune", "maybe", "true or false"]),
        ("decoder.reuse_rollouts=sometimes", ["decoder.reuse_rollouts", "sometimes", "true or false"]),
        ("decoder.shared_prefix=2", ["decoder.shared_prefix", "2", "true or false"]),
        ("reward.bounds=[1,0]", ["reward.bounds", "[1, 0]", "lo <= hi"]),
        ("reward.bounds=[0]", ["reward.bounds", "[0]", "[lo, hi], two finite numbers"]),
        ("baseline_reward.bounds=[a,1]", ["baseline_reward.bounds", "two finite numbers"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needles):
    message = error_of([override])
    for needle in needles:
        assert needle in message
    assert "\n" not in message


def test_comma_lists_point_to_sweep():
    assert "tqstar sweep" in error_of(["decoder.alpha=1,2"])


def test_hash_ignores_placement_but_not_settings():
    base = compose([])
    assert config_hash(base) == config_hash(compose(["output_dir=/elsewhere", "experiment_name=x"]))
    assert config_hash(base) != config_hash(compose(["decoder.alpha=2"]))


def test_keys_added_later_match_old_runs_at_their_default():
    """decoder.sample_top_k and decoder.rollout.top_k came after runs were made: an old run's config lacks them and
    is the same run at their default (null); a value is another run. (More in tests/test_identity.py.)"""
    from omegaconf import OmegaConf

    base = compose(["decoder=cd", "decoder.rollout.selection=sample", "decoder.selection=sample"])
    older = OmegaConf.to_container(base)
    del older["decoder"]["sample_top_k"], older["decoder"]["rollout"]["top_k"], older["choices"]
    assert same_run(older, base)
    assert not same_run(
        older, compose(["decoder=cd", "decoder.rollout.selection=sample", "decoder.selection=sample", "decoder.rollout.top_k=5"])
    )


@pytest.mark.parametrize("key", ["reuse_rollouts", "shared_prefix"])
def test_speed_keys_are_execution_only(key):
    """decoder.reuse_rollouts and decoder.shared_prefix change how much work is done, not what is generated."""
    base = compose(["decoder=cd"])
    assert base.decoder[key] is True
    assert config_hash(base) == config_hash(compose(["decoder=cd", f"decoder.{key}=false"]))


def test_synthetic_runs_hash_the_build_they_read(monkeypatch):
    """A recipe change (a new build key) makes every synthetic run new; runs on other data keep their hash."""
    synthetic, hh = compose([]), compose(["experiment=hh_pythia"])
    before = config_hash(synthetic), config_hash(compose(["synthetic.seed=1"])), config_hash(hh)
    assert before[0] != before[1]  # the seed names another build
    monkeypatch.setattr("tqstar.synthetic.cache.VERSION", 999)
    assert config_hash(synthetic) != before[0]
    assert config_hash(hh) == before[2]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_decoder_composes(method):
    """Every method of the registry has its decoder config (and no config names a method the registry lacks)."""
    assert validate(compose([f"decoder={method}"])).decoder.method == method


def test_decoder_configs_are_the_registry():
    assert set(group_options("decoder")) == set(METHOD_NAMES)


def test_cli_import_does_not_load_torch():
    code = "import sys, tqstar.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("spelling", [["reward=hf"], ["reward@reward=hf"]])
def test_every_spelling_of_a_group_override(spelling):
    cfg = compose([*spelling, "reward.name_or_path=some/rm"])
    assert (cfg.reward.type, cfg.reward.name_or_path) == ("hf", "some/rm")


def test_a_mount_can_be_named_by_its_package():
    assert compose(["sft=hf", "sft.name_or_path=x"]) == compose(["model@sft=hf", "sft.name_or_path=x"])
    assert compose(["baseline_reward=vader"]).baseline_reward.type == "vader"
    for spelling in ("reward@baseline_reward=null", "baseline_reward=null"):
        assert compose([spelling]).get("baseline_reward") is None


def test_paths_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    """A missing reward-model folder is reported before the policy models load and before a run folder exists."""
    from tqstar import models
    from tqstar.decode import run_decode

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    missing = tmp_path / "no-such-rm"
    cfg = compose(["reward=hf", f"reward.name_or_path={missing}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"reward.name_or_path=.*no-such-rm.*path does not exist"):
        run_decode(cfg)
    assert not (tmp_path / "out").exists()
    cfg = compose(["decoder=sft", "sft=hf", f"sft.name_or_path={missing}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"sft.name_or_path=.*path does not exist"):
        run_decode(cfg)
    with pytest.raises(ConfigError, match=r"the synthetic task has no model 'rho0.11'; did you mean 'rho0.1'"):
        run_decode(compose(["model@baseline=synthetic_rho", "baseline.name_or_path=synthetic:rho0.11"]))
