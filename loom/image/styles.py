"""Styles as data: prompt templates with ``{prompt}`` and a negative prompt, several combinable.

Styles live in JSON files (a list of ``{"name", "prompt", "negative_prompt"}``): the packaged ``styles.json`` plus
any file named by ``LOOM_STYLES`` (a path; later names override earlier ones).

    apply_styles("a red sneaker", ["Photograph", "Sharp"], "") -> (positive, negative)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGED_STYLES = Path(__file__).with_name("styles.json")


@dataclass(frozen=True, slots=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str = ""

    def __post_init__(self):
        if "{prompt}" not in self.prompt:
            raise ValueError(f"style {self.name!r}: its prompt template must contain {{prompt}}, got {self.prompt!r}")


def read_styles(path: str | Path) -> dict[str, Style]:
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a styles file holds a JSON list of {{name, prompt, negative_prompt}}")
    return {e["name"]: Style(e["name"], e["prompt"], e.get("negative_prompt", "")) for e in entries}


@lru_cache(maxsize=4)
def _load(extra: str | None) -> dict[str, Style]:
    styles = read_styles(PACKAGED_STYLES)
    if extra:
        styles.update(read_styles(extra))
    return styles


def load_styles() -> dict[str, Style]:
    """All known styles by name (packaged, then $LOOM_STYLES)."""
    return _load(os.environ.get("LOOM_STYLES"))


def apply_styles(prompt: str, names: list[str], negative_prompt: str = "") -> tuple[str, str]:
    """Wrap ``prompt`` in each style's template in order; join the negatives after the user's own."""
    styles = load_styles()
    unknown = [n for n in names if n not in styles]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; GET /v1/images/styles lists the {len(styles)} known ones")
    negatives = [negative_prompt] if negative_prompt else []
    for name in names:
        style = styles[name]
        prompt = style.prompt.replace("{prompt}", prompt)
        if style.negative_prompt:
            negatives.append(style.negative_prompt)
    return prompt, ", ".join(negatives)
