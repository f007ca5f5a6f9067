"""Flags made from config dataclasses: names, help from field docstrings, types, choices, booleans, round trip."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from loom.engine.config import EngineConfig
from loom.entrypoints.openai.serve import LLMServerConfig, add_serve_arguments
from loom.entrypoints.openai.tool_parsers import TOOL_PARSERS
from loom.entrypoints.openai.tools import ToolSettings
from loom.flags import add_config_arguments, config_from_args, field_docs, given_args


@dataclass(slots=True)
class Demo:
    name: str
    """Who to greet."""
    max_num_seqs: int = 8
    """Sequences in one step."""
    ratio: float | None = None
    """A share; None: automatic."""
    mode: Literal["fast", "exact"] = "fast"
    enabled: bool = True
    """Turn it off with --no-enabled (100% sure)."""
    tags: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    """Not a command-line type: no flag."""


def parse(argv: list[str], **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo, **kw)
    return parser.parse_args(argv)


def test_field_docs_come_from_the_source():
    docs = field_docs(Demo)
    assert docs["max_num_seqs"] == "Sequences in one step."
    assert "mode" not in docs and docs["ratio"] == "A share; None: automatic."


def test_flags_types_choices_booleans_and_round_trip():
    args = parse(["--name", "x", "--max-num-seqs", "4", "--ratio", "0.5", "--mode", "exact", "--no-enabled",
                  "--tags", "a", "--tags", "b"])
    assert config_from_args(Demo, args) == Demo("x", 4, 0.5, "exact", False, ["a", "b"])
    assert config_from_args(Demo, parse(["--name", "y"])) == Demo("y")
    with pytest.raises(SystemExit):
        parse(["--name", "x", "--mode", "slow"])  # not a choice
    with pytest.raises(SystemExit):
        parse([])  # a field without default is a required flag
    assert not hasattr(parse(["--name", "x"]), "options")


def test_help_defaults_prefix_and_renames():
    parser = argparse.ArgumentParser()
    added = add_config_arguments(parser, Demo, prefix="demo_", skip={"tags"}, defaults={"name": "z"},
                                 names={"max_num_seqs": "seqs"}, aliases={"ratio": ["--r"]})
    assert "tags" not in added and "options" not in added
    text = parser.format_help()
    assert "--demo-seqs" in text and "Sequences in one step. (default: 8)" in text and "--r" in text
    args = parser.parse_args(["--demo-seqs", "3", "--r", "0.1"])
    assert config_from_args(Demo, args, prefix="demo_") == Demo("z", 3, 0.1)


def test_engine_config_flags_cover_its_fields_with_choices():
    parser = argparse.ArgumentParser()
    added = add_config_arguments(parser, EngineConfig)
    assert {"model", "dtype", "max_num_seqs", "enable_prefix_caching", "attention_backend"} <= set(added)
    args = parser.parse_args(["--dtype", "bfloat16", "--no-enable-prefix-caching", "--max-num-seqs", "4"])
    config = config_from_args(EngineConfig, args)
    assert (config.dtype, config.enable_prefix_caching, config.max_num_seqs) == ("bfloat16", False, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])


def test_given_only_tells_given_flags_from_defaults_even_when_equal():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo, defaults={"max_num_seqs": 4}, given_only=True)
    assert given_args(Demo, parser.parse_args([])) == {}  # nothing given: nothing set, no required flag
    given = given_args(Demo, parser.parse_args(["--enabled", "--max-num-seqs", "4", "--tags", "a", "--tags", "b"]))
    assert given == {"enabled": True, "max_num_seqs": 4, "tags": ["a", "b"]}  # values equal to the defaults count
    assert given_args(Demo, parser.parse_args(["--no-enabled", "--ratio", "0.5"])) == {"enabled": False, "ratio": 0.5}
    text = " ".join(parser.format_help().split())  # help still shows the defaults
    assert "(100% sure). (default: on)" in text and "Sequences in one step. (default: 4)" in text
    assert config_from_args(Demo, parser.parse_args(["--name", "x"])) == Demo("x")  # the dataclass fills the rest
    top = argparse.ArgumentParser()  # as a subcommand (loom finetune): the parent namespace gets only what was given
    add_config_arguments(top.add_subparsers(dest="command").add_parser("run"), Demo, given_only=True)
    assert given_args(Demo, top.parse_args(["run", "--name", "y", "--enabled"])) == {"name": "y", "enabled": True}


def test_serve_tool_flags_come_from_the_server_config():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", "m", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    config = config_from_args(LLMServerConfig, args, skip={"engine"}, engine=config_from_args(EngineConfig, args))
    assert config.tool_settings == ToolSettings(parser="hermes", enable_auto=True, exclude_when_none=False)
    assert f"{{{','.join(TOOL_PARSERS)}}}" in parser.format_help()  # the choices are the registered parsers
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--tool-call-parser", "qwen"])
    with pytest.raises(ValueError, match="--tool-call-parser"):
        LLMServerConfig(EngineConfig(model="m"), enable_auto_tool_choice=True)


@dataclass(slots=True)
class Inner:
    k: int
    name: str = "x"


@dataclass(slots=True)
class Outer:
    inner: Inner | None = None
    """Inner settings as JSON."""


def test_dataclass_field_is_one_json_object_flag(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    assert config_from_args(Outer, parser.parse_args(["--inner", '{"k": 3}'])) == Outer(Inner(3))
    assert config_from_args(Outer, parser.parse_args([])) == Outer()
    assert "--inner JSON" in parser.format_help()
    for bad, message in [("{k: 3}", "not valid JSON"), ("[3]", "expected a JSON object"),
                         ('{"j": 3}', "unexpected keyword argument 'j'")]:
        with pytest.raises(SystemExit):
            parser.parse_args(["--inner", bad])
        assert message in capsys.readouterr().err
