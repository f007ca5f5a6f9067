"""A free loopback port: for a process group's rendezvous (tensor-parallel ranks, finetuning ranks) and for the
servers benchmarks and tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
