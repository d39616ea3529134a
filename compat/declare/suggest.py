"""Names a user mistyped: the closest declared ones, so a refusal says what was probably meant.

A refusal names the nearest few (``difflib``), not every name there is: 29 families in one line
hide the one the user wanted. With nothing close, a short list is still shown whole, and a long
one is left to the command that lists it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "key_hints", "unknown_name"]

_LIST_AT_MOST = 12  # a list this short is shown whole when nothing is close


def did_you_mean(word: str, options: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``"did you mean 'llama'?"`` (or two or three names), or ``""`` when nothing is close (``cutoff``:
    difflib's similarity ratio; two-letter keys need a lower one, ``tq`` is 0.5 from ``tp``)."""
    close = difflib.get_close_matches(word, sorted(set(options)), n=n, cutoff=cutoff)
    if not close:
        return ""
    names = [repr(c) for c in close]
    return "did you mean " + (f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]) + "?"


def unknown_name(kind: str, plural: str, name: str, known: Iterable[str], listed_by: str = "") -> str:
    """One sentence for an unknown ``kind``: the closest names, else the list (or the command that lists it)."""
    names = sorted(set(known))
    hint = did_you_mean(name, names)
    if hint:
        return f"unknown {kind} {name!r}; {hint}"
    if len(names) <= _LIST_AT_MOST or not listed_by:
        return f"unknown {kind} {name!r}; known {plural}: {', '.join(names)}"
    return f"unknown {kind} {name!r}; none of the {len(names)} {plural} is close ({listed_by} lists them)"


def key_hints(unknown: Iterable[str], allowed: Iterable[str]) -> str:
    """``" ('layout': did you mean 'layouts'?)"`` for the unknown keys of a table that are close to allowed ones."""
    allowed = sorted(set(allowed))
    hints = [f"{key!r}: {hint}" for key in sorted(unknown) if (hint := did_you_mean(key, allowed))]
    return f" ({'; '.join(hints)})" if hints else ""
