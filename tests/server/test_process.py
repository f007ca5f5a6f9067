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
import pytest

from loom.bench.process import free_port


def _spawn(model, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", str(model), "--port", str(port), "--log-level", "warning",
           "--threads", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_sigterm_drains_in_flight_stream_then_exits(tiny_llama):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tiny_llama, port, "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "4")
    try:
        _wait_ready(url, proc)
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
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 300  # the request in flight ran to its end
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        _kill(proc)


def test_serve_without_model_or_other_component_refuses():
    out = subprocess.run([sys.executable, "-m", "loom.cli", "serve", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--model" in out.stdout


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_path):
    port = free_port()
    proc = _spawn("smollm2", port)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, timeout=240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == out.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            _kill(proc)
