"""Running a server for a benchmark, a fault run or a test: a free loopback port, start, wait until it answers, stop.

    server = serve_in_thread(app)          # any ASGI app (its lifespan included), uvicorn in a thread
    httpx.get(f"{server.url}/health")
    server.stop()
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
