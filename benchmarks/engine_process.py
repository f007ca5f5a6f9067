"""`loom serve --engine-process` against the engine on a thread of the server: the same streamed workload, alternated.

A random 1-layer model of hidden size 32 (SmolLM2's tokenizer and 49,152-token vocabulary) makes a step mostly host
work, as on a GPU: what the engine's Python and the event loop's Python (one SSE chunk per stream per step) cost
each other when they share one GIL. Each round starts the server once per mode (`--threads` torch threads for the
engine), sends `--streams` streamed completions at once (`--input-len` random prompt tokens, `--output-len` tokens,
`ignore_eos`), then `--lone` requests one at a time, and reads the CPU time of the server's main thread (the event
loop) over the streamed run.

    python benchmarks/engine_process.py --rounds 2 --out results/engine_process.json

Prints one summary line (medians over rounds; ratios process / thread) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402
from loom.bench.serving import ServingBenchConfig, random_dataset, run_benchmark, token_counter  # noqa: E402

MODES = {"thread": [], "process": ["--engine-process"]}


def main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (its event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (USER_HZ = 100)


def one_mode(folder: Path, mode: str, args, tokenizer) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", str(folder), "--port", str(port),
           "--max-num-seqs", str(max(args.streams, 1)), "--max-num-batched-tokens", "8192", "--num-kv-blocks", "4096",
           "--threads", str(args.threads), *MODES[mode]]
    with start_server(cmd, url, timeout=300) as server:
        base = ServingBenchConfig(base_url=f"{url}/v1", model=str(folder), endpoint="completions",
                                  input_len=args.input_len, seed=args.seed)
        count = token_counter(tokenizer)
        warm = ServingBenchConfig(**{**asdict(base), "num_prompts": 2, "output_len": 8, "max_concurrency": 2})
        asyncio.run(run_benchmark(warm, random_dataset(tokenizer, warm), count))
        many = ServingBenchConfig(**{**asdict(base), "num_prompts": args.streams, "output_len": args.output_len,
                                     "max_concurrency": args.streams})
        before = main_thread_cpu_s(server.proc.pid)
        streamed = asyncio.run(run_benchmark(many, random_dataset(tokenizer, many), count))
        loop_cpu = main_thread_cpu_s(server.proc.pid) - before
        lone = ServingBenchConfig(**{**asdict(base), "num_prompts": args.lone, "output_len": args.output_len,
                                     "max_concurrency": 1, "seed": args.seed + 1})
        alone = asyncio.run(run_benchmark(lone, random_dataset(tokenizer, lone), count))
    return {
        "streams_out_tok_per_s": streamed["output_throughput"],
        "streams_tpot_p50_ms": streamed["median_tpot_ms"],
        "streams_loop_cpu_us_per_token": loop_cpu / max(streamed["total_output_tokens"], 1) * 1e6,
        "streams_min_chunks": streamed["min_streamed_chunks"],
        "lone_out_tok_per_s": alone["output_throughput"],
        "lone_tpot_p50_ms": alone["median_tpot_ms"],
        "failed": streamed["failed"] + alone["failed"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--lone", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the engine, both modes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/engine_process.json")
    args = ap.parse_args()

    from loom.models.catalogue import resolve_model
    from loom.models.loader import load_tokenizer
    from loom.models.tiny import save_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="loom-engine-process-")) / "tiny"
    save_tiny_model(folder, tokenizer_dir=resolve_model("smollm2"), num_hidden_layers=1, hidden_size=32,
                    intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    tokenizer = load_tokenizer(folder)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else reversed(list(MODES))):  # alternated: A B, B A, ...
            runs[mode].append(one_mode(folder, mode, args, tokenizer))
            print(f"round {r + 1} {mode}: {runs[mode][-1]}", file=sys.stderr)
    median = {mode: {k: statistics.median(run[k] for run in rows) for k in rows[0]} for mode, rows in runs.items()}
    t, p = median["thread"], median["process"]
    write_json(args.out, {"machine": machine(), "command": sys.argv, "args": vars(args), "runs": runs,
                          "median": median})
    print(f"engine_process ({args.streams} streams x {args.output_len} tokens, {args.threads} engine thread(s), "
          f"{args.rounds} rounds): thread {t['streams_out_tok_per_s']:.0f} / process {p['streams_out_tok_per_s']:.0f} "
          f"out tok/s ({p['streams_out_tok_per_s'] / t['streams_out_tok_per_s']:.2f}x), event-loop CPU "
          f"{t['streams_loop_cpu_us_per_token']:.0f} / {p['streams_loop_cpu_us_per_token']:.0f} us a token | one "
          f"stream: TPOT {t['lone_tpot_p50_ms']:.2f} / {p['lone_tpot_p50_ms']:.2f} ms, "
          f"{t['lone_out_tok_per_s']:.0f} / {p['lone_out_tok_per_s']:.0f} tok/s "
          f"({p['lone_out_tok_per_s'] / t['lone_out_tok_per_s']:.2f}x); failed {t['failed'] + p['failed']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
