"""`loom chat`: a terminal chat with an LLM through its chat template. Lines from stdin are user turns; an empty
line or EOF ends the chat. `/reset` clears the history."""

from __future__ import annotations

import argparse
import sys

from loom.entrypoints.cli import (
    add_engine_arguments,
    add_sampling_arguments,
    engine_config,
    lora_request,
    sampling_params,
)
from loom.entrypoints.llm import LLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser, max_tokens=256)
    parser.add_argument("--system", default=None, help="system prompt (default: the template's own)")


def run(args: argparse.Namespace) -> int:
    try:
        params = sampling_params(args)
        llm = LLM.from_config(engine_config(args))
        adapter = lora_request(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"loom chat with {llm.engine.model_path} (empty line or Ctrl-D to quit, /reset to clear)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = llm.chat(history, params, lora_request=adapter)[0].outputs[0].text.strip()
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)
