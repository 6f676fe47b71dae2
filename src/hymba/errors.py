"""The one exception type users see as a single line (the CLI prints it and exits non-zero)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HymbaError(ValueError):
    """Bad input: a message that says what is wrong and how to fix it."""


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """' (did you mean 'hidden_size'?)' for a near miss of a known key, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""
