"""Fixtures: a real uvicorn server (in a thread, on a free loopback port) over a tiny random Llama."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loom.bench.process import ThreadServer, serve_in_thread
from loom.engine.config import EngineConfig
from loom.entrypoints.openai.serve import LLMComponent, LLMServerConfig
from loom.server.app import build_app
from loom.server.guard import HTTPPolicy


@dataclass
class RunningServer(ThreadServer):
    component: LLMComponent = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics as {name{labels}: value}, with the model_name label dropped."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return values


def start_llm_server(config: LLMServerConfig, timeout: float = 120.0, api_key: str | None = None,
                 **policy) -> RunningServer:
    registry = CollectorRegistry()
    component = LLMComponent(config, registry)
    app = build_app([component], registry, HTTPPolicy(api_key=api_key, **policy))
    running = serve_in_thread(app, timeout)
    return RunningServer(running.url, running.server, running.thread, component)


def tiny_config(model_path, **overrides) -> LLMServerConfig:
    engine_keys = {"num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size",
                   "speculative_config", "async_scheduling", "reasoning_parser", "mm_processor_kwargs"}
    engine = EngineConfig(model=str(model_path), **{k: v for k, v in overrides.items() if k in engine_keys})
    rest = {"threads": 1, **{k: v for k, v in overrides.items() if k not in engine_keys}}
    return LLMServerConfig(engine, served_model_names=rest.pop("served_model_names", ["tiny"]), **rest)


@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    """A server over the tiny model per test module: served as 'tiny', 256 KV blocks of 16 tokens, 1 torch thread
    (tiny matmuls gain nothing from more, and the setting is restored when the server stops)."""
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, max_num_seqs=32))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server():
    """One server over SmolLM2 for the modules that need a real model's answers (structured outputs, tools): served
    as 'smollm2', 0.25 GB of KV cache, 32 sequences, 2 torch threads, no tool flags. Shared: starting it is ~10 s."""
    config = LLMServerConfig(EngineConfig(model="smollm2", kv_cache_memory_gb=0.25, max_num_seqs=32),
                             served_model_names=["smollm2"], threads=2)
    server = start_llm_server(config)
    yield server
    server.stop()


@pytest.fixture()
def client(tiny_server):
    import openai

    with openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def script_outputs(server: RunningServer, monkeypatch):
    """``script(text)``: from then on the engine writes ``text``: each sequence's next token is the text's token at its
    position, then EOS (the sampler is replaced through ``monkeypatch``; the model still runs)."""
    import torch

    from loom.engine import llm_engine
    from loom.ops.sampler import DeferredSample

    tokenizer = server.component.front.tokenizer
    eos = server.component.front.engine.eos_token_ids

    def script(text: str) -> list[int]:
        ids = tokenizer.encode(text, add_special_tokens=False) + [min(eos)]

        def sample(logits, rows):  # the model's log-probabilities where asked, as the real sampler gives them
            tokens = torch.tensor([ids[min(r.position, len(ids) - 1)] for r in rows])
            want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
            raw = torch.log_softmax(logits[want], dim=-1) if want else None
            index = torch.tensor(want) if 0 < len(want) < len(rows) else None
            return DeferredSample(tokens, raw, want, [rows[i].params.logprobs for i in want], index)

        monkeypatch.setattr(llm_engine, "sample_deferred", sample)
        return ids

    return script
