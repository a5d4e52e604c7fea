"""VADER compound sentiment of the response, in [-1, 1]: a published lexicon, deterministic, offline."""

from __future__ import annotations

from .base import Reward

_ANALYZER = None


def vader_compound(texts) -> list[float]:
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return [_ANALYZER.polarity_scores(text)["compound"] for text in texts]


class VaderReward(Reward):
    name = "vader"

    def score(self, prompts, responses):
        return vader_compound(responses)
