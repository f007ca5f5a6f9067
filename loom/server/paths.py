"""Paths a request names, confined to a folder the operator chose (``--model-store``, ``--lora-store``)."""

from __future__ import annotations

from pathlib import Path


def resolve_inside(store: Path, value: str | Path) -> Path | None:
    """``value`` resolved against ``store`` (a relative path is taken from it; ``~``, ``..`` and symlinks are followed);
    None when the result lies outside ``store``, which must be resolved already."""
    target = Path(value).expanduser()
    target = (store / target).resolve()  # an absolute path replaces the store
    return target if target.is_relative_to(store) else None
