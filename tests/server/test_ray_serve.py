"""`loom serve --replicas 2` on a local Ray cluster: one app (a tiny LLM and a toy model-server handler) in two
Ray Serve replicas behind Ray's proxy — both answer, SSE streams through, the API key holds, each /metrics names its
replica, a SIGKILLed replica is replaced while requests keep succeeding, and SIGTERM leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from loom.bench.process import free_port, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _marked(marker: str) -> list[psutil.Process]:
    """Every live process started under this test's server: Ray's workers rename themselves ("ray::...") and are
    re-parented when the raylet dies, but they keep the environment they were started with."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LOOM_RAY_TEST") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _replica_processes(marker: str) -> dict[int, str]:
    procs = {}
    for proc in _marked(marker):
        try:
            if "ServeReplica" in " ".join(proc.cmdline()):
                procs[proc.pid] = proc.cmdline()[0]
        except psutil.Error:
            continue
    return procs


def _complete(url: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_two_replicas_answer_stream_survive_a_kill_and_leave_nothing(tiny_llama, tmp_path):
    marker = uuid.uuid4().hex
    port = free_port()
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", str(tiny_llama), "--served-model-name", "tiny",
           "--max-model-len", "256", "--threads", "1", "--serve", "echo=tests.batching.toy_handlers#EchoHandler",
           "--threads-per-worker", "1", "--management-token-file", str(tmp_path / "token.json"),
           "--replicas", "2", "--num-cpus-per-replica", "0.5",
           "--api-key", KEY, "--port", str(port), "--log-level", "warning"]
    # A short private temp dir: Ray's socket paths must fit 107 bytes, and this cluster's files stay apart.
    ray_tmp = Path(f"/tmp/lr{marker[:8]}")
    env = {"PYTHONPATH": str(ROOT), "LOOM_RAY_TEST": marker, "RAY_TMPDIR": str(ray_tmp),
           "RAY_USAGE_STATS_ENABLED": "0"}
    server = start_server(cmd, f"http://127.0.0.1:{port}", ready_path="/health", timeout=240,
                          log_path=tmp_path / "serve.log", env=env, cwd=ROOT)
    url = server.url
    try:
        # Both replicas answer, each naming itself; Ray's proxy routes /health as any route.
        seen = set()
        _wait(lambda: seen.add(_complete(url).headers["x-loom-replica"]) or len(seen) == 2, 90,
              f"two replica ids in x-loom-replica (seen {seen})")
        assert len(_replica_processes(marker)) == 2

        # The Guard runs in every replica: no key, 401 with a JSON body; a model-server route answers too.
        denied = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
        assert denied.status_code == 401 and "error" in denied.json()
        echo = httpx.post(f"{url}/predictions/echo", json="ping", headers=AUTH, timeout=30)
        assert echo.status_code == 200 and echo.json()["item"] == "ping" and echo.headers["x-loom-replica"] in seen
        # no management API in replicas (N replicas cannot share its port): no token written or announced
        assert not (tmp_path / "token.json").exists() and "management API on" not in server.log_tail(20000)

        # SSE passes through Ray's proxy chunk by chunk, ending with [DONE]; same tokens as without streaming.
        whole = _complete(url, max_tokens=8, ignore_eos=True).json()["choices"][0]["text"]
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-loom-replica"] in seen
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == whole

        # Each replica's /metrics is its own, labelled with its id.
        labelled = set()
        _wait(lambda: labelled.update(r.headers["x-loom-replica"] for r in [httpx.get(f"{url}/metrics")]
                                      if f'loom_replica_info{{replica="{r.headers["x-loom-replica"]}"}} 1.0'
                                      in r.text) or labelled == seen, 60, "/metrics of both replicas")

        # SIGKILL one replica's process: new requests keep getting 200 while Ray replaces it.
        before = _replica_processes(marker)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        statuses, after = [], {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses.append(_complete(url).status_code)
            after = _replica_processes(marker)
            if len(after) == 2 and victim not in after:
                break
        assert victim not in after and len(after) == 2, f"no replacement within 120 s: {before} -> {after}"
        assert statuses and set(statuses) == {200}, statuses
        fresh = set()
        _wait(lambda: fresh.add(_complete(url).headers["x-loom-replica"]) or len(fresh - seen) == 1, 90,
              "the replacement replica answering with a new id")
    finally:
        server.proc.send_signal(signal.SIGTERM)  # to the server alone (see docs/scale-out.md for a group's signal)
        try:
            code = server.proc.wait(90)
        finally:
            left = _wait_gone(marker, 30)
            for proc in left:  # never leak a worker, whatever happened above
                proc.kill()
            log = server.log_tail(5000)
            server.stop(grace=5)
            _rm_tree(ray_tmp)
    assert not left, f"processes left after shutdown: {[(p.pid, p.name()) for p in left]}"
    assert code == 0, log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_flags_become_serve_options_without_starting_ray():
    from loom.server.ray_serve import app_from_flags

    fixed = app_from_flags({"flags": "--model m --replicas 3 --num-cpus-per-replica 2 --num-gpus-per-replica 1"})
    deployment = fixed._bound_deployment
    assert deployment.num_replicas == 3 and deployment.max_ongoing_requests == 128
    assert deployment.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0}
    scaling = app_from_flags({"flags": "--model m --autoscale 2:5"})._bound_deployment._deployment_config
    assert (scaling.autoscaling_config.min_replicas, scaling.autoscaling_config.max_replicas) == (2, 5)


@pytest.mark.parametrize("flags", ["--autoscale 3", "--autoscale 4:2", "--autoscale 0:2", "--replicas 0"])
def test_bad_replica_flags_are_refused_before_ray_starts(flags, tmp_path):
    out = subprocess.run([sys.executable, "-m", "loom.cli", "serve", "--model", "m", *flags.split(), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path)})
    assert out.returncode == 2 and ("--autoscale" in out.stderr or "--replicas" in out.stderr), out.stderr
    assert not (tmp_path / "ray").exists()  # refused before any Ray process started


def _wait_gone(marker: str, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _rm_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
