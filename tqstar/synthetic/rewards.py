"""Rewards of the synthetic task.

- ``target_reward`` (r, the gold reward): VADER compound sentiment of the response, in [-1, 1].
- ``baseline_reward`` (r_bl, for indirect transfer): a different but correlated reward,

      r_bl(x, y) = 0.75 * compound(y) + 0.25 * on_topic(x, y)

  where ``on_topic`` is 1.0 when the response names the topic asked about in the last human turn
  of the prompt (the topic noun, e.g. "hotel", or one of its aspects, e.g. "staff") and 0.0
  otherwise (also 0.0 when the prompt names no synthetic topic). Range [-0.75, 1].

Both take ``(prompts, responses)`` lists of equal length and return one float per pair. The
caller cuts stop strings (e.g. "\\n\\nHuman:") first; the text is scored as given.
"""

from __future__ import annotations

import re

from ..data.hh import last_human_turn
from ..rewards.vader import vader_compound
from .corpus import TOPICS

SENTIMENT_WEIGHT = 0.75
TOPIC_WEIGHT = 0.25

_WORD = re.compile(r"[a-z]+")


def _check(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; they must pair up")


def target_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold reward r: VADER compound sentiment of each response (the prompt is not scored)."""
    _check(prompts, responses)
    return vader_compound(responses)


def on_topic(prompt: str, response: str) -> float:
    """1.0 when the response names the prompt's topic (or one of its aspects), else 0.0."""
    asked = set(_WORD.findall(last_human_turn(prompt).lower()))
    said = set(_WORD.findall(response.lower()))
    for topic, aspects in TOPICS.items():
        if topic in asked:
            words = {topic} | {w for a in aspects for w in a.split()}
            if words & said:
                return 1.0
    return 0.0


def baseline_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Baseline reward r_bl = 0.75 * compound(response) + 0.25 * on_topic(prompt, response)."""
    _check(prompts, responses)
    return [SENTIMENT_WEIGHT * c + TOPIC_WEIGHT * on_topic(p, r) for c, p, r in zip(vader_compound(responses), prompts, responses)]
