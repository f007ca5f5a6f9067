"""``loom serve --engine-process``: the engine in a child process, outputs across the pipe as deltas.

The deltas rebuild exactly the cumulative outputs the engine made; a server with the engine in a process answers and
streams what the in-thread server does, frees every block of an aborted stream, loads adapters in the child, and
fails what is in flight when the child dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from loom.engine.config import EngineConfig
from loom.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loom.entrypoints.openai.engine_process import DeltaDecoder, DeltaEncoder, ProcessLLMEngine

from .conftest import start_llm_server, tiny_config


def _completion(index, text, ids, logprobs=None, reason=None):
    lps = [{t: -0.5 * t} for t in ids] if logprobs else None
    cumulative = sum(-0.5 * t for t in ids) if logprobs else None
    return CompletionOutput(index, text, list(ids), cumulative, lps, reason, "x" if reason == "stop" else None)


def test_deltas_rebuild_every_cumulative_output():
    """Two completions (n=2) with logprobs, one ending two steps before the other; a text that is rewritten rather
    than extended (sent whole again); a request finished on its first output; an aborted one forgotten."""
    steps = [
        [_completion(0, "He", [5], True), _completion(1, "Yo", [7], True)],
        [_completion(0, "Hell", [5, 6], True), _completion(1, "Yo!", [7, 8], True, "stop")],
        [_completion(0, "Hello", [5, 6, 9], True), _completion(1, "Yo!", [7, 8], True, "stop")],
        [_completion(0, "Hallo there", [5, 6, 9, 10], True), _completion(1, "Yo!", [7, 8], True, "stop")],
        [_completion(0, "Hallo there.", [5, 6, 9, 10, 11], True, "length"), _completion(1, "Yo!", [7, 8], True,
                                                                                           "stop")],
    ]
    made = [RequestOutput("a", "hi", [1, 2, 3], outs, i == len(steps) - 1, 2, RequestMetrics(float(i)))
            for i, outs in enumerate(steps)]
    made.insert(2, RequestOutput("b", None, [4], [_completion(0, "ok", [3], reason="stop")], True))
    made.insert(3, RequestOutput("c", None, [4], [_completion(0, "x", [3])], False))
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    sent = []
    for out in made:
        sent.append(encoder.encode(out))
        rebuilt = decoder.decode(sent[-1])
        assert rebuilt == out
    encoder.forget("c"), decoder.forget("c")
    kinds = [type(s).__name__ for s in sent]
    assert kinds == ["RequestOutput", "tuple", "RequestOutput", "RequestOutput", "tuple", "tuple", "tuple"]
    completions = [s[-1] for s in sent if isinstance(s, tuple)]  # (index, text_from, text, token_ids, ...)
    assert [c[0][3] for c in completions] == [[6], [9], [10], [11]]  # only what is new travels
    assert [c[0][1] for c in completions] == [2, 4, 0, 11]  # "Hello" -> "Hallo there": sent whole
    assert [c[1][3] for c in completions] == [[8], [], [], []]
    assert encoder._sent == {} and decoder._last == {}  # finished and aborted requests leave nothing behind


@pytest.fixture(scope="module")
def process_server(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, max_num_seqs=32, engine_process=True))
    yield server
    server.stop()


def _complete(url: str, stream: bool, **body) -> tuple[str, list[str | None], int]:
    body = {"model": "tiny", "prompt": "The tiny model says", "max_tokens": 12, "temperature": 0, **body}
    if not stream:
        out = httpx.post(f"{url}/completions", json=body, timeout=60).json()
        return [c["text"] for c in out["choices"]], [c["finish_reason"] for c in out["choices"]], \
            out["usage"]["completion_tokens"]
    texts, reasons = {}, {}
    with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)], -1


@pytest.mark.parametrize("body", [
    {},
    {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 20},
    {"stop": [" the", "."], "max_tokens": 30},
    {"logprobs": 2, "max_tokens": 6},
])
def test_the_process_engine_answers_and_streams_what_the_thread_engine_does(tiny_server, process_server, body):
    want = _complete(tiny_server.base_url, False, **body)
    assert _complete(process_server.base_url, False, **body) == want
    assert _complete(process_server.base_url, True, **body)[:2] == want[:2]
    if "logprobs" in body:
        ask = {"model": "tiny", "prompt": "The tiny model says", "temperature": 0, **body}
        a = httpx.post(f"{tiny_server.base_url}/completions", json=ask, timeout=60).json()["choices"][0]["logprobs"]
        b = httpx.post(f"{process_server.base_url}/completions", json=ask, timeout=60).json()["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and a["top_logprobs"][0].keys() == b["top_logprobs"][0].keys()
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)


def test_an_abandoned_stream_frees_its_blocks_and_metrics_come_from_the_child(process_server):
    before = process_server.metrics()
    body = {"model": "tiny", "prompt": "Count with me", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{process_server.base_url}/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 20:
                break  # the client goes away mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        health = httpx.get(f"{process_server.url}/health", timeout=10).json()["components"]["llm"]
        if health["running"] == 0 and health["kv_usage"] == 0.0 and health["in_flight"] == 0:
            break
        time.sleep(0.2)
    assert health == {**health, "running": 0, "kv_usage": 0.0, "in_flight": 0}
    after = process_server.metrics()
    assert after["loom_engine_steps_total"] > before["loom_engine_steps_total"]
    assert after["loom_generation_tokens_total"] - before["loom_generation_tokens_total"] >= 10


def test_a_dead_engine_process_fails_the_request_in_flight_and_stops_the_server(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, max_num_seqs=8, engine_process=True))
    front = server.component.front
    reasons = []
    front.on_fatal = reasons.append  # the real one SIGTERMs the server's process: here, pytest's
    try:
        body = {"model": "tiny", "prompt": "Go on", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 10:
                    os.kill(front.engine.process.pid, signal.SIGKILL)
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "engine" in events[-2]
        assert reasons and "the engine process exited" in reasons[0]
        assert front.fatal_error == reasons[0]
        r = httpx.post(f"{server.base_url}/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
        assert r.status_code == 503
    finally:
        server.stop()


def test_an_engine_process_that_fails_to_start_reports_why_and_leaves_nothing_open(tmp_path, tiny_llama):
    """The child's start-up error reaches start(); the child is gone and the relay's wake-up sockets are closed."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    front = ProcessLLMEngine(EngineConfig(model=str(broken), num_kv_blocks=64))
    with pytest.raises(Exception, match="NoSuchForCausalLM"):
        asyncio.run(front.start())
    assert front._wake_read.fileno() == -1 and front._wake_write.fileno() == -1
