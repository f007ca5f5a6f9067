"""Wildcards: ``__name__`` in a prompt becomes a line of ``name.txt``, picked reproducibly from the seed.

Files come from the packaged ``wildcards/`` folder and from the folders in ``LOOM_WILDCARDS`` (os.pathsep-separated;
later folders win). Nested wildcards expand up to a fixed depth.

    expand_wildcards("a __color__ __garment__", seed=7) -> "a green sandal"
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

PACKAGED_DIR = Path(__file__).with_name("wildcards")
PATTERN = re.compile(r"__([A-Za-z0-9_\-/]+?)__")
MAX_DEPTH = 5


def wildcard_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LOOM_WILDCARDS", "").split(os.pathsep) if p]
    return [PACKAGED_DIR, *extra]


def wildcard_options(name: str) -> list[str]:
    """The non-empty lines of the last ``name.txt`` found in the wildcard folders."""
    for folder in reversed(wildcard_dirs()):
        path = folder / f"{name}.txt"
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    raise ValueError(f"unknown wildcard __{name}__: add {name}.txt to one of {[str(d) for d in wildcard_dirs()]}")


def list_wildcards() -> list[str]:
    return sorted({p.stem for d in wildcard_dirs() if d.is_dir() for p in d.glob("*.txt")})


def expand_wildcards(prompt: str, seed: int) -> str:
    """Replace each ``__name__`` with a line chosen by a RNG seeded with ``seed`` (same seed, same prompt)."""
    rng = random.Random(seed)
    for _ in range(MAX_DEPTH):
        if not PATTERN.search(prompt):
            break
        prompt = PATTERN.sub(lambda m: rng.choice(wildcard_options(m.group(1))), prompt)
    return prompt
