"""`loom models list | pull NAME[:FORMAT]`: the packaged default models (a quantized GGUF, served as it is, and its
float32 expansion, converted once into a cached HF folder)."""

from __future__ import annotations

import argparse

from loom.models.catalogue import CATALOGUE, DEFAULT_FORMAT, FORMATS, converted_dir, is_converted, packaged_file, pull


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list catalogue models and whether each is prepared")
    p = sub.add_parser("pull", help="prepare a catalogue model (the float32 folder converted once) and print the path "
                                    "of the format asked for last (default: the quantized GGUF it is served as)")
    p.add_argument("name", choices=sorted(f"{n}{t}" for n in CATALOGUE for t in ("", *(f":{f}" for f in FORMATS))),
                   metavar="NAME[:FORMAT]", help=f"{', '.join(sorted(CATALOGUE))}; formats {', '.join(FORMATS)} "
                                                 f"(default {DEFAULT_FORMAT})")


def run(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        for name, entry in sorted(CATALOGUE.items()):
            folder = converted_dir(name)
            state = f"f32: {folder}" if is_converted(folder) else f"f32 not prepared (loom models pull {name})"
            print(f"{name}\t{entry.description}\t{DEFAULT_FORMAT}: {packaged_file(name)}; {state}")
        return 0
    name, _, fmt = args.name.partition(":")
    folder = pull(name)  # the tokenizer of either format
    print(folder if fmt == "f32" else packaged_file(name))
    return 0
