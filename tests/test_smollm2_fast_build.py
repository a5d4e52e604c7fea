"""The SmolLM2 build's faster-recipe knobs (issue #27): LoRA DPO (peft adapters, merged into a plain model
folder), the instruction that ends every question (a brevity instruction), the share of responses that end
by themselves (`ended_share`), and the timings the manifest records. Tiny random Llamas only."""

from __future__ import annotations

import json

import pytest

from tqstar.config import compose, validate
from tqstar.data.hh import last_human_turn, to_messages
from tqstar.errors import ConfigError
from tqstar.evaluate import ended_share
from tqstar.smollm2 import cache, params, prompts
from tqstar.smollm2.params import LATER_KNOBS, LORA_TARGET_MODULES, V1_RECIPE, Smollm2Params, params_from_config

BRIEF = "Answer in one or two sentences."
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)

# ----------------------------------------------------------------------------- the knobs


def test_lora_target_modules_are_the_linear_layers_of_a_llama_block():
    from conftest import make_llama, make_tokenizer

    model = make_llama(make_tokenizer(), seed=0)
    block = model.get_decoder().layers[0]
    linear = {name.rsplit(".", 1)[-1] for name, module in block.named_modules() if type(module).__name__ == "Linear"}
    assert set(Smollm2Params().lora_modules) == linear == set(LORA_TARGET_MODULES.split(","))


def test_recipes_v1_and_v2_keep_their_keys_and_v3_is_the_default(tmp_path):
    v1, default = Smollm2Params(**V1_RECIPE), Smollm2Params()
    v2 = Smollm2Params(**params.RECIPES["v2"])
    assert (default.ld_alpha, default.rpo_alpha, v2.ld_alpha, v2.rpo_alpha) == (0.0, 1.0, 0.5, None)
    assert "rpo_alpha" not in v2.to_dict()  # a knob v2 did not have, at the value that means "off": v2's key is kept
    assert not set(LATER_KNOBS) & set(v1.to_dict())  # the v1 key: a v1 build is found again
    assert set(v1.to_dict()) | set(LATER_KNOBS) == set(params.FIELDS)
    assert (default.lora_rank, default.instruction, default.bf16) == (16, "Answer in one short sentence.", True)
    assert {k: getattr(default, k) for k in V1_RECIPE} != V1_RECIPE and set(V1_RECIPE) <= set(default.to_dict())
    lora, brief = Smollm2Params(**{**V1_RECIPE, "lora_rank": 8}), Smollm2Params(**{**V1_RECIPE, "instruction": BRIEF})
    assert lora.to_dict()["lora_rank"] == 8 and brief.to_dict()["instruction"] == BRIEF
    keys = {cache.build_dir(0, tmp_path, p) for p in (default, v1, v2, lora, brief)}
    assert len(keys) == 5
    # the keys the builds of seed 0 were made under (recipe v1 at 9ba89c5, v2 at stop 25, v3 at stop 26)
    assert [cache.build_dir(0, tmp_path, p).name for p in (v1, v2, default)] == ["v1-ac49779c", "v1-3a069edf", "v1-045f8595"]


def test_the_recipe_is_chosen_in_the_config_and_params_apply_over_it():
    from tqstar.smollm2.testbed import TESTBED

    assert TESTBED.params(compose([]).smollm2) == Smollm2Params()
    assert TESTBED.params(compose(["smollm2.recipe=v1"]).smollm2) == Smollm2Params(**V1_RECIPE)
    tuned = TESTBED.params(compose(["smollm2.recipe=v1", "smollm2.params.lr=2e-5"]).smollm2)
    assert tuned == Smollm2Params(**{**V1_RECIPE, "lr": 2e-5})
    assert TESTBED.params(compose(["smollm2.recipe=v2"]).smollm2) == Smollm2Params(**params.RECIPES["v2"])
    with pytest.raises(ConfigError, match="smollm2.recipe='v4' is not a recipe; did you mean"):
        TESTBED.params(compose(["smollm2.recipe=v4"]).smollm2)


def test_new_knobs_come_from_the_config():
    cfg = compose([])
    assert tuple(cfg.smollm2.params) == params.FIELDS
    chosen = params_from_config(
        compose(
            [
                "smollm2.params.lora_rank=8",
                "smollm2.params.lora_alpha=16",
                f"smollm2.params.instruction='{BRIEF}'",
                "smollm2.params.lora_target_modules=[q_proj,v_proj]",
            ]
        ).smollm2.params
    )
    assert (chosen.lora_rank, chosen.lora_alpha, chosen.instruction) == (8, 16.0, BRIEF) and isinstance(chosen.lora_alpha, float)
    assert chosen.lora_modules == ["q_proj", "v_proj"] and chosen.lora_target_modules == "q_proj,v_proj"


@pytest.mark.parametrize(
    "override,message",
    [
        ("smollm2.params.lora_rank=0", "smollm2.params.lora_rank=0 is not allowed: must be null (full fine-tuning) or an integer >= 1"),
        ("smollm2.params.lora_rank=4.5", "smollm2.params.lora_rank=4.5 is not allowed: must be an integer"),
        ("smollm2.params.lora_alpha=0", "smollm2.params.lora_alpha=0.0 is not allowed: must be a number > 0"),
        ("smollm2.params.lora_dropout=1", "smollm2.params.lora_dropout=1.0 is not allowed: must be a number in [0, 1)"),
        ("smollm2.params.lora_target_modules=lm_head", "smollm2.params.lora_target_modules='lm_head' is not allowed"),
        ("smollm2.params.lora_target_modules=','", "smollm2.params.lora_target_modules=',' is not allowed"),
        ("smollm2.params.instruction=3", "smollm2.params.instruction=3 is not allowed: must be a string"),
        ("smollm2.params.instruction=' '", "smollm2.params.instruction=' ' is not allowed"),
        ("smollm2.params.instruction='Human: hi'", "without the HH markers"),
        ("smollm2.params.lora_rnk=8", "did you mean 'lora_rank'?"),
        (
            "smollm2.params.premise_prompts=1",
            "smollm2.params.premise_prompts=1 is not allowed: must be null (all held-out prompts) or an integer >= 2",
        ),
        ("smollm2.params.bf16=1", "smollm2.params.bf16=1 is not allowed: must be true or false"),
        ("smollm2.params.ld_alpha=1.5", "smollm2.params.ld_alpha=1.5 is not allowed: must be null (plain DPO) or a number in [0, 1]"),
        ("smollm2.params.ld_alpha=half", "smollm2.params.ld_alpha='half' is not allowed: must be a number"),
        ("smollm2.params.rpo_alpha=0", "smollm2.params.rpo_alpha=0.0 is not allowed: must be null (plain DPO) or a number > 0"),
        ("smollm2.params.pairs_finished_only=yes", "smollm2.params.pairs_finished_only='yes' is not allowed: must be true or false"),
    ],
)
def test_bad_new_knobs_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("?", r"\?")):
        validate(compose([override]))


def test_lora_leaves_the_tied_embedding_frozen():
    with pytest.raises(ConfigError, match="train_embeddings=True is not allowed: must be false with lora_rank set"):
        Smollm2Params(lora_rank=8, train_embeddings=True)


def test_lora_config_adapts_the_top_blocks_only_with_train_layers():
    pytest.importorskip("peft")
    from tqstar.smollm2.training import lora_config

    every = lora_config(Smollm2Params(lora_rank=4, lora_alpha=8.0, train_layers=None), n_blocks=30)
    top = lora_config(Smollm2Params(lora_rank=4, train_layers=10), n_blocks=30)
    assert (every.r, every.lora_alpha, every.layers_to_transform) == (4, 8.0, None)
    assert set(every.target_modules) == set(LORA_TARGET_MODULES.split(","))
    assert top.layers_to_transform == list(range(20, 30))


# ----------------------------------------------------------------------------- the instruction reaches every prompt


def test_the_instruction_ends_every_question_and_keeps_the_prompt_set():
    plain_train, plain_test = prompts.make_prompts(0, 40, 20)
    train, test = prompts.make_prompts(0, 40, 20, instruction=BRIEF)
    for plain, brief in zip(plain_train + plain_test, train + test):
        assert brief["id"] == plain["id"]
        question = last_human_turn(brief["prompt"]).strip()
        assert question == f"{last_human_turn(plain['prompt']).strip()} {BRIEF}"
        assert to_messages(brief["prompt"]) == [{"role": "user", "content": question}]


def test_the_instruction_reaches_the_formatted_prompt_the_models_see():
    from tqstar.smollm2.sampling import format_prompts

    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    train, _ = prompts.make_prompts(0, 4, 2, instruction=BRIEF)
    formatted = format_prompts(tokenizer, [p["prompt"] for p in train])
    assert all(text.startswith("user : ") and text.endswith(f"{BRIEF} assistant : ") for text in formatted)


# ----------------------------------------------------------------------------- responses that end by themselves


def test_ended_share_counts_eos_and_stop_strings_not_the_cap():
    assert ended_share(["eos", "stop_string", "max_new_tokens", "max_new_tokens"]) == 0.5
    assert ended_share(["eos", None, "eos"]) == 1.0  # rows without a stop_reason are left out
    assert ended_share([None, None]) is None and ended_share([]) is None


def test_pairs_of_whole_answers_leave_out_the_samples_cut_at_the_cap():
    from tqstar.smollm2.training import label_pairs

    samples = [
        {"prompt_index": 0, "response": "cut but glowing", "r": 0.95, "stop_reason": "max_new_tokens"},
        {"prompt_index": 0, "response": "good", "r": 0.6, "stop_reason": "eos"},
        {"prompt_index": 0, "response": "bad", "r": -0.5, "stop_reason": "eos"},
        {"prompt_index": 1, "response": "fine", "r": 0.2, "stop_reason": "eos"},
        {"prompt_index": 1, "response": "cut and grim", "r": -0.9, "stop_reason": "max_new_tokens"},
    ]
    every, counts = label_pairs(samples, "r", min_gap=0.1)
    assert [(p["chosen"], p["rejected"]) for p in every] == [(0, 2), (3, 4)] and counts["unusable_samples"] == 0
    whole, counts = label_pairs(samples, "r", min_gap=0.1, finished_only=True)
    assert [(p["chosen"], p["rejected"]) for p in whole] == [(1, 2)]  # prompt 1 has one whole answer: no pair
    assert (counts["unusable_samples"], counts["too_few_usable"], counts["pairs"]) == (2, 1, 1)


def test_ld_dpo_weighs_the_reference_as_trl_weighs_the_policy():
    from tqstar.smollm2.training import reference_logps

    chosen = {"token_ids": [5, 6, 7, 2], "sft_logprob": -10.0, "sft_token_logprobs": [-1.0, -2.0, -3.0, -4.0]}
    rejected = {"token_ids": [8, 2], "sft_logprob": -3.0, "sft_token_logprobs": [-2.5, -0.5]}
    assert reference_logps(chosen, rejected, None) == (-10.0, -3.0)  # plain DPO: the sums
    assert reference_logps(chosen, rejected, 0.5) == (-1.0 - 2.0 + 0.5 * (-3.0 - 4.0), -3.0)  # 2 shared tokens
    assert reference_logps(chosen, rejected, 1.0) == (-10.0, -3.0)
    with pytest.raises(RuntimeError, match="ld_alpha needs each sample's per-token log pi_sft"):
        reference_logps({"token_ids": [1], "sft_logprob": -1.0}, rejected, 0.5)


# ----------------------------------------------------------------------------- LoRA DPO on a tiny Llama


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """(SFT folder, prompt ids, samples, pairs): a tiny Llama saved with its tokenizer, and 4 prompts with 2
    responses each whose ``sft_logprob`` is the SFT model's own (so step 1 of DPO is at loss ln 2)."""
    import torch

    from conftest import make_llama, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lora-sft")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = make_llama(tokenizer, seed=3, layers=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = [encode(f"user : the {w} was assistant :") for w in ("trip", "food", "hotel", "movie")]
    texts = ("it was good and nice", "it was bad", "great day", "awful service", "the food was fine", "sad end", "love it", "ugly")
    samples = []
    for i, text in enumerate(texts):
        prompt, response = prompt_ids[i // 2], encode(text) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        tokens = logits.gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()
        samples.append(
            {
                "prompt_index": i // 2,
                "response": text,
                "token_ids": response,
                "sft_logprob": sum(tokens),
                "sft_token_logprobs": tokens,
                "stop_reason": "eos",
            }
        )
    pairs = [{"prompt_index": i, "chosen": 2 * i, "rejected": 2 * i + 1} for i in range(4)]
    return folder, prompt_ids, samples, pairs


LORA = dict(lora_rank=4, lora_alpha=8.0, max_steps=2, batch_size=2, lr=5e-2, warmup_ratio=0.0, bf16=False, ld_alpha=None, rpo_alpha=None)


@pytest.mark.slow
@pytest.mark.parametrize("train_layers", [None, 1])
def test_lora_dpo_trains_merges_and_saves_a_plain_model(tiny_pairs, tmp_path, train_layers):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tqstar.smollm2.training import train_dpo

    sft_dir, prompt_ids, samples, pairs = tiny_pairs
    recipe = Smollm2Params(**LORA, train_layers=train_layers)
    out = tmp_path / "dpo"
    record = train_dpo(sft_dir, out, prompt_ids, samples, pairs, recipe, beta=0.1, seed=0)

    assert record["steps"] == 2 and record["log"][0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # step 1: policy = reference
    assert record["lora"] == {"rank": 4, "alpha": 8.0, "modules": recipe.lora_modules}
    assert set(record["seconds"]) == {"load", "train", "save"} and all(v >= 0 for v in record["seconds"].values())
    # a plain model folder: no adapter files, the SFT model's parameter names, loadable as any checkpoint
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).state_dict()
    dpo = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(sft_dir).get_vocab()
    weights = dpo.state_dict()
    assert set(weights) == set(sft) and not any("lora" in name for name in weights)
    changed = {name for name in weights if not torch.equal(weights[name], sft[name])}
    assert changed and all(name.rsplit(".", 2)[-2] in recipe.lora_modules for name in changed)  # only the adapted layers moved
    adapted = {int(name.split("layers.")[1].split(".")[0]) for name in changed}
    assert adapted == ({0, 1} if train_layers is None else {1})
    # the trainable parameters are the adapters': r * (in + out) per adapted linear layer
    config = dpo.config
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_block = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + m) + (m + h))
    assert record["trainable_params"] == per_block * len(adapted)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [{"ld_alpha": 0.5}, {"ld_alpha": 0.0}, {"bf16": True}])
def test_ld_dpo_and_bf16_start_at_the_reference(tiny_pairs, tmp_path, knobs):
    """Step 1 of DPO is at loss ln 2 (policy = reference) with LD-DPO's weighting (the pairs differ in length, so
    an unweighted reference would put the margin off zero) and under bf16 autocast (within its rounding)."""
    from tqstar.smollm2.training import train_dpo

    sft_dir, prompt_ids, samples, pairs = tiny_pairs
    assert any(len(samples[p["chosen"]]["token_ids"]) != len(samples[p["rejected"]]["token_ids"]) for p in pairs)
    record = train_dpo(sft_dir, tmp_path / "dpo", prompt_ids, samples, pairs, Smollm2Params(**{**LORA, **knobs}), beta=0.1, seed=0)
    assert record["log"][0]["loss"] == pytest.approx(0.6931, abs=2e-3 if "ld_alpha" in knobs else 2e-2)


@pytest.mark.slow
def test_rpo_adds_the_chosen_answers_nll_to_the_dpo_loss(tiny_pairs, tmp_path):
    """RPO: step 1 (policy = reference, DPO loss ln 2) adds rpo_alpha x the mean NLL per token of its batch's chosen
    answers (EOS included), which lies between the least and the largest of the pairs' own means."""
    import math

    from tqstar.smollm2.training import train_dpo

    sft_dir, prompt_ids, samples, pairs = tiny_pairs
    nll = [-sum(samples[p["chosen"]]["sft_token_logprobs"]) / len(samples[p["chosen"]]["token_ids"]) for p in pairs]
    record = train_dpo(sft_dir, tmp_path / "dpo", prompt_ids, samples, pairs, Smollm2Params(**{**LORA, "rpo_alpha": 2.0}), beta=0.1, seed=0)
    extra = record["log"][0]["loss"] - math.log(2)
    assert 2.0 * min(nll) - 2e-3 <= extra <= 2.0 * max(nll) + 2e-3 and min(nll) > 0.1


@pytest.mark.slow
def test_a_tiny_build_with_lora_and_an_instruction_records_its_timings(tmp_path_factory):
    """The build end to end with the new knobs: the prompts carry the instruction, DPO runs under bf16 autocast, the
    premise checks on the first held-out prompts only, the baselines are plain folders, and the manifest holds every
    stage's seconds, DPO's and the premise checks' by part, the ended share."""
    from transformers import AutoModelForCausalLM

    from tqstar.smollm2 import ensure_built

    from conftest import make_llama, make_tokenizer

    sft = tmp_path_factory.mktemp("tiny-smollm2-sft")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    make_llama(tokenizer, seed=1).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    recipe = Smollm2Params(
        sft_source=str(sft),
        n_train_prompts=8,
        n_test_prompts=4,
        samples_per_prompt=3,
        max_new_tokens=8,
        max_steps=2,
        batch_size=2,
        lr=1e-2,
        warmup_ratio=0.0,
        min_gap=0.0,
        bl_min_gap=0.0,
        premise_sft_samples=4,
        premise_policy_samples=2,
        lora_rank=2,
        instruction=BRIEF,
        bf16=True,
        premise_prompts=2,
        pairs_finished_only=False,  # a random tiny Llama never ends an answer
    )
    folder = ensure_built(0, tmp_path_factory.mktemp("tiny-smollm2-cache"), recipe, progress=False, num_threads=1)
    m = cache.load_manifest(folder)
    assert m["params"]["lora_rank"] == 2 and m["params"]["instruction"] == BRIEF
    assert m["params"]["bf16"] is True and m["params"]["premise_prompts"] == 2
    # the premise checks ran on the first 2 of the 4 held-out prompts
    test_ids = [json.loads(line)["id"] for line in (folder / "prompts" / "test.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (folder / "heldout" / "sft.jsonl").read_text().splitlines()]
    assert len(test_ids) == 4 and {r["prompt_id"] for r in sft_rows} == set(test_ids[:2]) and len(sft_rows) == 2 * 4
    assert m["premise"]["sft"]["target_reward"]["prompts"] == 2
    assert set(m["seconds"]) == {"prompts", "sft", "samples", "dpo", "dpo_bl", "premise", "total"}
    assert set(m["premise_seconds"]) == {"sft_samples", "dpo_samples", "dpo_bl_samples"}
    assert sum(m["premise_seconds"].values()) <= m["seconds"]["premise"] + 0.01
    for name in ("dpo", "dpo_bl"):
        assert set(m["training"][name]["seconds"]) == {"load", "train", "save"} and m["training"][name]["lora"]["rank"] == 2
        assert AutoModelForCausalLM.from_pretrained(folder / name).config.model_type == "llama"
        assert not (folder / name / "adapter_config.json").exists()
    share = m["sizes"]["samples_ended_share"]
    assert 0.0 <= share <= 1.0 and share == pytest.approx(m["sizes"]["samples_finished"] / m["sizes"]["samples"], abs=1e-4)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (folder / "prompts" / f"{split}.jsonl").read_text().splitlines()]
        assert rows and all(last_human_turn(r["prompt"]).strip().endswith(BRIEF) for r in rows)
