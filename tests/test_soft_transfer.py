"""Soft transfer (decoder=soft_transfer): the soft value of pi_k estimated by importance sampling with the aligned
baseline as the proposal of the rollouts, against closed forms on a toy and the slow oracle on tiny models.

Toy (tests/test_premise.py's CUT tables): pi_sft picks a first word, then a second, then EOS; r counts positive minus
negative words; k = 2 and rollouts among pi_sft's top 2 (rollout.top_k = 2), so the target is rho*_{beta,2}. A
candidate a's rollout is one word b; a baseline whose second-word table is rho*_{beta,2}(b | a) ∝ pi_2(b | a) e^{r/beta}
makes r/beta + log pi_2(b | a) - log q(b | a) = log Z(a) for every b: one rollout gives the exact soft value.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_premise import CUT_FIRST, CUT_SECOND, SOFT_BETA, assert_top_k_optimum, toy_model

from tqstar.config import compose, validate
from tqstar.decoding import reference
from tqstar.decoding.engine import Decoder
from tqstar.decoding.rollouts import RolloutRunner
from tqstar.decoding.settings import DecoderSettings
from tqstar.decoding.values import effective_sample_size, soft_importance_q, soft_q
from tqstar.errors import ConfigError

from conftest import positive_words_reward

K = 2


def top(dist: dict, k: int = K) -> dict:
    kept = dict(sorted(dist.items(), key=lambda kv: -kv[1])[:k])
    return {w: p / sum(kept.values()) for w, p in kept.items()}


def reward_of(a: str, b: str) -> float:
    return positive_words_reward([""], [f"{a} {b}"])[0]


def exact_values(beta: float = SOFT_BETA) -> dict[str, float]:
    """V(a) = beta log E_{b ~ pi_2(. | a)} e^{r(a, b)/beta} for each first word a of pi_2's support."""
    return {a: beta * math.log(sum(p * math.exp(reward_of(a, b) / beta) for b, p in top(CUT_SECOND[a]).items())) for a in top(CUT_FIRST)}


def tilted_second(beta: float = SOFT_BETA) -> dict:
    """rho*_{beta,2}(b | a) ∝ pi_2(b | a) e^{r(a, b)/beta}: the second-word tables of a baseline that is the target."""
    out = {}
    for a, nxt in CUT_SECOND.items():
        kept = top(nxt)
        z = sum(p * math.exp(reward_of(a, b) / beta) for b, p in kept.items())
        out[a] = {b: p * math.exp(reward_of(a, b) / beta) / z for b, p in kept.items()}
    return out


def soft_transfer(sft, baseline, tokenizer, **overrides) -> Decoder:
    settings = dict(
        method="soft_transfer",
        value="soft",
        beta=SOFT_BETA,
        alpha=1 / SOFT_BETA,
        selection="sample",
        top_k=K,
        rollout_top_k=K,
        rollout_num=1,
        rollout_selection="sample",
        rollout_max_new_tokens=3,
        max_new_tokens=3,
        batch_size=100,
        max_batch_rows=20000,
        trace=True,
    )
    settings.update(overrides)
    return Decoder(sft, tokenizer, reward=positive_words_reward, baseline_model=baseline, settings=DecoderSettings(**settings))


def first_step_values(generations, tokenizer) -> list[tuple[str, float]]:
    """(first word, Q) of every candidate valued at t = 0."""
    out = []
    for g in generations:
        entry = g.trace[0]
        out += [(tokenizer.decode([c]).strip(), q) for c, q in zip(entry["candidates"], entry["q"]) if q is not None]
    return out


def test_a_baseline_equal_to_the_target_gives_the_exact_value_from_one_rollout(tokenizer):
    sft, prompt = toy_model(tokenizer, CUT_FIRST, CUT_SECOND)
    baseline, _ = toy_model(tokenizer, CUT_FIRST, tilted_second())
    generations = soft_transfer(sft, baseline, tokenizer).decode([prompt] * 40)
    exact = exact_values()
    values = first_step_values(generations, tokenizer)
    assert {a for a, _ in values} == set(exact)
    for a, q in values:  # zero variance: every rollout's term is log Z(a), up to the toy's EOS probability 1 - 1e-6
        assert q == pytest.approx(exact[a], abs=1e-5)
    # every weight is the same number within a candidate, so the effective sample size is n (= 1 here, trivially)
    assert all(e == pytest.approx(1.0) for g in generations for entry in g.trace for e in entry["ess"] if e is not None)


def test_the_decoder_samples_the_top_k_optimum_with_an_exact_baseline(tokenizer):
    """Alpha = 1/beta, sampled selection and exact values: responses from rho*_{beta,2} in closed form, its KL too."""
    sft, prompt = toy_model(tokenizer, CUT_FIRST, CUT_SECOND)
    baseline, _ = toy_model(tokenizer, CUT_FIRST, tilted_second())
    generations = soft_transfer(sft, baseline, tokenizer, trace=False).decode([prompt] * 400)
    assert_top_k_optimum(generations)
    # the run's diagnostics: exact weights, so the effective sample size is all of n at every step
    assert all(g.diagnostics["ess_fraction"] == pytest.approx(1.0) for g in generations)


@pytest.mark.parametrize("proposal", ["sft", "baseline"])
def test_a_mismatched_baseline_converges_as_rollouts_grow(tokenizer, proposal):
    """With the SFT model as 'baseline' tables shifted away from the target, V^ is consistent: its error at the prompt
    shrinks with n (and proposal=sft, q = pi_k, is the plain soft value of SFT rollouts)."""
    sft, prompt = toy_model(tokenizer, CUT_FIRST, CUT_SECOND)
    wrong = {a: {b: 1 / len(top(nxt)) for b in top(nxt)} for a, nxt in CUT_SECOND.items()}  # uniform over pi_2's support
    baseline, _ = toy_model(tokenizer, CUT_FIRST, wrong)
    exact = exact_values()
    errors = {}
    for n in (1, 16, 256):
        generations = soft_transfer(sft, baseline, tokenizer, rollout_num=n, rollout_proposal=proposal, max_new_tokens=1).decode(
            [prompt] * 30
        )
        values = first_step_values(generations, tokenizer)
        errors[n] = math.sqrt(sum((q - exact[a]) ** 2 for a, q in values) / len(values))
    assert errors[256] < errors[16] < errors[1], errors
    assert errors[256] < 0.05, errors


def test_proposal_sft_is_the_optimal_decoder_token_for_token(tokenizer, sft_model, baseline_model):
    """q = pi_k: every log weight is 0 and the draws are SFT rollouts' own, so soft_transfer with rollout.proposal=sft
    is decoder=cd with value=soft (the optimal decoder), token for token, with the same Q."""
    prompts = ["\n\nHuman: hello there\n\nAssistant:", "\n\nHuman: good day\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    common = dict(
        value="soft", beta=0.5, alpha=2.0, selection="sample", top_k=3, rollout_top_k=3, rollout_num=4, rollout_selection="sample"
    )
    common.update(rollout_max_new_tokens=4, max_new_tokens=5, batch_size=2, trace=True)
    optimal = Decoder(sft_model, tokenizer, reward=positive_words_reward, settings=DecoderSettings(method="cd", **common)).decode(prompts)
    transfer = Decoder(
        sft_model,
        tokenizer,
        reward=positive_words_reward,
        baseline_model=baseline_model,
        settings=DecoderSettings(method="soft_transfer", rollout_proposal="sft", **common),
    ).decode(prompts)
    for a, b in zip(optimal, transfer):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.trace, b.trace):
            assert x["q"] == pytest.approx(y["q"], abs=1e-6)
            assert x["rollout_rewards"] == y["rollout_rewards"]
            assert all(w == 0 for ws in y["rollout_log_weights"] for w in ws)


@pytest.mark.parametrize("proposal", ["baseline", "mixture"])
def test_the_oracle_computes_the_same_log_probs_and_values(tokenizer, sft_model, baseline_model, monkeypatch, proposal):
    """Each rollout's log pi_k, log q (the engine sums them token by token from its KV streams) and each candidate's
    V^ against one uncached pass of each model over the finished sequence (decoding/reference.py)."""
    made = []
    run = RolloutRunner.run

    def recording(self, request):
        out = run(self, request)
        made.append((request, [list(prefix) for prefix in request.prefixes], out))  # the engine appends to its prefixes later
        return out

    monkeypatch.setattr(RolloutRunner, "run", recording)
    settings = DecoderSettings(
        method="soft_transfer",
        value="soft",
        beta=0.5,
        alpha=2.0,
        selection="sample",
        top_k=3,
        rollout_top_k=4,
        rollout_num=4,
        rollout_selection="sample",
        rollout_temperature=0.8,
        rollout_proposal=proposal,
        rollout_max_new_tokens=4,
        max_new_tokens=3,
        trace=True,
        stop_strings=[],
    )
    prompts = ["\n\nHuman: hello there\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    decoder = Decoder(sft_model, tokenizer, reward=positive_words_reward, baseline_model=baseline_model, settings=settings)
    generations = decoder.decode(prompts)
    assert made
    n, k = settings.rollout_num, settings.top_k
    checked = 0
    for request, prefixes, out in made:
        step = request.t
        for b, candidates in enumerate(request.candidates):
            prompt_index = request.indices[b]
            prompt_ids = tokenizer(prompts[prompt_index])["input_ids"]
            entry = generations[prompt_index].trace[step]
            for i, z in enumerate(candidates):
                rows = [(b * k + i) * n + j for j in range(n)]
                logs = [
                    reference.reference_rollout_log_probs(
                        prompt_ids + prefixes[b] + [z], out.continuations[row], sft_model, baseline_model, settings
                    )
                    for row in rows
                ]
                share = settings.mixture_rows / n
                for row, (log_pi_k, log_q_sft, log_q_bl) in zip(rows, logs):
                    assert out.log_target[row] == pytest.approx(log_pi_k, abs=1e-4)  # the engine keeps logits in float32
                    log_q = log_q_bl if share == 0 else math.log(share * math.exp(log_q_sft) + (1 - share) * math.exp(log_q_bl))
                    assert out.log_proposal[row] == pytest.approx(log_q, abs=1e-4)
                rewards = entry["rollout_rewards"][i]
                assert entry["q"][i] == pytest.approx(reference.reference_soft_value(rewards, logs, settings), abs=1e-4)
                checked += 1
    assert checked >= 2 * k


def test_formulas():
    rewards = torch.tensor([[[1.0, 0.0, -1.0]]], dtype=torch.float64)
    zero = torch.zeros_like(rewards)
    assert soft_importance_q(rewards, zero, 0.5, False).item() == pytest.approx(soft_q(rewards, 0.5).item())
    assert soft_importance_q(rewards, zero, 0.5, True).item() == pytest.approx(soft_q(rewards, 0.5).item())
    weights = torch.log(torch.tensor([[[2.0, 1.0, 0.0 + 1e-300]]], dtype=torch.float64))
    expected = 0.5 * math.log((2 * math.exp(2) + 1 + 1e-300 * math.exp(-2)) / 3)
    assert soft_importance_q(rewards, weights, 0.5, False).item() == pytest.approx(expected)
    assert soft_importance_q(rewards, weights, 0.5, True).item() == pytest.approx(0.5 * math.log((2 * math.exp(2) + 1) / 3))
    assert effective_sample_size(zero).item() == pytest.approx(3)
    assert effective_sample_size(weights).item() == pytest.approx(9 / 5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(method="tqstar", value="soft", rollout_selection="sample", rollout_num=4), "counts the baseline's tilt"),
        (dict(method="soft_transfer", value="mean", rollout_selection="sample"), "decoder.value=soft"),
        (dict(method="soft_transfer", value="soft"), "rollout.selection=sample"),
        (dict(method="soft_transfer", value="soft", rollout_selection="sample", rollout_proposal="mixture"), "at least one from each"),
        (dict(method="cd", rollout_proposal="mixture"), "soft_transfer only"),
        (dict(method="soft_transfer", value="soft", rollout_selection="sample", rollout_mixture=1.5), "strictly between 0 and 1"),
    ],
)
def test_refusals(settings, message):
    with pytest.raises(ConfigError, match=message):
        DecoderSettings(**settings)


def test_the_uncorrected_combination_cannot_run_from_the_command_line(hydra_clean):
    with pytest.raises(ConfigError, match="counts the baseline's tilt towards r twice"):
        validate(compose(["decoder=tqstar", "decoder.value=soft", "decoder.rollout.selection=sample"]))
    cfg = validate(compose(["decoder=soft_transfer"]))
    assert cfg.decoder.method == "soft_transfer" and cfg.decoder.value == "soft"


def test_weighed_rollouts_cost_both_models(tokenizer, sft_model, baseline_model):
    """Every rollout token is one forward of the SFT model and one of the baseline (proposal=baseline): both counted."""
    decoder = Decoder(
        sft_model,
        tokenizer,
        reward=positive_words_reward,
        baseline_model=baseline_model,
        settings=DecoderSettings(
            method="soft_transfer", value="soft", top_k=2, rollout_top_k=2, rollout_num=2, rollout_selection="sample", max_new_tokens=2
        ),
    )
    (g,) = decoder.decode(["\n\nHuman: hi\n\nAssistant:"])
    prompt_tokens = len(tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"])
    assert g.cost["rollout_tokens"] > 0
    # the baseline's prefill and accepted tokens, plus one forward per rollout row and step (finished rows carried)
    assert g.cost["baseline_forward_tokens"] >= prompt_tokens + g.cost["rollout_tokens"]
    assert g.cost["sft_forward_tokens"] >= prompt_tokens + g.cost["rollout_tokens"]


def test_the_recorded_kl_of_a_noisy_soft_decoder_carries_a_jensen_gap(tokenizer):
    """The ground-truth split on the closed-form GAMBLE toy (tests/test_premise.py): 'the' (+1 'love' w.p. 0.3, -1
    'hate') or 'a' (0); the decoder with n = 4 SFT rollouts estimates V(the) = beta log mean_j e^{r_j/beta} from a
    Binomial(4, 0.3) count of 'love', V(a) = 0 exactly. Enumerating the count gives, in closed form, the decoder's real
    step distribution p_bar = E[p], the KL it records E[KL(p || pi_sft)] and rho*'s. The engine's responses follow
    p_bar and its recorded KL is the recorded one: above the real KL by the Jensen gap, which is a measurement."""
    from test_premise import GAMBLE_FIRST, GAMBLE_SECOND, soft_value_decoder

    from tqstar.premise import kl_split, step_distribution

    beta, n = SOFT_BETA, 4
    log_pi = [math.log(GAMBLE_FIRST["the"]), math.log(GAMBLE_FIRST["a"])]
    love = GAMBLE_SECOND["the"]["love"]
    exact = [beta * math.log(love * math.exp(1 / beta) + (1 - love) * math.exp(-1 / beta)), 0.0]
    noisy, weights = [], []
    for c in range(n + 1):
        noisy.append([beta * math.log((c * math.exp(1 / beta) + (n - c) * math.exp(-1 / beta)) / n), 0.0])
        weights.append(math.comb(n, c) * love**c * (1 - love) ** (n - c))
    first = kl_split(log_pi, exact, noisy, beta, weights)
    # the second step (after 'the') is exact: its rollouts end at once, so V = r
    second_p = step_distribution([math.log(love), math.log(1 - love)], [1.0, -1.0], beta)
    second = sum(p * math.log(p / q) for p, q in zip(second_p, (love, 1 - love)))
    p_bar_the = sum(w * step_distribution(log_pi, v, beta)[0] for w, v in zip(weights, noisy))
    p_star_the = step_distribution(log_pi, exact, beta)[0]
    recorded = first["recorded"] + p_bar_the * second
    real = first["real"] + p_bar_the * second
    target = first["target"] + p_star_the * second
    assert first["jensen_gap"] > 0.02 and recorded > real

    toy, prompt = toy_model(tokenizer, GAMBLE_FIRST, GAMBLE_SECOND)
    count = 2000
    generations = soft_value_decoder(toy, tokenizer, rollout_num=n, batch_size=200).decode([prompt] * count)
    share = sum(g.response.split()[0] == "the" for g in generations) / count
    assert abs(share - p_bar_the) < 4 * math.sqrt(p_bar_the * (1 - p_bar_the) / count)  # the decoder follows p_bar
    assert abs(p_bar_the - p_star_the) > 4 * math.sqrt(p_bar_the * (1 - p_bar_the) / count)  # ... which is not rho*'s
    per_response = [sum(g.policy_logprobs) - sum(g.sft_logprobs) for g in generations]
    kl_mean = sum(per_response) / count
    kl_se = (sum((v - kl_mean) ** 2 for v in per_response) / (count - 1) / count) ** 0.5
    assert abs(kl_mean - recorded) < 4 * kl_se + 0.005  # what it records: E[KL(p || pi_sft)]
    assert abs(kl_mean - real) > 4 * kl_se  # not the KL of what it decodes
    assert target != real


def test_the_predicted_jensen_gap_matches_the_exact_one_once_the_noise_is_small():
    """premise.predicted_jensen_gap (the delta method, from a draw's own rollouts) against the exact gap of the GAMBLE
    toy's first step, both in expectation over the Binomial(n, 0.3) count of 'love': close at n = 64 and 256, far
    too small at n = 4, where the noise is not small (no 'love' among 4 rollouts makes V(the) = -1)."""
    from tqstar.premise import kl_split, predicted_jensen_gap, step_distribution

    beta, love = SOFT_BETA, 0.3
    log_pi = [math.log(0.5), math.log(0.5)]
    exact = [beta * math.log(love * math.exp(1 / beta) + (1 - love) * math.exp(-1 / beta)), 0.0]
    ratios = {}
    for n in (4, 64, 256):
        noisy, weights, predicted = [], [], 0.0
        for c in range(n + 1):
            values = [beta * math.log((c * math.exp(1 / beta) + (n - c) * math.exp(-1 / beta)) / n), 0.0]
            weight = math.comb(n, c) * love**c * (1 - love) ** (n - c)
            noisy.append(values)
            weights.append(weight)
            terms = [[1 / beta] * c + [-1 / beta] * (n - c), [0.0] * n]
            predicted += weight * predicted_jensen_gap(step_distribution(log_pi, values, beta), terms, scale=1.0)
        ratios[n] = predicted / kl_split(log_pi, exact, noisy, beta, weights)["jensen_gap"]
    assert 0.8 < ratios[64] < 1.2 and 0.8 < ratios[256] < 1.2, ratios
    assert ratios[4] < 0.1, ratios
    assert predicted_jensen_gap([0.5, 0.5], [[1.0], [2.0]], 1.0) is None  # one rollout: no variance to estimate


@pytest.mark.parametrize("method", ["cd", "soft_transfer"])
def test_each_response_records_the_jensen_gap_its_steps_predict(tokenizer, sft_model, baseline_model, method):
    """value_diagnostics.kl_jensen_gap is the sum over the response's steps of premise.predicted_jensen_gap, recomputed
    here from the trace (the scores' softmax, each candidate's r / beta + log w); evaluate subtracts it from the KL."""
    from tqstar.premise import predicted_jensen_gap

    settings = DecoderSettings(
        method=method,
        value="soft",
        beta=0.5,
        alpha=2.0,
        selection="sample",
        temperature=1.0,
        top_k=3,
        rollout_top_k=3,
        rollout_num=4,
        rollout_selection="sample",
        rollout_max_new_tokens=3,
        max_new_tokens=4,
        trace=True,
    )
    decoder = Decoder(sft_model, tokenizer, reward=positive_words_reward, baseline_model=baseline_model, settings=settings)
    for g in decoder.decode(["\n\nHuman: hello there\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]):
        expected = 0.0
        for entry in g.trace:
            top = max(entry["scores"])
            weights = [math.exp(s - top) for s in entry["scores"]]
            probs = [w / sum(weights) for w in weights]
            log_weights = entry.get("rollout_log_weights") or [[0.0] * 4 for _ in entry["candidates"]]
            terms = [[r / 0.5 + lw for r, lw in zip(rs, lws)] for rs, lws in zip(entry["rollout_rewards"], log_weights)]
            expected += predicted_jensen_gap(probs, terms, scale=1.0)
        assert g.diagnostics["kl_jensen_gap"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
