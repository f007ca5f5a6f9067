"""Loom's LLM server against llama.cpp's ``llama-server`` on CPU: the same weights, the same /v1/completions workload
and streaming client (`loom bench serving`'s), servers alternated round by round; one summary line with the ratios.

    python benchmarks/vs_llamacpp.py --rounds 2 --out docs/results/vs_llamacpp_<date>.json \
        [--llama-server /tmp/llamacpp/llama.cpp/build/bin/llama-server] [--f32-gguf /tmp/llamacpp/smollm2-f32.gguf]

Configurations (``--configs``): ``loom-q4_1`` (``loom serve --model`` the packaged SmolLM2-135M-Instruct.Q4_1.gguf,
executed quantized), ``loom-f32`` (the float32 folder ``loom models pull smollm2`` expands from it),
``llamacpp-q4_1`` (llama-server on the packaged file), ``llamacpp-f32`` (llama-server on the same float32 weights as
an F32 GGUF, made with llama.cpp's own ``convert_hf_to_gguf.py --outtype f32`` from that folder).

Workload (issue 14's): prompts of ``--input-len`` random tokens (SmolLM2's tokenizer, decoded to text), ``--output-len``
output tokens with ``ignore_eos`` and ``min_tokens`` = that many (llama.cpp's ignore_eos masks the end-of-generation
tokens, vLLM's and Loom's only keeps going past them; min_tokens masks them in Loom too, so neither server emits an
EOS that streams no text; every request is checked to return exactly that many),
temperature 0, streamed, so TTFT and TPOT are per request; concurrency 1 (``--lone`` requests one after another) and
``--concurrency`` (``--num-prompts`` requests, closed loop). Every run draws fresh prompts (its own seed: never reused
across runs, servers or rounds), so no prefix or prompt cache can help; the servers' own count of prompt tokens
served from a cache (usage.prompt_tokens_details.cached_tokens) is recorded to show it. One connection per request
(llama-server sometimes drops a kept-alive one). Every server gets ``--threads`` threads (Loom's ``--threads``;
llama-server's ``-t`` and ``-tb``); llama-server ``-np 16 -c 4096`` (16 slots of 256 tokens, continuous batching on,
its defaults otherwise; ``--llama-args`` adds flags). Each configuration and round starts a fresh server on a free
loopback port, loads the model, sends ``--warmup`` requests before anything is measured, and stops it after (also
on errors, Ctrl-C or SIGTERM). Configurations alternate (even rounds in reverse order).

The machine is shared: before each server the script waits (at most ``--quiet-wait`` s) until the CPU time used by
other processes falls under ``--quiet-cores`` cores, and per run it records the load average and the core-seconds
other processes used while it ran (``other_cores``: the mean number of cores they took). A run with ``other_cores``
well above 0 on a 2-core machine is contended, and llama.cpp's spinning thread pool suffers most from that.

How llama-server is built (llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist; the server sources are in
``vendor/llama.cpp/tools/server``):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llamacpp
    cd /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build -j2 --target llama-server
    HF_HUB_OFFLINE=1 python convert_hf_to_gguf.py --outtype f32 --outfile /tmp/llamacpp/smollm2-f32.gguf \
        "$(python -c 'from loom.models.catalogue import pull; print(pull("smollm2"))')"

(on an AVX2-only CPU the same commands give its AVX2 build: ``GGML_NATIVE`` compiles for the build machine.)

``--isa avx2`` runs the AVX2 code paths on an AVX-512 machine: Loom's kernels built with ``LOOM_CPU_ARCH=x86-64-v3``,
torch, oneDNN and MKL limited to AVX2, and llama-server from an AVX2 build (``--llama-server``), made from the same
source with the CPU features spelled out instead of ``GGML_NATIVE`` (an AVX2 EPYC's: AVX2, FMA, F16C, BMI2):

    cmake -S . -B build-avx2 -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build-avx2 -j2 --target llama-server

The script refuses ``--isa avx2`` with a llama-server whose build cache says ``GGML_NATIVE=ON`` or ``GGML_AVX512=ON``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.isa import AVX2_ENV  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402
from loom.bench.serving import ServingBenchConfig, random_dataset, run_benchmark, token_counter  # noqa: E402

CONFIGS = ("loom-q4_1", "llamacpp-q4_1", "loom-f32", "llamacpp-f32")
FORMATS = ("q4_1", "f32")
SERVER_CANDIDATES = ("/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server",
                     "/tmp/llamacpp/llama.cpp/build/bin/llama-server",
                     "/tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")
F32_CANDIDATES = ("/tmp/llamacpp/smollm2-f32.gguf", "/tmp/llcpp/models/smollm2-f32.gguf")


def default_llama_server() -> str:
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    found = [p for p in SERVER_CANDIDATES if Path(p).is_file()] + [shutil.which("llama-server") or ""]
    return next((p for p in found if p), SERVER_CANDIDATES[0])


def default_f32_gguf() -> str:
    return next((p for p in F32_CANDIDATES if Path(p).is_file()), F32_CANDIDATES[0])


def packaged_gguf() -> str:
    from loom.models.catalogue import packaged_file

    return str(packaged_file("smollm2"))


def server_command(config: str, port: int, args: argparse.Namespace) -> list[str]:
    from loom.models.catalogue import pull

    kind, fmt = config.split("-")
    if kind == "loom":
        folder = str(pull("smollm2"))  # the float32 folder; also the GGUF's tokenizer (as `loom serve smollm2` does)
        model = packaged_gguf() if fmt == "q4_1" else folder
        return [sys.executable, "-m", "loom.cli", "serve", "--model", model, "--tokenizer", folder,
                "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                "--threads", str(args.threads), *shlex.split(args.loom_args)]
    model = packaged_gguf() if fmt == "q4_1" else args.f32_gguf
    return [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "-tb", str(args.threads), "-np", "16", "-c", str(args.ctx), "--alias", "bench", "--log-disable",
            *shlex.split(args.llama_args)]


def server_env(args: argparse.Namespace) -> dict:
    """Every server's environment; with --isa avx2 Loom's and torch's kernels held to AVX2 (llama.cpp's ISA is fixed
    when it is built: give --llama-server an AVX2 build, see the docstring)."""
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return {**env, **AVX2_ENV} if args.isa == "avx2" else env


# --- the machine's other load ---------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def _session_ticks(sid: int) -> int:
    """utime + stime jiffies of every live process in session ``sid`` (a server started in its own session)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            rest = stat.read_text().rsplit(")", 1)[1].split()
            if int(rest[3]) == sid:  # fields after the name: state ppid pgrp session ...
                ticks += int(rest[11]) + int(rest[12])
    return ticks


class CpuMeter:
    """Core-seconds used during a span by everything but the servers' sessions and this process: the contention."""

    def __init__(self, *server_sids: int) -> None:
        self.sids = server_sids
        self.busy, self.total = _cpu_ticks()
        self.servers = [_session_ticks(sid) for sid in server_sids]
        self.own = sum(os.times()[:2])  # this process only: a stopped server's time lands in the children fields
        self.wall = time.monotonic()
        self.load = os.getloadavg()

    def read(self) -> dict:
        hz = os.sysconf("SC_CLK_TCK")
        busy, _ = _cpu_ticks()
        wall = time.monotonic() - self.wall
        servers = [(_session_ticks(sid) - t0) / hz for sid, t0 in zip(self.sids, self.servers)]
        own = sum(os.times()[:2]) - self.own
        other = max(0.0, (busy - self.busy) / hz - sum(servers) - own)
        wall = wall or 1e-9
        return {"wall_s": wall, "server_cores": sum(servers) / wall, "each_server_cores": [x / wall for x in servers],
                "client_cores": own / wall, "other_cores": other / wall, "load_average_before": self.load,
                "load_average_after": os.getloadavg()}


def wait_quiet(args: argparse.Namespace) -> dict:
    """Wait until processes other than this one take < ``--quiet-cores`` cores over 3 s, at most ``--quiet-wait`` s."""
    start = time.monotonic()
    while True:
        meter = CpuMeter()
        time.sleep(3.0)
        other = meter.read()["other_cores"]
        waited = time.monotonic() - start
        if other < args.quiet_cores or waited >= args.quiet_wait:
            return {"waited_s": round(waited, 1), "other_cores_at_start": round(other, 2),
                    "quiet": other < args.quiet_cores}


# --- one run --------------------------------------------------------------------------------------------------
def run_point(url: str, tokenizer, args: argparse.Namespace, concurrency: int, num: int, seed: int,
              server_sid: int) -> dict:
    cfg = ServingBenchConfig(base_url=f"{url}/v1", model="bench", endpoint="completions", num_prompts=num,
                             input_len=args.input_len, output_len=args.output_len, max_concurrency=concurrency,
                             seed=seed, exact_output="ignore_eos", timeout_s=args.request_timeout, keepalive=False,
                             extra_body={"min_tokens": args.output_len})
    samples = random_dataset(tokenizer, cfg)
    meter = CpuMeter(server_sid)

    async def bounded() -> dict:
        return await asyncio.wait_for(run_benchmark(cfg, samples, token_counter(tokenizer)), args.run_timeout)

    point = asyncio.run(bounded())
    point["seed"] = seed
    point["exact_output"] = point["failed"] == 0 and point["min_output_tokens"] == args.output_len
    point["cpu"] = meter.read()
    return point


def measure(config: str, tokenizer, args: argparse.Namespace, round_index: int, attempt: int = 0) -> dict:
    quiet = wait_quiet(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(args)
    # fresh prompts for every run: a seed per (invocation seed, round, configuration, attempt, point), never repeated
    base = args.seed * 100_000 + 1000 * (round_index + 1) + 100 * CONFIGS.index(config) + 10 * attempt
    cmd = server_command(config, port, args)
    started = time.monotonic()
    with start_server(cmd, url, timeout=args.startup_timeout, env=env) as server:
        ready_s = time.monotonic() - started
        sid = server.proc.pid  # start_new_session: the server leads its own session
        run_point(url, tokenizer, args, 2, args.warmup, seed=base, server_sid=sid)  # kernels, pages, threads
        lone = run_point(url, tokenizer, args, 1, args.lone, seed=base + 1, server_sid=sid)
        loaded = run_point(url, tokenizer, args, args.concurrency, args.num_prompts, seed=base + 2, server_sid=sid)
    return {"command": cmd, "ready_s": ready_s, "quiet_wait": quiet, "c1": lone, f"c{args.concurrency}": loaded}


def paired_lone(fmt: str, tokenizer, args: argparse.Namespace) -> dict:
    """Concurrency 1 with both servers of a format up at once and single requests alternated between them (A B, B A,
    ...): slow drifts of the machine (other guests' memory traffic, clocks) hit both alike, so the per-pair TPOT ratio
    is much tighter than one of separate runs. Both servers of a pair get the same prompt (each sees it once, so neither
    has it cached); only the server being asked works, the other idles (its CPU recorded)."""
    names = (f"loom-{fmt}", f"llamacpp-{fmt}")
    quiet = wait_quiet(args)
    base = args.seed * 100_000 + 90_000 + 1000 * FORMATS.index(fmt)
    samples = random_dataset(tokenizer, ServingBenchConfig(num_prompts=args.paired_lone, input_len=args.input_len,
                                                           output_len=args.output_len, seed=base))
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in names:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            servers[name] = stack.enter_context(start_server(server_command(name, port, args), url,
                                                             timeout=args.startup_timeout, env=server_env(args)))
            run_point(url, tokenizer, args, 2, args.warmup, seed=base + 1 + names.index(name),
                      server_sid=servers[name].proc.pid)
        meter = CpuMeter(*(servers[name].proc.pid for name in names))
        per_request: dict[str, list[dict]] = {name: [] for name in names}
        for k in range(args.paired_lone):
            for name in names if k % 2 == 0 else names[::-1]:
                cfg = ServingBenchConfig(base_url=f"{servers[name].url}/v1", model="bench", endpoint="completions",
                                         num_prompts=1, input_len=args.input_len, output_len=args.output_len,
                                         max_concurrency=1, seed=base, exact_output="ignore_eos",
                                         timeout_s=args.request_timeout, keepalive=False,
                                         extra_body={"min_tokens": args.output_len})
                point = asyncio.run(asyncio.wait_for(
                    run_benchmark(cfg, [samples[k]], token_counter(tokenizer)), args.run_timeout))
                per_request[name].append({key: point[key] for key in ("completed", "median_ttft_ms", "median_tpot_ms",
                                                                      "total_output_tokens", "cached_prompt_tokens",
                                                                      "min_streamed_chunks", "errors")})
        cpu = meter.read()
    completed = [k for k in range(args.paired_lone) if all(per_request[n][k]["completed"] for n in names)]
    # TPOT needs the tokens streamed one by one: an output that never completes a UTF-8 character (random prompts
    # can lead greedy decoding into lone byte tokens) arrives in one piece at the end, from either server
    ok = [k for k in completed if all(per_request[n][k]["min_streamed_chunks"] >= args.output_len // 2 for n in names)]
    tpot = {n: [per_request[n][k]["median_tpot_ms"] for k in ok] for n in names}
    ttft = {n: [per_request[n][k]["median_ttft_ms"] for k in ok] for n in names}
    ratios = [a / b for a, b in zip(tpot[names[0]], tpot[names[1]])]
    return {"servers": list(names), "requests_per_server": args.paired_lone, "completed_pairs": len(completed),
            "timed_pairs": len(ok),
            "quiet_wait": quiet,
            "tpot_p50_ms": {n: statistics.median(tpot[n]) for n in names} if ok else {},
            "ttft_p50_ms": {n: statistics.median(ttft[n]) for n in names} if ok else {},
            "tpot_ratio_loom_over_llamacpp": {"median_of_pairs": statistics.median(ratios) if ok else None,
                                              "min": min(ratios, default=None), "max": max(ratios, default=None)},
            "exact_output": all(r["total_output_tokens"] == args.output_len for n in names for r in per_request[n]),
            "cached_prompt_tokens": sum(r["cached_prompt_tokens"] for n in names for r in per_request[n]),
            "per_request": per_request,
            "cpu": {**cpu, "each_server_cores": dict(zip(names, cpu["each_server_cores"]))}}


# --- summary --------------------------------------------------------------------------------------------------
def summarize_rounds(rounds: list[dict], configs: list[str], loaded: str) -> tuple[dict, dict]:
    def median(config: str, point: str, key: str) -> float:
        return statistics.median(r[config][point][key] for r in rounds)

    summary = {c: {"c1_output_tok_s": median(c, "c1", "output_throughput"),
                   "c1_ttft_p50_ms": median(c, "c1", "median_ttft_ms"),
                   "c1_tpot_p50_ms": median(c, "c1", "median_tpot_ms"),
                   f"{loaded}_output_tok_s": median(c, loaded, "output_throughput"),
                   f"{loaded}_ttft_p50_s": median(c, loaded, "median_ttft_ms") / 1000,
                   f"{loaded}_ttft_p99_s": median(c, loaded, "p99_ttft_ms") / 1000,
                   f"{loaded}_tpot_p50_ms": median(c, loaded, "median_tpot_ms"),
                   "other_cores_max": max(r[c][p]["cpu"]["other_cores"] for r in rounds for p in ("c1", loaded))}
               for c in configs}
    ratios = {}
    for fmt in ("q4_1", "f32"):
        ours, theirs = summary.get(f"loom-{fmt}"), summary.get(f"llamacpp-{fmt}")
        if ours and theirs:
            ratios[fmt] = {"c1_output": ours["c1_output_tok_s"] / theirs["c1_output_tok_s"],
                           "c1_ttft_p50": ours["c1_ttft_p50_ms"] / theirs["c1_ttft_p50_ms"],
                           "c1_tpot_p50": ours["c1_tpot_p50_ms"] / theirs["c1_tpot_p50_ms"],
                           loaded: ours[f"{loaded}_output_tok_s"] / theirs[f"{loaded}_output_tok_s"],
                           f"{loaded}_ttft_p99": ours[f"{loaded}_ttft_p99_s"] / theirs[f"{loaded}_ttft_p99_s"]}
    best = max((summary[c][f"{loaded}_output_tok_s"] for c in configs if c.startswith("llamacpp")), default=None)
    if best and "loom-q4_1" in summary:
        ratios[f"q4_1_{loaded}_vs_llamacpp_best"] = summary["loom-q4_1"][f"{loaded}_output_tok_s"] / best
    return summary, ratios


def summary_line(ratios: dict, paired: dict, args: argparse.Namespace, loaded: str) -> str:
    parts = [f"{fmt}: c=1 {r['c1_output']:.2f}x tok/s (TPOT p50 {r['c1_tpot_p50']:.2f}x), c={args.concurrency} "
             f"{r[loaded]:.2f}x tok/s (TTFT p99 {r[f'{loaded}_ttft_p99']:.2f}x)"
             for fmt, r in ratios.items() if isinstance(r, dict)]
    best = ratios.get(f"q4_1_{loaded}_vs_llamacpp_best")
    if best:
        parts.append(f"q4_1 c={args.concurrency} vs llama.cpp's best {best:.2f}x")
    for fmt, p in paired.items():
        r = p["tpot_ratio_loom_over_llamacpp"]
        if r["median_of_pairs"] is not None:
            parts.append(f"{fmt} paired c=1 TPOT {r['median_of_pairs']:.2f}x ({p['timed_pairs']} pairs)")
    isa = " (AVX2 code paths)" if args.isa == "avx2" else ""
    return (f"loom / llama.cpp, smollm2 /v1/completions in {args.input_len}/out {args.output_len}, "
            f"{args.threads} threads{isa}: " + "; ".join(parts))


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    return "unknown"


def llama_server_facts(path: str) -> dict:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    facts = {"path": path, "version": (out.stdout + out.stderr).strip().splitlines()}
    cache = Path(path).resolve().parent.parent / "CMakeCache.txt"  # build/bin/llama-server -> build/CMakeCache.txt
    if cache.is_file():
        keep = ("CMAKE_BUILD_TYPE:", "GGML_NATIVE:", "GGML_AVX", "GGML_LLAMAFILE:", "GGML_OPENMP:", "LLAMA_CURL:",
                "CMAKE_CXX_COMPILER:")
        facts["cmake_cache"] = [x for x in cache.read_text().splitlines() if x.startswith(keep)]
    return facts


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # an exception: the `with start_server(...)` blocks stop their server on the way out


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, among {', '.join(CONFIGS)}")
    ap.add_argument("--llama-server", default=default_llama_server(),
                    help="the llama-server binary (default: $LLAMA_SERVER, a build under /tmp/llamacpp, or PATH)")
    ap.add_argument("--f32-gguf", default=default_f32_gguf(), help="the float32 folder converted to an F32 GGUF")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: Loom and torch limited to AVX2 (with an AVX2 build of llama-server: the ISA of an "
                         "AVX2-only CPU on this one)")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, e.g. '--cache-ram 0'")
    ap.add_argument("--loom-args", default="", help="extra `loom serve` flags, e.g. '--engine-process'")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of separate runs (0: only --paired-lone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--lone", type=int, default=8, help="requests at concurrency 1")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=48, help="requests at --concurrency (closed loop)")
    ap.add_argument("--paired-lone", type=int, default=0,
                    help="after the rounds, per format: both servers up, this many single requests each, alternated "
                         "(the tightest c=1 TPOT ratio); 0: off")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests (2 at a time) after startup")
    ap.add_argument("--ctx", type=int, default=16 * 256, help="llama-server's -c (shared by its 16 slots)")
    ap.add_argument("--seed", type=int, default=0, help="shifts every run's prompt seed (another draw of prompts)")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="wait before each server until other processes use fewer cores than this")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="... but at most this many seconds (0: no wait)")
    ap.add_argument("--contended-cores", type=float, default=0.25,
                    help="a run during which other processes took more cores than this is measured again ...")
    ap.add_argument("--retries", type=int, default=2, help="... at most this many times (all attempts are kept)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--run-timeout", type=float, default=900.0, help="bound on one measured run (s)")
    ap.add_argument("--out", default="results/vs_llamacpp.json")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or set(configs) - set(CONFIGS):
        ap.error(f"--configs: choose among {', '.join(CONFIGS)}; got {args.configs!r}")
    llama = None
    if any(c.startswith("llamacpp") for c in configs):
        if not Path(args.llama_server).is_file() and not shutil.which(args.llama_server):
            ap.error(f"--llama-server {args.llama_server} not found (build it as this script's docstring says, or set "
                     "LLAMA_SERVER)")
        try:
            llama = llama_server_facts(args.llama_server)
        except (OSError, subprocess.SubprocessError) as exc:
            ap.error(f"--llama-server {args.llama_server} does not run: {exc}")
        native = [x for x in llama.get("cmake_cache", []) if x.split("=")[0] in ("GGML_NATIVE:BOOL", "GGML_AVX512:BOOL")
                  and x.split("=", 1)[1].upper() in ("ON", "TRUE", "1")]
        if args.isa == "avx2" and (native or "cmake_cache" not in llama):
            ap.error(f"--isa avx2 needs an AVX2 build of llama-server (see the docstring); {args.llama_server}'s build "
                     f"has {', '.join(native) or 'no CMakeCache.txt beside it'}")
    if "llamacpp-f32" in configs and not Path(args.f32_gguf).is_file():
        ap.error(f"--f32-gguf {args.f32_gguf} does not exist (convert_hf_to_gguf.py --outtype f32, see the docstring)")
    try:
        packaged_gguf()
    except FileNotFoundError as exc:
        ap.error(str(exc))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from loom.bench.serving import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    loaded = f"c{args.concurrency}"
    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rounds = []
    for i in range(args.rounds):
        order = configs if i % 2 == 0 else configs[::-1]
        results = {}
        for config in order:
            discarded = []
            for attempt in range(args.retries + 1):
                r = measure(config, tokenizer, args, i, attempt)
                other = max(r[p]["cpu"]["other_cores"] for p in ("c1", loaded))
                if other <= args.contended_cores or attempt == args.retries:
                    break
                print(f"round {i + 1} {config}: other processes took {other:.2f} cores, measuring again", flush=True)
                discarded.append(r)
            results[config] = {**r, "discarded_contended_attempts": discarded}
            c1, cn = r["c1"], r[loaded]
            print(f"round {i + 1} {config}: c=1 {c1['output_throughput']:.1f} tok/s, TTFT p50 "
                  f"{c1['median_ttft_ms']:.0f} ms, TPOT p50 {c1['median_tpot_ms']:.1f} ms | c={args.concurrency} "
                  f"{cn['output_throughput']:.1f} tok/s, TTFT p50/p99 {cn['median_ttft_ms'] / 1000:.2f}/"
                  f"{cn['p99_ttft_ms'] / 1000:.2f} s, TPOT p50 {cn['median_tpot_ms']:.1f} ms | failed "
                  f"{c1['failed'] + cn['failed']}, cached prompt tokens {c1['cached_prompt_tokens']}+"
                  f"{cn['cached_prompt_tokens']}, other load {c1['cpu']['other_cores']:.2f}/"
                  f"{cn['cpu']['other_cores']:.2f} cores (waited {r['quiet_wait']['waited_s']} s)", flush=True)
        rounds.append(results)

    paired = {}
    for fmt in FORMATS if args.paired_lone else ():
        if f"loom-{fmt}" in configs and f"llamacpp-{fmt}" in configs:
            paired[fmt] = p = paired_lone(fmt, tokenizer, args)
            r = p["tpot_ratio_loom_over_llamacpp"]
            if r["median_of_pairs"] is not None:
                print(f"paired c=1 {fmt}: TPOT p50 loom {p['tpot_p50_ms'][f'loom-{fmt}']:.1f} ms, llama.cpp "
                      f"{p['tpot_p50_ms'][f'llamacpp-{fmt}']:.1f} ms, per-pair ratio median "
                      f"{r['median_of_pairs']:.2f}x "
                      f"({r['min']:.2f}-{r['max']:.2f}), {p['timed_pairs']}/{args.paired_lone} pairs timed, "
                      f"other load {p['cpu']['other_cores']:.2f} cores", flush=True)

    summary, ratios = summarize_rounds(rounds, configs, loaded) if rounds else ({}, {})
    for fmt, p in paired.items():
        ratios[f"{fmt}_paired_c1_tpot"] = p["tpot_ratio_loom_over_llamacpp"]["median_of_pairs"]
    write_json(args.out, {
        "date": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": [Path(sys.executable).name, *sys.argv], "args": vars(args),
        "workload": {"endpoint": "/v1/completions", "input_len": args.input_len, "output_len": args.output_len,
                     "ignore_eos": True, "min_tokens": args.output_len, "temperature": 0.0, "stream": True,
                     "lone_requests": args.lone,
                     "concurrency": args.concurrency, "num_prompts": args.num_prompts,
                     "prompts": "fresh per run (seeded random token ids decoded to text)"},
        "summary": summary, "ratios": ratios, "rounds": rounds, "paired_c1": paired, "llama_server": llama,
        "loom_commit": git_commit(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "machine": {**machine(), "cpu_model": cpu_model()},
    })
    print(summary_line(ratios, paired, args, loaded))
    failed = any(p["failed"] or not p["exact_output"] for r in rounds for c in r.values()
                 for k, p in c.items() if k in ("c1", loaded))
    failed = failed or any(p["completed_pairs"] < args.paired_lone or not p["exact_output"] for p in paired.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
