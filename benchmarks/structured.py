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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

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
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body(i, args, constrained))
                                           for i in range(args.concurrency)))
        wall = time.perf_counter() - t0
    for r in responses:
        r.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    if constrained:  # the constraint really held: every answer is a prefix of the schema's JSON
        for r in responses:
            assert r.json()["choices"][0]["message"]["content"].startswith('{"description":"'), r.text[:200]
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--out", default="results/structured.json")
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", "smollm2", "--port", str(port), "--threads",
           str(args.threads), "--max-num-seqs", str(max(32, args.concurrency)), "--log-level", "warning"]
    rounds = []
    with start_server(cmd, url, timeout=300):
        asyncio.run(batch(url, argparse.Namespace(**{**vars(args), "concurrency": 2}), True))  # warm-up, compile
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            result = {("constrained" if c else "free"): asyncio.run(batch(url, args, c)) for c in order}
            rounds.append(result)
    free = statistics.median(r["free"]["tokens_per_s"] for r in rounds)
    constrained = statistics.median(r["constrained"]["tokens_per_s"] for r in rounds)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
               "load_avg": os.getloadavg()[0], "args": vars(args), "rounds": rounds,
               "free_tokens_per_s": free, "constrained_tokens_per_s": constrained,
               "ratio": round(constrained / free, 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"structured bench, c={args.concurrency}, {args.max_tokens} tokens each: json_schema {constrained:.1f} vs "
          f"free {free:.1f} output tok/s ({summary['ratio']:.2f}x, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
