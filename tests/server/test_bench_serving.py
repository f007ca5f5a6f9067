"""The serving benchmark: its statistics on hand-made results, and a small real run against the tiny server."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.serving_vs_transformers import compare_line
from loom.bench.serving import RequestResult, ServingBenchConfig, random_dataset, request_body, summarize, sweep


def test_summary_statistics_follow_vllm_definitions():
    cfg = ServingBenchConfig(max_concurrency=2)
    results = [
        RequestResult(ok=True, ttft=0.1, latency=1.1, itl=[0.2, 0.3], output_tokens=11, prompt_tokens=5),
        RequestResult(ok=True, ttft=0.3, latency=2.3, itl=[0.5], output_tokens=5, prompt_tokens=7, cached_tokens=3),
        RequestResult(ok=False, error="HTTP 503"),
    ]
    s = summarize(results, duration=4.0, cfg=cfg)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 503"])
    assert s["output_throughput"] == pytest.approx(16 / 4.0)
    assert (s["cached_prompt_tokens"], s["min_output_tokens"]) == (3, 5)
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["total_token_throughput"] == pytest.approx(28 / 4.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx(((1.0 / 10) + (2.0 / 4)) / 2 * 1000)  # (latency - ttft) / (out - 1)
    assert s["median_itl_ms"] == pytest.approx(300.0) and s["max_itl_ms"] == pytest.approx(500.0)
    assert s["p99_e2el_ms"] == pytest.approx(1000 * (1.1 + 0.99 * (2.3 - 1.1)))


def test_dataset_is_seeded_and_bodies_fit_each_server(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    cfg = ServingBenchConfig(num_prompts=4, input_len=20, output_len=8, range_ratio=0.5, seed=3)
    a, b = random_dataset(tok, cfg), random_dataset(tok, cfg)
    assert a == b and len({s.prompt for s in a}) == 4
    assert all(10 <= s.prompt_len <= 30 and 4 <= s.output_len <= 12 for s in a)
    other = random_dataset(tok, ServingBenchConfig(num_prompts=4, input_len=20, output_len=8, seed=4))
    assert other[0].prompt != a[0].prompt
    loom = request_body(cfg, a[0])
    assert loom["ignore_eos"] is True and loom["stream_options"] == {"include_usage": True}
    hf = request_body(ServingBenchConfig(exact_output="generation_config", endpoint="completions"), a[0])
    assert "ignore_eos" not in hf and "stream_options" not in hf and hf["prompt"] == a[0].prompt
    assert json.loads(hf["generation_config"]) == {"max_new_tokens": a[0].output_len, "do_sample": False}


def test_benchmark_run_against_the_tiny_server(tiny_server, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    cfg = ServingBenchConfig(base_url=tiny_server.base_url, model="tiny", num_prompts=6, input_len=12, output_len=5,
                             max_concurrency=3, request_rate=50.0)
    before = tiny_server.metrics()["loom_generation_tokens_total"]
    [s] = sweep(cfg, random_dataset(tok, cfg), lambda text: 0, concurrencies=[3], rates=[50.0], warmup=0)
    assert s["completed"] == 6 and s["failed"] == 0
    assert 0 < s["engine_busy_fraction"] <= 1.05 and s["mean_batch_seqs"] >= 1
    assert s["total_output_tokens"] == 30  # usage from the server: exactly output_len each (ignore_eos)
    assert tiny_server.metrics()["loom_generation_tokens_total"] - before == 30
    assert 0 < s["median_ttft_ms"] <= s["median_e2el_ms"]
    assert not math.isnan(s["median_itl_ms"])


def test_compare_line_reports_ratios_and_verdict():
    loom = {"output_throughput": 90.0, "p99_ttft_ms": 500.0, "max_concurrency": 16, "request_rate": "inf"}
    hf = {"output_throughput": 30.0, "p99_ttft_ms": 2000.0, "max_concurrency": 16, "request_rate": "inf"}
    args = argparse.Namespace(model="smollm2", num_prompts=64, input_len=128, output_len=64)
    line = compare_line({"loom": [loom], "transformers serve": [hf]}, args)
    assert "3.00x output tok/s" in line and "p99 TTFT 0.25x" in line and line.endswith("PASS)")
    slow = compare_line({"loom": [{**loom, "output_throughput": 45.0}], "transformers serve": [hf]}, args)
    assert "1.50x" in slow and slow.endswith("MISS)")


def test_pictured_requests_against_a_vision_server(tmp_path, smollm2_path):
    """--images: seeded random JPEGs sent as image_url parts; a tiny LLaVA server counts each picture's 16 tokens in
    the usage the benchmark sums, and a text endpoint refuses pictures."""
    from loom.models.tiny import save_tiny_vision_model
    from tests.server.conftest import start_llm_server, tiny_config

    path = save_tiny_vision_model(tmp_path / "llava", smollm2_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = ServingBenchConfig(model="tiny", num_prompts=3, input_len=10, output_len=4, images=2, image_size=(64, 48),
                             seed=5)
    a, b = random_dataset(tok, cfg), random_dataset(tok, cfg)
    assert a == b and all(len(s.images) == 2 and s.images[0].startswith("data:image/jpeg;base64,") for s in a)
    assert a[0].images[0] != a[0].images[1]
    parts = request_body(cfg, a[0])["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    with pytest.raises(ValueError, match="chat endpoint"):
        ServingBenchConfig(images=1, endpoint="completions")
    server = start_llm_server(tiny_config(path, num_kv_blocks=128))
    try:
        cfg.base_url = server.base_url
        plain = ServingBenchConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "images": 0})
        [pictured] = sweep(cfg, a, lambda text: 0, concurrencies=[3], rates=[math.inf], warmup=0)
        [text] = sweep(plain, random_dataset(tok, plain), lambda text: 0, concurrencies=[3], rates=[math.inf],
                       warmup=0)
    finally:
        server.stop()
    assert pictured["completed"] == 3 and pictured["failed"] == 0
    assert pictured["total_input_tokens"] - text["total_input_tokens"] >= 3 * 2 * 16  # and each picture's tags
