"""`loom serve`: one process, one app, one /metrics — the LLM engine, the model server and the image generator.

Each area contributes a serve plugin module with ``add_serve_arguments(parser)`` and
``create_component(args, registry) -> Component | None`` (None when its flags ask for nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import sys

from prometheus_client import CollectorRegistry

from loom.server.app import build_app
from loom.server.guard import DEFAULT_MAX_BODY_BYTES, HTTPPolicy

SERVE_PLUGINS = ("loom.entrypoints.openai.serve", "loom.batching.serve", "loom.image.serve")


def _plugins():
    for name in SERVE_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            yield importlib.import_module(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every route but /health, /ping, /metrics and "
                             "/version, for every component (default $LOOM_API_KEY; none: no authentication)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help=f"largest request body on any route, in MiB; larger ones get 413 "
                             f"(default {DEFAULT_MAX_BODY_BYTES // 2**20})")
    replicas = parser.add_argument_group("replicas on Ray Serve (pip install 'loom[ray]'; docs/scale-out.md)")
    replicas.add_argument("--replicas", type=int, default=None,
                          help="run the app as N Ray Serve replicas behind Ray's HTTP proxy on --host/--port")
    replicas.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                          help="Serve's autoscaling between MIN and MAX replicas instead of a fixed --replicas")
    replicas.add_argument("--ray-address", default=None,
                          help="join this Ray cluster (auto: the one on this node) instead of starting a local one")
    replicas.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    replicas.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="Ray GPUs each replica reserves")
    replicas.add_argument("--max-ongoing-requests", type=int, default=128,
                          help="requests Ray's proxy sends one replica at a time (Serve's default, 5, starves Loom's "
                               "batching: it queues and batches by itself)")
    for plugin in _plugins():
        plugin.add_serve_arguments(parser)


def build_components(args: argparse.Namespace, registry: CollectorRegistry) -> list:
    """The components the flags ask for (ValueError on a bad flag; empty when they ask for nothing). A component with
    an ``attach(components)`` method is then shown the others (the image generator uses a served LLM that way)."""
    components = [c for p in _plugins() if (c := p.create_component(args, registry)) is not None]
    for component in components:
        if hasattr(component, "attach"):
            component.attach(components)
    return components


def run(args: argparse.Namespace) -> int:
    import uvicorn  # local: `loom serve --help` parses flags without it; only a starting server needs it

    from loom.server import ray_serve

    registry = CollectorRegistry()
    try:
        policy = policy_from_args(args)
        if ray_serve.wanted(args):
            return ray_serve.run(args)
        components = build_components(args, registry)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not components:
        print("nothing to serve: pass --model (LLM), --serve NAME=HANDLER (model server) or --image (images)")
        return 2
    app = build_app(components, registry, policy)
    configs = [uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                              timeout_graceful_shutdown=30)]
    for component in components:
        for extra in component.extra_servers():
            configs.append(uvicorn.Config(extra.app, host=extra.host, port=extra.port, log_level=args.log_level))
    run_event_loop(_serve_all([uvicorn.Server(c) for c in configs]))
    fatal = [f"{c.name}: {error}" for c in components if (error := getattr(c, "fatal_error", None))]
    for line in fatal:
        print(f"error: {line}", file=sys.stderr)
    return 1 if fatal else 0


def run_event_loop(main) -> None:
    """``asyncio.run`` on uvloop where it is installed (as uvicorn's own ``run`` would choose), else on asyncio."""
    # NOTE: asyncio.run alone never uses uvloop, which uvicorn.run would pick. Measured on the model server's
    # lone-request overhead (vs_peers, 3 alternating rounds x 2 modes, 2 cores): 1.92 ms mean on asyncio, 1.81 on
    # uvloop, within the noise (+-0.2 ms); kept so that `loom serve` runs on the loop the in-thread tests use.
    try:
        import uvloop  # optional: a dependency everywhere but Windows
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def policy_from_args(args: argparse.Namespace) -> HTTPPolicy:
    return HTTPPolicy(api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20))


async def _serve_all(servers) -> None:
    """Run every server; SIGTERM/SIGINT stops accepting, drains in-flight requests (lifespan stop), then exits."""
    loop = asyncio.get_running_loop()

    def request_exit() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_exit)
    for server in servers:
        server.capture_signals = contextlib.nullcontext  # we own the signals for all of them
    await asyncio.gather(*(server.serve() for server in servers))
