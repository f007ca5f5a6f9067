"""`loom bench`: load tools. Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``.

    loom bench load --serve minilm=embedding --batch-sizes 1,8,32 --workers 1,2,4 --concurrency 32

Add a subcommand by adding a line to BENCH_COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_COMMANDS: dict[str, tuple[str, str]] = {
    "load": ("loom.bench.load",
             "model-server sweep: batch size x workers at a fixed client concurrency (CSV, JSON, PNG)"),
    "serving": ("loom.bench.serving",
                "LLM serving benchmark for any OpenAI-compatible URL: TTFT/TPOT/ITL, tok/s (JSON, PNG)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    for name, (module, help_text) in BENCH_COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(sub)
    parser.set_defaults(_bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    module = getattr(args, "_bench_module", None)
    if module is None:
        args._bench_parser.print_help()
        return 2
    return int(importlib.import_module(module).run(args) or 0)
