"""`tqstar plan`: parameter counts from config.json, the KV formula against a real cache, verdicts and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tqstar.cli import app
from tqstar.plan import arch_from_config, count_parameters, parse_memory, safetensors_parameters, split_layers


def _configs():
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    small = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    return [
        ("llama tied, grouped kv", "AutoModelForCausalLM", LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True)),
        ("llama untied", "AutoModelForCausalLM", LlamaConfig(**small, tie_word_embeddings=False)),
        ("gpt_neox", "AutoModelForCausalLM", GPTNeoXConfig(**small, tie_word_embeddings=False)),
        ("gpt2", "AutoModelForCausalLM", GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        ("gpt_neox classifier", "AutoModelForSequenceClassification", GPTNeoXConfig(**small, num_labels=1)),
        ("llama classifier", "AutoModelForSequenceClassification", LlamaConfig(**small, num_labels=1)),
    ]


@pytest.mark.parametrize("name,auto,config", _configs(), ids=[c[0] for c in _configs()])
def test_parameter_count_of_saved_model_equals_numel(tmp_path, name, auto, config):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(config)
    model.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in model.parameters())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert count_parameters(arch_from_config(saved)) == expected
    assert safetensors_parameters(tmp_path) == expected


def test_kv_formula_equals_a_real_dynamic_cache():
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    rows, positions = 5, 7
    cache = DynamicCache()
    import inspect

    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(torch.randint(0, 97, (rows, positions)), use_cache=True, **{argument: cache})
    real = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size() for layer in cache.layers
    )
    arch = arch_from_config(config.to_dict())
    assert rows * positions * arch.kv_bytes_per_token(4) == real


def test_memory_option_and_split():
    assert parse_memory(["cuda:0=80GB", "cuda=24GiB", "cpu=512MB"]) == {"cuda:0": 80 * 10**9, "cuda": 24 * 2**30, "cpu": 512 * 10**6}
    assert split_layers(32, {"cuda:0": 80, "cuda:1": 40}) == {"cuda:0": 22, "cuda:1": 10}


def test_plan_hh_pythia_prints_offline_and_saves_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app, ["plan", "experiment=hh_pythia", "--memory", "cuda:0=80GB", "--memory", "cuda:1=80GB", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "fits" in result.output and "FLOPs per response" in result.output
    plan = json.loads(out.read_text())
    sft = next(m for m in plan["models"] if "sft" in m["mounts"])
    assert sft["parameters"] == 6_857_302_016  # Pythia-6.9B, the published count
    assert {d["device"]: d["verdict"] for d in plan["devices"]}["cuda:0"] == "fits"


def test_plan_refuses_with_exit_2_and_one_line_suggestion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["plan", "experiment=hh_pythia", "--memory", "cuda=24GB"])
    assert result.exit_code == 2
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "will run out of memory" in error[0] and "decoder.batch_size=" in error[0]


def test_bad_memory_value_is_one_line(monkeypatch):
    result = CliRunner().invoke(app, ["plan", "experiment=hh_pythia", "--memory", "cuda:0"])
    assert result.exit_code == 2 and "--memory" in result.stderr


def test_auto_split_loads_with_device_map(saved_models, monkeypatch):
    """<mount>.device=auto_split passes device_map="auto" (accelerate places the layers; on a CPU-only machine all on the
    CPU) and does not move the model afterwards; inputs go where its first layers are."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from tqstar.models import clear_cache, load_model

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = OmegaConf.create({"name_or_path": str(saved_models["sft"]), "dtype": "float32", "device": "auto_split"})
    clear_cache()
    try:
        loaded = load_model(cfg)
    finally:
        clear_cache()
    assert seen.get("device_map") == "auto"
    assert loaded.device == next(loaded.model.parameters()).device
