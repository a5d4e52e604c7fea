"""Selecting a token from scores: argmax, or a seeded draw from softmax(score / temperature).

Draws use inverse-CDF sampling with one uniform per row from that row's own generator, so a
prompt's samples do not depend on the batch it was decoded in.
"""

from __future__ import annotations

import torch


def sample_index(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: probs (R, C), uniform (R,) -> indices (R,). Deterministic given the noise."""
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1).contiguous()).squeeze(-1)
    return index.clamp(max=probs.shape[-1] - 1)


def select(scores: torch.Tensor, generators, selection: str, temperature: float):
    """Pick a column per row of `scores` (R, C); return (index (R,), log p_decoder of it, or None when greedy)."""
    if selection == "greedy":
        return scores.argmax(-1), None
    policy = torch.log_softmax(scores / temperature, dim=-1)
    # drawn on each generator's own device (the CPU: the same draws on any accelerator), then moved
    uniform = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(policy.device)
    pick = sample_index(policy.exp(), uniform)
    return pick, policy.gather(1, pick[:, None]).squeeze(1)
