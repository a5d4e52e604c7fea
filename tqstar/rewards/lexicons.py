"""Two more published sentiment lexicons, as rewards and independent judges: AFINN and TextBlob's pattern lexicon.

Both score the response only (like VADER, tqstar/rewards/vader.py), are deterministic, and read nothing but the
word lists their packages ship: no network, no NLTK corpora. Neither shares a lexicon with VADER, so a run guided by
`reward=vader` can be judged by them (`tqstar evaluate RUN --gold-reward afinn`) without the judge being the guide.

- `afinn` (package `afinn`, word list AFINN-en-165, emoticons off): the sum `x` of the integer word valences
  (-5..+5; phrases such as "can't stand" count once) mapped like VADER's compound, `x / sqrt(x^2 + 15)`, into
  (-1, 1): 0 for no sentiment word, +-0.5 at |x| = 2.24, +-0.87 at |x| = 7. Monotone in `x`, so it ranks responses
  exactly as the raw AFINN sum does; `afinn_sum` gives the raw sum.
- `textblob` (package `textblob`, its PatternAnalyzer): the polarity, the mean of the clipped polarities in [-1, 1]
  of the known words (with "not", "very" and "!" handled), so in [-1, 1] as it is; 0 for no known word.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import Reward

# VADER's normalisation constant (vaderSentiment's `normalize(score, alpha=15)`): compound = x / sqrt(x^2 + 15).
AFINN_ALPHA = 15.0

_AFINN = None
_PATTERN = None


def _missing(package: str, kind: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"reward type {kind} needs the package {package!r}, which is not installed ({exc}); `make setup` or `pip install {package}`"
    )


def _afinn():
    global _AFINN
    if _AFINN is None:
        try:
            from afinn import Afinn
        except ImportError as exc:
            raise _missing("afinn", "afinn", exc) from None
        _AFINN = Afinn(language="en", emoticons=False)
    return _AFINN


def _pattern():
    global _PATTERN
    if _PATTERN is None:
        try:
            from textblob.en.sentiments import PatternAnalyzer
        except ImportError as exc:
            raise _missing("textblob", "textblob", exc) from None
        _PATTERN = PatternAnalyzer()
    return _PATTERN


def normalize_sum(x: float, alpha: float = AFINN_ALPHA) -> float:
    """VADER's compound map of a summed valence: x / sqrt(x^2 + alpha), in (-1, 1); 0 -> 0."""
    return x / math.sqrt(x * x + alpha)


def afinn_sum(texts) -> list[float]:
    """The raw AFINN-en-165 score of each text: the sum of its words' valences (unbounded; 0 = no sentiment word)."""
    analyzer = _afinn()
    return [float(analyzer.score(text)) for text in texts]


def afinn_compound(texts) -> list[float]:
    """AFINN's sum mapped like VADER's compound, x / sqrt(x^2 + 15), in (-1, 1)."""
    return [normalize_sum(x) for x in afinn_sum(texts)]


def textblob_polarity(texts) -> list[float]:
    """TextBlob's PatternAnalyzer polarity of each text, in [-1, 1] (0 = no known word)."""
    analyzer = _pattern()
    return [float(analyzer.analyze(text).polarity) for text in texts]


class AfinnReward(Reward):
    name = "afinn"

    def __init__(self, stop_strings=(), bounds=None):
        super().__init__(stop_strings, bounds)
        _afinn()  # a missing package stops the run when the reward is built, not at its first score

    def score(self, prompts, responses):
        return afinn_compound(responses)


class TextBlobReward(Reward):
    name = "textblob"

    def __init__(self, stop_strings=(), bounds=None):
        super().__init__(stop_strings, bounds)
        _pattern()

    def score(self, prompts, responses):
        return textblob_polarity(responses)
