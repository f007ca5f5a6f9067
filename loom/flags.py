"""Command-line flags made from config dataclasses, so that a setting is declared once: its field name is the flag
(``max_num_seqs`` -> ``--max-num-seqs``), its docstring the help, its annotation the type and choices.

    add_config_arguments(parser.add_argument_group("engine"), EngineConfig, defaults={"model": None})
    config = config_from_args(EngineConfig, args)

Annotations map to argparse as: ``bool`` -> ``--flag / --no-flag``; ``int``, ``float``, ``str`` -> that type;
``X | None`` -> X with default None; ``Literal[...]`` -> choices; ``list[X]`` -> a repeatable flag
(``--stop a --stop b``); a dataclass -> one JSON object (``--speculative-config '{"method": "ngram", ...}'``, built
with the class's ``from_dict`` where it has one). Fields of any other type are left out (a config can still take
them in Python). vLLM builds its CLI from its configs the same way.

To let flags override settings from elsewhere (a config file), add them with ``given_only=True``: a flag not on the
command line then leaves no value at all, so ``given_args`` tells a flag given with its default value from one not
given (``--packing`` where the default is on still overrides a file's ``packing: false``):

    add_config_arguments(parser, FinetuneConfig, given_only=True)
    config = FinetuneConfig(**{**file_values, **given_args(FinetuneConfig, parser.parse_args())})
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal on the line after it), from the class's source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a class made at run time)
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_config_arguments(parser, cls: type, *, only: set[str] | None = None, skip: set[str] = frozenset(),
                         prefix: str = "", defaults: dict[str, Any] | None = None,
                         names: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None,
                         helps: dict[str, str] | None = None, given_only: bool = False,
                         several: frozenset[str] = frozenset()) -> list[str]:
    """Add one flag per field of dataclass ``cls`` (``only`` / ``skip`` choose fields); returns the fields added.

    prefix: put before each flag and dest (``image_`` -> ``--image-max-pixels``, dest ``image_max_pixels``).
    defaults: replace a field's default on this command line; names: a flag spelling other than the field's;
    aliases: more spellings of a flag; helps: replace a field's docstring; several: list fields whose flag also takes
    several values at once (``--lora-modules a=x b=y``, vLLM's spelling) besides being repeatable.
    given_only: a flag not given sets nothing in the parsed namespace (``argparse.SUPPRESS``) and none is required;
    ``--help`` still shows the defaults (those of ``defaults`` are then the caller's to apply). Read the flags given
    with ``given_args``.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults, names, aliases, helps = defaults or {}, names or {}, aliases or {}, helps or {}
    added = []
    for field in dataclasses.fields(cls):
        if (only is not None and field.name not in only) or field.name in skip or not field.init:
            continue
        spec = _argparse_spec(hints[field.name])
        if spec is None:
            continue
        if field.name in several and spec.get("action") == "append":
            spec = {**spec, "action": "extend", "nargs": "+"}
        default = defaults.get(field.name, _default(field))
        flag = "--" + prefix.replace("_", "-") + names.get(field.name, field.name).replace("_", "-")
        flags = [flag, *aliases.get(field.name, [])]
        text = helps.get(field.name, docs.get(field.name, "")).replace("%", "%%")
        if default is dataclasses.MISSING:
            kwargs = {"required": not given_only, "help": text}
        elif spec.get("action") is argparse.BooleanOptionalAction:
            kwargs = {"default": default, "help": f"{text} (default: {'on' if default else 'off'})".strip()}
        else:
            kwargs = {"default": default, "help": f"{text} (default: {default})".strip()}
        if given_only:
            kwargs["default"] = argparse.SUPPRESS  # not given: no attribute at all, whatever the value would be
        parser.add_argument(*flags, dest=prefix + field.name, **spec, **kwargs)
        added.append(field.name)
    return added


def config_from_args(cls: type, args: argparse.Namespace, prefix: str = "", skip: set[str] = frozenset(),
                     **overrides: Any):
    """``cls`` built from the parsed flags that ``add_config_arguments`` added (and ``overrides``); pass the same
    ``skip`` as there, so that a flag of another config with the same name is not taken for a skipped field."""
    return cls(**{**given_args(cls, args, prefix, skip), **overrides})


def given_args(cls: type, args: argparse.Namespace, prefix: str = "", skip: set[str] = frozenset()) -> dict[str, Any]:
    """``{field: value}`` for the fields of ``cls`` that have a value in ``args``: with flags added by
    ``add_config_arguments(..., given_only=True)``, exactly those given on the command line (even when the value
    given equals the default); otherwise every flag, defaults included."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in skip and hasattr(args, prefix + f.name)}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _argparse_spec(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords (type, choices, nargs, action) for a field's annotation; None: no flag for it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _argparse_spec(rest[0]) if len(rest) == 1 else None
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is list and len(args) == 1 and args[0] in (int, float, str):
        return {"type": args[0], "action": "append"}  # repeat the flag: a list flag never eats positionals
    if dataclasses.is_dataclass(annotation):
        return {"type": _json_object(annotation), "metavar": "JSON"}
    return None


def _json_object(cls: type):
    """An argparse type: a JSON object -> ``cls.from_dict(obj)`` (or ``cls(**obj)``); a bad one is a usage error
    that names the flag and says what is wrong."""

    def parse(text: str):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
        if not isinstance(values, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
        try:
            return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = cls.__name__
    return parse
