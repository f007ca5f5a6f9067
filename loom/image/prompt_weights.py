"""Prompt weights in the syntax Fooocus and A1111 share: ``(word)``, ``[word]``, ``(word:1.3)``; pure text, no torch.

``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by ``w``; brackets
nest and their factors multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. A bracket
left open weights the text after it to the end; a closing bracket with no opener is plain text (as A1111 does).

    parse_weights("a (red:1.3) dress, [blurry]") -> [("a ", 1.0), ("red", 1.3), (" dress, ", 1.0), ("blurry", 1/1.1)]
"""

from __future__ import annotations

import re

UP = 1.1
"""The factor of one pair of round brackets (its inverse for square brackets)."""
MAX_ABS_WEIGHT = 10.0
"""Weights beyond this push CLIP's hidden states far outside what the UNet saw in training."""

# one syntax element per match: escape | explicit weight closing a round bracket | bracket | plain run
_TOKEN = re.compile(r"\\[\\()\[\]]|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|[()\[\]]|\\|:|[^\\()\[\]:]+")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``text`` as (segment, weight) pairs, neighbours of equal weight merged; ``[("", 1.0)]`` for empty text."""
    segments: list[list] = []  # [text, weight], mutable while brackets close
    opened: list[tuple[str, int]] = []  # (bracket, index of the first segment inside it)

    def close(bracket: str, factor: float) -> None:
        start = next(i for b, i in reversed(opened) if b == bracket)
        opened.remove((bracket, start))
        for seg in segments[start:]:
            seg[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token in ("(", "["):
            opened.append((token, len(segments)))
        elif weight is not None and _is_open("(", opened):
            close("(", float(weight))
        elif token == ")" and _is_open("(", opened):
            close("(", UP)
        elif token == "]" and _is_open("[", opened):
            close("[", 1 / UP)
        else:
            segments.append([token[1:] if len(token) == 2 and token[0] == "\\" else token, 1.0])
    for bracket, _ in reversed(list(opened)):
        close(bracket, UP if bracket == "(" else 1 / UP)
    return _merge(segments)


def _is_open(bracket: str, opened: list[tuple[str, int]]) -> bool:
    return any(b == bracket for b, _ in opened)


def _merge(segments: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def is_plain(text: str) -> bool:
    """True when ``text`` has no weight syntax at all (it parses to itself at weight 1)."""
    return parse_weights(text) == [(text, 1.0)]


def check_weights(text: str, name: str = "prompt") -> None:
    """Raise ValueError when a weight is outside ±MAX_ABS_WEIGHT."""
    for segment, weight in parse_weights(text):
        if abs(weight) > MAX_ABS_WEIGHT:
            raise ValueError(f"{name}: the weight of {segment[:40]!r} is {weight:g}; weights must be within "
                             f"±{MAX_ABS_WEIGHT:g}, e.g. (word:1.3)")
