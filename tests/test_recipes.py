"""The recipes of docs/architecture.md ("Where to add things"), followed step by step in a test.

A method: one `MethodSpec` entry in tqstar/methods.py plus `conf/decoder/<name>.yaml`; the engine, validation,
decode and evaluate pick it up from the registry. A reward with no code: `type: callable` and `function:
package.module:fn` in `conf/reward/<name>.yaml`. Each is added here to a copy of the config folder (and, for
the method, to the registry) and decoded end to end on tiny models.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import tqstar.config
from tqstar.config import compose, conf_dir
from tqstar.methods import METHODS

from conftest import ASSISTANT, HUMAN

pytestmark = pytest.mark.slow  # four decodes on copies of conf/ (about 7 s): kept out of the one-minute tier


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that the composer reads instead (its compose cache cleared before and after)."""
    folder = tmp_path / "conf"
    shutil.copytree(conf_dir(), folder)
    tqstar.config._compose_cached.cache_clear()
    monkeypatch.setattr(tqstar.config, "conf_dir", lambda: folder)
    yield folder
    tqstar.config._compose_cached.cache_clear()


def decode(tmp_path, saved_models, *overrides):
    from tqstar.decode import run_decode

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"{HUMAN} {w}{ASSISTANT}"}) + "\n" for i, w in enumerate(["hotel", "food"]))
    )
    cfg = compose(
        [
            f"sft.name_or_path={saved_models['sft']}",
            f"baseline.name_or_path={saved_models['dpo']}",
            "dataset=local",
            f"dataset.path={prompts}",
            f"output_dir={tmp_path / 'out'}",
            "experiment_name=recipes",
            "decoder.top_k=3",
            "decoder.max_new_tokens=4",
            "decoder.rollout.max_new_tokens=2",
            "device=cpu",
            *overrides,
        ]
    )
    return run_decode(tqstar.config.validate(cfg)).rows


def generated(rows):
    return [(r["prompt_id"], r["token_ids"], r["reward"]) for r in rows]


def test_a_method_added_by_the_recipe_decodes(tmp_path, saved_models, conf_copy, monkeypatch, hydra_clean):
    # 1. one MethodSpec entry (a twin of CD under another name)
    monkeypatch.setitem(METHODS, "cd_twin", dataclasses.replace(METHODS["cd"], name="cd_twin", summary="CD under another name"))
    # 2. conf/decoder/<name>.yaml: defaults [_common, _self_], method: <name>
    (conf_copy / "decoder" / "cd_twin.yaml").write_text("defaults:\n  - _common\n  - _self_\nmethod: cd_twin\n")
    twin = decode(tmp_path / "twin", saved_models, "decoder=cd_twin")
    cd = decode(tmp_path / "cd", saved_models, "decoder=cd")
    assert generated(twin) == generated(cd)


def test_a_reward_added_by_the_recipe_needs_no_code(tmp_path, saved_models, conf_copy, hydra_clean):
    (conf_copy / "reward" / "positive_words.yaml").write_text(
        "type: callable\nfunction: conftest:positive_words_reward\nbounds: null\nstop_strings: ['\\n\\nHuman:']\n"
    )
    rows = decode(tmp_path, saved_models, "decoder=cd", "reward=positive_words")
    from conftest import positive_words_reward

    assert [r["reward"] for r in rows] == positive_words_reward([r["prompt"] for r in rows], [r["response"] for r in rows])


def test_a_testbed_added_by_the_recipe_decodes(tmp_path, saved_models, conf_copy, monkeypatch, hydra_clean):
    """One package with a `testbed` module (tests/toy_testbed.py) plus one line in REGISTRY; its config block and
    its dataset's YAML; then `toy:<model>` models and `dataset=toy` decode, and the build's key is in the identity."""
    import toy_testbed

    from tqstar.decode import run_decode
    from tqstar.identity import identity
    from tqstar.testbeds import REGISTRY

    monkeypatch.setitem(REGISTRY, "toy", "toy_testbed")
    monkeypatch.setattr(toy_testbed, "SOURCES", {"sft": saved_models["sft"], "dpo": saved_models["dpo"]})
    (conf_copy / "toy").mkdir()
    (conf_copy / "toy" / "default.yaml").write_text(f"seed: 0\ncache_dir: {tmp_path / 'cache'}\n")
    decode_yaml = conf_copy / "decode.yaml"
    decode_yaml.write_text(decode_yaml.read_text().replace("defaults:\n  - _self_\n", "defaults:\n  - _self_\n  - toy: default\n"))
    (conf_copy / "dataset" / "toy.yaml").write_text("defaults:\n  - _common\n  - _self_\nname: toy\nsplit: test\nlimit: null\n")
    cfg = tqstar.config.validate(
        compose(
            [
                "dataset=toy",
                "sft.name_or_path=toy:sft",
                "baseline.name_or_path=toy:dpo",
                "decoder=tqstar",
                "decoder.top_k=3",
                "decoder.max_new_tokens=4",
                "decoder.rollout.max_new_tokens=2",
                f"output_dir={tmp_path / 'out'}",
                "device=cpu",
            ]
        )
    )
    assert identity(cfg)["toy_build"] == "toy-v1-seed0"
    rows = run_decode(cfg).rows
    assert [r["prompt_id"] for r in rows] == ["test-0", "test-1", "test-2"]
    with pytest.raises(tqstar.config.ConfigError, match="the toy testbed has no model 'dpp'; did you mean 'dpo'"):
        run_decode(tqstar.config.validate(compose(["dataset=toy", "sft.name_or_path=toy:sft", "baseline.name_or_path=toy:dpp"])))
