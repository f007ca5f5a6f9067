"""Recipes: a ``loom finetune`` run's settings in a YAML file, so that a run is a file to keep, share and rerun.

    loom finetune --config recipe.yaml --max-steps 50     # flags given on the command line override the file

    values = load_recipe("recipe.yaml")                   # {"model": "smollm2", "max_steps": 100, ...}, checked
    cfg = resolve_config(values, given={"max_steps": 50}, defaults={"model": "smollm2"})
    write_recipe(cfg, Path(cfg.output) / RESOLVED_RECIPE)  # loads again with --config: the same FinetuneConfig

A recipe is a YAML mapping whose keys are ``FinetuneConfig``'s fields, i.e. the flags without ``--`` (``max_steps`` or
``max-steps``). Unknown keys and values of the wrong type are errors that name the key; relative paths are taken from
the current directory, as on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from loom.finetune.config import FinetuneConfig

RESOLVED_RECIPE = "loom_finetune_config.yaml"
"""The file in the output folder that holds a run's resolved settings (defaults, recipe and flags merged)."""


class _WrongType(Exception):
    pass


def recipe_keys() -> list[str]:
    """The keys a recipe may have: FinetuneConfig's fields."""
    return [f.name for f in dataclasses.fields(FinetuneConfig) if f.init]


def load_recipe(path: str | Path, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """``{field: value}`` from a YAML recipe, keys normalised (``max-steps`` -> ``max_steps``) and values checked
    against the field types (a float field also takes an int); ValueError naming the file and key otherwise.

    aliases: more key spellings, e.g. ``{"threads": "num_threads"}`` for the ``--threads`` flag."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the recipe {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of settings (max_steps: 100), got a "
                         f"{type(data).__name__}")
    keys = recipe_keys()
    hints = typing.get_type_hints(FinetuneConfig)
    aliases = aliases or {}
    values: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name not in keys:
            close = difflib.get_close_matches(name, keys + list(aliases), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "see `loom finetune --help` for the settings"
            errors.append(f"unknown key {key!r} ({hint})")
            continue
        if name in values:
            errors.append(f"{key!r} sets {name} a second time (max_steps and max-steps are the same key)")
            continue
        try:
            values[name] = _check(value, hints[name])
        except _WrongType:
            errors.append(f"{key}: expected {_describe(hints[name])}, got {value!r}")
    if errors:
        raise ValueError(f"{path}: " + "; ".join(errors))
    return values


def resolve_config(values: dict[str, Any], given: dict[str, Any] | None = None,
                   defaults: dict[str, Any] | None = None) -> FinetuneConfig:
    """FinetuneConfig from, in rising precedence: ``defaults`` (the command line's own, e.g. model=smollm2), the
    recipe's ``values``, and the flags ``given`` on the command line; ValueError if a required setting is missing."""
    merged = {**(defaults or {}), **values, **(given or {})}
    missing = [f.name for f in dataclasses.fields(FinetuneConfig)
               if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in merged]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        keys = ", ".join(f"{name}: ..." for name in missing)
        raise ValueError(f"missing {flags}: give them as flags or in the --config recipe ({keys})")
    return FinetuneConfig(**merged)


def write_recipe(cfg: FinetuneConfig, path: str | Path) -> Path:
    """Write ``cfg`` as a YAML recipe (every field, in declaration order) that ``load_recipe`` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# The resolved settings of a `loom finetune` run (defaults, --config recipe and flags merged).\n"
              f"# Rerun it with: loom finetune --config {path}\n")
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _check(value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (as converted: int -> float, a single string -> a list of one); else
    _WrongType."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value  # not a type a flag takes either: FinetuneConfig checks it
        return _check(value, rest[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 2e-4 as a string: it wants 2.0e-4
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            return [_check(item, args[0]) for item in items]
    else:
        return value
    raise _WrongType


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join([_describe(a) for a in rest] + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation,
                                                                                              str(annotation))
