"""`loom bench serving`: an online serving benchmark for any OpenAI-compatible server,
in the style of vLLM's benchmark_serving.

A seeded random dataset (random token ids of the model's tokenizer, decoded to text) is sent over HTTP streaming,
all at once or with Poisson arrivals, under a concurrency cap. Per request it records TTFT (first content), the
gaps between streamed chunks (ITL), TPOT = (latency - TTFT) / (output tokens - 1) and the end-to-end latency;
per run the request throughput and output tokens/s. Several concurrencies or rates give latency against load
(JSON + PNG).

    loom bench serving --base-url http://127.0.0.1:8000/v1 --model smollm2 --concurrencies 1,4,16

benchmarks/serving_vs_transformers.py runs the same client against Loom and then `transformers serve`.

Every request asks for exactly ``--output-len`` tokens: Loom and vLLM take ``ignore_eos``; `transformers serve`
takes a ``generation_config`` without an EOS id (``--exact-output auto`` picks the right one per server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loom.models.catalogue import resolve_model
from loom.models.loader import load_tokenizer as load_folder_tokenizer


@dataclass(slots=True)
class ServingBenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "smollm2"
    endpoint: str = "chat"
    """chat (/v1/chat/completions) or completions (/v1/completions)."""
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    """Lengths drawn uniformly from [len * (1 - r), len * (1 + r)]."""
    request_rate: float = math.inf
    """Requests per second (Poisson arrivals); inf sends them all at once."""
    max_concurrency: int | None = 16
    seed: int = 0
    exact_output: str = "ignore_eos"
    """ignore_eos (Loom, vLLM) | generation_config (transformers serve) | none (stop at EOS)."""
    api_key: str | None = None
    timeout_s: float = 600.0
    extra_body: dict | None = None
    """Fields added to every request's body (e.g. ``{"min_tokens": 64}``)."""
    images: int = 0
    """Pictures per chat request (vLLM's random multimodal dataset): seeded random JPEGs of ``image_size``, sent as
    image_url data URLs, for a vision model's serving."""
    image_size: tuple[int, int] = (640, 480)
    """The pictures' width and height."""
    keepalive: bool = True
    """Reuse connections between requests; False opens one per request (llama-server's cpp-httplib sometimes drops
    a kept-alive connection as the next request arrives: "Server disconnected without sending a response")."""

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {self.endpoint!r}")
        if self.exact_output not in ("ignore_eos", "generation_config", "none"):
            raise ValueError(f"exact_output must be ignore_eos, generation_config or none, got {self.exact_output!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0 (inf = all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {self.max_concurrency}")
        if self.images < 0 or (self.images and self.endpoint != "chat"):
            raise ValueError(f"images must be >= 0 and need the chat endpoint, got {self.images} on {self.endpoint}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size is (width, height) in pixels, got {self.image_size}")


@dataclass(slots=True)
class Sample:
    prompt: str
    prompt_len: int
    output_len: int
    images: list[str] = field(default_factory=list)
    """Data URLs of the request's pictures (``ServingBenchConfig.images``)."""


@dataclass(slots=True)
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server says it served from a cache (usage.prompt_tokens_details.cached_tokens)."""
    error: str = ""


# --- dataset ----------------------------------------------------------------------------------------------------
def random_dataset(tokenizer, cfg: ServingBenchConfig) -> list[Sample]:
    """Seeded prompts of random (non-special) token ids decoded to text, as vLLM's random dataset."""
    rng = random.Random(cfg.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    samples = []
    pixels = np.random.default_rng(cfg.seed)
    for _ in range(cfg.num_prompts):
        n_in = _draw(rng, cfg.input_len, cfg.range_ratio)
        text = tokenizer.decode([rng.choice(vocab) for _ in range(n_in)])
        images = [_random_picture(pixels, cfg.image_size) for _ in range(cfg.images)]
        samples.append(Sample(text, n_in, _draw(rng, cfg.output_len, cfg.range_ratio), images))
    return samples


def _random_picture(rng: np.random.Generator, size: tuple[int, int]) -> str:
    """A JPEG of random pixels as a data URL (quality 90: a 640 x 480 one is ~200 kB)."""
    import base64
    import io

    from PIL import Image  # local: only pictured runs need Pillow

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _draw(rng: random.Random, length: int, ratio: float) -> int:
    return max(1, rng.randint(int(length * (1 - ratio)), int(math.ceil(length * (1 + ratio)))))


# --- one request ------------------------------------------------------------------------------------------------
def request_body(cfg: ServingBenchConfig, sample: Sample) -> dict:
    body: dict = {"model": cfg.model, "max_tokens": sample.output_len, "stream": True, "temperature": 0.0}
    if cfg.endpoint == "chat" and sample.images:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in sample.images]
        body["messages"] = [{"role": "user", "content": [*parts, {"type": "text", "text": sample.prompt}]}]
    elif cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    if cfg.exact_output == "ignore_eos":
        body["ignore_eos"] = True
        body["stream_options"] = {"include_usage": True}
    elif cfg.exact_output == "generation_config":  # a fresh GenerationConfig has no EOS id: it runs to max_new_tokens
        body["generation_config"] = json.dumps({"max_new_tokens": sample.output_len, "do_sample": False})
    return {**body, **(cfg.extra_body or {})}


async def send_one(client: httpx.AsyncClient, cfg: ServingBenchConfig, sample: Sample, count_tokens) -> RequestResult:
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    result, text, usage, last = RequestResult(ok=False, prompt_tokens=sample.prompt_len), [], None, None
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + path, json=request_body(cfg, sample)) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                usage = chunk.get("usage") or usage
                piece = _content(chunk, cfg.endpoint)
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    text.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage["completion_tokens"] if usage else count_tokens("".join(text))
    result.prompt_tokens = usage["prompt_tokens"] if usage else sample.prompt_len
    result.cached_tokens = int(((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    result.ok = last is not None
    result.error = "" if result.ok else "no content streamed"
    return result


def _content(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


# --- one run ----------------------------------------------------------------------------------------------------
async def run_benchmark(cfg: ServingBenchConfig, samples: list[Sample], count_tokens) -> dict:
    """Send every sample (Poisson arrivals or all at once, at most max_concurrency in flight); summary metrics."""
    rng = np.random.default_rng(cfg.seed)
    limit = asyncio.Semaphore(cfg.max_concurrency or len(samples))
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=(cfg.max_concurrency or len(samples)) + 4,
                          max_keepalive_connections=20 if cfg.keepalive else 0)  # 20: httpx's default
    async with httpx.AsyncClient(timeout=cfg.timeout_s, headers=headers, limits=limits) as client:

        async def limited(sample: Sample) -> RequestResult:
            async with limit:
                return await send_one(client, cfg, sample, count_tokens)

        tasks = []
        start = time.perf_counter()
        for sample in samples:
            tasks.append(asyncio.create_task(limited(sample)))
            if math.isfinite(cfg.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / cfg.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, cfg)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def _stats(name: str, values: list[float]) -> dict:
    mean = float(np.mean(values)) * 1000 if values else float("nan")
    return {f"mean_{name}_ms": mean, f"median_{name}_ms": _pct(values, 50), f"p99_{name}_ms": _pct(values, 99)}


def summarize(results: list[RequestResult], duration: float, cfg: ServingBenchConfig) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "max_concurrency": cfg.max_concurrency,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "min_output_tokens": min((r.output_tokens for r in ok), default=0),
        "min_streamed_chunks": min((len(r.itl) + 1 for r in ok), default=0),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **_stats("ttft", [r.ttft for r in ok]),
        **_stats("tpot", tpot),
        **_stats("itl", [g for r in ok for g in r.itl]),
        "max_itl_ms": max((g for r in ok for g in r.itl), default=float("nan")) * 1000,
        **_stats("e2el", [r.latency for r in ok]),
    }


def sweep(cfg: ServingBenchConfig, samples: list[Sample], count_tokens, concurrencies: list[int | None],
          rates: list[float], warmup: int = 2) -> list[dict]:
    """One run per concurrency x rate point, after ``warmup`` unmeasured requests."""
    if warmup:
        warm = ServingBenchConfig(**{**asdict(cfg), "max_concurrency": warmup, "request_rate": math.inf})
        asyncio.run(run_benchmark(warm, samples[:warmup], count_tokens))
    points = []
    for c in concurrencies:
        for rate in rates:
            point_cfg = ServingBenchConfig(**{**asdict(cfg), "max_concurrency": c, "request_rate": rate})
            before = engine_counters(cfg.base_url)
            point = asyncio.run(run_benchmark(point_cfg, samples, count_tokens))
            points.append({**point, **engine_deltas(before, engine_counters(cfg.base_url), point["duration_s"])})
    return points


_COUNTERS = ("loom_iteration_seconds_sum", "loom_iteration_num_seqs_sum", "loom_iteration_num_seqs_count")


def engine_counters(base_url: str) -> dict[str, float]:
    """Loom's per-step counters from the server's /metrics; {} for servers that have none."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(f"{root}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _COUNTERS:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def engine_deltas(before: dict, after: dict, duration: float) -> dict:
    """Engine busy fraction (time in steps / wall time) and mean sequences per step during a run."""
    if not before or set(before) != set(_COUNTERS) or set(after) != set(_COUNTERS):
        return {}
    busy = after["loom_iteration_seconds_sum"] - before["loom_iteration_seconds_sum"]
    steps = after["loom_iteration_num_seqs_count"] - before["loom_iteration_num_seqs_count"]
    seqs = after["loom_iteration_num_seqs_sum"] - before["loom_iteration_num_seqs_sum"]
    return {"engine_busy_fraction": busy / duration, "engine_steps": steps,
            "mean_batch_seqs": seqs / steps if steps else 0.0}


# --- output -----------------------------------------------------------------------------------------------------
def plot(series: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Latency against load: TTFT p50/p99 and TPOT p50 against achieved output tokens/s, one line per server."""
    # local: matplotlib takes ~0.3 s to import and only plots need it; pyplot must come after use("Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (name, points) in enumerate(series.items()):
        x, color = [p["output_throughput"] for p in points], f"C{k}"
        axes[0].plot(x, [p["median_ttft_ms"] for p in points], "o-", color=color, label=f"{name} p50")
        axes[0].plot(x, [p["p99_ttft_ms"] for p in points], "s--", color=color, label=f"{name} p99")
        axes[1].plot(x, [p["median_tpot_ms"] for p in points], "o-", color=color, label=f"{name} p50")
        axes[1].plot(x, [p["p99_tpot_ms"] for p in points], "s--", color=color, label=f"{name} p99")
        for p, xi in zip(points, x):
            axes[0].annotate(f"c={p['max_concurrency']}", (xi, p["p99_ttft_ms"]), fontsize=7)
    axes[0].set(xlabel="output tokens/s", ylabel="TTFT (ms)", title="time to first token", yscale="log")
    axes[1].set(xlabel="output tokens/s", ylabel="TPOT (ms)", title="time per output token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def point_line(name: str, p: dict) -> str:
    line = (f"{name}: c={p['max_concurrency']} rate={p['request_rate']} "
            f"{p['completed']}/{p['completed'] + p['failed']} ok, "
            f"{p['output_throughput']:.1f} out tok/s, {p['request_throughput']:.2f} req/s, "
            f"TTFT p50/p99 {p['median_ttft_ms']:.0f}/{p['p99_ttft_ms']:.0f} ms, "
            f"TPOT p50/p99 {p['median_tpot_ms']:.1f}/{p['p99_tpot_ms']:.1f} ms, ITL p50 {p['median_itl_ms']:.1f} ms")
    if "engine_busy_fraction" in p:
        line += f", engine busy {100 * p['engine_busy_fraction']:.0f}%, mean batch {p['mean_batch_seqs']:.1f} seqs"
    return line


# --- CLI --------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServingBenchConfig()
    parser.add_argument("--base-url", default=d.base_url, help=f"an OpenAI-compatible /v1 URL (default {d.base_url})")
    parser.add_argument("--model", default=d.model,
                        help="the 'model' field to send (and the tokenizer, unless --tokenizer)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or catalogue name for the dataset (default: --model)")
    parser.add_argument("--endpoint", default=d.endpoint, choices=["chat", "completions"])
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts)
    parser.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens (random ids)")
    parser.add_argument("--output-len", type=int, default=d.output_len, help="output tokens per request")
    parser.add_argument("--range-ratio", type=float, default=d.range_ratio)
    parser.add_argument("--request-rates", default="inf",
                        help="comma-separated requests/s (Poisson); inf = all at once")
    parser.add_argument("--concurrencies", default="16", help="comma-separated caps on requests in flight; 0 = no cap")
    parser.add_argument("--exact-output", default="auto", choices=["auto", "ignore_eos", "generation_config", "none"],
                        help="how to make every request produce --output-len tokens (auto: ignore_eos; "
                             "generation_config for transformers serve)")
    parser.add_argument("--images", type=int, default=d.images,
                        help="random pictures per chat request, for a vision model (default 0)")
    parser.add_argument("--image-size", default="x".join(map(str, d.image_size)), metavar="WxH",
                        help=f"the pictures' size (default {d.image_size[0]}x{d.image_size[1]})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (default 2)")
    parser.add_argument("--out", default="results/serving", help="output prefix: PREFIX.json and PREFIX.png")


def config_from_args(args: argparse.Namespace, base_url: str, model: str, exact: str) -> ServingBenchConfig:
    return ServingBenchConfig(
        base_url=base_url, model=model, endpoint=args.endpoint, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed, exact_output=exact,
        api_key=args.api_key, images=args.images, image_size=_size(args.image_size),
    )  # fmt: skip


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"--image-size is WIDTHxHEIGHT, e.g. 640x480; got {text!r}")
    return int(width), int(height)


def parse_lists(args: argparse.Namespace) -> tuple[list[int | None], list[float]]:
    concurrencies = [int(c) or None for c in args.concurrencies.split(",") if c.strip()]
    rates = [math.inf if r.strip() == "inf" else float(r) for r in args.request_rates.split(",") if r.strip()]
    if not concurrencies or not rates:
        raise ValueError("--concurrencies and --request-rates need at least one value each")
    return concurrencies, rates


def load_tokenizer(name: str):
    """The tokenizer of a catalogue name or a local folder."""
    return load_folder_tokenizer(resolve_model(name))


def run(args: argparse.Namespace) -> int:
    concurrencies, rates = parse_lists(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    exact = "ignore_eos" if args.exact_output == "auto" else args.exact_output
    cfg = config_from_args(args, args.base_url, args.model, exact)
    samples = random_dataset(tokenizer, cfg)
    points = sweep(cfg, samples, token_counter(tokenizer), concurrencies, rates, args.warmup)
    for p in points:
        print(point_line(args.base_url, p))
    prefix = Path(args.out)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": asdict(cfg), "points": points}
    write_outputs(prefix, result, {args.base_url: points}, f"{args.model} @ {args.base_url}")
    return 0 if all(p["failed"] == 0 for p in points) else 1


def write_outputs(prefix: Path, result: dict, series: dict[str, list[dict]], title: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2, default=str))
    png = plot(series, prefix.with_suffix(".png"), title)
    print(f"wrote {json_path} and {png}")


def token_counter(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
