"""The premise checks and the exact-Q* arm against a toy whose rho*_beta and Q*_beta are known in closed form.

Toy: after the prompt, pi_sft picks 'good' (p) or 'bad' (1 - p); then 'great' or 'awful' with
probabilities that depend on the first word; then EOS. r = (#positive - #negative words), so the four
responses score +2, 0, 0, -2. rho*_beta(y) ∝ pi_sft(y) e^{r(y)/beta} over those four.
"""

from __future__ import annotations

import math
import random

import pytest

from tqstar import premise
from tqstar.decoding.engine import Decoder
from tqstar.decoding.settings import DecoderSettings
from tqstar.rewards.base import zero_reward

from conftest import ASSISTANT, HUMAN, positive_words_reward
from toy import ToyLM

BETA = 0.8
FIRST = {"good": 0.6, "bad": 0.4}
SECOND = {"good": {"great": 0.7, "awful": 0.3}, "bad": {"great": 0.2, "awful": 0.8}}
REWARD = {("good", "great"): 2.0, ("good", "awful"): 0.0, ("bad", "great"): 0.0, ("bad", "awful"): -2.0}


def responses():
    return [((a, b), FIRST[a] * SECOND[a][b], REWARD[(a, b)]) for a in FIRST for b in SECOND[a]]


def exact(beta=BETA):
    z = sum(p * math.exp(r / beta) for _, p, r in responses())
    optimum = {y: p * math.exp(r / beta) / z for y, p, r in responses()}
    expected = sum(optimum[y] * r for y, _, r in responses())
    kl = sum(optimum[y] * math.log(optimum[y] / p) for y, p, _ in responses())
    return optimum, expected, kl


def draw(rng, weights):
    items = list(weights)
    return rng.choices(items, weights=[weights[y] for y in items])[0]


def test_optimum_reward_and_kl_from_sft_samples_match_the_closed_form():
    rng = random.Random(0)
    sft = {y: p for y, p, _ in responses()}
    by_prompt = [[REWARD[draw(rng, sft)] for _ in range(400)] for _ in range(30)]
    _, expected, kl = exact()
    reward = premise.optimum_reward(by_prompt, BETA)
    assert abs(reward["mean"] - expected) < 4 * reward["se"] + 0.01
    assert reward["samples_per_prompt"] == 400 and 1 < reward["effective_samples_mean"] < 400
    estimate = premise.optimum_kl(by_prompt, BETA)
    assert abs(estimate["mean"] - kl) < 4 * estimate["se"] + 0.01


def test_optimum_expectation_of_any_quantity_matches_the_closed_form():
    rng = random.Random(1)
    sft = {y: p for y, p, _ in responses()}
    drawn = [[draw(rng, sft) for _ in range(400)] for _ in range(30)]
    optimum, _, _ = exact()
    great = premise.optimum_expectation([[REWARD[y] for y in g] for g in drawn], [[float(y[1] == "great") for y in g] for g in drawn], BETA)
    truth = sum(p for y, p in optimum.items() if y[1] == "great")
    assert abs(great["mean"] - truth) < 4 * great["se"] + 0.01 and great["prompts"] == 30 and great["samples_per_prompt"] == 400


def test_optimum_curve_matches_the_closed_form_and_rises_with_kl():
    rng = random.Random(2)
    sft = {y: p for y, p, _ in responses()}
    by_prompt = [[REWARD[draw(rng, sft)] for _ in range(400)] for _ in range(30)]
    curve = premise.optimum_curve(by_prompt, betas=(4.0, 1.0, 0.5))
    assert [point["beta"] for point in curve] == [4.0, 1.0, 0.5]
    for point in curve:
        _, expected, kl = exact(point["beta"])
        assert abs(point["reward"] - expected) < 4 * point["reward_se"] + 0.01
        assert abs(point["kl"] - kl) < 4 * point["kl_se"] + 0.01
    assert curve[0]["reward"] < curve[1]["reward"] < curve[2]["reward"] and curve[0]["kl"] < curve[1]["kl"] < curve[2]["kl"]


def test_sample_kl_and_implied_slope_of_the_optimum_and_of_a_weaker_baseline():
    rng = random.Random(1)
    sft = {y: p for y, p, _ in responses()}
    for strength, slope in ((1.0, 1.0), (0.5, 0.5)):  # rho ∝ pi e^{strength r / beta}: the optimum, and half of it
        z = sum(p * math.exp(strength * REWARD[y] / BETA) for y, p in sft.items())
        rho = {y: p * math.exp(strength * REWARD[y] / BETA) / z for y, p in sft.items()}
        samples = [draw(rng, rho) for _ in range(4000)]
        prompt_of = [i % 40 for i in range(len(samples))]
        kl = premise.sample_kl([[math.log(rho[y])] for y in samples], [[math.log(sft[y])] for y in samples], prompt_of)
        exact_kl = sum(rho[y] * math.log(rho[y] / sft[y]) for y in sft)
        assert abs(kl["mean"] - exact_kl) < 4 * kl["se"] + 0.01
        fit = premise.implied_reward_slope([math.log(rho[y] / sft[y]) for y in samples], [REWARD[y] for y in samples], BETA, prompt_of)
        assert fit["slope"] == pytest.approx(slope, abs=1e-9) and fit["correlation"] == pytest.approx(1.0)


def test_soft_weights_are_stable_for_tiny_beta():
    weights = premise.soft_weights([1.0, 0.9, -1.0], beta=1e-3)
    assert weights[0] == pytest.approx(1.0) and sum(weights) == pytest.approx(1.0)


def toy_model(tokenizer, first_words=FIRST, second_words=SECOND):
    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    transitions = {ids(ASSISTANT): {ids(w): p for w, p in first_words.items()}}
    for first, nxt in second_words.items():
        transitions[ids(first)] = {ids(w): p for w, p in nxt.items()}
    for word in {w for nxt in second_words.values() for w in nxt}:
        transitions[ids(word)] = {eos: 0.999999}
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    return ToyLM(vocab_size, transitions, default={eos: 0.999999}), f"{HUMAN} hotel{ASSISTANT}"


def test_exact_q_arm_estimates_q_star_of_the_closed_form(tokenizer):
    """TQ* indirect with baseline = pi_sft, r_bl = 0, beta_bl = beta, self-normalised sampled rollouts
    (the synthetic_exact_q preset) estimates Q*_beta(s, z) = E_{rho*_beta}[r | z]."""
    toy, prompt = toy_model(tokenizer)
    settings = DecoderSettings(
        method="tqstar",
        transfer="indirect",
        beta_bl=BETA,
        self_normalize=True,
        top_k=2,
        rollout_num=2000,
        rollout_selection="sample",
        rollout_max_new_tokens=3,
        max_new_tokens=1,
        max_batch_rows=4000,
        trace=True,
    )
    decoder = Decoder(toy, tokenizer, reward=positive_words_reward, baseline_model=toy, baseline_reward=zero_reward, settings=settings)
    step = decoder.decode([prompt])[0].trace[0]
    for token, q, rollout_rewards in zip(step["tokens"], step["q"], step["rollout_rewards"]):
        first = token.strip()
        weights = {b: SECOND[first][b] * math.exp(REWARD[(first, b)] / BETA) for b in SECOND[first]}
        q_star = sum(w * REWARD[(first, b)] for b, w in weights.items()) / sum(weights.values())
        # Monte-Carlo error of a self-normalised estimate with 2000 rollouts: well under 0.05 here
        assert q == pytest.approx(q_star, abs=0.05), first
        assert len(set(rollout_rewards)) == 2  # both continuations were sampled


def test_the_exact_q_preset_is_indirect_transfer_from_the_sft_model(hydra_clean):
    from tqstar.config import compose, validate

    cfg = validate(compose(["experiment=synthetic_exact_q"]))
    assert cfg.baseline.name_or_path == cfg.sft.name_or_path
    assert cfg.baseline_reward.function == "tqstar.rewards.base:zero_reward"
    d = cfg.decoder
    assert (d.transfer, d.self_normalize, d.rollout.selection) == ("indirect", True, "sample") and d.rollout.num >= 16


# A toy where the optimum and a mean-value decoder disagree: 'the' is a gamble (love +1 with p .3, hate -1),
# 'a' is safe ('it', 0). The mean prefers 'a' (0 > -0.4); rho*_beta at beta = 0.25 prefers 'the' (p ~ .94).
GAMBLE_FIRST = {"the": 0.5, "a": 0.5}
GAMBLE_SECOND = {"the": {"love": 0.3, "hate": 0.7}, "a": {"it": 1.0}}
SOFT_BETA = 0.25


def soft_value_decoder(toy, tokenizer, **overrides) -> Decoder:
    """The synthetic_optimal recipe on a toy: CD's SFT rollouts (100, sampled), soft values, alpha = 1/beta, sampled."""
    settings = dict(method="cd", value="soft", beta=SOFT_BETA, alpha=1 / SOFT_BETA, selection="sample", top_k=2, rollout_num=100)
    settings.update(rollout_selection="sample", rollout_max_new_tokens=3, max_new_tokens=3, batch_size=50, max_batch_rows=20000)
    return Decoder(toy, tokenizer, reward=positive_words_reward, settings=DecoderSettings(**{**settings, **overrides}))


@pytest.mark.parametrize("value", ["soft", "mean"])
def test_soft_value_decoder_samples_the_closed_form_optimum(value, tokenizer):
    """decoder.value=soft with SFT rollouts (cd), alpha = 1/beta, sampled selection draws responses from
    rho*_beta itself: frequencies, mean reward and KL match the closed form within sampling error.
    The same decoder with the mean value (CD's) does not: it is not the optimum of the KL-regularised objective."""
    toy, prompt = toy_model(tokenizer, GAMBLE_FIRST, GAMBLE_SECOND)
    n = 400
    generations = soft_value_decoder(toy, tokenizer, value=value).decode([prompt] * n)
    sft = {(a, b): GAMBLE_FIRST[a] * GAMBLE_SECOND[a][b] for a in GAMBLE_SECOND for b in GAMBLE_SECOND[a]}
    reward = {y: positive_words_reward([""], [" ".join(y)])[0] for y in sft}
    assert reward == {("the", "love"): 1.0, ("the", "hate"): -1.0, ("a", "it"): 0.0}
    z = sum(p * math.exp(reward[y] / SOFT_BETA) for y, p in sft.items())
    optimum = {y: p * math.exp(reward[y] / SOFT_BETA) / z for y, p in sft.items()}
    expected = sum(optimum[y] * reward[y] for y in sft)
    kl = sum(optimum[y] * math.log(optimum[y] / sft[y]) for y in sft)
    counts = {}
    for g in generations:
        words = tuple(g.response.split())
        counts[words] = counts.get(words, 0) + 1
    matches = all(abs(counts.get(y, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.02 for y, p in optimum.items())
    assert matches == (value == "soft"), counts
    if value == "mean":
        return
    assert set(counts) <= set(optimum)
    rewards = [reward[tuple(g.response.split())] for g in generations]
    mean = sum(rewards) / n
    se = (sum((r - mean) ** 2 for r in rewards) / (n - 1) / n) ** 0.5
    assert abs(mean - expected) < 4 * se + 0.01
    # the recorded log-probs give KL(decoder || pi_sft) per response, which is KL(rho* || pi_sft) here
    per_response = [sum(g.policy_logprobs) - sum(g.sft_logprobs) for g in generations]
    kl_mean = sum(per_response) / n
    kl_se = (sum((v - kl_mean) ** 2 for v in per_response) / (n - 1) / n) ** 0.5
    assert abs(kl_mean - kl) < 4 * kl_se + 0.02


def test_soft_value_is_the_log_mean_exp_and_is_refused_where_undefined():
    import torch

    from tqstar.decoding.values import soft_q
    from tqstar.errors import ConfigError

    rewards = torch.tensor([[[1.0, 0.0, -1.0]]], dtype=torch.float64)
    expected = 0.5 * math.log((math.exp(2) + 1 + math.exp(-2)) / 3)
    assert soft_q(rewards, 0.5).item() == pytest.approx(expected)
    assert soft_q(torch.tensor([[[1000.0, 999.0]]], dtype=torch.float64), 0.01).item() == pytest.approx(
        1000 + 0.01 * math.log((1 + math.exp(-100)) / 2)
    )
    with pytest.raises(ConfigError, match="decoder.value=soft needs rollouts"):
        DecoderSettings(method="args", value="soft")
    with pytest.raises(ConfigError, match="transfer=indirect"):
        DecoderSettings(method="tqstar", value="soft", transfer="indirect")


# A toy where the top-2 cut matters at both steps: 'good' (+1) is the third first word, 'great' (+1) the third
# word after 'the'. A decoder among pi_sft's top 2 can only reach rho*_{beta,2} ∝ pi_2 · e^{r/beta}: it prefers
# 'a' (P(the) = 0.39); rollouts of the whole vocabulary would see 'great' behind 'the' (P(the) = 0.95).
CUT_FIRST = {"the": 0.5, "a": 0.3, "good": 0.2}
CUT_SECOND = {"the": {"hate": 0.5, "it": 0.3, "great": 0.2}, "a": {"it": 1.0}, "good": {"it": 1.0}}


def truncated_closed_form(beta: float, k: int = 2):
    """{response: (pi_sft(y), pi_k(y), r(y))} over pi_k's support, and rho*_{beta,k}'s E[r] and KL to pi_sft."""

    def top(dist):
        kept = dict(sorted(dist.items(), key=lambda kv: -kv[1])[:k])
        return {w: p / sum(kept.values()) for w, p in kept.items()}

    support = {}
    for a, p_a in top(CUT_FIRST).items():
        for b, p_b in top(CUT_SECOND[a]).items():
            support[(a, b)] = (CUT_FIRST[a] * CUT_SECOND[a][b], p_a * p_b, positive_words_reward([""], [f"{a} {b}"])[0])
    z = sum(pk * math.exp(r / beta) for _, pk, r in support.values())
    optimum = {y: pk * math.exp(r / beta) / z for y, (_, pk, r) in support.items()}
    expected = sum(optimum[y] * support[y][2] for y in support)
    kl = sum(optimum[y] * math.log(optimum[y] / support[y][0]) for y in support)
    return support, optimum, expected, kl


def test_top_k_optimum_from_truncated_samples_matches_the_closed_form():
    """premise.optimum_curve with each sample's truncation cost gives rho*_{beta,k}'s reward and its KL to the
    untruncated pi_sft (exact when the 'samples' are pi_k's support in proportion)."""
    support, _, expected, kl = truncated_closed_form(SOFT_BETA)
    rewards, cuts = [], []
    for p, pk, r in support.values():
        copies = round(pk * 6400)  # pi_k's probabilities are multiples of 1/6400 here
        rewards += [r] * copies
        cuts += [math.log(pk / p)] * copies
    (point,) = premise.optimum_curve([rewards], betas=(SOFT_BETA,), cuts_by_prompt=[cuts])
    assert point["reward"] == pytest.approx(expected, abs=1e-9) and point["kl"] == pytest.approx(kl, abs=1e-9)
    (untruncated,) = premise.optimum_curve([rewards], betas=(SOFT_BETA,))
    assert untruncated["kl"] < point["kl"]  # without the cut, the KL to pi_k only


def test_soft_value_decoder_with_top_k_rollouts_samples_the_top_k_optimum(tokenizer):
    """The synthetic_optimal recipe at k = 2 (rollouts of pi_sft truncated to the decoder's top k): responses
    come from rho*_{beta,k} in closed form, and the recorded KL to pi_sft is rho*_{beta,k}'s, truncation included."""
    toy, prompt = toy_model(tokenizer, CUT_FIRST, CUT_SECOND)
    assert_top_k_optimum(soft_value_decoder(toy, tokenizer, rollout_top_k=2).decode([prompt] * 400))


def assert_top_k_optimum(generations) -> None:
    """Responses of the CUT toy drawn from rho*_{SOFT_BETA,2}: frequencies, recorded KL to pi_sft and mean reward match
    the closed form within sampling error."""
    n = len(generations)
    support, optimum, expected, kl = truncated_closed_form(SOFT_BETA)
    counts = {}
    for g in generations:
        counts[tuple(g.response.split())] = counts.get(tuple(g.response.split()), 0) + 1
    assert set(counts) <= set(optimum), counts
    assert all(abs(counts.get(y, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.02 for y, p in optimum.items()), counts
    per_response = [sum(g.policy_logprobs) - sum(g.sft_logprobs) for g in generations]
    kl_mean = sum(per_response) / n
    kl_se = (sum((v - kl_mean) ** 2 for v in per_response) / (n - 1) / n) ** 0.5
    assert abs(kl_mean - kl) < 4 * kl_se + 0.02
    rewards = [support[tuple(g.response.split())][2] for g in generations]
    assert abs(sum(rewards) / n - expected) < 0.1
