"""The `loom` command line: serve | generate | chat | finetune | imagine | bench | models.

Each subcommand lives beside the code it drives (``loom/<area>/cli.py``) and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up, importing lazily so that
``loom --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loom import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("loom.server.cli", "start the HTTP server (OpenAI LLM API, model server, image API)"),
    "generate": ("loom.entrypoints.cli", "generate completions for prompts with an LLM, offline"),
    "chat": ("loom.entrypoints.chat_cli", "chat with an LLM in the terminal"),
    "models": ("loom.models.cli", "list and prepare the packaged default models"),
    "finetune": ("loom.finetune.cli", "instruction-finetune a model (full or LoRA)"),
    "imagine": ("loom.image.cli", "generate an image from a prompt"),
    "bench": ("loom.bench.cli", "load tools: batching sweeps and serving benchmarks"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            sub.set_defaults(_module=module)
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
