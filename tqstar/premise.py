"""Checks of TQ*'s premise: how close is a baseline rho_bl to the KL-regularised optimum rho*_beta?

rho*_beta(y|x) ∝ pi_sft(y|x) · exp(r(x,y) / beta). Three measurements, all from samples (pure
functions of numbers, no models here; the testbeds' builds feed them):

(a) E_{rho*_beta}[r], estimated per prompt by self-normalised importance sampling of M responses
    y_1..y_M ~ pi_sft(.|x): sum_i e^{r_i/beta} r_i / sum_i e^{r_i/beta}; averaged over prompts
    (`optimum_reward`). Compare with the baseline's sampled (T=1) mean reward.
(b) KL(rho*_beta || pi_sft) per response = E_{rho*}[r]/beta - log Z(x), log Z(x) = log E_{pi_sft} e^{r/beta},
    from the same samples (`optimum_kl`); KL(rho_bl || pi_sft) from samples of rho_bl with both
    models' log-probs: mean of sum_t (log rho_bl - log pi_sft) (`sample_kl`).
(c) The implied reward: at the optimum beta · log(rho*/pi_sft)(y|x) = r(x,y) - beta log Z(x), so
    regressing beta · log(rho_bl/pi_sft) on r within prompts (per-prompt intercepts) gives slope 1
    (`implied_reward_slope`); a slope below 1 is a baseline short of the optimum, above 1 past it.

Each returns a mean and a standard error across prompts; the self-normalised estimates are
consistent as M grows but biased towards pi_sft for small M and small beta, so `optimum_reward`
also reports the effective sample size of the weights.
"""

from __future__ import annotations

import math
from typing import Sequence

from .stats import mean_and_stderr


def _log_mean_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def soft_weights(rewards: Sequence[float], beta: float) -> list[float]:
    """Self-normalised weights e^{r_i/beta} / sum_j e^{r_j/beta} (stable for small beta)."""
    top = max(rewards)
    raw = [math.exp((r - top) / beta) for r in rewards]
    total = sum(raw)
    return [w / total for w in raw]


def _optimum_of_prompt(rewards: Sequence[float], beta: float, cuts: Sequence[float] | None = None) -> tuple[float, float, float]:
    """One prompt's (E_{rho*}[r], KL(rho* || pi_sft), effective sample size) from its pi_sft samples' rewards.

    With ``cuts`` the samples come from pi_sft truncated to its top k tokens at every step, pi_k, and
    cut(y) = sum_t -log (top-k mass at step t) = log pi_k(y) - log pi_sft(y) for each; the optimum is then
    rho*_{beta,k} ∝ pi_k · e^{r/beta} (what a top-k decoder can reach), and its KL to the untruncated
    pi_sft is E_{rho*}[r]/beta - log E_{pi_k}[e^{r/beta}] + E_{rho*}[cut]."""
    weights = soft_weights(rewards, beta)
    expected = sum(w * r for w, r in zip(weights, rewards))
    kl = expected / beta - _log_mean_exp([r / beta for r in rewards])
    if cuts is not None:
        kl += sum(w * c for w, c in zip(weights, cuts))
    return expected, kl, 1.0 / sum(w * w for w in weights)


def optimum_reward(rewards_by_prompt: Sequence[Sequence[float]], beta: float) -> dict:
    """(a) E_{rho*_beta}[r] from pi_sft samples: per-prompt self-normalised IS, then mean ± s.e. over prompts."""
    per_prompt = [_optimum_of_prompt(rewards, beta) for rewards in rewards_by_prompt]
    mean, se = mean_and_stderr([p[0] for p in per_prompt])
    return {
        "mean": mean,
        "se": se,
        "prompts": len(per_prompt),
        "samples_per_prompt": _samples(rewards_by_prompt),
        "effective_samples_mean": mean_and_stderr([p[2] for p in per_prompt])[0],
    }


def optimum_expectation(rewards_by_prompt: Sequence[Sequence[float]], values_by_prompt: Sequence[Sequence[float]], beta: float) -> dict:
    """E_{rho*_beta}[f] of any per-sample quantity f (e.g. 1 for a response that ended by itself) from pi_sft samples:
    per-prompt self-normalised IS with the weights of their rewards, then mean ± s.e. over prompts."""
    per_prompt = [
        sum(w * v for w, v in zip(soft_weights(rewards, beta), values)) for rewards, values in zip(rewards_by_prompt, values_by_prompt)
    ]
    mean, se = mean_and_stderr(per_prompt)
    return {"mean": mean, "se": se, "prompts": len(per_prompt), "samples_per_prompt": _samples(rewards_by_prompt)}


def optimum_kl(rewards_by_prompt: Sequence[Sequence[float]], beta: float) -> dict:
    """(b) KL(rho*_beta || pi_sft) per response: E_{rho*}[r]/beta - log E_{pi_sft}[e^{r/beta}], per prompt."""
    mean, se = mean_and_stderr([_optimum_of_prompt(rewards, beta)[1] for rewards in rewards_by_prompt])
    return {"mean": mean, "se": se, "prompts": len(rewards_by_prompt), "samples_per_prompt": _samples(rewards_by_prompt)}


OPTIMUM_CURVE_BETAS = (4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.025)


def optimum_curve(
    rewards_by_prompt: Sequence[Sequence[float]],
    betas: Sequence[float] = OPTIMUM_CURVE_BETAS,
    cuts_by_prompt: Sequence[Sequence[float]] | None = None,
) -> list[dict]:
    """The reward-KL frontier of rho*_beta over ``betas``: per beta, (a) and (b) from the same pi_sft samples,
    with the per-prompt values (``reward_by_prompt``, ``kl_by_prompt``, in prompt order) so a run on a
    subset of the prompts can be compared on the same prompts. With ``cuts_by_prompt`` (samples of pi_sft
    truncated to its top k, see `_optimum_of_prompt`): the frontier of rho*_{beta,k}, KL still to pi_sft.

    Nothing decoded from pi_sft can beat it: at its KL, rho*_beta has the highest expected reward
    (it maximises E[r] - beta·KL). With M samples per prompt the KL estimate cannot exceed log M,
    so points whose effective sample size nears 1 (small beta) understate both reward and KL."""
    out = []
    for beta in betas:
        cuts = cuts_by_prompt if cuts_by_prompt is not None else [None] * len(rewards_by_prompt)
        per_prompt = [_optimum_of_prompt(rewards, beta, cut) for rewards, cut in zip(rewards_by_prompt, cuts)]
        reward, reward_se = mean_and_stderr([p[0] for p in per_prompt])
        kl, kl_se = mean_and_stderr([p[1] for p in per_prompt])
        out.append(
            {
                "beta": float(beta),
                "reward": reward,
                "reward_se": reward_se,
                "kl": kl,
                "kl_se": kl_se,
                "effective_samples_mean": mean_and_stderr([p[2] for p in per_prompt])[0],
                "reward_by_prompt": [p[0] for p in per_prompt],
                "kl_by_prompt": [p[1] for p in per_prompt],
            }
        )
    return out


def sample_kl(
    policy_logprobs: Sequence[Sequence[float]], sft_logprobs: Sequence[Sequence[float]], prompt_of: Sequence[int] | None = None
) -> dict:
    """(b) KL(rho || pi_sft) per response from responses sampled from rho: the mean of sum_t (log rho - log pi_sft).

    With `prompt_of` (the prompt index of each response) the s.e. is across prompts (several samples
    per prompt are averaged first)."""
    totals = [sum(p) - sum(q) for p, q in zip(policy_logprobs, sft_logprobs)]
    groups = _group(totals, prompt_of)
    mean, se = mean_and_stderr([sum(g) / len(g) for g in groups])
    return {"mean": mean, "se": se, "responses": len(totals), "prompts": len(groups)}


def sample_reward(rewards: Sequence[float], prompt_of: Sequence[int] | None = None) -> dict:
    """Mean reward of sampled responses, s.e. across prompts."""
    groups = _group(list(rewards), prompt_of)
    mean, se = mean_and_stderr([sum(g) / len(g) for g in groups])
    return {"mean": mean, "se": se, "responses": len(rewards), "prompts": len(groups)}


def implied_reward_slope(
    log_ratios: Sequence[float], rewards: Sequence[float], beta: float, prompt_of: Sequence[int] | None = None
) -> dict:
    """(c) Slope of beta · log(rho_bl/pi_sft)(y|x) regressed on r(x,y), with an intercept per prompt
    (log Z(x) differs by prompt): 1 at the optimum. Also the correlation of the two, within prompts."""
    prompt_of = list(prompt_of) if prompt_of is not None else [0] * len(rewards)
    by_prompt: dict[int, list[tuple[float, float]]] = {}
    for prompt, ratio, reward in zip(prompt_of, log_ratios, rewards):
        by_prompt.setdefault(prompt, []).append((beta * ratio, reward))
    xs, ys = [], []
    for pairs in by_prompt.values():
        if len(pairs) < 2:
            continue  # one response says nothing within its prompt
        mean_y = sum(p[0] for p in pairs) / len(pairs)
        mean_x = sum(p[1] for p in pairs) / len(pairs)
        ys += [p[0] - mean_y for p in pairs]
        xs += [p[1] - mean_x for p in pairs]
    sxx = sum(x * x for x in xs)
    syy = sum(y * y for y in ys)
    if not xs or sxx == 0:
        return {"slope": None, "se": None, "correlation": None, "responses": len(rewards)}
    slope = sum(x * y for x, y in zip(xs, ys)) / sxx
    dof = max(len(xs) - len(by_prompt) - 1, 1)
    residual = sum((y - slope * x) ** 2 for x, y in zip(xs, ys)) / dof
    return {
        "slope": slope,
        "se": math.sqrt(residual / sxx),
        "correlation": (sum(x * y for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)) if syy else None,
        "responses": len(rewards),
    }


def baseline_checks(rows: Sequence[dict], sft_rewards_by_prompt: Sequence[Sequence[float]], key: str, beta: float) -> dict:
    """A baseline against the optimum it was built for, rho*_beta of the reward ``key``: (a) its sampled reward
    and E_{rho*}[r], (b) its KL to pi_sft and rho*'s, (c) its implied-reward slope. ``rows``: the baseline's samples,
    each with ``prompt_index``, the reward ``key``, ``logprob`` (the baseline's), ``sft_logprob`` and ``finished``;
    ``sft_rewards_by_prompt``: the rewards ``key`` of pi_sft's samples, grouped by prompt in prompt order."""
    prompt_of = [int(r["prompt_index"]) for r in rows]
    rewards = [r[key] for r in rows]
    return {
        "reward": key,
        "beta": beta,
        "sampled_reward": sample_reward(rewards, prompt_of),
        "optimum_reward": optimum_reward(sft_rewards_by_prompt, beta),
        "kl": sample_kl([[r["logprob"]] for r in rows], [[r["sft_logprob"]] for r in rows], prompt_of),
        "optimum_kl": optimum_kl(sft_rewards_by_prompt, beta),
        "implied_reward_slope": implied_reward_slope([r["logprob"] - r["sft_logprob"] for r in rows], rewards, beta, prompt_of),
        "finished_frac": sum(r["finished"] for r in rows) / len(rows),
    }


def _group(values: list[float], prompt_of: Sequence[int] | None) -> list[list[float]]:
    if prompt_of is None:
        return [[v] for v in values]
    groups: dict[int, list[float]] = {}
    for prompt, value in zip(prompt_of, values):
        groups.setdefault(prompt, []).append(value)
    return list(groups.values())


def _samples(rewards_by_prompt: Sequence[Sequence[float]]) -> int | None:
    sizes = {len(r) for r in rewards_by_prompt}
    return sizes.pop() if len(sizes) == 1 else None


# ----------------------------------------------------------------------------- the recorded KL of a noisy soft decoder
#
# At a state s the optimal decoder draws z from p(z) = softmax_z(log pi_sft(z | s) + V^(s, z) / beta) over pi_sft's top
# k, with V^ estimated from n rollouts, and records log p(z) - log pi_sft(z). Fresh noise at every step makes the
# decoder's real step distribution the mean p_bar = E_noise[p] (the draws of V^ are part of the decoder), so the
# recorded KL, E_noise[KL(p || pi_sft)], exceeds the real one, KL(p_bar || pi_sft), by E_noise[KL(p || p_bar)] >= 0:
# a Jensen gap in the measurement. What is left, KL(p_bar || pi_sft) - KL(p* || pi_sft) with p* from exact values,
# is a real distortion of the decoded distribution (KL(p_bar || p*) says how far it moved).


def step_distribution(log_pi: Sequence[float], values: Sequence[float], beta: float) -> list[float]:
    """softmax(log pi_sft(z) + V(z) / beta) over the candidates z."""
    scores = [lp + v / beta for lp, v in zip(log_pi, values)]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def _kl(p: Sequence[float], q_log: Sequence[float]) -> float:
    return sum(pi * (math.log(pi) - ql) for pi, ql in zip(p, q_log) if pi > 0)


def kl_split(
    log_pi: Sequence[float], exact: Sequence[float], noisy: Sequence[Sequence[float]], beta: float, weights: Sequence[float] | None = None
) -> dict:
    """One state's KL to pi_sft, split. log_pi: log pi_sft of the k candidates (over the whole vocabulary); exact: their
    values from many rollouts; noisy: R draws of the decoder's own estimates (each k values, e.g. disjoint groups of n
    of the same rollouts; `weights`: their probabilities when enumerated, else equal). Returns recorded (E_r KL(p_r || pi_sft)), real (KL(p_bar || pi_sft)), target
    (KL(p* || pi_sft)), jensen_gap (recorded - real), distortion (real - target) and moved (KL(p_bar || p*))."""
    target_p = step_distribution(log_pi, exact, beta)
    draws = [step_distribution(log_pi, values, beta) for values in noisy]
    share = [w / sum(weights) for w in weights] if weights is not None else [1 / len(draws)] * len(draws)
    mean_p = [sum(w * p[z] for w, p in zip(share, draws)) for z in range(len(log_pi))]
    recorded = sum(w * _kl(p, log_pi) for w, p in zip(share, draws))
    real = _kl(mean_p, log_pi)
    target = _kl(target_p, log_pi)
    return {
        "recorded": recorded,
        "real": real,
        "target": target,
        "jensen_gap": recorded - real,
        "distortion": real - target,
        "moved": _kl(mean_p, [math.log(p) if p > 0 else -math.inf for p in target_p]),
    }


def predicted_jensen_gap(probs: Sequence[float], terms: Sequence[Sequence[float]], scale: float) -> float | None:
    """The Jensen gap of one step predicted from the decoder's own rollouts, to second order (the delta method).

    `terms[z]` are candidate z's n terms a_j = r_j / beta + log w_j (log w = 0 for rollouts of pi_k itself), so its
    value is V = beta log mean_j e^{a_j}; `probs` the step distribution the decoder drew from; `scale` = alpha * beta /
    temperature, what one unit of log mean_j e^{a_j} moves a candidate's score by. The estimate's noise has variance
    sigma_z^2 ≈ Var(e^a) / (n mean(e^a)^2) (the delta method, the sample variance with n - 1), and for independent
    small noise on the scores E[KL(p || p_bar)] ≈ 1/2 sum_z p_z (1 - p_z) scale^2 sigma_z^2. None with one rollout
    (no variance to estimate)."""
    gap = 0.0
    for p, a in zip(probs, terms):
        n = len(a)
        if n < 2:
            return None
        top = max(a)
        u = [math.exp(x - top) for x in a]
        mean = sum(u) / n
        variance = sum((x / mean - 1) ** 2 for x in u) / (n - 1)
        gap += 0.5 * p * (1 - p) * scale**2 * variance / n
    return gap


SPLIT_KEYS = ("recorded", "real", "target", "jensen_gap", "predicted_gap", "distortion", "moved")


def summarise_split(rows: Sequence[dict], keys: Sequence[str] = SPLIT_KEYS) -> dict:
    """Per-state `kl_split` rows ({"response", key: value}) of whole responses -> per key the mean and s.e. over
    responses of their sums over steps (per-response nats), and the number of responses."""
    sums: dict = {}
    for row in rows:
        total = sums.setdefault(row["response"], {})
        for key in keys:
            if row.get(key) is not None:
                total[key] = total.get(key, 0.0) + float(row[key])
    out = {"responses": len(sums)}
    for key in keys:
        out[key] = mean_and_stderr([total.get(key) for total in sums.values()])
    return out
