"""Structured (json_schema) vs free generation through one `loom serve`, same prompts, same output length.

    nice -n 10 .venv/bin/python benchmarks/structured.py --concurrency 16 --max-tokens 128 --rounds 3

Each round sends the same ``--concurrency`` chat requests twice, all at once: free (``ignore_eos``, so every answer
is exactly ``--max-tokens`` tokens) and constrained by a JSON schema whose one string field must be longer than
``--max-tokens`` tokens can fill (so the grammar never completes early and every answer is also exactly
``--max-tokens`` tokens), greedy. Free and constrained alternate within each round (order flipped every round). The
figure is output tokens per second of the batch (tokens / wall time from the first send to the last answer); the
issue's target is constrained >= 90% of free. Prints ONE summary line and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from loom.bench.ab import ab_parser, ab_summary, alternate, post_all, serve_command  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402

TOPICS = ("a lighthouse", "a violin", "a desert town", "a rocket launch", "a market in Hanoi", "an old bridge",
          "a winter forest", "a chess match", "a bakery", "a thunderstorm", "a museum at night", "a harbour",
          "a mountain village", "a robot", "a train journey", "a garden in spring")


def schema(max_tokens: int) -> dict:
    # minLength far past what max_tokens can write: the grammar cannot complete, every answer runs max_tokens
    return {"type": "object", "properties": {"description": {"type": "string", "minLength": 8 * max_tokens}},
            "required": ["description"], "additionalProperties": False}


def body(i: int, args: argparse.Namespace, constrained: bool) -> dict:
    out = {"model": "smollm2", "max_tokens": args.max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} in detail (request {i})."}]}
    if constrained:
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "description", "schema": schema(args.max_tokens)}}
    else:
        out["ignore_eos"] = True
    return out


async def batch(url: str, args: argparse.Namespace, constrained: bool) -> dict:
    result, responses = await post_all(f"{url}/v1/chat/completions",
                                       [body(i, args, constrained) for i in range(args.concurrency)])
    if constrained:  # the constraint really held: every answer is a prefix of the schema's JSON
        for r in responses:
            assert r.json()["choices"][0]["message"]["content"].startswith('{"description":"'), r.text[:200]
    return result


def main(argv: list[str] | None = None) -> int:
    args = ab_parser(__doc__, out="results/structured.json").parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with start_server(serve_command(port, args), url, timeout=300):
        asyncio.run(batch(url, argparse.Namespace(**{**vars(args), "concurrency": 2}), True))  # warm-up, compile
        rounds = alternate(args.rounds, {"free": lambda: asyncio.run(batch(url, args, False)),
                                         "constrained": lambda: asyncio.run(batch(url, args, True))})
    summary = ab_summary(args, rounds, "free", "constrained")
    print(f"structured bench, c={args.concurrency}, {args.max_tokens} tokens each: json_schema "
          f"{summary['constrained_tokens_per_s']:.1f} vs free {summary['free_tokens_per_s']:.1f} output tok/s "
          f"({summary['ratio']:.2f}x, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
