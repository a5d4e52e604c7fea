"""Metrics of decoded responses that are pure functions of texts and numbers: diversity, distance
from SFT, win-tie.

Definitions follow the TQ* authors, who reuse ARGS' evaluation (deeplearning-wisc/args, metrics.py):
- rep-n = 100 * (1 - unique n-grams / (n-grams + 1)) over the word tokens of ONE response, and
  diversity = prod_{n=2..4} (1 - rep-n / 100), both computed per response and then averaged over
  the prompts (ARGS averages the per-response values; it never pools n-grams across responses).
- Word tokens are NLTK's `word_tokenize` (Punkt sentence split + NLTK's improved Treebank word
  tokenizer). NLTK needs a data download for Punkt, so this module carries an offline port of the
  two (`word_tokenize` below); the tests check it against NLTK itself where NLTK is installed.

No torch, transformers or network here: coherence (a transformers sentence embedder) lives in
`tqstar.embedder`, the LLM judge (an OpenAI-compatible endpoint) in `tqstar.judge`, and the
summary statistics (mean, standard error) in `tqstar.stats`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from .stats import mean_and_stderr

# ---------------------------------------------------------------------------------------------
# Word tokenizer: an offline port of nltk.word_tokenize (nltk 3.10; Apache 2.0)
# ---------------------------------------------------------------------------------------------
# word_tokenize(text) = [NLTKWordTokenizer().tokenize(s) for s in PunktSentenceTokenizer(text)].
# The sentence split matters only at sentence ends: the word tokenizer detaches a period solely at
# the end of its input, so "home. Then" gives 'home', '.' after a split and 'home.' without one.

_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_PUNCTUATION = [
    (re.compile(r"([^\.])(\.)([\]\)}>\"\'»”’ ]*)\s*$"), r"\1 \2 \3 "),  # the final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),  # figure dash, en/em dashes, horizontal bar
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
# Robert MacIntyre's contractions, as NLTK uses them: "cannot" -> "can not", "gonna" -> "gon na".
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(not)\b",
        r"(?i)\b(d)('ye)\b",
        r"(?i)\b(gim)(me)\b",
        r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b",
        r"(?i)\b(lem)(me)\b",
        r"(?i)\b(more)('n)\b",
        r"(?i)\b(wan)(na)(?=\s)",
        r"(?i) ('t)(is)\b",
        r"(?i) ('t)(was)\b",
    )
]


def treebank_tokenize(sentence: str) -> list[str]:
    """NLTK's improved Treebank word tokenizer (`NLTKWordTokenizer.tokenize`) for one sentence."""
    text = sentence
    for pattern, replacement in _STARTING_QUOTES:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _PUNCTUATION:
        text = pattern.sub(replacement, text)
    for pattern, replacement in (_PARENS_BRACKETS, _DOUBLE_DASHES):
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _ENDING_QUOTES:
        text = pattern.sub(replacement, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


# Punkt without its trained English model: the same decision rules, with a short hand-made list of
# abbreviations (no break after "Dr.") and frequent sentence starters (a break after "etc." before
# "The"). The trained model also learns word casing statistics; on ordinary prose that changes
# nothing, on abbreviation-heavy text a few periods may attach differently.
ABBREVIATIONS = frozenset(
    """
mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd corp jan feb apr jun jul aug sep sept oct nov dec
a.m p.m u.s u.k ph.d approx dept gov capt sgt ave
""".split()
)
SENTENCE_STARTERS = frozenset(
    """
the this that these those it its i we he she they you my our his her their a an in on at for
but and so if then there when while however also after before as what how why
""".split()
)
_CLOSING = "\"')]}»”’"
_WORD_START_SKIP = '("`{[:;&#*@)}]-,'  # characters Punkt never starts a word with
_NUMBER = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")


def _punkt_token(token: str) -> str:
    """The first Punkt word token of a whitespace-delimited token ("(Then" -> "(", "...so" -> "...")."""
    multi = re.match(r"-{2,}|\.{2,}", token)
    if multi:
        return multi.group()
    if token[0] in _WORD_START_SKIP:
        return token[0]
    word = re.match(r"[^)\";}\]*:@'({\[!?,]+", token)
    return word.group() if word else token[0]


def _is_sentence_break(token: str, next_token: str) -> bool:
    core = token.rstrip(_CLOSING).lstrip(_WORD_START_SKIP)
    if not core or core[-1] not in ".?!":
        return False
    if core[-1] in "?!":
        return True
    if core.endswith(".."):  # an ellipsis never ends a sentence without casing statistics
        return False
    word = core[:-1].lower()
    following = _punkt_token(next_token)
    # Punkt's orthographic evidence that the next token starts a sentence; with no learned casing
    # statistics it is "no" for punctuation and lower case, "unknown" otherwise.
    not_starter = following in ";:,.!?" or following[0].islower()
    if word in ABBREVIATIONS or word.split("-")[-1] in ABBREVIATIONS:
        return following[0].isupper() and following.lower().rstrip(".") in SENTENCE_STARTERS
    if _INITIAL.match(core):  # "J. Bach": an initial
        return not not_starter and not following[0].isupper()
    if _NUMBER.match(core):  # "in 1990. then" vs "in 1990. The"
        return not not_starter
    return True


_REALIGN = re.compile(r"^([\"\')\]}]+?)(?:\s+|(?=--)|$)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` as Punkt (without a trained model) splits them; whitespace-stripped."""
    tokens = list(re.finditer(r"\S+", text))
    ends = [current.end() for current, following in zip(tokens, tokens[1:]) if _is_sentence_break(current.group(), following.group())]
    spans, start = [], 0
    for end in ends + [len(text)]:
        # Closing quotes and brackets that open a sentence belong to the one before (Punkt's realignment).
        match = _REALIGN.match(text[start:end].lstrip()) if spans else None
        if match:
            offset = len(text[start:end]) - len(text[start:end].lstrip())
            spans[-1] = (spans[-1][0], start + offset + len(match.group(1)))
            start += offset + match.end()
        spans.append((start, end))
        start = end
    return [text[a:b].strip() for a, b in spans if text[a:b].strip()]


def word_tokenize(text: str) -> list[str]:
    """Offline equivalent of `nltk.word_tokenize(text)` (English): sentence split, then Treebank words."""
    return [token for sentence in split_sentences(text) for token in treebank_tokenize(sentence)]


# ---------------------------------------------------------------------------------------------
# Diversity (ARGS / TQ*)
# ---------------------------------------------------------------------------------------------


def rep_n(tokens: Sequence[str], n: int) -> float:
    """100 * (1 - unique n-grams / (n-grams + 1)) of one token sequence; 100 when it has no n-gram
    (ARGS' formula as is: a response shorter than n words counts as fully repetitive)."""
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 100.0 * (1.0 - len(set(ngrams)) / (len(ngrams) + 1))


def diversity_scores(text: str) -> dict[str, float]:
    """rep_2, rep_3, rep_4 and diversity = prod_n (1 - rep_n / 100) of one response."""
    tokens = word_tokenize(text)
    scores = {f"rep_{n}": rep_n(tokens, n) for n in (2, 3, 4)}
    product = 1.0
    for n in (2, 3, 4):
        product *= 1.0 - scores[f"rep_{n}"] / 100.0
    scores["diversity"] = product
    return scores


# ---------------------------------------------------------------------------------------------
# Distance from the SFT model
# ---------------------------------------------------------------------------------------------


def sft_logprob_per_token(sft_logprobs: Sequence[float] | None) -> float | None:
    """Mean log pi_sft(y_t | s_t) over the response tokens (None for an empty response)."""
    if not sft_logprobs:
        return None
    return math.fsum(sft_logprobs) / len(sft_logprobs)


def kl_estimate(policy_logprobs: Sequence[float] | None, sft_logprobs: Sequence[float] | None) -> float | None:
    """sum_t [log p_dec(y_t|s_t) - log pi_sft(y_t|s_t)] for one sampled response: an unbiased
    single-sample estimate of KL(p_dec || pi_sft) over whole responses when y ~ p_dec."""
    if policy_logprobs is None or sft_logprobs is None:
        return None
    if len(policy_logprobs) != len(sft_logprobs):
        raise ValueError(f"{len(policy_logprobs)} policy log-probs but {len(sft_logprobs)} SFT log-probs")
    return math.fsum(p - s for p, s in zip(policy_logprobs, sft_logprobs))


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-n sampling from its base policy: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------------------------
# Win-tie against a reference
# ---------------------------------------------------------------------------------------------


def win_tie(values: Sequence[float], reference: Sequence[float], margin: float = 0.0) -> dict[str, Any]:
    """Paired outcomes of `values` against `reference`: +1 win (value > ref + margin), 0 tie, -1 lose.

    Returns counts, rates in percent (win_rate, tie_rate, lose_rate, win_tie_rate = win + tie) and
    the per-pair outcomes.
    """
    if len(values) != len(reference):
        raise ValueError(f"win_tie needs paired values, got {len(values)} and {len(reference)}")
    outcomes = []
    for value, ref in zip(values, reference):
        difference = float(value) - float(ref)
        outcomes.append(1 if difference > margin else -1 if difference < -margin else 0)
    total = len(outcomes)
    wins, ties = outcomes.count(1), outcomes.count(0)
    losses = total - wins - ties
    rate = (lambda k: 100.0 * k / total) if total else (lambda k: None)
    return {
        "n": total,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": rate(wins),
        "tie_rate": rate(ties),
        "lose_rate": rate(losses),
        "win_tie_rate": rate(wins + ties),
        "outcomes": outcomes,
    }


def bootstrap_rates(outcomes: Sequence[int], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (in percent) of the win, tie and lose rates of paired outcomes
    (+1 / 0 / -1), resampling the prompts with replacement: {'win_rate_ci': [lo, hi], ...}."""
    import numpy as np

    values = np.asarray(outcomes)
    if values.size == 0:
        return {f"{name}_ci": [None, None] for name in ("win_rate", "tie_rate", "lose_rate")}
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(n_boot, values.size))]
    tail = 100 * (1 - level) / 2
    out = {}
    for name, outcome in (("win_rate", 1), ("tie_rate", 0), ("lose_rate", -1)):
        rates = 100.0 * (samples == outcome).mean(axis=1)
        out[f"{name}_ci"] = [float(np.percentile(rates, tail)), float(np.percentile(rates, 100 - tail))]
    return out


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of value - reference over paired prompts."""
    if len(values) != len(reference):
        raise ValueError(f"paired_difference needs paired values, got {len(values)} and {len(reference)}")
    return mean_and_stderr([float(v) - float(r) for v, r in zip(values, reference)])
