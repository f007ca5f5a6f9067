"""Continuous batching across HTTP requests, aborts on disconnect, the bounded queue (503) and /health under load."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from tests.server.conftest import start_llm_server, tiny_config

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def _steps_over_one(m: dict) -> float:
    return m["loom_iteration_num_seqs_count"] - m["loom_iteration_num_seqs_bucket{le=1.0}"]


def _wait_for(predicate, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def test_16_concurrent_streams_share_steps_and_report_usage(tiny_server):
    prompt_tokens = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": MESSAGES}).json()["count"]
    before = tiny_server.metrics()

    async def one(client: openai.AsyncOpenAI, i: int):
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=48, temperature=1.0, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return chunks

    async def run_all():
        async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(run_all())
    after = tiny_server.metrics()
    for chunks in results:
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 48)
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert after["loom_request_success_total{finished_reason=length}"] - before.get(
        "loom_request_success_total{finished_reason=length}", 0) == 16
    assert after["loom_generation_tokens_total"] - before["loom_generation_tokens_total"] == 16 * 48
    steps = after["loom_iteration_num_seqs_count"] - before["loom_iteration_num_seqs_count"]
    seqs = after["loom_iteration_num_seqs_sum"] - before["loom_iteration_num_seqs_sum"]
    assert _steps_over_one(after) - _steps_over_one(before) > 0
    assert seqs / steps > 2, f"mean batch {seqs / steps:.2f} sequences per step: requests did not share steps"
    assert steps < 16 * 48  # one step per token per request would be no batching at all
    assert after["loom_iteration_num_seqs_max"] >= 8


def test_disconnected_streams_are_aborted_and_free_every_block(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=512, max_num_seqs=16))
    try:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "stream": True, "ignore_eos": True}

        async def read_then_leave(client: httpx.AsyncClient):
            async with client.stream("POST", f"{server.base_url}/chat/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 4:
                        return  # closing the response drops the connection mid-generation

        async def run_all():
            async with httpx.AsyncClient(timeout=60) as client:
                await asyncio.gather(*(read_then_leave(client) for _ in range(8)))

        asyncio.run(run_all())
        m = _wait_for(lambda: (m := server.metrics())["loom_request_success_total{finished_reason=abort}"] == 8 and m)
        m = _wait_for(lambda: (m := server.metrics())["loom_num_requests_running"] == 0 and m)
        assert m["loom_kv_cache_free_blocks"] == m["loom_kv_cache_num_blocks"] == 512
        assert m["loom_kv_cache_usage_perc"] == 0
        assert m["loom_generation_tokens_total"] < 8 * 900 / 2  # stopped early, not run to the end
        engine = server.component.front.engine  # idle now: reading it from this thread is safe
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.has_unfinished_requests()
        assert server.component.front.num_in_flight == 0
    finally:
        server.stop()


def test_full_queue_answers_503_with_retry_after_while_health_answers(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, max_num_seqs=2, max_waiting=1))
    body = {"model": "tiny", "prompt": "count with me", "max_tokens": 900, "stream": True, "ignore_eos": True}
    client = httpx.Client(timeout=60)
    held = []
    try:
        for _ in range(3):  # 2 running + 1 waiting fill the bound
            r = client.send(client.build_request("POST", f"{server.base_url}/completions", json=body), stream=True)
            assert r.status_code == 200
            held.append(r)
        for _ in range(3):
            r = client.post(f"{server.base_url}/completions", json={**body, "stream": False})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "overloaded_error"
        health = client.get(f"{server.url}/health")
        assert health.status_code == 200
        assert health.json()["components"]["llm"]["in_flight"] == 3
        assert server.metrics()["loom_requests_rejected_total"] == 3
        for r in held:
            r.close()
        _wait_for(lambda: client.get(f"{server.url}/health").json()["components"]["llm"]["in_flight"] == 0)
        ok = client.post(f"{server.base_url}/completions", json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        for r in held:
            r.close()
        client.close()
        server.stop()


def test_non_streaming_client_that_gives_up_aborts_its_request(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=128, max_num_seqs=4))
    try:
        body = {"model": "tiny", "prompt": "patience", "max_tokens": 900, "ignore_eos": True}
        try:
            httpx.post(f"{server.base_url}/completions", json=body, timeout=0.5)
            raise AssertionError("the request should not have finished within 0.5 s")
        except httpx.TimeoutException:
            pass
        m = _wait_for(lambda: (m := server.metrics()).get("loom_request_success_total{finished_reason=abort}") == 1
                      and m)
        m = _wait_for(lambda: (m := server.metrics())["loom_kv_cache_free_blocks"] == 128 and m)
        assert m["loom_generation_tokens_total"] < 900
    finally:
        server.stop()
