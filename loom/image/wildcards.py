"""Wildcards: ``__name__`` in a prompt becomes a line of ``name.txt``, picked reproducibly from the seed.

Files come from the packaged ``wildcards/`` folder and from the folders in ``LOOM_WILDCARDS`` (os.pathsep-separated;
later folders win). Nested wildcards expand up to a fixed depth.

    expand_wildcards("a __color__ __garment__", seed=7) -> "a green sandal"

A name is a plain file stem (letters, digits, ``_`` and ``-``): it can only name a ``.txt`` file directly inside
one of the wildcard folders, never a path (``__/etc/passwd__`` or ``__../x__`` is not a wildcard at all and stays
in the prompt as text). Errors name the wildcard, never a server folder. The expanded prompt is bounded, so
wildcards that expand to wildcards cannot grow a prompt without limit.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

PACKAGED_DIR = Path(__file__).with_name("wildcards")
NAME = r"[A-Za-z0-9_-]+?"
PATTERN = re.compile(rf"__({NAME})__")
MAX_DEPTH = 5
MAX_EXPANDED_CHARS = 16_384


def wildcard_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LOOM_WILDCARDS", "").split(os.pathsep) if p]
    return [PACKAGED_DIR, *extra]


def wildcard_file(name: str) -> Path | None:
    """The last ``name.txt`` directly inside a wildcard folder (symlinks out of the folder are not followed)."""
    if not re.fullmatch(NAME, name):
        return None
    for folder in reversed(wildcard_dirs()):
        path = folder / f"{name}.txt"
        if path.is_file() and path.resolve().parent == folder.resolve():
            return path
    return None


def wildcard_options(name: str) -> list[str]:
    """The non-empty lines of ``name.txt`` (``#`` starts a comment line)."""
    if not re.fullmatch(NAME, name):
        raise ValueError("a wildcard name is a plain name of letters, digits, '_' and '-', never a path")
    path = wildcard_file(name)
    if path is None:
        raise ValueError(f"unknown wildcard __{name}__; GET /v1/images/options lists the known ones "
                         "(add NAME.txt to a folder in LOOM_WILDCARDS for more)")
    lines = [line.strip() for line in path.read_text().splitlines()]
    options = [line for line in lines if line and not line.startswith("#")]
    if not options:
        raise ValueError(f"wildcard __{name}__ has no lines to choose from")
    return options


def list_wildcards() -> list[str]:
    return sorted({p.stem for d in wildcard_dirs() if d.is_dir() for p in d.glob("*.txt") if wildcard_file(p.stem)})


def check_wildcards(prompt: str) -> None:
    """ValueError naming the first wildcard in ``prompt`` that does not exist (to answer 400 before queueing)."""
    for name in PATTERN.findall(prompt):
        wildcard_options(name)


def expand_wildcards(prompt: str, seed: int) -> str:
    """Replace each ``__name__`` with a line chosen by a RNG seeded with ``seed`` (same seed, same prompt)."""
    rng = random.Random(seed)
    for _ in range(MAX_DEPTH):
        if not PATTERN.search(prompt):
            break
        prompt = PATTERN.sub(lambda m: rng.choice(wildcard_options(m.group(1))), prompt)
        if len(prompt) > MAX_EXPANDED_CHARS:
            raise ValueError(f"the prompt grew past {MAX_EXPANDED_CHARS} characters while its wildcards expanded; "
                             "use fewer or shorter wildcards")
    return prompt
