"""`loom serve` plugin for the dynamic-batching model server.

    loom serve --serve minilm=embedding --batch-size 32 --max-batch-delay 5 --workers 2
    loom serve --serve vit=image-classifier:/models/vit --config models.yaml
    loom serve --model-server          # management API only; register models later
    loom serve --serve vit=image-classifier --workers 4 --gpus 0,1    # workers on cuda:0, cuda:1, cuda:0, cuda:1

Inference routes join the main app; the management API runs on its own port (127.0.0.1:8081 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig, load_models_yaml, parse_serve_spec
from loom.batching.handlers.torchserve import archive_settings
from loom.batching.management import build_management_app, new_token, write_token_file
from loom.batching.placement import device_list
from loom.batching.routes import RAW_BODY_PREFIXES, PredictionRoute, build_inference_router
from loom.batching.server import ModelServer
from loom.flags import add_config_arguments, given_args
from loom.models.catalogue import loom_home
from loom.server.component import ExtraServer

MODEL_FLAGS = {"batch_size", "max_batch_delay", "workers", "max_queue_size", "request_timeout", "threads_per_worker"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model server (dynamic batching)")
    group.add_argument("--serve", action="append", default=[], metavar="NAME=HANDLER[:PATH]",
                       help="serve a model: HANDLER is embedding, reranker, image-classifier, a .py file or a module "
                            "(repeatable)")
    group.add_argument("--config", metavar="MODELS_YAML",
                       help="models.yaml: models: {NAME: {handler, path, batch_size, ...}}")
    group.add_argument("--model-server", action="store_true",
                       help="start the model server even with no model (register later)")
    # settings for every model declared here; given ones only, so a TorchServe archive's own fill the rest
    add_config_arguments(group, ModelConfig, only=MODEL_FLAGS, given_only=True)
    group.add_argument("--gpus", default=None, metavar="0,1",
                       help="GPUs the workers use, in turn over every worker of every model (TorchServe's "
                            "round-robin); a handler finds its device in ctx.device (default: every visible GPU, "
                            "else the CPU)")
    group.add_argument("--management-host", default="127.0.0.1")
    group.add_argument("--management-port", type=int, default=8081)
    group.add_argument("--management-token", default=None,
                       help="bearer token for the management API (default: generated)")
    group.add_argument("--management-token-file", default=None,
                       help="where the token is written (default $LOOM_HOME/model-server-token.json)")
    group.add_argument("--enable-model-api", action="store_true",
                       help="allow POST /models on the management API, which runs the handler code it names "
                            "(off by default: list, describe, scale and unregister still work)")
    group.add_argument("--model-store", default=None, metavar="DIR",
                       help="with --enable-model-api: handler files and model folders must lie inside DIR")


def configs_from_args(args: argparse.Namespace) -> list[ModelConfig]:
    given = given_args(ModelConfig, args)  # the model flags on the command line, nothing else
    configs = load_models_yaml(args.config, archive_settings=_archive_settings, **given) if args.config else []
    configs += [_archive_defaults(parse_serve_spec(spec, **given), given) for spec in args.serve]
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names {duplicates} are declared twice; "
                         "give each --serve / models.yaml entry its own name")
    return configs


def _archive_settings(handler: str, path: str | None) -> dict:
    """A TorchServe archive's model-config.yaml settings (batchSize, maxBatchDelay, minWorkers, responseTimeout);
    {} for any other model."""
    return archive_settings(path) if handler == "torchserve" and path is not None else {}


def _archive_defaults(config: ModelConfig, given: dict) -> ModelConfig:
    """A --serve archive's own settings where no flag was given (TorchServe's order: what the operator gives, then
    the archive, then the server's defaults)."""
    archive = {k: v for k, v in _archive_settings(config.handler, config.path).items() if k not in given}
    return config.updated(**archive) if archive else config


def create_component(args: argparse.Namespace, registry: CollectorRegistry) -> ModelServerComponent | None:
    if not (args.serve or args.config or args.model_server):
        return None
    configs = configs_from_args(args)
    devices = device_list(args.gpus)
    token = args.management_token or new_token()
    token_file = Path(args.management_token_file) if args.management_token_file else _default_token_file()
    return ModelServerComponent(configs, registry, token, args.management_host, args.management_port, token_file,
                                announce_token=not args.management_token, enable_model_api=args.enable_model_api,
                                model_store=args.model_store, devices=devices,
                                management=not getattr(args, "in_replica", False))


def _default_token_file() -> Path:
    return loom_home() / "model-server-token.json"


class ModelServerComponent:
    """The model server as a `loom serve` component."""

    name = "model_server"
    raw_body_prefixes = RAW_BODY_PREFIXES

    def __init__(self, configs: list[ModelConfig], registry: CollectorRegistry | None, token: str,
                 management_host: str = "127.0.0.1", management_port: int = 8081, token_file: Path | None = None,
                 announce_token: bool = False, enable_model_api: bool = False, model_store: str | None = None,
                 devices: list[str] | None = None, management: bool = True):
        """``management``: open the management API on its own port (off in a Ray Serve replica, where N replicas
        cannot share the port): no token file, no announcement."""
        self.configs = configs
        self.server = ModelServer(registry, devices)
        self.token = token
        self.token_file = token_file
        self.announce_token = announce_token
        app = build_management_app(self.server, token, enable_model_api, model_store)
        self.management = ExtraServer(app, management_host, management_port) if management else None
        self._router = build_inference_router(self.server)
        self._predictions = PredictionRoute(self.server)

    def routers(self) -> list[APIRouter]:
        return [self._router]

    def raw_routes(self) -> list[PredictionRoute]:
        return [self._predictions]

    def extra_servers(self) -> list[ExtraServer]:
        return [self.management] if self.management else []

    async def start(self) -> None:
        if self.management and self.token_file is not None:
            write_token_file(self.token_file, self.token)
        if self.management and self.announce_token:
            where = f" (also in {self.token_file})" if self.token_file else ""
            print(f"model server management API on http://{self.management.host}:{self.management.port}, "
                  f"token: {self.token}{where}", file=sys.stderr, flush=True)
        await asyncio.gather(*(self.server.register(c) for c in self.configs))

    async def stop(self) -> None:
        await self.server.stop()

    def health(self) -> dict:
        return {"ready": self.server.is_ready(), "models": self.server.summary()}
