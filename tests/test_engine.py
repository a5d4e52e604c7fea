"""Properties of the decoding engine: one property per test, tiny models, seconds each."""

from __future__ import annotations

import math

import pytest
import torch

from tqstar.decoding.engine import Decoder
from tqstar.decoding.reference import reference_decode
from tqstar.decoding.settings import DecoderSettings

from conftest import ASSISTANT, HUMAN, positive_words_reward, tiny_model, vocab_size_of
from toy import ToyLM

PROMPTS = [
    f"{HUMAN} the movie was bad{ASSISTANT}",
    f"{HUMAN} hotel{ASSISTANT}",
    f"{HUMAN} at first the food was awful but then it was great , the service was fine{ASSISTANT}",
]


def length_reward(prompts, responses):
    return [0.1 * len(r.split()) for r in responses]


def make_decoder(sft_model, tokenizer, baseline_model=None, **settings):
    defaults = dict(top_k=4, max_new_tokens=10, rollout_max_new_tokens=4, batch_size=3)
    return Decoder(
        sft_model,
        tokenizer,
        reward=positive_words_reward,
        baseline_model=baseline_model,
        baseline_reward=length_reward,
        settings=DecoderSettings(**{**defaults, **settings}),
    )


def sft_greedy(sft_model, tokenizer, prompts=PROMPTS, max_new_tokens=10):
    return [g.token_ids for g in make_decoder(sft_model, tokenizer, method="sft", max_new_tokens=max_new_tokens).decode(prompts)]


@pytest.mark.parametrize("method", ["args", "cd", "tqstar"])
def test_alpha_zero_is_sft_greedy(method, sft_model, baseline_model, tokenizer):
    decoder = make_decoder(sft_model, tokenizer, baseline_model, method=method, alpha=0.0)
    assert [g.token_ids for g in decoder.decode(PROMPTS)] == sft_greedy(sft_model, tokenizer)


@pytest.mark.parametrize("method", ["args", "cd", "tqstar"])
def test_top_k_one_is_sft_greedy(method, sft_model, baseline_model, tokenizer):
    decoder = make_decoder(sft_model, tokenizer, baseline_model, method=method, top_k=1, alpha=5.0)
    assert [g.token_ids for g in decoder.decode(PROMPTS)] == sft_greedy(sft_model, tokenizer)


CASES = [
    dict(method="sft"),
    dict(method="baseline"),
    dict(method="args", alpha=2.0),
    dict(method="cd", alpha=2.0),
    dict(method="tqstar", alpha=2.0),
    dict(method="tqstar", alpha=2.0, max_batch_rows=3),  # chunks split a prompt's candidates
    dict(method="tqstar", alpha=2.0, transfer="indirect"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_engine_equals_reference_oracle(case, sft_model, baseline_model, tokenizer):
    """Greedy: the KV-cached, batched engine picks exactly the oracle's tokens, prompts of different lengths together."""
    decoder = make_decoder(sft_model, tokenizer, baseline_model, **case)
    fast = decoder.decode(PROMPTS)
    for prompt, generation in zip(PROMPTS, fast):
        text, ids = reference_decode(
            prompt, sft_model, tokenizer, decoder.reward, decoder.settings, baseline_model, decoder.baseline_reward
        )
        assert generation.token_ids == ids
        assert generation.response == text


def test_batch_size_does_not_change_greedy_tokens(sft_model, baseline_model, tokenizer):
    together = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", batch_size=3).decode(PROMPTS)
    alone = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", batch_size=1).decode(PROMPTS)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


@pytest.mark.parametrize("method", ["sft", "tqstar", "best_of_n"])
def test_sampling_with_a_fixed_seed_is_reproducible(method, sft_model, baseline_model, tokenizer):
    settings = dict(method=method, selection="sample", rollout_selection="sample", seed=7, n=3)
    first = make_decoder(sft_model, tokenizer, baseline_model, **settings).decode(PROMPTS)
    second = make_decoder(sft_model, tokenizer, baseline_model, **settings, batch_size=1).decode(PROMPTS)
    other = make_decoder(sft_model, tokenizer, baseline_model, **{**settings, "seed": 8}).decode(PROMPTS)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    for generation in first:
        assert generation.policy_logprobs is not None and len(generation.policy_logprobs) == generation.num_tokens


def test_token_limit_and_logprob_records(sft_model, tokenizer):
    for generation in make_decoder(sft_model, tokenizer, method="cd", max_new_tokens=3).decode(PROMPTS):
        assert 1 <= generation.num_tokens <= 3
        assert len(generation.sft_logprobs) == generation.num_tokens
        assert all(v <= 0 for v in generation.sft_logprobs)
        assert generation.policy_logprobs is None  # greedy: the decoding policy is a point mass


def test_best_of_n_keeps_the_highest_reward_sample(sft_model, tokenizer):
    decoder = make_decoder(sft_model, tokenizer, method="best_of_n", n=4, selection="sample")
    for generation in decoder.decode(PROMPTS):
        rewards = generation.extra["best_of_n_rewards"]
        assert len(rewards) == 4
        assert positive_words_reward([""], [generation.response])[0] == max(rewards)


# ----------------------------------------------------------------------------- toy, hand-computed


def toy_setup(tokenizer):
    """From the prompt's last token, 'fine' (p=.6) or 'awful' (p=.3). 'fine' ends at once (+1);
    'awful' leads deterministically to 'but then wonderful great love' (-1 +1 +1 +1 = +2)."""
    ids = tokenizer.convert_tokens_to_ids
    assistant, eos = ids(ASSISTANT), tokenizer.eos_token_id
    chain = ["awful", "but", "then", "wonderful", "great", "love"]
    transitions = {assistant: {ids("fine"): 0.6, ids("awful"): 0.3}, ids("fine"): {eos: 0.99}, ids("love"): {eos: 0.99}}
    for a, b in zip(chain, chain[1:]):
        transitions[ids(a)] = {ids(b): 0.99}
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    return ToyLM(vocab_size, transitions, default={eos: 0.99}), f"{HUMAN} hotel{ASSISTANT}"


@pytest.mark.parametrize("method,expected_first", [("tqstar", "awful"), ("cd", "awful"), ("args", "fine")])
def test_lookahead_finds_the_reward_behind_an_unlikely_first_token(method, expected_first, tokenizer):
    toy, prompt = toy_setup(tokenizer)
    decoder = Decoder(
        toy,
        tokenizer,
        reward=positive_words_reward,
        baseline_model=toy,
        settings=DecoderSettings(method=method, top_k=2, alpha=1.0, max_new_tokens=8, rollout_max_new_tokens=6),
    )
    generation = decoder.decode([prompt])[0]
    assert generation.response.split()[0] == expected_first
    if expected_first == "awful":
        assert generation.response == "awful but then wonderful great love"


def rbl(prompts, responses):
    return [0.5 * len(r.split()) for r in responses]


@pytest.mark.parametrize("transfer", ["direct", "indirect"])
def test_q_matches_hand_computation(transfer, tokenizer):
    """Two-step toy: candidate z then one deterministic rollout token; Q by hand from r and r_bl.
    (The self-normalised estimator needs distinct rollouts: test_indirect_q_weights_distinct_sampled_rollouts.)"""
    toy, prompt = toy_setup(tokenizer)
    settings = DecoderSettings(
        method="tqstar", top_k=2, alpha=1.0, max_new_tokens=1, rollout_max_new_tokens=1, transfer=transfer, beta_bl=2.0, trace=True
    )
    decoder = Decoder(toy, tokenizer, reward=positive_words_reward, baseline_model=toy, baseline_reward=rbl, settings=settings)
    step = decoder.decode([prompt])[0].trace[0]
    expected = {}
    # 'fine' + EOS: r = 1, r_bl = 0.5 ; 'awful' + 'but': r = -1, r_bl = 1.0
    for word, r, r_bl in (("fine", 1.0, 0.5), ("awful", -1.0, 1.0)):
        w = math.exp((r - r_bl) / 2.0)
        expected[word] = r if transfer == "direct" else w * r
    got = dict(zip([t.strip() for t in step["tokens"]], step["q"]))
    assert got == pytest.approx(expected, abs=1e-6)
    assert step["scores"] == pytest.approx([lp + q for lp, q in zip(step["logprobs"], step["q"])], abs=1e-5)


@pytest.mark.parametrize("self_normalize", [False, True])
def test_indirect_q_weights_distinct_sampled_rollouts(self_normalize, sft_model, baseline_model, tokenizer):
    """Indirect Q from n sampled rollouts that differ: each candidate's Q is the importance-weighted
    reduction of its own rollouts' r and r_bl (identical rollouts would make any weighting look right)."""
    settings = DecoderSettings(
        method="tqstar",
        transfer="indirect",
        self_normalize=self_normalize,
        beta_bl=0.5,
        top_k=3,
        max_new_tokens=2,
        rollout_num=4,
        rollout_selection="sample",
        rollout_max_new_tokens=4,
        trace=True,
    )
    decoder = Decoder(
        sft_model, tokenizer, reward=positive_words_reward, baseline_model=baseline_model, baseline_reward=length_reward, settings=settings
    )
    distinct = 0
    for generation in decoder.decode(PROMPTS):
        for step in generation.trace:
            for q, rewards, baseline in zip(step["q"], step["rollout_rewards"], step["rollout_baseline_rewards"]):
                weights = [math.exp((r - b) / 0.5) for r, b in zip(rewards, baseline)]
                if self_normalize:
                    expected = sum(w * r for w, r in zip(weights, rewards)) / sum(weights)
                else:
                    expected = sum(w * r for w, r in zip(weights, rewards)) / len(rewards)
                assert q == pytest.approx(expected, rel=1e-5, abs=1e-6)
                distinct += len(set(zip(rewards, baseline))) > 1 and len(set(weights)) > 1
    assert distinct >= 3, "the rollouts must differ for this test to tell the estimators apart"


def test_stop_string_ends_and_is_cut(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    assistant = ids(ASSISTANT)
    transitions = {assistant: {ids("good"): 0.9}, ids("good"): {ids(HUMAN): 0.9}, ids(HUMAN): {ids("bad"): 0.9}}
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    toy = ToyLM(vocab_size, transitions, default={ids("bad"): 0.9})
    generation = Decoder(toy, tokenizer, settings=DecoderSettings(method="sft", max_new_tokens=10)).decode([f"{HUMAN} hi{ASSISTANT}"])[0]
    assert generation.stop_reason == "stop_string"
    assert generation.response.strip() == "good"
    assert generation.num_tokens == 2


def test_needs_a_reward_and_a_baseline(sft_model, tokenizer):
    with pytest.raises(ValueError, match="needs a reward"):
        Decoder(sft_model, tokenizer, settings=DecoderSettings(method="cd"))
    with pytest.raises(ValueError, match="needs a baseline"):
        Decoder(sft_model, tokenizer, reward=positive_words_reward, settings=DecoderSettings(method="tqstar"))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_architectures_match_the_oracle(family, tokenizer):
    """GPT-2 (learned positions) and GPT-NeoX (rotary, pythia) through the same cache code."""
    sizes = {} if family == "gpt2" else dict(max_position_embeddings=128)
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = tiny_model(family, vocab_size_of(tokenizer), seed=3, sharpen=20.0, **sizes, **ids)
    model = model.double().eval()
    decoder = make_decoder(model, tokenizer, model, method="tqstar", alpha=2.0)
    for prompt, generation in zip(PROMPTS, decoder.decode(PROMPTS)):
        assert generation.token_ids == reference_decode(prompt, model, tokenizer, decoder.reward, decoder.settings, model)[1]


def test_counters_add_up(sft_model, baseline_model, tokenizer):
    decoder = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", rollout_max_new_tokens=3)
    generations = decoder.decode(PROMPTS)
    steps = sum(g.num_tokens for g in generations)
    assert decoder.counters["reward_calls"] == steps * 4  # one per candidate per step
    assert 0 < decoder.counters["rollout_tokens"] <= steps * 4 * 3
    assert decoder.counters["sft_forward_tokens"] > 0 and decoder.counters["baseline_forward_tokens"] >= decoder.counters["rollout_tokens"]


def test_out_of_memory_halves_the_chunk_and_gives_the_same_tokens(sft_model, baseline_model, tokenizer, monkeypatch):
    """A candidate batch that does not fit is split in halves and retried; the result is unchanged."""
    from tqstar.decoding import kv

    expected = [g.token_ids for g in make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", alpha=2.0).decode(PROMPTS)]
    original = kv.KVStream.fork

    def fork_with_small_memory(self, rows, **options):
        if rows.shape[0] > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(self, rows, **options)

    monkeypatch.setattr(kv.KVStream, "fork", fork_with_small_memory)
    decoder = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", alpha=2.0, max_batch_rows=12)
    assert [g.token_ids for g in decoder.decode(PROMPTS)] == expected
    assert decoder.chunk_rows == 3 and decoder.oom_retries == 2


@pytest.mark.parametrize("rollout_selection", ["greedy", "sample"])
def test_finished_rollout_rows_carried_in_the_batch_change_nothing(sft_model, baseline_model, tokenizer, rollout_selection):
    """Rollouts that stop early (here at '.' or '!') stay in the batch until a quarter of the rows are done;
    one rollout per forward pass (nothing carried) gives the same tokens, Q values and rollout-token count."""
    settings = dict(
        method="tqstar",
        alpha=2.0,
        rollout_max_new_tokens=8,
        rollout_num=2 if rollout_selection == "sample" else 1,
        rollout_selection=rollout_selection,
        stop_strings=["\n\nHuman:", ".", "!"],
        trace=True,
    )
    batched = make_decoder(sft_model, tokenizer, baseline_model, **settings)
    one_row = make_decoder(sft_model, tokenizer, baseline_model, max_batch_rows=1, **settings)
    a, b = batched.decode(PROMPTS), one_row.decode(PROMPTS)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga.trace, gb.trace):
            assert sa["q"] == pytest.approx(sb["q"], abs=1e-5)
    steps = sum(g.num_tokens for g in a)
    assert (
        batched.counters["rollout_tokens"] == one_row.counters["rollout_tokens"] < steps * 4 * settings["rollout_num"] * 8
    )  # some ended early
    assert batched.counters["baseline_forward_tokens"] >= one_row.counters["baseline_forward_tokens"]


def test_settings_that_change_nothing_are_refused():
    from tqstar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"decoder.rollout.num=4 with decoder.rollout.selection=greedy"):
        DecoderSettings(method="cd", rollout_num=4)
    with pytest.raises(ConfigError, match=r"decoder.self_normalize=true with decoder.rollout.num=1"):
        DecoderSettings(method="tqstar", transfer="indirect", self_normalize=True)
    with pytest.raises(ConfigError, match=r"decoder.rollout.top_k=3 truncates sampled rollouts"):
        DecoderSettings(method="cd", rollout_top_k=3)
    with pytest.raises(ConfigError, match=r"decoder.sample_top_k=3 truncates sampling"):
        DecoderSettings(method="sft", sample_top_k=3)
    with pytest.raises(ConfigError, match=r"decoder.sample_top_k=0 is not allowed"):
        DecoderSettings(method="sft", selection="sample", sample_top_k=0)
    DecoderSettings(method="sft", rollout_num=4)  # rollout knobs of a method without rollouts are inert, not contradictory
    DecoderSettings(method="sft", rollout_top_k=4)
    DecoderSettings(method="cd", sample_top_k=4)  # a valued method proposes decoder.top_k candidates: inert
    DecoderSettings(method="best_of_n", sample_top_k=4)  # best-of-n always samples
    DecoderSettings(method="tqstar", transfer="indirect", self_normalize=True, rollout_num=2, rollout_selection="sample")


@pytest.mark.parametrize("rollout_selection", ["greedy", "sample"])
def test_tqstar_with_the_sft_model_as_baseline_is_cd(rollout_selection, sft_model, tokenizer):
    """Rolling out the SFT model is controlled decoding: TQ* with baseline = SFT equals CD token for token."""
    knobs = dict(alpha=2.0, rollout_selection=rollout_selection, rollout_num=2 if rollout_selection == "sample" else 1, trace=True)
    tqstar = make_decoder(sft_model, tokenizer, sft_model, method="tqstar", **knobs).decode(PROMPTS)
    cd = make_decoder(sft_model, tokenizer, method="cd", **knobs).decode(PROMPTS)
    assert [g.token_ids for g in tqstar] == [g.token_ids for g in cd]
    assert [[step["q"] for step in g.trace] for g in tqstar] == [[step["q"] for step in g.trace] for g in cd]


def never_ending_toy(tokenizer):
    """'the' (p .6) or 'a' (p .3) after every token, never EOS: rollouts always run their full length."""
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    return ToyLM(vocab_size, {}, default={ids("the"): 0.6, ids("a"): 0.3})


@pytest.mark.parametrize(
    "method,expected",
    [
        # one prompt of P tokens, k=2, L=3, two response tokens (the second step feeds nothing: it is the last)
        ("sft", lambda P: {"sft_forward_tokens": P + 1, "baseline_forward_tokens": 0, "rollout_tokens": 0, "reward_calls": 0}),
        ("baseline", lambda P: {"sft_forward_tokens": P + 1, "baseline_forward_tokens": P + 1, "rollout_tokens": 0, "reward_calls": 0}),
        (
            "args",
            lambda P: {
                "sft_forward_tokens": P + 1,
                "baseline_forward_tokens": 0,
                "rollout_tokens": 0,
                "reward_calls": 4,
                "candidates_valued": 4,
            },
        ),
        # cd rolls out the SFT model from the proposer's own cache: 2 candidates x 3 tokens per step, in sft's count
        (
            "cd/no-reuse",
            lambda P: {
                "sft_forward_tokens": P + 1 + 2 * 6,
                "baseline_forward_tokens": 0,
                "rollout_tokens": 12,
                "reward_calls": 4,
                "candidates_valued": 4,
            },
        ),
        (
            "tqstar/no-reuse",
            lambda P: {
                "sft_forward_tokens": P + 1,
                "baseline_forward_tokens": P + 1 + 2 * 6,
                "rollout_tokens": 12,
                "reward_calls": 4,
                "candidates_valued": 4,
            },
        ),
        # with rollout reuse (the default): step 1 chooses 'the', whose rollout was 'the the the'; at step 2 the candidate
        # 'the' takes 'the the' from it (2 reused) and computes one token (1 fed, 1 generated); 'a' rolls out 3 as before
        (
            "cd",
            lambda P: {
                "sft_forward_tokens": P + 1 + 6 + 3 + 1,
                "baseline_forward_tokens": 0,
                "rollout_tokens": 10,
                "rollout_tokens_reused": 2,
                "reward_calls": 4,
                "candidates_valued": 4,
            },
        ),
        (
            "tqstar",
            lambda P: {
                "sft_forward_tokens": P + 1,
                "baseline_forward_tokens": P + 1 + 6 + 3 + 1,
                "rollout_tokens": 10,
                "rollout_tokens_reused": 2,
                "reward_calls": 4,
                "candidates_valued": 4,
            },
        ),
        # best-of-2: two sampled responses of two tokens each (P + 1 fed each), both ranked by the reward
        ("best_of_n", lambda P: {"sft_forward_tokens": 2 * (P + 1), "baseline_forward_tokens": 0, "rollout_tokens": 0, "reward_calls": 2}),
    ],
)
def test_costs_match_a_hand_count_and_add_up(method, expected, tokenizer):
    toy, other = never_ending_toy(tokenizer), never_ending_toy(tokenizer)  # two objects: separate caches
    prompt = f"{HUMAN} hotel{ASSISTANT}"
    P = len(tokenizer(prompt)["input_ids"])
    method, _, no_reuse = method.partition("/")
    settings = DecoderSettings(method=method, top_k=2, rollout_max_new_tokens=3, max_new_tokens=2, n=2, reuse_rollouts=not no_reuse)
    decoder = Decoder(toy, tokenizer, reward=positive_words_reward, baseline_model=other, settings=settings)
    (generation,) = decoder.decode([prompt])
    assert generation.num_tokens == 2
    # a Python reward reads no tokens; it has no bounds, so nothing is pruned
    want = {"candidates_valued": 0, "rollout_tokens_reused": 0, **expected(P), "reward_tokens": 0, "candidates_pruned": 0}
    assert generation.cost == want
    assert decoder.counters == want  # one prompt: the run's counters are its cost
    # several prompts in one batch: the per-response costs add up to the counters
    batch = Decoder(toy, tokenizer, reward=positive_words_reward, baseline_model=other, settings=settings)
    generations = batch.decode([prompt, f"{HUMAN} the movie was bad{ASSISTANT}", prompt])
    assert {k: sum(g.cost[k] for g in generations) for k in want} == batch.counters


# ----------------------------------------------------------------------------- exact bound pruning (decoder.prune)


def bounded_reward(prompts, responses):
    """positive_words_reward / 3, clipped to [-1, 1]: a reward with declared bounds."""
    return [max(-1.0, min(1.0, v / 3)) for v in positive_words_reward(prompts, responses)]


def bounded_decoder(sft_model, tokenizer, baseline_model=None, bounds=(-1.0, 1.0), **settings):
    from tqstar.rewards import FunctionReward

    defaults = dict(top_k=4, max_new_tokens=6, rollout_max_new_tokens=3, batch_size=3, alpha=1.0)
    return Decoder(
        sft_model,
        tokenizer,
        reward=FunctionReward(bounded_reward, bounds=bounds),
        baseline_model=baseline_model,
        baseline_reward=length_reward,
        settings=DecoderSettings(**{**defaults, **settings}),
    )


PRUNE_CASES = [
    dict(method="cd"),
    dict(method="tqstar"),
    dict(method="tqstar", rollout_selection="sample", rollout_num=2),  # each rollout row draws its own noise
    dict(method="cd", value="soft", beta=0.5),  # beta log mean e^{r/beta} is within [lo, hi]
    dict(method="tqstar", transfer="indirect", self_normalize=True, rollout_selection="sample", rollout_num=2),
]


@pytest.mark.parametrize("case", PRUNE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pruning_gives_the_same_greedy_tokens_with_fewer_rollouts(case, sft_model, baseline_model, tokenizer):
    """decoder.prune skips candidates whose best reachable score, l_i + alpha * hi, is below a valued one's:
    the same tokens as valuing every candidate, the same Q where valued, fewer rollouts and reward calls."""
    pruning = bounded_decoder(sft_model, tokenizer, baseline_model, trace=True, **case)
    full = bounded_decoder(sft_model, tokenizer, baseline_model, trace=True, prune=False, **case)
    assert pruning.q_upper is not None and full.q_upper is None
    a, b = pruning.decode(PROMPTS), full.decode(PROMPTS)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    steps = sum(g.num_tokens for g in a)
    valued, pruned = pruning.counters["candidates_valued"], pruning.counters["candidates_pruned"]
    assert pruned > 0 and valued + pruned == steps * 4
    assert full.counters["candidates_valued"] == steps * 4 and full.counters["candidates_pruned"] == 0
    n = case.get("rollout_num", 1)
    assert pruning.counters["reward_calls"] == valued * n * (2 if case.get("transfer") == "indirect" else 1)
    assert pruning.counters["rollout_tokens"] < full.counters["rollout_tokens"]
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga.trace, gb.trace):
            assert sa["chosen"] == sb["chosen"] and sa["q"][sa["chosen"]] is not None
            for qa, qb, ra in zip(sa["q"], sb["q"], sa["rollout_rewards"]):
                assert (qa is None) == (ra is None)
                if qa is not None:
                    assert qa == pytest.approx(qb, abs=1e-6)
            # pruned candidates are a suffix of the top-k (log-probs fall), and each could not have won
            cut = [q is None for q in sa["q"]]
            assert cut == sorted(cut)
            for i, skipped in enumerate(cut):
                if skipped:
                    assert sb["scores"][i] <= sb["scores"][sb["chosen"]]  # (rounded in the trace; a later index loses ties)


def test_pruned_engine_equals_reference_oracle(sft_model, baseline_model, tokenizer):
    decoder = bounded_decoder(sft_model, tokenizer, baseline_model, method="tqstar")
    for prompt, generation in zip(PROMPTS, decoder.decode(PROMPTS)):
        assert generation.token_ids == reference_decode(prompt, sft_model, tokenizer, decoder.reward, decoder.settings, baseline_model)[1]
    assert decoder.counters["candidates_pruned"] > 0


def test_pruning_is_inactive_for_sampled_selection(sft_model, baseline_model, tokenizer):
    """selection=sample draws from softmax(score): every candidate matters, nothing is pruned (prune=true is no error)."""
    knobs = dict(method="tqstar", selection="sample", seed=5)
    on, off = (
        bounded_decoder(sft_model, tokenizer, baseline_model, **knobs),
        bounded_decoder(sft_model, tokenizer, baseline_model, prune=False, **knobs),
    )
    a, b = on.decode(PROMPTS), off.decode(PROMPTS)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.policy_logprobs for g in a] == [g.policy_logprobs for g in b]
    steps = sum(g.num_tokens for g in a)
    assert on.counters["candidates_pruned"] == 0 and on.counters["candidates_valued"] == steps * 4
    assert on.counters == off.counters


@pytest.mark.parametrize(
    "settings,bounds",
    [
        (dict(method="tqstar", selection="sample"), (-1.0, 1.0)),
        (dict(method="tqstar", transfer="indirect"), (-1.0, 1.0)),  # mean(w r): the weights are unbounded
        (dict(method="args"), (-1.0, 1.0)),  # no rollouts: valued in one reward call anyway
        (dict(method="cd", prune=False), (-1.0, 1.0)),
        (dict(method="cd"), None),  # a reward without bounds
    ],
)
def test_where_pruning_does_not_apply(settings, bounds, sft_model, baseline_model, tokenizer):
    decoder = bounded_decoder(sft_model, tokenizer, baseline_model, bounds=bounds, **settings)
    assert decoder.q_upper is None


def test_settings_say_where_q_is_within_the_reward_bounds():
    assert DecoderSettings(method="cd").prunes and DecoderSettings(method="cd", value="soft").prunes
    soft_transfer = dict(method="soft_transfer", value="soft", rollout_selection="sample", rollout_num=2)
    assert DecoderSettings(**soft_transfer, self_normalize=True).prunes  # sum_j w e^{r/beta} / sum_j w: within the bounds
    assert not DecoderSettings(**soft_transfer).prunes  # log weights are unbounded
    assert DecoderSettings(method="tqstar", transfer="indirect", self_normalize=True, rollout_num=2, rollout_selection="sample").prunes
    assert not DecoderSettings(method="tqstar", transfer="indirect").prunes
    assert not DecoderSettings(method="cd", selection="sample").prunes
    assert not DecoderSettings(method="cd", prune=False).prunes
    assert not DecoderSettings(method="sft").prunes and not DecoderSettings(method="best_of_n").prunes
    from tqstar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"decoder.prune='yes' is not allowed: must be true or false"):
        DecoderSettings(prune="yes")


def test_a_reward_outside_its_declared_bounds_stops_the_run(sft_model, baseline_model, tokenizer):
    from tqstar.errors import ConfigError
    from tqstar.rewards import RewardBoundsError

    decoder = bounded_decoder(sft_model, tokenizer, baseline_model, bounds=(0.5, 1.0), method="tqstar")
    with pytest.raises(RewardBoundsError) as info:
        decoder.decode(PROMPTS)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert "bounded_reward" in message and "[0.5, 1.0]" in message and "returned 0.0" in message


def test_reward_bounds_are_two_ordered_numbers():
    from tqstar.errors import ConfigError
    from tqstar.rewards import FunctionReward, check_bounds

    assert check_bounds(None) is None and check_bounds([0, 1]) == (0.0, 1.0) and check_bounds((-0.75, 1.0)) == (-0.75, 1.0)
    for bad, needle in (([1, 0], "lo <= hi"), ([0], "two finite numbers"), ("0,1", "two finite numbers"), ([0, float("inf")], "finite")):
        with pytest.raises(ConfigError, match=needle):
            check_bounds(bad, "reward.bounds")
    with pytest.raises(ConfigError, match=r"reward.bounds=\[2, 1\]"):
        FunctionReward(bounded_reward, bounds=[2, 1])
    assert FunctionReward(bounded_reward, bounds=[0, 0])([""], ["the movie"]) == [0.0]  # lo == hi is allowed (r_bl = 0)


def test_pruned_costs_match_a_hand_count_and_add_up(tokenizer):
    """never_ending_toy proposes 'the' (log .6) then 'a' (log .3); every rollout scores 0. With bounds [-1, 1]
    and alpha = 0.5, 'a' can reach log .3 + 0.5 < log .6 + 0: pruned at both steps, so one rollout a step and one
    reward call per step: L = 3 tokens at step 1, and at step 2 the rollout of 'the' reused from step 1 plus one token."""
    from tqstar.rewards import FunctionReward

    toy, other = never_ending_toy(tokenizer), never_ending_toy(tokenizer)
    prompt = f"{HUMAN} hotel{ASSISTANT}"
    P = len(tokenizer(prompt)["input_ids"])
    settings = DecoderSettings(method="tqstar", alpha=0.5, top_k=2, rollout_max_new_tokens=3, max_new_tokens=2)
    reward = FunctionReward(bounded_reward, bounds=(-1, 1))
    decoder = Decoder(toy, tokenizer, reward=reward, baseline_model=other, settings=settings)
    (generation,) = decoder.decode([prompt])
    want = dict(
        sft_forward_tokens=P + 1,
        baseline_forward_tokens=P + 1 + 3 + 1,
        rollout_tokens=4,
        rollout_tokens_reused=2,  # step 2's 'the' continues step 1's rollout 'the the the' (see the hand count above)
        reward_calls=2,
        reward_tokens=0,
        candidates_valued=2,
        candidates_pruned=2,
    )
    assert generation.cost == want and decoder.counters == want
    batch = Decoder(toy, tokenizer, reward=reward, baseline_model=other, settings=settings)
    generations = batch.decode([prompt, f"{HUMAN} the movie was bad{ASSISTANT}", prompt])
    assert {k: sum(g.cost[k] for g in generations) for k in want} == batch.counters
    assert batch.counters["candidates_pruned"] == 6


def test_top_k_sampling_draws_from_the_truncated_renormalised_distribution(sft_model, tokenizer):
    """decoder.sample_top_k: each token is one of the SFT model's top k, and the recorded policy log-prob is the
    renormalised one, log pi_sft(z) - log(top-k mass): their difference is the truncation cost, >= 0."""
    decoder = make_decoder(sft_model, tokenizer, method="sft", selection="sample", sample_top_k=2, seed=3)
    for g in decoder.decode(PROMPTS):
        assert g.policy_logprobs is not None
        for policy, sft in zip(g.policy_logprobs, g.sft_logprobs):
            assert policy >= sft - 1e-6
    full = make_decoder(sft_model, tokenizer, method="sft", selection="sample", seed=3).decode(PROMPTS)
    assert all(abs(sum(g.policy_logprobs) - sum(g.sft_logprobs)) < 1e-4 for g in full)  # no truncation: no cost
    # with k = 1 top-k sampling is greedy decoding
    greedy = sft_greedy(sft_model, tokenizer)
    one = make_decoder(sft_model, tokenizer, method="sft", selection="sample", sample_top_k=1).decode(PROMPTS)
    assert [g.token_ids for g in one] == greedy


def test_rollouts_sampled_from_the_top_one_token_are_greedy_rollouts(sft_model, baseline_model, tokenizer):
    greedy = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", trace=True).decode(PROMPTS)
    top_one = make_decoder(
        sft_model, tokenizer, baseline_model, method="tqstar", trace=True, rollout_selection="sample", rollout_num=2, rollout_top_k=1
    ).decode(PROMPTS)
    assert [g.token_ids for g in top_one] == [g.token_ids for g in greedy]
    assert [step["q"] for g in top_one for step in g.trace] == [step["q"] for g in greedy for step in g.trace]


# ----------------------------------------------------------------------------- greedy rollout reuse (decoder.reuse_rollouts)

REUSE_CASES = [
    dict(method="cd"),
    dict(method="tqstar"),
    dict(method="tqstar", transfer="indirect"),  # r and r_bl recomputed on the reused rollout texts
    dict(method="cd", prune=False),
    dict(method="tqstar", prune=False, batch_size=1),
    dict(method="tqstar", max_batch_rows=3),  # chunks split a prompt's candidates
    dict(method="cd", value="soft", beta=0.5),
    dict(method="tqstar", stop_strings=["\n\nHuman:", ".", "!"], rollout_max_new_tokens=6),  # rollouts that end early
    dict(method="tqstar", rollout_max_new_tokens=1),  # nothing to reuse but the last token's cache position
    dict(method="cd", selection="sample", seed=3),  # sampled selection, greedy rollouts: every candidate valued
]


@pytest.fixture(scope="module")
def near_baseline(sft_model):
    """A baseline close to the SFT model, as a DPO model is: its greedy rollouts often start with one of the SFT
    model's top-k tokens (the unrelated tiny `baseline_model` seldom does, so TQ* would seldom reuse a rollout)."""
    import copy

    model = copy.deepcopy(sft_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


@pytest.mark.parametrize("case", REUSE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_rollout_reuse_gives_the_same_tokens_and_q_with_fewer_rollout_tokens(case, sft_model, near_baseline, tokenizer):
    """The chosen token's greedy rollout [tau_1, ..., tau_L] continues at the next step as the rollout of the candidate
    tau_1: the same tokens, Q and rollout rewards as rolling out afresh; the reused tokens are not generated again."""
    baseline_model = near_baseline
    knobs = {"trace": True, "max_new_tokens": 8, "rollout_max_new_tokens": 4, **case}
    reusing = bounded_decoder(sft_model, tokenizer, baseline_model, **knobs)
    fresh = bounded_decoder(sft_model, tokenizer, baseline_model, reuse_rollouts=False, **knobs)
    assert reusing.settings.reuses_rollouts and not fresh.settings.reuses_rollouts
    a, b = reusing.decode(PROMPTS), fresh.decode(PROMPTS)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.policy_logprobs for g in a] == [g.policy_logprobs for g in b]
    for ga, gb in zip(a, b):
        assert [(s["q"], s["rollout_rewards"], s.get("rollout_baseline_rewards")) for s in ga.trace] == [
            (s["q"], s["rollout_rewards"], s.get("rollout_baseline_rewards")) for s in gb.trace
        ]
    on, off = reusing.counters, fresh.counters
    assert on["rollout_tokens"] + on["rollout_tokens_reused"] == off["rollout_tokens"] and off["rollout_tokens_reused"] == 0
    rollout_forward = f"{reusing.spec.rollout}_forward_tokens"
    if knobs["rollout_max_new_tokens"] > 1:
        assert on["rollout_tokens_reused"] > 0 and on[rollout_forward] < off[rollout_forward]
    else:  # L = 1: the carried rollout is its first token only; the one token left is computed either way
        assert on == off
    same = ("reward_calls", "candidates_valued", "candidates_pruned")
    assert {key: on[key] for key in same} == {key: off[key] for key in same}
    assert {key: sum(g.cost[key] for g in a) for key in on} == on  # the responses' costs add up to the counters


@pytest.mark.parametrize(
    "case",
    [dict(method="cd"), dict(method="tqstar", batch_size=1), dict(method="tqstar", stop_strings=["\n\nHuman:", ".", "!"])],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_rollout_reuse_with_pruning_equals_reference_oracle(case, sft_model, near_baseline, tokenizer):
    baseline_model = near_baseline
    decoder = bounded_decoder(sft_model, tokenizer, baseline_model, max_new_tokens=8, rollout_max_new_tokens=5, **case)
    for prompt, generation in zip(PROMPTS, decoder.decode(PROMPTS)):
        text, ids = reference_decode(prompt, sft_model, tokenizer, decoder.reward, decoder.settings, baseline_model)
        assert generation.token_ids == ids and generation.response == text
    assert decoder.counters["rollout_tokens_reused"] > 0


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="tqstar", rollout_selection="sample", rollout_num=2),
        dict(method="cd", rollout_selection="sample"),
        dict(method="args"),
        dict(method="sft"),
        dict(method="best_of_n", selection="sample"),
        dict(method="tqstar", reuse_rollouts=False),
    ],
)
def test_rollout_reuse_is_inert_where_it_does_not_apply(settings, sft_model, baseline_model, tokenizer):
    decoder = bounded_decoder(sft_model, tokenizer, baseline_model, max_new_tokens=3, n=2, **settings)
    assert not decoder.settings.reuses_rollouts
    decoder.decode(PROMPTS)
    assert decoder.counters["rollout_tokens_reused"] == 0


def test_reuse_rollouts_is_true_or_false():
    from tqstar.errors import ConfigError

    assert DecoderSettings(method="cd").reuses_rollouts and DecoderSettings(method="tqstar", transfer="indirect").reuses_rollouts
    with pytest.raises(ConfigError, match=r"decoder.reuse_rollouts='no' is not allowed: must be true or false"):
        DecoderSettings(reuse_rollouts="no")


def test_a_carried_rollout_that_stopped_early_but_would_not_now_is_rolled_out_afresh(sft_model, tokenizer):
    """Reuse takes a carried rollout's tokens only where this step's rollout provably makes them: one that ended before
    L tokens (a stop string seen through a token now out of the tail) while the new tail does not end there runs anew."""
    from tqstar.decoding.kv import KVStream
    from tqstar.decoding.rollouts import GreedyTail, RolloutRequest, RolloutRunner
    from tqstar.decoding.stops import StopChecker

    settings = DecoderSettings(method="cd", rollout_max_new_tokens=4)
    stops = StopChecker(tokenizer, settings.stop_strings)
    encoded = tokenizer([PROMPTS[1]], return_tensors="pt")
    parent = KVStream.prefill(sft_model, encoded["input_ids"], encoded["attention_mask"])
    candidates = [parent.logits.topk(3).indices[0].tolist()]

    def runner():
        return RolloutRunner(settings, stops, dict.fromkeys(("rollout_tokens", "rollout_tokens_reused", "sft_forward_tokens"), 0))

    fresh = runner().run(RolloutRequest(parent, [[]], candidates, [0], 0)).continuations
    assert len(fresh[1]) == 4  # it does not end early, so a carried rollout of 2 tokens "ended" wrongly
    reusing = runner()
    carried = GreedyTail([candidates[0][1], *fresh[1][:1]])  # tau_1, tau_2 and no keys/values: as if it had ended
    made = reusing.run(RolloutRequest(parent, [[]], candidates, [0], 0, carried=[carried], keep=True))
    kept = made.kept
    assert made.continuations == fresh
    assert reusing.counters["rollout_tokens_reused"] == 0 and reusing.counters["rollout_tokens"] == sum(map(len, fresh))
    assert [kept[i].tokens for i in range(3)] == fresh and kept[1].kv is not None


def test_a_stage_timer_sees_every_stage_around_its_work_and_changes_nothing(sft_model, baseline_model, tokenizer):
    """Decoder(on_stage=timer) is called around each stage with its name (STAGES): prefill and the five stages at the
    top, rollouts and reward calls inside value; the tokens are those of an untimed decoder."""
    from contextlib import contextmanager

    from tqstar.decoding.engine import STAGES

    seen, open_stages = [], []

    @contextmanager
    def timer(stage):
        seen.append((tuple(open_stages), stage))
        open_stages.append(stage)
        try:
            yield
        finally:
            open_stages.pop()

    plain = make_decoder(sft_model, tokenizer, baseline_model, method="tqstar", alpha=2.0)
    timed = Decoder(
        sft_model, tokenizer, reward=positive_words_reward, baseline_model=baseline_model, settings=plain.settings, on_stage=timer
    )
    generations = timed.decode(PROMPTS)  # one batch: as many steps as its longest response
    assert [g.token_ids for g in generations] == [g.token_ids for g in plain.decode(PROMPTS)]
    assert {stage for _, stage in seen} == set(STAGES) and not open_stages
    assert {(outer, stage) for outer, stage in seen if outer} == {(("value",), "rollouts"), (("value",), "reward")}
    top = [stage for outer, stage in seen if not outer]
    assert top[0] == "prefill" and top[1:6] == ["propose", "value", "score", "select", "append"]
    assert top.count("propose") == top.count("append") == max(g.num_tokens for g in generations)
