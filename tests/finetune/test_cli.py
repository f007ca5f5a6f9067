"""`loom finetune` end to end on a tiny random Llama folder: train, export, evaluate base vs tuned; bad data errors."""

from __future__ import annotations

import json

import pytest

from loom.cli import main
from scripts.finetune_demo_data import write_jsonl

from .test_loss import RECORDS


@pytest.mark.slow
def test_cli_lora_run_exports_a_loadable_folder(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    write_jsonl(RECORDS[:4], tmp_path / "eval.jsonl")
    out = tmp_path / "out"
    code = main([
        "finetune", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.jsonl"),
        "--eval-data", str(tmp_path / "eval.jsonl"), "--output", str(out), "--lora", "--lora-r", "4",
        "--max-steps", "3", "--batch-size", "2", "--max-length", "128", "--no-progress", "--save-every", "2",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "tuned" in printed and "exact match" in printed
    summary = json.loads((out / "loom_finetune.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["base"]["num_examples"] == 4
    assert summary["eval"]["tuned"]["loss"] != summary["eval"]["base"]["loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-000003" / "trainable.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and tok.chat_template
    assert "lora" not in " ".join(n for n, _ in model.named_parameters())


def test_cli_reports_malformed_data_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    code = main(["finetune", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress"])
    assert code == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().out
