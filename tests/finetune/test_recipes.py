"""Recipes: `loom finetune --config recipe.yaml`, flags given on the command line over the file over the defaults,
unknown keys and wrong types as errors, the resolved settings written to the output folder and loadable again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from loom.cli import build_parser, main
from loom.finetune.cli import add_arguments, config_from_args
from loom.finetune.config import FinetuneConfig
from loom.finetune.recipe_file import RESOLVED_RECIPE, load_recipe, recipe_keys, write_recipe
from scripts.finetune_demo_data import write_jsonl

from .test_loss import RECORDS

DOCS_RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "sft-lora.yaml"


def resolve(argv: list[str]) -> FinetuneConfig:
    """`loom finetune ARGV` parsed by the real `loom` parser (a subcommand) and resolved as `loom finetune` does."""
    argv = ["finetune", *argv]
    return config_from_args(build_parser(argv).parse_args(argv))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_file_values_are_used_and_flags_given_override_them(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data: train.jsonl\noutput: out\nmax-steps: 10\npacking: false\n"
                                        "lr: 2e-4\nlora: true\nreport_to: [tensorboard]\nthreads: 3\n")
    cfg = resolve(["--config", str(recipe)])
    assert (cfg.data, cfg.output, cfg.max_steps, cfg.packing, cfg.lora) == ("train.jsonl", "out", 10, False, True)
    assert cfg.lr == 2e-4 and cfg.report_to == ["tensorboard"] and cfg.num_threads == 3
    assert cfg.model == "smollm2" and cfg.batch_size == 8  # not in the file: the command line's / config's defaults
    cfg = resolve(["--config", str(recipe), "--max-steps", "3", "--packing", "--output", "o2"])
    assert (cfg.max_steps, cfg.packing, cfg.output, cfg.data) == (3, True, "o2", "train.jsonl")
    # a flag given with its default value still wins over the file (packing defaults to on)
    assert FinetuneConfig.__dataclass_fields__["packing"].default is True
    cfg = resolve(["--config", str(recipe), "--no-lora", "--batch-size", "8"])
    assert cfg.lora is False and cfg.packing is False and cfg.batch_size == 8
    cfg = resolve(["--config", str(recipe), "--model", "other"])
    assert cfg.model == "other"
    cfg = resolve(["--config", str(write(tmp_path / "m.yaml", "model: tiny\ndata: d\noutput: o\n"))])
    assert cfg.model == "tiny"  # the recipe overrides the command line's default model


def test_no_recipe_works_as_before_and_missing_required_is_a_clear_error(tmp_path):
    cfg = resolve(["--data", "d.jsonl", "--output", "o"])
    assert cfg == FinetuneConfig(model="smollm2", data="d.jsonl", output="o")
    with pytest.raises(ValueError, match=r"missing --data: give them as flags or in the --config recipe \(data: "):
        resolve(["--output", "o", "--config", str(write(tmp_path / "r.yaml", "max_steps: 5\n"))])


def test_unknown_keys_name_the_key_and_close_matches(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data: d\noutput: o\nmax_step: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError) as err:
        load_recipe(recipe)
    text = str(err.value)
    assert str(recipe) in text and "unknown key 'max_step' (did you mean max_steps" in text
    assert "unknown key 'learning_rate'" in text  # every unknown key is reported, not only the first
    with pytest.raises(ValueError, match="'max-steps' sets max_steps a second time"):
        load_recipe(write(tmp_path / "twice.yaml", "max_steps: 1\nmax-steps: 2\n"))


@pytest.mark.parametrize(("text", "message"), [
    ('max_steps: "ten"\n', "max_steps: expected an integer or null, got 'ten'"),
    ("max_steps: 2.5\n", "max_steps: expected an integer or null, got 2.5"),
    ("packing: 1\n", "packing: expected true or false, got 1"),
    ("lr: fast\n", "lr: expected a number or null, got 'fast'"),
    ("template: jinja\n", "template: expected one of 'chat', 'alpaca', got 'jinja'"),
    ("report_to: {tensorboard: 1}\n", "report_to: expected a list of strings or null"),
    ("model: 7\n", "model: expected a string, got 7"),
])
def test_wrong_types_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match="r.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_values_are_converted_where_yaml_is_looser_than_the_fields(tmp_path):
    values = load_recipe(write(tmp_path / "r.yaml", "epochs: 2\nlr: 1e-3\nreport_to: wandb\nmax_steps: null\n"))
    assert values == {"epochs": 2.0, "lr": 1e-3, "report_to": ["wandb"], "max_steps": None}
    assert isinstance(values["epochs"], float)
    assert load_recipe(write(tmp_path / "empty.yaml", "")) == {}


def test_not_a_mapping_bad_yaml_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ValueError, match="a recipe is a YAML mapping"):
        load_recipe(write(tmp_path / "list.yaml", "- max_steps\n- 10\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(write(tmp_path / "bad.yaml", "max_steps: [1\n"))
    with pytest.raises(ValueError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="report_to takes tensorboard, wandb; got 'mlflow'"):  # the config's check
        resolve(["--config", str(write(tmp_path / "r.yaml", "data: d\noutput: o\nreport_to: [mlflow]\n"))])


def test_resolved_recipe_loads_back_to_the_same_config(tmp_path):
    cfg = FinetuneConfig(model="smollm2", data="train.jsonl", output=str(tmp_path / "out"), lora=True, lr=2e-5,
                         max_steps=7, packing=False, report_to=["tensorboard", "wandb"], epochs=1.5, eval_data=None,
                         warmup_steps=0, method="dpo", beta=0.25, min_lr_ratio=0.1)
    path = write_recipe(cfg, tmp_path / "out" / RESOLVED_RECIPE)
    data = yaml.safe_load(path.read_text())
    assert list(data) == recipe_keys()  # every setting, in the config's order
    assert resolve(["--config", str(path)]) == cfg
    assert path.read_text().startswith("# The resolved settings")


def test_every_flag_has_a_recipe_key():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    assert "max_steps" in dests and dests <= set(recipe_keys())


def test_docs_recipe_is_valid():
    values = load_recipe(DOCS_RECIPE)
    assert values["lora"] is True and values["report_to"] == ["tensorboard"]
    assert resolve(["--config", str(DOCS_RECIPE)]).max_steps == values["max_steps"]


@pytest.mark.slow
def test_cli_with_a_recipe_writes_settings_and_logs(tmp_path, tiny_model_dir, capsys):
    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yaml", yaml.safe_dump({
        "model": str(tiny_model_dir), "data": str(tmp_path / "train.jsonl"), "output": str(out), "lora": True,
        "lora-r": 4, "max_steps": 5, "batch_size": 2, "max_length": 128, "progress": False,
        "report_to": ["tensorboard"],
    }))
    assert main(["finetune", "--config", str(recipe), "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out / 'logs' / 'tensorboard'}" in printed
    assert f"metrics: {out / 'logs' / 'metrics.jsonl'}" in printed
    summary = json.loads((out / "loom_finetune.json").read_text())
    assert summary["steps"] == 2  # the flag over the file's 5
    resolved = resolve(["--config", str(out / RESOLVED_RECIPE)])
    assert resolved.to_dict() == summary["config"] and resolved.max_steps == 2 and resolved.lora_r == 4
    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(r["loss"] > 0 for r in lines)
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
