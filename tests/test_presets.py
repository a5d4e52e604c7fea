"""Experiment presets and the model / reward / dataset config groups: each composes, validates and says
what it should, and the command line still wins over a preset."""

from __future__ import annotations

import pytest

from tqstar.config import compose, group_options, validate
from tqstar.smollm2 import Smollm2Params
from tqstar.synthetic import BuildParams


@pytest.fixture(autouse=True)
def _clean(hydra_clean):
    yield


@pytest.mark.parametrize("name", group_options("experiment"))
def test_every_experiment_composes_and_validates(name):
    cfg = validate(compose([f"experiment={name}"]))
    assert cfg.experiment_name == name


def test_hh_pythia_is_the_authors_setup():
    cfg = validate(compose(["experiment=hh_pythia"]))
    assert cfg.sft.name_or_path == "lomahony/eleuther-pythia6.9b-hh-sft"
    assert cfg.baseline.name_or_path == "lomahony/eleuther-pythia6.9b-hh-dpo"
    assert (cfg.reward.type, cfg.reward.name_or_path, cfg.reward.label) == ("hf", "usvsnsp/pythia-6.9b-rm-full-hh-rlhf", None)
    assert (cfg.dataset.name, cfg.dataset.path, cfg.dataset.split, cfg.dataset.prompt_column) == (
        "full_hh_rlhf",
        "Dahoas/full-hh-rlhf",
        "test",
        "prompt",
    )
    assert cfg.dataset.max_prompt_tokens == 1333  # prompts of 1334+ tokens are skipped
    assert {cfg.sft.dtype, cfg.baseline.dtype, cfg.reward.dtype} == {"float16"}
    assert (cfg.sft.device, cfg.baseline.device, cfg.reward.device) == ("cuda:0", "cuda:0", "cuda:1")
    d = cfg.decoder
    assert (d.method, d.transfer, d.top_k, d.alpha, d.max_new_tokens, d.rollout.max_new_tokens) == ("tqstar", "direct", 10, 1.0, 128, 20)
    assert not cfg.sft.trust_remote_code and not cfg.reward.trust_remote_code


def test_smollm2_offline_is_direct_transfer_from_the_dpo_baseline_built_here():
    cfg = validate(compose(["experiment=smollm2_offline"]))
    assert (cfg.sft.name_or_path, cfg.baseline.name_or_path) == ("smollm2:sft", "smollm2:dpo")
    assert cfg.sft.prompt_format == cfg.baseline.prompt_format == "chat"
    assert cfg.reward.type == "vader" and (cfg.dataset.name, cfg.dataset.split) == ("smollm2", "test")
    assert cfg.baseline_reward.function == "tqstar.smollm2.rewards:on_topic"  # r_bl, for `tqstar evaluate`
    d = cfg.decoder
    assert (d.method, d.transfer, d.top_k, d.rollout.max_new_tokens, d.max_new_tokens, d.batch_size) == ("tqstar", "direct", 5, 10, 80, 8)
    assert d.max_new_tokens == Smollm2Params().max_new_tokens  # as long as the samples the baseline was trained on


def test_smollm2_indirect_rolls_out_the_baseline_of_the_other_reward():
    cfg = validate(compose(["experiment=smollm2_indirect"]))
    assert (cfg.sft.name_or_path, cfg.baseline.name_or_path) == ("smollm2:sft", "smollm2:dpo_bl")
    assert (cfg.reward.type, cfg.baseline_reward.type, cfg.baseline_reward.function) == (
        "vader",
        "callable",
        "tqstar.smollm2.rewards:on_topic",
    )
    assert list(cfg.baseline_reward.bounds) == [-1.0, 1.0]
    assert (cfg.decoder.method, cfg.decoder.transfer, cfg.decoder.beta_bl) == ("tqstar", "indirect", Smollm2Params().bl_beta)
    assert (cfg.decoder.top_k, cfg.decoder.rollout.max_new_tokens, cfg.decoder.max_new_tokens) == (5, 10, Smollm2Params().max_new_tokens)
    assert cfg.dataset.name == "smollm2"


def test_the_packaged_smollm2_weights_need_nothing_from_the_network():
    cfg = validate(compose(["experiment=smollm2_offline", "sft=smollm2", "baseline=smollm2", "dataset=hh_sample"]))
    assert cfg.sft.name_or_path == cfg.baseline.name_or_path == "packaged:smollm2"
    assert cfg.dataset.path == "packaged:hh_prompts.jsonl"


def test_synthetic_indirect_is_the_authors_indirect_setting():
    cfg = validate(compose(["experiment=synthetic_indirect"]))
    assert cfg.baseline.name_or_path == "synthetic:rho_bl" and cfg.decoder.beta_bl == BuildParams().baseline_reward_beta
    assert (cfg.decoder.method, cfg.decoder.transfer, cfg.decoder.rollout.max_new_tokens) == ("tqstar", "indirect", 5)
    assert cfg.dataset.name == "synthetic"


def test_the_command_line_wins_over_a_preset():
    cfg = validate(compose(["experiment=hh_pythia", "decoder=cd", "decoder.top_k=4", "reward.device=cuda:0", "dataset.limit=5"]))
    assert (cfg.decoder.method, cfg.decoder.top_k, cfg.reward.device, cfg.dataset.limit) == ("cd", 4, "cuda:0", 5)


@pytest.mark.parametrize(
    "group,mounts", [("model", ("sft", "baseline")), ("reward", ("reward", "baseline_reward")), ("dataset", ("dataset",))]
)
def test_every_config_of_a_group_has_its_common_keys(group, mounts):
    """Each config of a group starts from its _common.yaml, so an override such as sft.dtype=... or
    dataset.shard=... works whichever config is mounted; mounted twice, a config gives equal nodes."""
    default = compose([])
    for name in group_options(group):
        cfg = compose([f"{group}@{mount}={name}" for mount in mounts])
        nodes = [cfg[mount] for mount in mounts]
        assert all(node == nodes[0] for node in nodes), name
        if group != "reward":  # rewards of different types have different keys by design
            assert set(nodes[0]) >= set(default[mounts[0]]) - {"name", "split", "path"}, name


@pytest.mark.parametrize("name", [n for n in group_options("model") if n != "hf"])  # hf: the template, name_or_path ???
def test_every_model_config_points_at_something_loadable_or_says_why(name):
    """Presets name real sources: a synthetic model the task builds, a packaged file that is installed, or
    a hub id (which, offline, is refused before anything loads with a message naming the key)."""
    from tqstar.decode import check_sources
    from tqstar.errors import ConfigError

    cfg = validate(compose([f"model@sft={name}", "decoder=sft"]))
    try:
        check_sources(cfg)
    except ConfigError as exc:
        assert "sft.name_or_path" in str(exc) and "offline" in str(exc)


def test_show_config_prints_the_authors_setup():
    from typer.testing import CliRunner

    from tqstar.cli import app

    result = CliRunner().invoke(app, ["decode", "experiment=hh_pythia", "--show-config"])
    assert result.exit_code == 0, result.output
    for text in ("lomahony/eleuther-pythia6.9b-hh-dpo", "usvsnsp/pythia-6.9b-rm-full-hh-rlhf", "Dahoas/full-hh-rlhf", "device: cuda:1"):
        assert text in result.output


def test_hh_pythia_release_changes_only_the_model_roles():
    """The authors' release proposes and rolls out with the DPO model: sft == baseline == DPO, all else hh_pythia."""
    from omegaconf import OmegaConf

    release = validate(compose(["experiment=hh_pythia_release"]))
    paper = validate(compose(["experiment=hh_pythia"]))
    dpo = "lomahony/eleuther-pythia6.9b-hh-dpo"
    assert release.sft.name_or_path == release.baseline.name_or_path == paper.baseline.name_or_path == dpo
    assert release.sft == release.baseline == paper.baseline
    assert release.experiment_name == "hh_pythia_release"

    def rest(cfg):
        return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("sft", "experiment_name", "choices")}

    assert rest(release) == rest(paper)


def test_smollm2_soft_transfer_weighs_dpo_rollouts_back_to_the_sft_top_k():
    cfg = validate(compose(["experiment=smollm2_soft_transfer"]))
    assert (cfg.sft.name_or_path, cfg.baseline.name_or_path, cfg.reward.type) == ("smollm2:sft", "smollm2:dpo", "vader")
    d = cfg.decoder
    assert (d.method, d.value, d.selection, d.rollout.selection, d.rollout.proposal) == (
        "soft_transfer",
        "soft",
        "sample",
        "sample",
        "baseline",
    )
    assert d.beta == Smollm2Params().beta and d.alpha == pytest.approx(1 / d.beta)  # rho*_beta of the DPO baseline's beta
    assert d.rollout.top_k == d.top_k == 5 and d.max_new_tokens == Smollm2Params().max_new_tokens
    sft = validate(compose(["experiment=smollm2_soft_transfer", "decoder.rollout.proposal=sft"])).decoder
    assert sft.rollout.proposal == "sft" and sft.method == "soft_transfer"
