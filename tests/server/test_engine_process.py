"""``loom serve --engine-process``: the engine in a child process, outputs across the pipe as deltas.

What crosses the pipe rebuilds exactly the outputs the engine makes of each kind; a server with the engine in a
process answers and streams what the in-thread server does, frees every block of an aborted stream, loads adapters
in the child, and fails what is in flight when the child dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from loom.engine.config import EngineConfig
from loom.entrypoints.openai.async_engine import AsyncLLMEngine
from loom.entrypoints.openai.engine_process import ProcessLLMEngine

from .conftest import start_llm_server, tiny_config


def test_what_crosses_the_pipe_rebuilds_every_output_of_the_kind_asked_for(tiny_llama):
    """The child's engine runs a request as ``wire_params`` makes it; the parent's decoder turns what crosses back
    into the outputs the request asked for. Each request runs twice in one engine, as asked and as the child runs
    it, side by side (so in the same steps): two completions with logprobs, one stopping early; a stop string held
    back; a final-only request; an aborted request forgotten; a request the child refused."""
    from loom.engine.llm_engine import LLMEngine
    from loom.engine.sampling_params import SamplingParams
    from loom.entrypoints.openai.engine_process import OutputDecoder, encode, wire_params
    from tests.engine.test_parity import varied_prompts

    engine = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=256, seed=0))
    prompts = varied_prompts(4, seed=70, low=5, high=20)
    asked = [
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, logprobs=1, stop=["e"]),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, stop=["zzz"]),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, output_kind="final_only"),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    ]
    decoder = OutputDecoder()
    for i, (prompt, params) in enumerate(zip(prompts, asked)):
        engine.add_request(f"asked-{i}", None, params, prompt_token_ids=prompt)
        decoder.expect(f"wire-{i}", prompt, params)
        engine.add_request(f"wire-{i}", None, wire_params(params), prompt_token_ids=prompt)
    decoder.expect("refused", [1], asked[0])
    decoder.forget("refused")  # what the parent does when the child's answer is an error
    steps = 0
    while engine.has_unfinished_requests():
        if steps == 3:
            engine.abort_request("wire-3"), engine.abort_request("asked-3")
            decoder.forget("wire-3")
        outs = engine.step()
        steps += 1
        want = {o.request_id.removeprefix("asked-"): o for o in outs if o.request_id.startswith("asked-")}
        got = {}
        for o in outs:
            if o.request_id.startswith("wire-") and (out := decoder.decode(encode(o))) is not None:
                got[o.request_id.removeprefix("wire-")] = out
            if o.request_id == "wire-3":
                aborted = encode(o)
        assert got.keys() == want.keys()
        for i, out in got.items():
            assert (out.outputs, out.finished, out.prompt_token_ids) == (want[i].outputs, want[i].finished,
                                                                         want[i].prompt_token_ids)
    assert decoder.decode(aborted) is None  # an output of a step that ran while the abort was on its way
    assert wire_params(asked[0]).output_kind == "delta" and wire_params(asked[2]).output_kind == "final_only"
    assert decoder._requests == {}  # finished, aborted and refused requests leave nothing behind


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
    {"logprobs": 2, "max_tokens": 3, "echo": True},  # the prompt's logprobs cross the pipe too
])
def test_the_process_engine_answers_and_streams_what_the_thread_engine_does(tiny_server, process_server, body):
    want = _complete(tiny_server.base_url, False, **body)
    assert _complete(process_server.base_url, False, **body) == want
    assert _complete(process_server.base_url, True, **body)[:2] == want[:2]
    if "logprobs" in body:
        ask = {"model": "tiny", "prompt": "The tiny model says", "temperature": 0, **body}
        a = httpx.post(f"{tiny_server.base_url}/completions", json=ask, timeout=60).json()["choices"][0]["logprobs"]
        b = httpx.post(f"{process_server.base_url}/completions", json=ask, timeout=60).json()["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and a["top_logprobs"][-1].keys() == b["top_logprobs"][-1].keys()
        first = 1 if body.get("echo") else 0  # an echoed prompt's first token has no logprob
        assert a["token_logprobs"][first:] == pytest.approx(b["token_logprobs"][first:], abs=1e-5)
        assert len(a["tokens"]) == body["max_tokens"] + (4 if body.get("echo") else 0)  # the prompt: 4 tokens


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


@pytest.mark.parametrize("front_class", [AsyncLLMEngine, ProcessLLMEngine])
def test_a_request_id_in_use_is_refused_and_the_live_request_goes_on(tiny_llama, front_class):
    from loom.engine.sampling_params import SamplingParams

    async def run():
        front = front_class(EngineConfig(model=str(tiny_llama), num_kv_blocks=128, block_size=4))
        await front.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, output_kind="delta")
            stream = await front.add_request("x", [5, 6, 7], params)
            with pytest.raises(ValueError, match="already in use"):
                await front.add_request("x", [8, 9], params)
            tokens = []

            async def read():
                async for out in stream:
                    tokens.extend(out.outputs[0].token_ids)

            await asyncio.wait_for(read(), 60)  # a live request dropped by the refusal would never finish
            stream.close()
            return tokens
        finally:
            await front.shutdown()

    assert len(asyncio.run(run())) == 300
