"""Run identity by design (tqstar.identity): execution-only keys are never part of it, keys added later are
filled with their defaults, so old run folders are found by the same command; changing a value is a new run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tqstar.config import compose
from tqstar.identity import EXECUTION, config_hash, same_run
from tqstar.runs import RunFolder

RUNS_9BA89C5 = Path(__file__).parent / "data" / "runs_9ba89c5"  # config.yaml files written by main at 9ba89c5


@pytest.mark.parametrize("key", [k for k in EXECUTION if k.startswith("decoder.")])
def test_execution_keys_are_not_identity(key):
    base = compose(["decoder=cd"])
    value = OmegaConf.select(base, key)
    changed = not value if isinstance(value, bool) else value + 1
    assert config_hash(compose(["decoder=cd", f"{key}={changed}"])) == config_hash(base)


def test_settings_are_identity():
    base = compose([])
    assert config_hash(base) == config_hash(compose(["output_dir=/elsewhere", "experiment_name=x", "num_threads=1"]))
    assert config_hash(base) != config_hash(compose(["decoder.alpha=2"]))
    assert config_hash(base) != config_hash(compose(["synthetic.seed=1"]))  # another build


def _older(cfg, *keys: str) -> dict:
    """The config a run made before `keys` existed wrote (and no `choices` block)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("choices")
    for key in keys:
        *path, leaf = key.split(".")
        block = data
        for part in path:
            block = block[part]
        del block[leaf]
    return data


@pytest.mark.parametrize(
    "overrides, added",
    [
        (["decoder=cd", "decoder.selection=sample"], ["decoder.sample_top_k", "decoder.rollout.top_k"]),
        (["reward=hf", "reward.name_or_path=some/rm"], ["reward.output"]),
        ([], ["synthetic.size", "decoder.value", "decoder.beta"]),
        (["experiment=hh_pythia"], ["smollm2", "num_threads"]),
    ],
)
def test_a_key_added_with_its_default_keeps_old_runs(tmp_path, overrides, added):
    cfg = compose([f"output_dir={tmp_path}", *overrides])
    older = _older(cfg, *added)
    assert same_run(older, cfg)
    folder = tmp_path / str(cfg.experiment_name) / f"20200101-000000-{cfg.decoder.method}-0000beef"  # an old rule's hash
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(older)))
    assert RunFolder.for_config(cfg).path == folder
    # another value of an added key is another run
    key = added[0]
    if not key.startswith("smollm2") and OmegaConf.select(cfg, key) is None:
        other = compose([f"output_dir={tmp_path}", *overrides, f"{key}=5"])
        assert not same_run(older, other)
        assert RunFolder.for_config(other).path != folder


def test_a_changed_default_does_not_alias_an_old_run():
    """An old run's config says which value it ran with: a new default is a new run."""
    cfg = compose(["decoder=cd"])
    older = _older(cfg)
    older["decoder"]["alpha"] = 2.0  # the default once was 2
    assert not same_run(older, cfg)


@pytest.mark.parametrize("case", sorted(json.loads((RUNS_9BA89C5 / "cases.json").read_text())))
def test_runs_of_main_before_this_change_are_found(tmp_path, case):
    """Run folders written by main at 9ba89c5 (the migration-log hash) are resumed by the same command."""
    spec = json.loads((RUNS_9BA89C5 / "cases.json").read_text())[case]
    cfg = compose([f"output_dir={tmp_path}", *spec["overrides"]])
    folder = tmp_path / str(cfg.experiment_name) / spec["folder"]
    shutil.copytree(RUNS_9BA89C5 / spec["folder"], folder)
    assert RunFolder.for_config(cfg).path == folder
    moved = compose([f"output_dir={tmp_path}", *spec["overrides"], "decoder.top_k=3"])
    assert RunFolder.for_config(moved).path != folder


def test_a_new_default_recipe_starts_new_runs_and_the_old_recipe_finds_the_old_ones(tmp_path):
    """A SmolLM2 run from before `smollm2.recipe` existed built recipe v1 (`Testbed.stored_defaults`): today's plain
    command (today's default recipe) gets a new folder, and naming recipe v1 and its 48 tokens resumes the old one."""
    spec = json.loads((RUNS_9BA89C5 / "cases.json").read_text())["smollm2_indirect"]
    plain = compose([f"output_dir={tmp_path}", "experiment=smollm2_indirect"])
    folder = tmp_path / str(plain.experiment_name) / spec["folder"]
    shutil.copytree(RUNS_9BA89C5 / spec["folder"], folder)
    assert RunFolder.for_config(plain).path != folder
    assert RunFolder.for_config(compose([f"output_dir={tmp_path}", *spec["overrides"]])).path == folder
    # the recipe alone is not enough: v2's presets decode 80 tokens, v1's runs 48
    assert RunFolder.for_config(compose([f"output_dir={tmp_path}", "experiment=smollm2_indirect", "smollm2.recipe=v1"])).path != folder
