"""`loom generate`: complete prompts with an LLM, offline (prompts as arguments, or one per line on stdin)."""

from __future__ import annotations

import argparse
import json
import sys


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="catalogue name or local HF folder (default smollm2)")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "device": args.device,
        "max_model_len": args.max_model_len,
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
    }


def sampling_params(args: argparse.Namespace):
    from loom.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser, max_tokens=32)
    parser.add_argument("prompts", nargs="*", help="prompts; none reads one prompt per line from stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    from loom.entrypoints.llm import LLM

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("no prompts: pass them as arguments or on stdin", file=sys.stderr)
        return 2
    try:
        params = sampling_params(args)
        llm = LLM(args.model, **engine_kwargs(args))
        outputs = llm.generate(prompts, params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out in outputs:
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "finish_reason": c.finish_reason}))
        else:
            print(f"{out.prompt}{c.text}")
    return 0
