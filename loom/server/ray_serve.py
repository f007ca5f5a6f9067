"""`loom serve ... --replicas N`: the same Loom app as a Ray Serve deployment, N replicas behind Ray's HTTP proxy.

    loom serve --model smollm2 --replicas 2                 # a local Ray cluster, started and stopped with the server
    loom serve --model smollm2 --autoscale 1:4              # Serve's autoscaling between 1 and 4 replicas
    loom serve --model smollm2 --replicas 4 --ray-address auto --num-gpus-per-replica 1    # an existing cluster

Loom does not route or restart anything itself: each replica builds exactly the app `loom serve` builds (the
components its flags ask for, the Guard with the API key and body limits, /health, /metrics) from the same parsed
flags, Ray Serve's proxy spreads requests over the replicas (streaming passes through), and Serve's controller
replaces a replica whose process dies. Every response carries ``x-loom-replica`` (the replica's id); each replica's
/metrics is its own registry, with ``loom_replica_info{replica="..."}`` naming it (Ray's own metrics export has
Serve's per-replica series for a cluster-wide view). Components' extra ports (the model server's management API, the
image web UI) are not opened in replicas: N replicas cannot share one port.

``ray`` is imported only here, and only when these flags are given (``pip install 'loom[ray]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Gauge

APP_NAME = "loom"
OWNER_ENV = "LOOM_RAY_OWNER"
"""Marks the processes of the local Ray cluster this server started (inherited through the raylet)."""


def wanted(args: argparse.Namespace) -> bool:
    return args.replicas is not None or bool(args.autoscale or args.ray_address)


def parse_autoscale(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    low, sep, high = spec.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 0 < int(low) <= int(high):
        raise ValueError(f"--autoscale takes MIN:MAX replicas with 1 <= MIN <= MAX, e.g. 1:4; got {spec!r}")
    return int(low), int(high)


def run(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --replicas / --autoscale / --ray-address need Ray Serve: pip install 'loom[ray]' "
              "(ray[serve])", file=sys.stderr)
        return 2
    app = application(args)
    local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    if local:  # a cluster of its own: every process it starts inherits this mark (see _sweep)
        os.environ[OWNER_ENV] = f"{os.getpid()}-{time.time_ns()}"
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning", log_to_driver=True)
    stop = _catch_signals()
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, detached=False)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        replicas = f"autoscaling {args.autoscale}" if args.autoscale else f"{args.replicas or 1}"
        print(f"Loom on Ray Serve: {replicas} replica(s) at http://{args.host}:{args.port}", flush=True)
        stop.wait()
    finally:
        _stop(serve, ray, local)
    return 0


def application(args: argparse.Namespace):
    """The Serve application (a bound deployment) of these flags: replicas, resources, autoscaling."""
    from ray import serve

    autoscale = parse_autoscale(args.autoscale)
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    options: dict = {"ray_actor_options": {"num_cpus": args.num_cpus_per_replica,
                                           "num_gpus": args.num_gpus_per_replica},
                     "max_ongoing_requests": args.max_ongoing_requests}
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": 8}
    else:
        options["num_replicas"] = args.replicas or 1

    def build_app():  # a function, which Serve calls once in each replica (an object would be taken as the app)
        return replica_app(args)

    return serve.deployment(serve.ingress(build_app)(), name="loom", **options).bind()


def app_from_flags(config: dict):
    """Serve's application builder for config files (`serve run`, `serve deploy`, KubeRay's RayService):
    ``import_path: loom.server.ray_serve:app_from_flags`` with ``args: {flags: "--model smollm2 --replicas 2"}``.
    The config file's own ``deployments`` settings override the flags' replicas and resources."""
    import shlex

    from loom.server.cli import add_arguments

    parser = argparse.ArgumentParser(prog="loom serve")
    add_arguments(parser)
    return application(parser.parse_args(shlex.split(config.get("flags", ""))))


def _stop(serve, ray, local: bool, timeout: float = 10.0) -> None:
    """Take the app down; on a local cluster, Serve and Ray too, then kill whatever of it is left.

    A Ctrl-C or a `timeout`/`kill -- -PGID` signals the whole process group, which Ray's own processes share with this
    one: the raylet may already be gone, orphaning its workers (replicas, proxy, controller) and making Serve's
    shutdown wait forever. Hence the bounded wait and the sweep."""
    stop = threading.Thread(target=serve.shutdown if local else lambda: serve.delete(APP_NAME), daemon=True)
    stop.start()
    stop.join(timeout)
    if stop.is_alive():
        print(f"warning: Ray Serve did not shut down within {timeout:.0f} s; killing its processes", file=sys.stderr)
    ray.shutdown()
    if local:
        _sweep(os.environ[OWNER_ENV])


def _sweep(mark: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace``, every process but this one that carries this server's mark."""
    import psutil

    def marked() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get(OWNER_ENV) == mark:
                    found.append(proc)
        return found

    left = marked()
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def _catch_signals() -> threading.Event:
    """SIGTERM/SIGINT set the returned event. Installed right after ``ray.init``, which installs a handler that
    aborts the process (and so skips the shutdown below)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def replica_app(args: argparse.Namespace):
    """The `loom serve` app of one replica, from the parsed flags, answering with its replica id."""
    from ray import serve

    from loom.server.app import build_app
    from loom.server.cli import build_components, policy_from_args

    replica = serve.get_replica_context().replica_id.unique_id
    registry = CollectorRegistry()
    info = Gauge("loom_replica_info", "The Ray Serve replica that serves this /metrics", ["replica"],
                 registry=registry)
    info.labels(replica=replica).set(1)
    # extra ports are not opened in a replica: components leave out what would announce or serve them
    args = argparse.Namespace(**{**vars(args), "in_replica": True})
    return ReplicaHeader(build_app(build_components(args, registry), registry, policy_from_args(args)), replica)


class ReplicaHeader:
    """ASGI wrapper: every HTTP response (streamed ones too) carries ``x-loom-replica``. Lifespan and other
    messages pass through untouched."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (b"x-loom-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_header)
