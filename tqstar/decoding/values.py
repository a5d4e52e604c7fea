"""Q estimators: how each method values the k candidate tokens of a step.

An estimator takes a `ValueContext` (the active rows' prompts, accepted prefixes and candidates,
plus callables for text, rewards and rollouts) and returns Q as a (B, k) float32 tensor with
per-candidate details for the trace (or None). It values the candidates `ctx.pairs()` names (all of
them, or those `ctx.select` marks when the engine prunes: docs/architecture.md); the others get NaN.
The method registry (tqstar.methods) names the estimator of each method; the formulas from rollout
rewards are plain functions that the reference oracle shares.

- partial_reward (ARGS): Q_i = r(x, [y_<t, z_i]).
- rollout_mean (CD; TQ* direct): Q_i = mean_j r(x, [y_<t, z_i, tau_ij]).
- transfer (TQ*): rollout_mean for direct transfer; for indirect transfer the importance-weighted
  mean with w_ij = exp((r_ij - r_bl_ij) / beta_bl): mean_j(w r), or sum_j w r / sum_j w when
  self-normalised.
- decoder.value=soft (any rollout method): the soft value V_i = beta log mean_j exp(r_ij / beta), the
  log-mean-exp of the rollout rewards. With SFT rollouts, alpha = 1/beta and sampled selection, the
  decoder draws from rho*_beta(z | s) ∝ pi_sft(z | s) E[e^{r/beta} | s, z] up to the top-k cut and
  Monte-Carlo error: the exact optimum of the KL-regularised objective (the optimal-decoder preset in conf/experiment/).
  With baseline rollouts this would count the baseline's tilt towards r twice; settings refuse it.
- soft_importance (soft_transfer): the same soft value of pi_k (pi_sft truncated to rollout.top_k) estimated from
  rollouts tau_j ~ q (the baseline, a mixture, or pi_k): V_i = beta [logsumexp_j (r_ij / beta + log w_ij) - log n],
  log w_ij = log pi_k(tau_ij) - log q(tau_ij); self-normalised (decoder.self_normalize): - logsumexp_j log w_ij instead
  of - log n. Unbiased in Z = E_pi_k[e^{r/beta}] and consistent; exact at n = 1 when q is rho*_{beta,k}; with q = pi_k
  every log w is 0 and it is soft_q. Details carry the log weights and each candidate's effective sample size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .settings import DecoderSettings


@dataclass
class ValueContext:
    settings: DecoderSettings
    prompts: list[str]  # the reward's prompt text of each active row (B)
    prefixes: list[list[int]]  # accepted response ids of each active row
    candidates: list[list[int]]  # (B, k) candidate ids
    text: Callable[[list[int]], str]  # response ids -> text
    reward: Callable[
        [list[str], list[str], list[int]], list[float]
    ]  # r(prompts, responses, owners): owners[i] = row b of pair i, for costs
    baseline_reward: Callable[[list[str], list[str], list[int]], list[float]] | None  # r_bl (indirect transfer), same signature
    # rollouts(pairs): a `Rollouts` (decoding/rollouts.py) of rows (b, i, j) in that order: continuations, [] for the rows
    # of candidates not in pairs, and, for weighed rollouts, their log-probs under pi_k and the proposal
    rollouts: Callable[[list[tuple[int, int]]], Any]
    device: torch.device
    select: list[list[bool]] | None = None  # (B, k): the candidates to value now; None = all

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.candidates), len(self.candidates[0])

    def pairs(self) -> list[tuple[int, int]]:
        """(b, i) of the candidates to value, in that order."""
        B, k = self.shape
        return [(b, i) for b in range(B) for i in range(k) if self.select is None or self.select[b][i]]


# ----------------------------------------------------------------------------- formulas


def mean_q(rewards: torch.Tensor) -> torch.Tensor:
    """(B, k, n) rollout rewards -> (B, k): the plain Monte-Carlo mean."""
    return rewards.mean(-1)


def importance_weights(rewards: torch.Tensor, baseline_rewards: torch.Tensor, beta_bl: float) -> torch.Tensor:
    return torch.exp((rewards - baseline_rewards) / beta_bl)


def importance_q(rewards: torch.Tensor, baseline_rewards: torch.Tensor, beta_bl: float, self_normalize: bool) -> torch.Tensor:
    """Indirect transfer: rollouts of rho_bl reweighted towards r by exp((r - r_bl) / beta_bl)."""
    weights = importance_weights(rewards, baseline_rewards, beta_bl)
    if self_normalize:
        return (weights * rewards).sum(-1) / weights.sum(-1)
    return (weights * rewards).mean(-1)


def soft_q(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, k, n) -> (B, k): beta * log mean_j exp(r_j / beta), computed stably (logsumexp)."""
    n = rewards.shape[-1]
    return beta * (torch.logsumexp(rewards / beta, dim=-1) - torch.log(torch.tensor(float(n), dtype=rewards.dtype, device=rewards.device)))


def soft_importance_q(rewards: torch.Tensor, log_weights: torch.Tensor, beta: float, self_normalize: bool) -> torch.Tensor:
    """(B, k, n) rewards and log importance weights log pi_k(tau) - log q(tau) -> (B, k): the soft value of pi_k."""
    total = torch.logsumexp(rewards / beta + log_weights, dim=-1)
    if self_normalize:
        return beta * (total - torch.logsumexp(log_weights, dim=-1))
    n = rewards.shape[-1]
    return beta * (total - math.log(n))


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """(..., n) log weights -> (...): Kish's (sum w)^2 / sum w^2, between 1 and n (n when the weights are equal)."""
    return torch.exp(2 * torch.logsumexp(log_weights, dim=-1) - torch.logsumexp(2 * log_weights, dim=-1))


def q_from_rollouts(settings: DecoderSettings, rewards: torch.Tensor, baseline_rewards: torch.Tensor | None) -> torch.Tensor:
    """Q (B, k) from (B, k, n) rollout rewards, by the method's estimator."""
    if settings.value == "soft":
        return soft_q(rewards, settings.beta)
    if settings.spec.value == "transfer" and settings.transfer == "indirect":
        return importance_q(rewards, baseline_rewards, settings.beta_bl, settings.self_normalize)
    return mean_q(rewards)


# ----------------------------------------------------------------------------- estimators


def _scatter(values: list[float], pairs: list[tuple[int, int]], shape: tuple[int, ...], device) -> torch.Tensor:
    """Values of `pairs` (b, i) (n per pair, in order) into a float64 tensor of `shape` on `device`, NaN elsewhere."""
    out = torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    if pairs:
        rows, columns = zip(*pairs)
        out[list(rows), list(columns)] = torch.tensor(values, dtype=torch.float64, device=device).view(len(pairs), *shape[2:])
    return out


def partial_reward(ctx: ValueContext):
    pairs = ctx.pairs()
    owners = [b for b, _ in pairs]
    prompts = [ctx.prompts[b] for b in owners]
    responses = [ctx.text(ctx.prefixes[b] + [ctx.candidates[b][i]]) for b, i in pairs]
    rewards = ctx.reward(prompts, responses, owners)
    return _scatter(rewards, pairs, ctx.shape, ctx.device).to(torch.float32), None


def from_rollouts(ctx: ValueContext):
    """Roll out each candidate rollout.num times, score each rollout text, reduce by the method's formula."""
    s = ctx.settings
    (B, k), n = ctx.shape, s.rollout_num
    pairs = ctx.pairs()
    made = ctx.rollouts(pairs)
    continuations = made.continuations
    owners = [b for b, _ in pairs for _ in range(n)]
    prompts = [ctx.prompts[b] for b in owners]
    responses = [
        ctx.text(ctx.prefixes[b] + [ctx.candidates[b][i]] + continuations[(b * k + i) * n + j]) for b, i in pairs for j in range(n)
    ]
    rewards = _scatter(ctx.reward(prompts, responses, owners), pairs, (B, k, n), ctx.device)
    details = {"rewards": rewards}
    baseline_rewards = None
    if s.needs_baseline_reward:
        baseline_rewards = _scatter(ctx.baseline_reward(prompts, responses, owners), pairs, (B, k, n), ctx.device)
        details.update(baseline_rewards=baseline_rewards, weights=importance_weights(rewards, baseline_rewards, s.beta_bl))
    if s.spec.weighs_rollouts:
        logs = [made.log_target[(b * k + i) * n + j] - made.log_proposal[(b * k + i) * n + j] for b, i in pairs for j in range(n)]
        log_weights = _scatter(logs, pairs, (B, k, n), ctx.device)
        values = soft_importance_q(rewards, log_weights, s.beta, s.self_normalize)
        details.update(log_weights=log_weights, ess=effective_sample_size(log_weights))
        return values.to(torch.float32), details
    values = q_from_rollouts(s, rewards, baseline_rewards)
    return values.to(torch.float32), details


ESTIMATORS: dict[str, Callable[[ValueContext], tuple[torch.Tensor, dict | None]]] = {
    "partial_reward": partial_reward,
    "rollout_mean": from_rollouts,
    "transfer": from_rollouts,
    "soft_importance": from_rollouts,  # the rollouts' log weights towards pi_k (MethodSpec.weighs_rollouts)
}
