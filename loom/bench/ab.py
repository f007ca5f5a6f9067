"""A/B benchmarks through one `loom serve`: two variants of the same batch of requests, alternated round by round.

    args = ab_parser(__doc__, out="results/x.json").parse_args()
    with start_server(serve_command(port, args, "--enable-lora"), url, timeout=300):
        rounds = alternate(args.rounds, {"base": run_base, "adapters": run_adapters})
    summary = ab_summary(args, rounds, "base", "adapters")

Each variant sends ``--concurrency`` requests at once and is measured as output tokens per second of the batch
(tokens / wall time from the first send to the last answer); the order of the two flips every round, and the figures
are medians over rounds, so a slow phase of a busy machine does not fall on one variant only.
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
from collections.abc import Callable
from pathlib import Path

import httpx


def ab_parser(doc: str, out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--out", default=out)
    return parser


def serve_command(port: int, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loom.cli", "serve", "--model", "smollm2", "--port", str(port), "--threads",
            str(args.threads), "--max-num-seqs", str(max(32, args.concurrency)), "--log-level", "warning", *extra]


async def post_all(url: str, bodies: list[dict]) -> tuple[dict, list[httpx.Response]]:
    """POST every body at once; the batch's output tokens per second, and the responses (all 200, else raises)."""
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(client.post(url, json=body) for body in bodies))
        wall = time.perf_counter() - t0
    for r in responses:
        r.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}, responses


def alternate(rounds: int, variants: dict[str, Callable[[], dict]]) -> list[dict]:
    """Run both variants once per round, the order flipped every round."""
    names = list(variants)
    out = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        out.append({name: variants[name]() for name in order})
    return out


def ab_summary(args: argparse.Namespace, rounds: list[dict], reference: str, variant: str) -> dict:
    """Medians of both variants and their ratio (variant / reference), with the run's date, machine and load; also
    written as JSON to ``args.out``."""
    ref = statistics.median(r[reference]["tokens_per_s"] for r in rounds)
    var = statistics.median(r[variant]["tokens_per_s"] for r in rounds)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
               "load_avg": os.getloadavg()[0], "args": vars(args), "rounds": rounds,
               f"{reference}_tokens_per_s": ref, f"{variant}_tokens_per_s": var, "ratio": round(var / ref, 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary
