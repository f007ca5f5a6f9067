"""`loom serve --model PATH` as a real process: flags reach the engine, SIGTERM drains a stream, then exits 0;
and (slow) SmolLM2 answers a chat question through the official client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from loom.bench.process import ServerProcess, free_port, start_server


def _serve(model, *extra: str, timeout: float = 120.0) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", str(model), "--port", str(port),
           "--log-level", "warning", "--threads", "1", *extra]
    return start_server(cmd, f"http://127.0.0.1:{port}", timeout=timeout)


@pytest.mark.parametrize("mode", [[], ["--engine-process"]], ids=["engine-thread", "engine-process"])
def test_sigterm_drains_in_flight_stream_then_exits(tiny_llama, mode):
    """SIGTERM to the server's whole process group (as Ctrl-C, `timeout` and systemd send it): the stream in flight
    still runs to its end (the engine's own process ignores the signal until the server has drained), exit 0, and
    no process of the server's is left."""
    server = _serve(tiny_llama, "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "4", *mode)
    url, proc = server.url, server.proc
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == len(mode)  # the engine's process, with --engine-process
    try:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["max_model_len"] == 512
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 300, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        lines: list[str] = []
        first = threading.Event()

        def consume():
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(60)
        os.killpg(proc.pid, signal.SIGTERM)  # the server runs in a session of its own: its group is its pid
        reader.join(120)
        assert proc.wait(120) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 300  # the request in flight ran to its end
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        server.stop(grace=5)


def test_serve_without_model_or_other_component_refuses():
    out = subprocess.run([sys.executable, "-m", "loom.cli", "serve", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--model" in out.stdout


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_path):
    # the float32 format: the default 4-bit file answers this with a French landmark, as llama.cpp does (test_gguf.py)
    with _serve("smollm2:f32", "--served-model-name", "smollm2", timeout=240) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == out.choices[0].message.content


@pytest.mark.slow
def test_smollm2_over_two_ranks_answers_then_a_killed_rank_ends_the_server(smollm2_path):
    """`loom serve --tensor-parallel-size 2`: the official client, streamed and not; then SIGKILL to rank 1 while a
    stream runs ends the server within 30 s, non-zero, naming the rank."""
    import psutil

    server = _serve("smollm2", "--tensor-parallel-size", "2", timeout=240)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0)
        assert "Paris" in out.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=question, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == out.choices[0].message.content

        ranks = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                 if "loom.engine.tensor_parallel" in " ".join(p.cmdline())]
        assert len(ranks) == 1
        body = {"model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            killed = time.monotonic()
            ranks[0].kill()
            rest = list(lines)  # the stream ends (with an error event) instead of hanging
        assert server.proc.wait(30) == 1
        assert time.monotonic() - killed < 30
        events = [line for line in rest if line]
        assert events[-1] == "data: [DONE]" and "rank 1" in json.loads(events[-2][len("data: "):])["error"]["message"]
        assert "rank 1" in server.log_tail() and "exited with code -9" in server.log_tail()
        assert not ranks[0].is_running()
    finally:
        server.stop(grace=5)
