"""Choosing parts of a model by name: glob strings or compiled regexes (FreezeLayers, LoRA, WeightMerging)."""

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

Pattern = str | re.Pattern[str]


def as_patterns(argument: str, patterns: Pattern | Sequence[Pattern] | None) -> tuple[Pattern, ...]:
    """``patterns`` as a tuple, checked: each a glob string (``"net.0.*"``) or a compiled ``re`` pattern.

    >>> as_patterns("x", "net.*")
    ('net.*',)
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str | re.Pattern):
        patterns = [patterns]
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str | re.Pattern):
            raise TypeError(
                f"`{argument}` takes name patterns: glob strings like 'net.0.*' or re.compile(...) patterns; "
                f"got {pattern!r}."
            )
    return patterns


def matching(
    argument: str,
    patterns: tuple[Pattern, ...],
    named: dict[str, Any],
    model: str,
    noun: str = "parameter",
    suffixes: bool = False,
) -> set[str]:
    """The names any of ``patterns`` matches (a glob with :func:`fnmatch.fnmatchcase`, a regex in full); a pattern
    that matches none is an error that lists the names (``noun`` says what they name). With ``suffixes``, a plain
    name without glob characters also matches every name that ends with it after a dot, as PEFT's
    ``target_modules`` does (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).

    >>> sorted(matching("train", ("net.2.*",), {"net.0.weight": 0, "net.2.weight": 0, "net.2.bias": 0}, "MLP"))
    ['net.2.bias', 'net.2.weight']
    """
    matched: set[str] = set()
    for pattern in patterns:
        hits = {name for name in named if _matches(pattern, name, suffixes)}
        if not hits:
            shown = ", ".join(list(named)[:8]) + (", …" if len(named) > 8 else "")
            raise ValueError(
                f"`{argument}` pattern {pattern.pattern if isinstance(pattern, re.Pattern) else pattern!r} matches "
                f"no {noun} of {model}; its {noun} names are like: {shown or 'none'}."
            )
        matched |= hits
    return matched


def _matches(pattern: Pattern, name: str, suffixes: bool) -> bool:
    """Whether ``pattern`` matches ``name``: a regex in full, a glob, or (``suffixes``) a plain name as its end.

    >>> _matches("q_proj", "layers.0.q_proj", suffixes=True), _matches("q_proj", "layers.0.q_proj", suffixes=False)
    (True, False)
    """
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    if fnmatch.fnmatchcase(name, pattern):
        return True
    plain = not any(character in pattern for character in "*?[")
    return suffixes and plain and name.endswith("." + pattern)
