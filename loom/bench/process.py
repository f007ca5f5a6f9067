"""Running a server for a benchmark, a fault run or a test: a free loopback port, start, wait until it answers, stop.

    with start_server([sys.executable, "-m", "loom.cli", "serve", "--model", "smollm2", "--port", str(port)],
                      f"http://127.0.0.1:{port}") as server:        # its own process (and session)
        httpx.get(f"{server.url}/health")                           # it answered 200 before this line
    server = serve_in_thread(app)          # or any ASGI app (its lifespan included), uvicorn in a thread
    server.stop()

One copy of each of these helpers: benchmarks, `loom bench` and the tests all start their servers here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import uvicorn

from loom.distributed.ports import free_port


@dataclass
class ThreadServer:
    """A uvicorn server over an ASGI app, in a thread of this process, on a loopback port."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: stop accepting, drain (the app's lifespan stop), join the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server at {self.url} did not stop within {timeout} s")


def serve_in_thread(app, timeout: float = 120.0, log_level: str = "warning") -> ThreadServer:
    """Start ``app`` on a free loopback port and return once it accepts connections."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.05)
    return ThreadServer(f"http://127.0.0.1:{port}", server, thread)


@dataclass
class ServerProcess:
    """A server running as its own process, in its own session (so stopping it stops its workers too)."""

    proc: subprocess.Popen
    url: str
    log: IO
    log_path: Path | None = None

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with contextlib.suppress(OSError, ValueError):
            self.log.seek(0)
            return self.log.read()[-chars:]
        return ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM its session (the server drains and exits), SIGKILL what is left after ``grace``; its exit code."""
        if self.proc.poll() is None:
            _signal_session(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_session(self.proc, signal.SIGKILL)
                self.proc.wait(10)
        _signal_session(self.proc, signal.SIGKILL)  # workers that outlived the server
        with contextlib.suppress(OSError, ValueError):
            self.log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(cmd: list[str], url: str, ready_path: str = "/health", timeout: float = 180.0,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 ) -> ServerProcess:
    """Start ``cmd`` in its own session and return once ``url + ready_path`` answers 200.

    NOTE: with autogroup scheduling (on on these machines) the kernel shares CPU between sessions, not processes, and
    `nice` only ranks processes inside a session; the server's session gets this session's group priority, so a
    benchmark's servers are neither favoured over each other nor over the load client.
    """
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by stop()
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                            env={**os.environ, **offline, **(env or {})})
    with contextlib.suppress(OSError, ValueError):
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(own_group_nice()))
    server = ServerProcess(proc, url.rstrip("/"), log, Path(log_path) if log_path else None)
    try:
        wait_http(server.url + ready_path, timeout, proc)
    except RuntimeError as exc:
        tail = server.log_tail()
        server.stop(grace=5)
        raise RuntimeError(f"{exc}; the end of its log:\n{tail}") from None
    except BaseException:  # Ctrl-C or SIGTERM-as-SystemExit while waiting: don't leave the server running
        server.stop(grace=5)
        raise
    return server


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll GET ``url`` until it answers 200; RuntimeError if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def own_group_nice() -> int:
    """The nice of this process's scheduling group ("/autogroup-2 nice 0" -> 0); 0 without autogroup."""
    try:
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
