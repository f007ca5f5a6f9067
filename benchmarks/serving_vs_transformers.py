"""Loom's LLM server against `transformers serve --continuous-batching`: one after the other on loopback, the same
model folder, the same seeded workload and client (`loom bench serving`'s), one summary line with the ratios.

    nice -n 10 .venv/bin/python benchmarks/serving_vs_transformers.py --num-prompts 64 --input-len 128 --output-len 64 \
        --concurrencies 16

Each server runs alone (the other is stopped first) with torch's default threads (or ``--threads``), the same KV pool
(``--kv-blocks`` blocks of 16 tokens) and the same 2048-token step budget; startup, model load and two warm-up
requests are not measured. Prints ONE summary line and writes results/serving.json (+ .png).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loom.bench.process import free_port, start_server
from loom.bench.serving import (
    add_arguments,
    config_from_args,
    load_tokenizer,
    parse_lists,
    point_line,
    random_dataset,
    sweep,
    token_counter,
    write_outputs,
)
from loom.models.catalogue import resolve_model


@dataclass(slots=True)
class PeerServer:
    name: str
    command: list[str]
    model_field: str
    """What requests put in ``model``."""
    exact_output: str


def kv_gib(model_path: Path, num_blocks: int, block_size: int = 16, bytes_per_value: int = 4) -> float:
    """GiB that ``num_blocks`` float32 KV blocks of this model take (K and V, every layer)."""
    cfg = json.loads((model_path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_block = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * block_size * bytes_per_value
    return num_blocks * per_block / 2**30


def servers(model_path: Path, port: int, args: argparse.Namespace) -> list[PeerServer]:
    """Both servers with the same KV pool (``--kv-blocks`` blocks of 16 tokens) and step budget (2048 tokens).

    NOTE: `transformers serve` on CPU otherwise sizes its cache from system memory (12.5 GB RSS here, OOM-killed).
    """
    transformers_cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    loom = [sys.executable, "-m", "loom.cli", "serve", "--model", str(model_path), "--served-model-name", "bench",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--block-size", "16",
            "--kv-cache-memory-gb", f"{kv_gib(model_path, args.kv_blocks) * 1.0001:.6f}",
            "--max-num-batched-tokens", "2048", *shlex.split(args.loom_args)]
    if args.threads:
        loom += ["--threads", str(args.threads)]
    hf = [transformers_cli, "serve", "--continuous-batching", str(model_path), "--host", "127.0.0.1",
          "--port", str(port), "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
          "--cb-block-size", "16", "--cb-num-blocks", str(args.kv_blocks), "--cb-max-batch-tokens", "2048"]
    return [PeerServer("loom", loom, "bench", "ignore_eos"),
            PeerServer("transformers serve", hf, str(model_path), "generation_config")]


def run_compare(args: argparse.Namespace) -> int:
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    concurrencies, rates = parse_lists(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = Path(args.out)
    series, configs = {}, {}
    for server in servers(model_path, port, args):
        exact = server.exact_output if args.exact_output == "auto" else args.exact_output
        cfg = config_from_args(args, f"{url}/v1", server.model_field, exact)
        samples = random_dataset(tokenizer, cfg)  # same seed: the same prompts for both
        print(f"starting {server.name}: {' '.join(server.command)}", flush=True)
        log_path = prefix.parent / f"{prefix.name}-{server.name.split()[0]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # torch reads OMP/MKL_NUM_THREADS at start-up: the same thread count for every server
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
        with start_server(server.command, url, timeout=args.startup_timeout, log_path=log_path, env=env):
            points = sweep(cfg, samples, token_counter(tokenizer), concurrencies, rates, args.warmup)
        for p in points:
            print(point_line(server.name, p), flush=True)
        series[server.name], configs[server.name] = points, cfg
    summary = compare_line(series, args)
    print(summary)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model_path), "summary": summary,
              "configs": {k: _plain(v) for k, v in configs.items()}, "series": series}
    write_outputs(prefix, result, series,
                  f"{args.model}: Loom vs transformers serve (in {args.input_len}, out {args.output_len})")
    failed = any(p["failed"] for points in series.values() for p in points)
    return 1 if failed else 0


def compare_line(series: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """One line: the last point of each (the highest concurrency / rate), and Loom's ratios."""
    loom, hf = series["loom"][-1], series["transformers serve"][-1]
    tput = loom["output_throughput"] / hf["output_throughput"] if hf["output_throughput"] else float("inf")
    ttft = loom["p99_ttft_ms"] / hf["p99_ttft_ms"] if hf["p99_ttft_ms"] else float("nan")
    verdict = "PASS" if tput >= 3 and ttft < 1 else "MISS"
    return (f"serving {args.model} c={loom['max_concurrency']} rate={loom['request_rate']} {args.num_prompts} prompts "
            f"in {args.input_len}/out {args.output_len}: loom {loom['output_throughput']:.1f} out tok/s, p99 TTFT "
            f"{loom['p99_ttft_ms'] / 1000:.2f} s | "
            f"transformers serve {hf['output_throughput']:.1f} out tok/s, p99 TTFT "
            f"{hf['p99_ttft_ms'] / 1000:.2f} s | {tput:.2f}x output tok/s, p99 TTFT {ttft:.2f}x "
            f"(target >= 3x and < 1x: {verdict})")


def _plain(cfg) -> dict:
    return {k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in asdict(cfg).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(model="smollm2")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every server (OMP_NUM_THREADS; Loom's --threads)")
    parser.add_argument("--kv-blocks", type=int, default=1024, help="KV-cache blocks of 16 tokens for every server")
    parser.add_argument("--loom-args", default="", help="extra flags for `loom serve`")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit unwinds the with-blocks: servers are stopped
    return run_compare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
