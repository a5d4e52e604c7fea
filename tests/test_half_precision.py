"""Half precision (bfloat16, float16) on the CPU: the engine against the reference oracle in the same dtype, and an HF
classifier reward loaded with `reward.dtype=bfloat16` against float32 (issue 26). Tiny models, seconds; the SmolLM2
check is in the slow tier.

Where the log-probs come from: `decoding/kv.py` upcasts each forward's last logits to float32 (`.float()`) before
anything reads them, so the engine's log_softmax, top-k, scores, greedy rollout argmax and sampling all run in float32
on the half-precision logits (the oracle does the same, `reference.py`); the HF reward upcasts its logits too
(`rewards/hf.py` `_values`). What half precision changes is the logits themselves: each is a rounded half value.
"""

from __future__ import annotations

import random

import pytest
import torch

from tqstar.decoding.engine import Decoder
from tqstar.decoding.reference import reference_decode
from tqstar.decoding.settings import DecoderSettings

from conftest import ASSISTANT, HUMAN, WORDS, make_llama, positive_words_reward

HALF = ("bfloat16", "float16")
ENGINE_PROMPTS = [  # test_engine.py's
    f"{HUMAN} the movie was bad{ASSISTANT}",
    f"{HUMAN} hotel{ASSISTANT}",
    f"{HUMAN} at first the food was awful but then it was great , the service was fine{ASSISTANT}",
]


def length_reward(prompts, responses):  # test_engine.py's baseline reward r_bl
    return [0.1 * len(r.split()) for r in responses]


# The engine tests' three prompts, then 21 random word strings (1-12 words) of a fixed seed: 24 prompts, one batch.
_rng = random.Random(0)
PROMPTS = list(ENGINE_PROMPTS) + [
    f"{HUMAN} " + " ".join(_rng.choice(WORDS) for _ in range(_rng.randint(1, 12))) + ASSISTANT for _ in range(21)
]
SETTINGS = dict(top_k=4, max_new_tokens=10, rollout_max_new_tokens=4, batch_size=len(PROMPTS), alpha=2.0)


@pytest.fixture(scope="module")
def half_models(tokenizer):
    """dtype name -> (SFT, baseline): the engine tests' tiny Llamas (seeds 1, 2) cast to that dtype."""
    return {name: (make_llama(tokenizer, 1).to(getattr(torch, name)), make_llama(tokenizer, 2).to(getattr(torch, name))) for name in HALF}


def decode_both(models, tokenizer, **case):
    """The engine's generations of PROMPTS (traced) and the oracle's (text, ids) of each, in the models' dtype."""
    sft, baseline = models
    settings = DecoderSettings(**{**SETTINGS, **case, "trace": True})
    decoder = Decoder(
        sft, tokenizer, reward=positive_words_reward, baseline_model=baseline, baseline_reward=length_reward, settings=settings
    )
    fast = decoder.decode(PROMPTS)
    oracle = [reference_decode(p, sft, tokenizer, decoder.reward, decoder.settings, baseline, decoder.baseline_reward) for p in PROMPTS]
    return fast, oracle


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["sft", "args"])
def test_engine_equals_the_oracle_without_rollouts(method, dtype, half_models, tokenizer):
    """No rollouts (plain greedy, ARGS's partial rewards): the engine's tokens are exactly the oracle's in half
    precision too, on 24 prompts of 1-20 words decoded together (left padding, KV cache vs re-encoding)."""
    fast, oracle = decode_both(half_models[dtype], tokenizer, method=method)
    for generation, (text, ids) in zip(fast, oracle):
        assert generation.token_ids == ids
        assert generation.response == text


@pytest.mark.parametrize("dtype", HALF)
def test_log_probs_are_float32_on_half_precision_logits(dtype, half_models, tokenizer):
    """The engine's log pi_sft of each chosen token is log_softmax in float32 of the model's half logits (the oracle's
    way), not rounded to the half dtype (a softmax in bfloat16 would give values on its 8-bit-mantissa grid). Equal to the
    oracle's within 0.05, not to float32 rounding: the engine's logits come from a KV cache fed one token at a time and
    the oracle's from re-encoding the sequence, each rounded to the half dtype (measured differences up to 0.003)."""
    sft, _ = half_models[dtype]
    half = getattr(torch, dtype)
    fast, _ = decode_both(half_models[dtype], tokenizer, method="sft")
    on_half_grid = total = 0
    for prompt, generation in zip(PROMPTS[:6], fast):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for t, (token, logprob) in enumerate(zip(generation.token_ids, generation.sft_logprobs)):
            with torch.no_grad():
                logits = sft(input_ids=torch.tensor([prompt_ids + generation.token_ids[:t]])).logits[0, -1]
            assert logits.dtype == half
            expected = float(torch.log_softmax(logits.float(), dim=-1)[token])
            assert logprob == pytest.approx(expected, abs=0.05)
            on_half_grid += float(torch.tensor(logprob).to(half).float()) == logprob
            total += 1
    assert total >= 20 and on_half_grid < total / 2


ROLLOUT_CASES = [dict(method="cd"), dict(method="tqstar"), dict(method="tqstar", transfer="indirect")]


@pytest.mark.slow  # 6 decodes with the oracle beside them (about 15 s): the fast tier keeps SFT, ARGS and the reward
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_rollout_methods_match_the_oracle_but_for_half_precision_ties(case, dtype, half_models, tokenizer):
    """Rollout methods (CD, TQ* direct and indirect) in half precision: the engine's tokens are the oracle's on most
    prompts, and where they part, the proposer's top-k and log-probs at that step are the oracle's: the difference
    comes from the rollouts.

    Why they can part: a greedy rollout is an argmax over half-precision logits, and bfloat16 keeps 8 bits of mantissa,
    so logits of 4-8 sit on a grid of 1/32 and two tokens often tie exactly or within one step of it (seen here: a
    rollout step with tokens 11 and 4 both at 4.75). The engine computes a rollout's keys and values another way than
    the oracle (a KV cache fed one token at a time, forked into k x n padded rows, shared-prefix attention, vs
    generate() re-encoding the sequence), each rounded to the half dtype, so a near-tie can go the other way; one
    rollout token more or less of a positive word changes Q by a whole reward unit, alpha=2 times that changes the
    choice, and the response then continues from another prefix. The tiny models' greedy paths are short and
    repetitive, which makes such ties common; float32 has 16 more mantissa bits and matches exactly (test_engine.py).

    Measured on this machine (24 prompts, 10 tokens each, k=4, L=4): bfloat16 parts on 2/24 prompts for CD (4 of 112
    tokens from the first difference on), 4/24 for TQ* direct (28/192), 3/24 for indirect (18/212); float16 (10 bits
    of mantissa) on 0/24, 0/24 and 2/24 (10/212). Bounds asserted: at most a third of the prompts part, and at most a
    quarter of all tokens lie at or after a prompt's first difference."""
    fast, oracle = decode_both(half_models[dtype], tokenizer, **case)
    sft = half_models[dtype][0]
    parted = after = total = 0
    for prompt, generation, (_, ids) in zip(PROMPTS, fast, oracle):
        length = max(len(ids), len(generation.token_ids))
        total += length
        t = first_difference(generation.token_ids, ids)
        if t is None:
            continue
        parted += 1
        after += length - t
        assert t < min(len(ids), len(generation.token_ids)), "one side stopped without choosing another token"
        step = generation.trace[t]
        with torch.no_grad():  # the oracle's proposal at that step: the same prefix, so the same top-k and log-probs
            logits = sft(input_ids=torch.tensor([tokenizer(prompt)["input_ids"] + ids[:t]])).logits[0, -1]
        top = torch.log_softmax(logits.float(), dim=-1).topk(SETTINGS["top_k"])
        # (as sets: tied log-probs, frequent in half precision, may come in another order; values within the half
        # dtype's rounding of the two ways of computing the logits, as in the test above)
        assert {s.strip() for s in step["tokens"]} == {tokenizer.decode([z]).strip() for z in top.indices.tolist()}
        assert sorted(step["logprobs"]) == pytest.approx(sorted(top.values.tolist()), abs=0.05)
    assert parted <= len(PROMPTS) / 3, f"{parted}/{len(PROMPTS)} prompts parted"
    assert after <= total / 4, f"{after}/{total} tokens at or after a first difference"


# ----------------------------------------------------------------------------- an HF classifier reward in bfloat16

PROMPT = "the movie was bad and the food was awful but then the service was fine"


@pytest.fixture(scope="module")
def sharp_classifier_dir(tmp_path_factory):
    """A tiny GPT-NeoX one-logit classifier (the pythia reward models' architecture, a BPE tokenizer without a pad
    token) whose score head is scaled x40 so its logits spread over about +-5 (random init gives +-0.1, too flat for
    a tolerance to mean anything), saved by path in float32."""
    from test_reward_prefix_cache import make_bpe_tokenizer, make_classifier

    tokenizer = make_bpe_tokenizer()
    model = make_classifier("gpt_neox", len(tokenizer))
    with torch.no_grad():
        model.score.weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("rm-bf16") / "rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reward_rows():
    """Decoding's pattern: k x n rows of a prompt sharing an accepted prefix (the prefix cache's case), plus others."""
    accepted = " the food was good and"
    tails = [" great", " bad day", " fine , the movie", " hate", " love it", " poor", " nice trip", " sad"]
    prompts = [PROMPT] * 8 + ["the day"] * 3 + ["it was"]
    responses = [accepted + t for t in tails] + [" good", " bad", " awful hotel"] + [" fine"]
    return prompts, responses


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_a_bfloat16_reward_scores_near_float32_with_and_without_its_prefix_cache(output, sharp_classifier_dir):
    """reward.dtype=bfloat16 through build_reward: each score within 0.1 of float32's for the logit (scores spread over
    about +-7; bfloat16's relative step is 2^-8; measured max difference 0.016) and within 0.01 for the probability
    (measured 0.0014), the order of rows more than twice the tolerance apart kept; and the prefix-cache path (less than
    half the tokens read) agrees with encoding every text whole in bfloat16 within 0.01 (logit; 0.001 probability).
    Measured: equal (0.0) here; both are bfloat16, but the cached prefix's keys and values come from another batch
    shape, which may round differently on another CPU."""
    from test_rewards import hf_cfg

    from tqstar.rewards import build_reward

    prompts, responses = reward_rows()
    f32 = build_reward(hf_cfg(sharp_classifier_dir, output=output))(prompts, responses)
    cached = build_reward(hf_cfg(sharp_classifier_dir, dtype="bfloat16", output=output))
    whole = build_reward(hf_cfg(sharp_classifier_dir, dtype="bfloat16", output=output, prefix_cache=False))
    assert cached.model.dtype == whole.model.dtype == torch.bfloat16
    assert cached.prefix_cache and not whole.prefix_cache
    with_cache, without = cached(prompts, responses), whole(prompts, responses)
    assert sum(cached.last_tokens) < sum(whole.last_tokens) / 2  # the cache was used
    tolerance, cache_tolerance = (0.1, 0.01) if output == "logit" else (0.01, 0.001)
    assert max(abs(v) for v in f32) > (2.0 if output == "logit" else 0.0)  # the scores are not flat
    assert without == pytest.approx(f32, abs=tolerance)
    assert with_cache == pytest.approx(without, abs=cache_tolerance)
    for i in range(len(f32)):
        for j in range(len(f32)):
            if f32[i] > f32[j] + 2 * tolerance:
                assert without[i] > without[j] and with_cache[i] > with_cache[j]


# ----------------------------------------------------------------------------- SmolLM2 in bfloat16 (slow)

SMOLLM2_PROMPTS = [
    "\n\nHuman: How do I make a good cup of tea?\n\nAssistant:",
    "\n\nHuman: My neighbour's dog barks all night. What should I do?\n\nAssistant:",
    "\n\nHuman: Can you suggest a weekend trip near the mountains?\n\nAssistant:",
]


def smollm2_bfloat16(method: str):
    """SmolLM2-135M-Instruct (the packaged GGUF, dequantised to bfloat16 on the CPU) as SFT and baseline, VADER reward,
    k=4, rollouts of 6 tokens, 8 new tokens, the three prompts decoded together: (engine generations, oracle ids)."""
    from omegaconf import OmegaConf

    from tqstar.models import load_model
    from tqstar.rewards import build_reward

    loaded = load_model(OmegaConf.create({"name_or_path": "packaged:smollm2", "dtype": "bfloat16", "device": "cpu"}), "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.dtype == torch.bfloat16
    reward = build_reward(OmegaConf.create({"type": "vader", "stop_strings": ["\n\nHuman:"]}))
    settings = DecoderSettings(method=method, top_k=4, alpha=1.0, max_new_tokens=8, rollout_max_new_tokens=6, batch_size=3, trace=True)
    decoder = Decoder(model, tokenizer, reward=reward, baseline_model=model, settings=settings)
    fast = decoder.decode(SMOLLM2_PROMPTS)
    oracle = [reference_decode(prompt, model, tokenizer, reward, decoder.settings, model)[1] for prompt in SMOLLM2_PROMPTS]
    return fast, oracle, tokenizer


@pytest.mark.slow
def test_smollm2_in_bfloat16_greedy_equals_the_oracle():
    """Plain greedy decoding of SmolLM2 in bfloat16: exactly the oracle's tokens (measured so here)."""
    fast, oracle, _ = smollm2_bfloat16("sft")
    assert [g.token_ids for g in fast] == oracle


@pytest.mark.slow
def test_smollm2_in_bfloat16_tqstar_parts_from_the_oracle_only_at_near_ties():
    """TQ* on SmolLM2 in bfloat16 does not match the oracle token for token: measured here, 2 of the 3 prompts part
    (at response steps 3 and 0). Why: SmolLM2's logits are of order 10-20, where bfloat16's step is 1/16-1/8, and
    the engine's forwards (three left-padded prompts in one batch, KV caches fed a token at a time, rollout rows forked
    from them) round otherwise than the oracle's (one prompt re-encoded whole, generate()); the proposer's log-probs
    moved by ~0.03 between batch sizes 3 and 1 here, and the rollouts, hence VADER's Q, move too, while the top two
    scores were 0.03 and 0.1 apart. So the test asserts what explains a parting: at a prompt's first difference the
    oracle's token is among the engine's k candidates and its engine score is within 0.5 of the best (a near-tie
    under bfloat16's error), and the tokens before it are the same (they are by definition)."""
    fast, oracle, tokenizer = smollm2_bfloat16("tqstar")
    for generation, ids in zip(fast, oracle):
        t = first_difference(generation.token_ids, ids)
        if t is None:
            continue
        assert t < min(len(ids), len(generation.token_ids))
        step = generation.trace[t]
        wanted = tokenizer.decode([ids[t]])
        assert wanted in step["tokens"], f"the oracle's token {wanted!r} is not among the engine's candidates {step['tokens']}"
        assert max(step["scores"]) - step["scores"][step["tokens"].index(wanted)] <= 0.5
