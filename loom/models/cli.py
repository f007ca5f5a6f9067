"""`loom models list | pull NAME`: the packaged default models, converted once into cached HF folders."""

from __future__ import annotations

import argparse

from loom.models.catalogue import CATALOGUE, converted_dir, is_converted, pull


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list catalogue models and whether each is prepared")
    p = sub.add_parser("pull", help="convert a catalogue model into a cached HF folder; prints its path last")
    p.add_argument("name", choices=sorted(CATALOGUE))


def run(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        for name, entry in sorted(CATALOGUE.items()):
            folder = converted_dir(name)
            state = str(folder) if is_converted(folder) else f"not prepared (loom models pull {name})"
            print(f"{name}\t{entry.description}\t{state}")
        return 0
    print(pull(args.name))
    return 0
