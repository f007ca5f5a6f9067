"""Decoding beside a burst of pictures: text requests stream from a LLaVA-shaped model served by Loom while pictured
requests arrive all at once, with the encoder budget at its default (``max_num_batched_tokens``: ten pictures may
start encoding in one step) and at one picture a step (``--max-num-encoder-tokens 196``), in the same run, servers
alternated round by round.

    python benchmarks/encoder_budget.py --rounds 2

The model is benchmarks/vision.py's (CLIP ViT-B/16 at 224 px: 196 tokens a picture; SmolLM2-135M's shape; random
weights, float32). Per round and setting, after one text and one pictured
request to warm the server: 8 text requests (32-token prompts, 256 output tokens) stream through ``loom bench
serving``'s client; 1 s later, 16 requests with one 320 x 240 picture each (8 output tokens) arrive at once. Prints
one summary line (the text requests' worst inter-token latency, the stall a step of pictures causes, each way; the
pictured requests' mean TTFT) and writes JSON (default results/encoder_budget.json).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.vision import build_model  # noqa: E402

SETTINGS = {"default": [], "one-picture": ["--max-num-encoder-tokens", "196"]}


async def burst(text_cfg, text_samples, picture_cfg, picture_samples) -> tuple[dict, dict]:
    """One text and one pictured request to warm the server; then the text requests, and 1 s later the pictured
    ones."""
    from loom.bench.serving import run_benchmark

    await asyncio.gather(run_benchmark(text_cfg, text_samples[:1], lambda text: 0),
                         run_benchmark(picture_cfg, picture_samples[:1], lambda text: 0))
    text_samples, picture_samples = text_samples[1:], picture_samples[1:]

    async def pictures():
        await asyncio.sleep(1.0)
        return await run_benchmark(picture_cfg, picture_samples, lambda text: 0)

    return await asyncio.gather(run_benchmark(text_cfg, text_samples, lambda text: 0), pictures())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/encoder_budget.json")
    args = ap.parse_args()

    from loom.bench.process import free_port, start_server
    from loom.bench.serving import ServingBenchConfig, random_dataset
    from loom.models.catalogue import resolve_model
    from loom.models.loader import load_tokenizer

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "llava", resolve_model("smollm2"), args.seed)
        tokenizer = load_tokenizer(path)
        for r in range(args.rounds):
            for name, flags in SETTINGS.items():
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                command = [sys.executable, "-m", "loom.cli", "serve", "--model", str(path), "--port", str(port),
                           "--served-model-name", "llava", *flags]
                text_cfg = ServingBenchConfig(base_url=url + "/v1", model="llava", num_prompts=9, input_len=32,
                                              output_len=256, max_concurrency=None, seed=args.seed + r)
                picture_cfg = ServingBenchConfig(base_url=url + "/v1", model="llava", num_prompts=17, input_len=16,
                                                 output_len=8, max_concurrency=None, images=1, image_size=(320, 240),
                                                 seed=args.seed + 100 + r)
                with start_server(command, url, timeout=300):
                    text, pictured = asyncio.run(burst(text_cfg, random_dataset(tokenizer, text_cfg), picture_cfg,
                                                       random_dataset(tokenizer, picture_cfg)))
                assert text["failed"] == 0 and pictured["failed"] == 0, (text["errors"], pictured["errors"])
                runs[name].append({"text": text, "pictured": pictured})
                print(f"round {r + 1} {name}: text max ITL {text['max_itl_ms']:.0f} ms (p99 {text['p99_itl_ms']:.0f}), "
                      f"pictured mean TTFT {pictured['mean_ttft_ms']:.0f} ms", flush=True)

    def median(name: str, part: str, key: str) -> float:
        return statistics.median(run[part][key] for run in runs[name])

    summary = {name: {"text_max_itl_ms": median(name, "text", "max_itl_ms"),
                      "text_p99_itl_ms": median(name, "text", "p99_itl_ms"),
                      "text_mean_itl_ms": median(name, "text", "mean_itl_ms"),
                      "pictured_mean_ttft_ms": median(name, "pictured", "mean_ttft_ms"),
                      "pictured_p99_ttft_ms": median(name, "pictured", "p99_ttft_ms")} for name in SETTINGS}
    ratio = summary["default"]["text_max_itl_ms"] / summary["one-picture"]["text_max_itl_ms"]
    write_json(args.out, {"benchmark": "encoder_budget", "rounds": args.rounds, "settings": SETTINGS,
                          "summary": summary, "runs": runs, "machine": machine()})
    d, o = summary["default"], summary["one-picture"]
    print(f"encoder budget: text max ITL {d['text_max_itl_ms']:.0f} ms (default) vs {o['text_max_itl_ms']:.0f} ms "
          f"(one picture a step), {ratio:.2f}x lower; pictured mean TTFT {d['pictured_mean_ttft_ms']:.0f} vs "
          f"{o['pictured_mean_ttft_ms']:.0f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
