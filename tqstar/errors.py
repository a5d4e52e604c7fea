"""The one error every layer raises for bad input, and the did-you-mean hint its messages use.

Ground module: imports nothing from tqstar. The CLI turns a `ConfigError` into one line on stderr
and exit code 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A bad config or bad input: the CLI prints the message on one line and exits 2."""


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """'did you mean 'tqstar'? allowed: a, b, c' (the hint only when a close match exists)."""
    allowed = list(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed: {', '.join(allowed)}"


def check_choice(key: str, value: object, allowed: Iterable[str]) -> None:
    """ConfigError `key='value' is not allowed; did you mean ...? allowed: ...` unless `value` is one of `allowed`:
    the one message of every closed choice a config names (dtypes, prompt and dataset formats, reward types)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; {did_you_mean(value, allowed)}")
