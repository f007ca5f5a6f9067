"""Step metrics for people: the JSONL file always, TensorBoard events that TensorBoard's own reader reads back, the
wandb hook (a fake module, no network), and a clear error at start when an asked-for package is missing."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loom.cli import main
from loom.finetune.config import FinetuneConfig
from loom.finetune.reporting import check_report_to, make_reporter, tensorboard_dir, where_logs_go

STEPS = {
    1: {"loss": 2.5, "grad_norm": 1.25, "lr": 1e-4, "rewards/margins": 0.125, "tokens_per_s": 300.0},
    2: {"loss": 2.0, "grad_norm": 0.75, "lr": 2e-4, "rewards/margins": 0.5, "tokens_per_s": 310.0},
    4: {"loss": 1.5, "grad_norm": float("nan"), "lr": 1.5e-4, "rewards/margins": 1.0, "tokens_per_s": 320.0},
}


def config(tmp_path, report_to=None) -> FinetuneConfig:
    return FinetuneConfig(model="m", data="d.jsonl", output=str(tmp_path / "out"), report_to=report_to)


def log_all(reporter) -> None:
    for step, metrics in STEPS.items():
        reporter.log(step, metrics)
    reporter.close()


def test_jsonl_has_one_line_per_logged_step(tmp_path):
    cfg = config(tmp_path)
    reporter = make_reporter(cfg)
    assert len(reporter.reporters) == 1
    log_all(reporter)
    lines = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 4]
    assert [r["loss"] for r in lines] == [2.5, 2.0, 1.5] and lines[1]["rewards/margins"] == 0.5
    assert lines[2]["grad_norm"] is None  # NaN is not JSON: null
    assert all(isinstance(r["time"], float) for r in lines)
    assert where_logs_go(cfg) == [f"metrics: {tmp_path / 'out' / 'logs' / 'metrics.jsonl'} (one JSON line per "
                                  "logged step)"]


def test_tensorboard_events_read_back_with_tensorboards_reader(tmp_path):
    cfg = config(tmp_path, ["tensorboard", "tensorboard"])
    reporter = make_reporter(cfg)
    assert len(reporter.reporters) == 2  # JSONL + one TensorBoard writer, though asked twice
    log_all(reporter)
    events = EventAccumulator(str(tensorboard_dir(cfg)))
    events.Reload()
    assert {"loss", "grad_norm", "lr", "rewards/margins", "tokens_per_s"} <= set(events.Tags()["scalars"])
    for name in ("loss", "lr", "rewards/margins"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2, 4]
        assert [s.value for s in scalars] == pytest.approx([STEPS[s][name] for s in (1, 2, 4)], rel=1e-6)
    assert f"tensorboard: tensorboard --logdir {tmp_path / 'out' / 'logs' / 'tensorboard'}" in where_logs_go(cfg)


def test_wandb_hook_with_a_fake_module(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(name="run")
    fake.log = lambda metrics, step: calls.append(("log", metrics, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    cfg = config(tmp_path, ["wandb"])
    check_report_to(cfg)
    reporter = make_reporter(cfg)
    assert calls == [("init", {"project": "my-project", "config": cfg.to_dict(),
                               "dir": str(tmp_path / "out" / "logs")})]
    log_all(reporter)
    assert calls[1:4] == [("log", STEPS[s], s) for s in (1, 2, 4)]
    assert calls[4:] == [("finish",)]
    assert "wandb: project my-project" in where_logs_go(cfg)[1]
    monkeypatch.delenv("WANDB_PROJECT")
    make_reporter(config(tmp_path / "2", ["wandb"])).close()
    assert calls[5][1]["project"] == "loom"


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match="report_to wandb needs the wandb package.*pip install wandb"):
        check_report_to(config(tmp_path, ["wandb"]))
    with pytest.raises(ValueError, match="pip install wandb"):
        make_reporter(config(tmp_path, ["wandb"]))


def test_missing_tensorboard_fails_at_start_with_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match=r"report_to tensorboard needs the tensorboard package.*"
                                         r"pip install 'tensorboard>=2\.14'.*pip install -e '\.\[tensorboard\]'"):
        check_report_to(config(tmp_path, ["tensorboard"]))
    with pytest.raises(ValueError, match="tensorboard package"):
        make_reporter(config(tmp_path, ["tensorboard"]))
    # the CLI stops before loading anything: the model path does not even exist
    code = main(["finetune", "--model", str(tmp_path / "no-model"), "--data", "d.jsonl",
                 "--output", str(tmp_path / "o"), "--report-to", "tensorboard"])
    assert code == 2
    assert "error: report_to tensorboard needs the tensorboard package" in capsys.readouterr().out
    check_report_to(config(tmp_path))  # nothing asked for: nothing needed
