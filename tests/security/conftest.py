"""One `loom serve`-shaped app with every component on (tiny LLM, toy model-server handler, tiny image pipeline),
served by uvicorn on a free loopback port, with an API key: what the security tests attack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.serve import ModelServerComponent
from loom.bench.process import ThreadServer, free_port, serve_in_thread
from loom.entrypoints.openai.serve import LLMComponent
from loom.image.limits import ImageLimits
from loom.image.serve import ImageComponent
from loom.server.app import build_app
from loom.server.guard import HTTPPolicy
from tests.server.conftest import tiny_config

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ECHO = f"{Path(__file__).parents[1] / 'batching' / 'toy_handlers.py'}#EchoHandler"


@dataclass
class Stack:
    server: ThreadServer
    app: object
    llm: LLMComponent
    models: ModelServerComponent
    images: ImageComponent

    @property
    def url(self) -> str:
        return self.server.url


def build_stack(tiny_llama, image_engine, output_dir: Path, api_key: str | None = KEY, **llm_overrides):
    """The app and its three components (not started)."""
    registry = CollectorRegistry()
    llm = LLMComponent(tiny_config(tiny_llama, num_kv_blocks=128, max_num_seqs=8, max_model_len=256,
                                   **llm_overrides), registry)
    models = ModelServerComponent([ModelConfig("echo", ECHO, max_queue_size=8)], registry, "mgmt-token",
                                  management_port=free_port(), token_file=None)
    images = ImageComponent("tiny", registry, output_dir, engine=image_engine, max_queued=4, keep_jobs=5,
                            limits=ImageLimits(max_pixels=64 * 64, max_steps=4, max_images=2), api_key=api_key)
    app = build_app([llm, models, images], registry, HTTPPolicy(api_key=api_key, max_body_bytes=1 << 20))
    return app, llm, models, images


@pytest.fixture(scope="module")
def stack(tiny_llama, tiny_image_engine, tmp_path_factory):
    app, llm, models, images = build_stack(tiny_llama, tiny_image_engine, tmp_path_factory.mktemp("images"))
    server = serve_in_thread(app)
    yield Stack(server, app, llm, models, images)
    server.stop()
