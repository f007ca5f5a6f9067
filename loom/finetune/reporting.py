"""Where a run's step metrics go: a JSONL file always (``OUTPUT/logs/metrics.jsonl``), more with ``report_to``.

    reporter = make_reporter(cfg)              # writes OUTPUT/logs/metrics.jsonl (+ tensorboard/, + wandb)
    reporter.log(step, {"loss": 1.93, "lr": 2e-4})
    reporter.close()

``report_to=["tensorboard"]`` writes TensorBoard event files to ``OUTPUT/logs/tensorboard`` (view them with
``tensorboard --logdir OUTPUT/logs/tensorboard``); ``report_to=["wandb"]`` logs to Weights & Biases (project
``$WANDB_PROJECT``, default "loom"). Both packages are optional: ``check_report_to(cfg)`` says what to install before a
run starts.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from loom.finetune.config import FinetuneConfig


class JsonlReporter:
    """One JSON object per logged step: ``{"step": n, "time": unix seconds, **metrics}``, flushed at each line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # NaN/inf are not JSON
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Reporters:
    """Fans each step's metrics out to every reporter."""

    def __init__(self, reporters: list):
        self.reporters = reporters

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for reporter in self.reporters:
            reporter.log(step, metrics)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


TENSORBOARD_INSTALL = "pip install 'tensorboard>=2.14' (in a Loom checkout: pip install -e '.[tensorboard]')"
WANDB_INSTALL = "pip install wandb"


def _summary_writer_class():
    try:
        # optional extra, imported only when asked for: torch.utils.tensorboard needs the tensorboard package
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(f"report_to tensorboard needs the tensorboard package, which is not installed: "
                         f"{TENSORBOARD_INSTALL}; or leave out --report-to tensorboard") from exc
    return SummaryWriter


def _wandb_module():
    try:
        import wandb  # never a dependency of Loom: imported only when asked for
    except ImportError as exc:
        raise ValueError(f"report_to wandb needs the wandb package, which Loom does not install: {WANDB_INSTALL} "
                         f"(then `wandb login`, or set WANDB_MODE=offline); or leave out --report-to wandb") from exc
    return wandb


class TensorBoardReporter:
    """Each metric as a TensorBoard scalar under its own name ("loss", "rewards/margins"), at the optimizer step."""

    def __init__(self, log_dir: Path):
        writer_class = _summary_writer_class()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = writer_class(log_dir=str(log_dir), flush_secs=10)  # a live `tensorboard` sees steps soon

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbReporter:
    """Weights & Biases: one run per ``loom finetune`` (its config the FinetuneConfig), ``wandb.log`` at each step."""

    def __init__(self, cfg: FinetuneConfig, log_dir: Path):
        self.wandb = _wandb_module()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=wandb_project(), config=cfg.to_dict(), dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        self.wandb.finish()


def logs_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output) / "logs"


def metrics_path(cfg: FinetuneConfig) -> Path:
    return logs_dir(cfg) / "metrics.jsonl"


def tensorboard_dir(cfg: FinetuneConfig) -> Path:
    return logs_dir(cfg) / "tensorboard"


def wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT", "loom")


def _targets(cfg: FinetuneConfig) -> list[str]:
    return list(dict.fromkeys(cfg.report_to or []))  # a target given twice reports once


def check_report_to(cfg: FinetuneConfig) -> None:
    """Raise ValueError (saying what to install) if a ``report_to`` target's package is missing: call it before a
    run loads its model, so that a missing package fails at once rather than after the set-up."""
    for target in _targets(cfg):
        if target == "tensorboard":
            _summary_writer_class()
        elif target == "wandb":
            _wandb_module()


def where_logs_go(cfg: FinetuneConfig) -> list[str]:
    """One line per place a run's metrics go, for people: the JSONL file, the tensorboard command, the wandb project."""
    lines = [f"metrics: {metrics_path(cfg)} (one JSON line per logged step)"]
    for target in _targets(cfg):
        if target == "tensorboard":
            lines.append(f"tensorboard: tensorboard --logdir {tensorboard_dir(cfg)}")
        elif target == "wandb":
            lines.append(f"wandb: project {wandb_project()} (WANDB_PROJECT), files in {logs_dir(cfg)}")
    return lines


def make_reporter(cfg: FinetuneConfig) -> Reporters:
    """The JSONL reporter, then one per ``cfg.report_to`` target; ValueError if a target's package is missing."""
    reporters: list = [JsonlReporter(metrics_path(cfg))]
    try:
        for target in _targets(cfg):
            if target == "tensorboard":
                reporters.append(TensorBoardReporter(tensorboard_dir(cfg)))
            elif target == "wandb":
                reporters.append(WandbReporter(cfg, logs_dir(cfg)))
    except BaseException:
        Reporters(reporters).close()
        raise
    return Reporters(reporters)
