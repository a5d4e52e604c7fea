"""Config composition and validation: bad values fail before any model loads, with key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tqstar.config import ConfigError, compose, config_hash, validate


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


@pytest.mark.parametrize("override,needles", [
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
])
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


@pytest.mark.parametrize("method", ["sft", "baseline", "best_of_n", "args", "cd", "tqstar"])
def test_every_decoder_composes(method):
    assert validate(compose([f"decoder={method}"])).decoder.method == method


def test_cli_import_does_not_load_torch():
    code = "import sys, tqstar.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
