"""The SmolLM2 experiment's two rewards: r = VADER (the target) and r_bl = on-topic (the indirect baseline's).

r_bl is the cosine similarity of the user's question and the response, both embedded by the packaged
all-MiniLM-L6-v2 (tqstar.embedder, the coherence metric's embedder): correlated with r only through
what the model writes, so a baseline aligned to it is aligned to a different reward, which is what
indirect transfer corrects for. The question is the prompt's last Human turn (the reward sees the HH
prompt as written, not the chat template). Values lie in [-1, 1] (conf/reward/smollm2_on_topic.yaml).
"""

from __future__ import annotations

from typing import Sequence

from ..data.hh import last_human_turn
from ..rewards.vader import vader_compound

EMBEDDER = "packaged:all-minilm-l6-v2"


def on_topic(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """cos(embed(last question of the prompt), embed(response)) per pair, in [-1, 1]."""
    from ..embedder import Embedder

    embedder = Embedder.load(EMBEDDER, device="auto", batch_size=64)
    questions = [last_human_turn(p).strip() for p in prompts]
    return [max(-1.0, min(1.0, v)) for v in embedder.cosine(questions, [str(r) for r in responses])]


def target_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """r: VADER compound sentiment of the response, in [-1, 1] (what reward=vader scores)."""
    return vader_compound(list(responses))


def baseline_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """r_bl: `on_topic`."""
    return on_topic(prompts, responses)
