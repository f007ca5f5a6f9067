"""The LLM serve plugin: ``loom serve --model smollm2`` adds the OpenAI-compatible API to the one Loom app.

    loom serve --model smollm2                    # http://127.0.0.1:8000/v1, /metrics, /health
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'

Routes and their behaviour live in ``loom/entrypoints/openai/``; this module maps flags to an ``LLMServerConfig`` and
wraps the async engine front as a ``Component`` (start = build the engine, stop = drain, then stop its thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from dataclasses import dataclass, field
from typing import Literal

from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from loom.engine.config import EngineConfig, MultiModalLimits
from loom.engine.tensor_parallel import launched_by_torchrun, run_worker_from_env
from loom.entrypoints.openai.async_engine import AsyncLLMEngine
from loom.entrypoints.openai.engine_process import ProcessLLMEngine
from loom.entrypoints.openai.lora import LoRARegistry, parse_lora_module
from loom.entrypoints.openai.metrics import LLMMetrics
from loom.entrypoints.openai.reasoning import REASONING_PARSERS
from loom.entrypoints.openai.response_store import DEFAULT_STORED_RESPONSES, ResponseStore
from loom.entrypoints.openai.routes import build_lora_router, build_routers, load_adapter
from loom.entrypoints.openai.serving import ServingContext
from loom.entrypoints.openai.tool_parsers import TOOL_PARSERS
from loom.entrypoints.openai.tools import ToolSettings
from loom.flags import add_config_arguments, config_from_args
from loom.server.component import ExtraServer


@dataclass(slots=True)
class LLMServerConfig:
    engine: EngineConfig
    served_model_names: list[str] = field(default_factory=list)
    """Names clients put in ``model``; empty: the --model value as given."""
    max_waiting: int = 256
    """Sequences that may wait beyond the ``max_num_seqs`` running ones; more get 503 + Retry-After."""
    max_n: int = 16
    """Most completions per request (``n``); each is a sequence at admission."""
    max_prompt_chars: int | None = None
    """Most prompt characters per request, checked before tokenization; None: 32 per token of context."""
    drain_timeout_s: float = 120.0
    """Seconds SIGTERM waits for requests in flight before the engine stops."""
    threads: int | None = None
    """torch threads for the engine; None keeps torch's default (one per core). On a busy machine fewer can be much
    faster."""
    lora_modules: list[str] = field(default_factory=list)
    """LoRA adapters served from the start, as NAME=PATH (peft folders, e.g. OUTPUT/adapter of `loom finetune
    --lora`); a request names one in "model". Needs --enable-lora."""
    allow_runtime_lora_updating: bool = False
    """Add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read adapter folders from this machine)."""
    lora_store: str | None = None
    """With runtime updating: adapter paths must resolve inside this folder (relative ones are taken from it)."""
    tool_call_parser: Literal["hermes", "llama3_json", "mistral", "openai", "glm45", "deepseek_v3",
                              "deepseek_v31"] | None = None
    """How tool calls are found in the model's text for tool_choice "auto": hermes (Hermes, Qwen <tool_call> JSON;
    also the format used for a chat template that ignores tools), llama3_json, mistral, openai (gpt-oss' harmony
    messages to functions.*; needs --reasoning-parser gpt_oss), glm45 (GLM-4.5's <arg_key>/<arg_value> calls)."""
    enable_auto_tool_choice: bool = False
    """Let the model choose whether to call tools (tool_choice "auto", the default when tools are given); needs
    --tool-call-parser. Without it such requests get 400."""
    exclude_tools_when_tool_choice_none: bool = False
    """Leave the tools out of the prompt when tool_choice is "none" (by default the template still gets them)."""
    max_stored_responses: int = DEFAULT_STORED_RESPONSES
    """Responses /v1/responses keeps (store: true, OpenAI's default) for previous_response_id and GET
    /v1/responses/{id}, in memory, oldest dropped first; 0 keeps none (store is then ignored)."""
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    """How chat templates get a message's content (vLLM's flag): "string" (text; image placeholders written into
    it), "openai" (a list of typed parts, for templates that loop over them), "auto" (a vision model's template is
    read to tell; a text model's gets strings)."""
    allowed_local_media_path: str | None = None
    """A vision model's chat requests may name images as file:// URLs under this folder (vLLM's flag); None: only
    inline data: URLs. Loom never fetches http(s) images."""
    engine_process: bool = False
    """Run the engine in a process of its own (vLLM v1's EngineCore) instead of a thread of the server's: the HTTP
    event loop and the engine's Python stop sharing one GIL. Pays where host work bounds a step (a GPU, many
    streams); outputs cross a pipe as deltas."""

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.max_stored_responses < 0:
            raise ValueError(f"max_stored_responses must be >= 0, got {self.max_stored_responses}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got {self.tool_call_parser}")
        if self.tool_call_parser == "openai" and self.engine.reasoning_parser != "gpt_oss":
            raise ValueError("tool_call_parser openai reads the harmony messages that reasoning_parser gpt_oss "
                             "separates: add --reasoning-parser gpt_oss")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser: add --tool-call-parser "
                             f"({' | '.join(TOOL_PARSERS)}; hermes for Qwen, Hermes and SmolLM2)")
        if not self.served_model_names:
            self.served_model_names = [self.engine.model]
        if (self.lora_modules or self.allow_runtime_lora_updating) and not self.engine.enable_lora:
            raise ValueError("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
        for spec in self.lora_modules:
            parse_lora_module(spec)  # ValueError on a malformed entry, before the engine loads

    @property
    def max_in_flight(self) -> int:
        return self.engine.max_num_seqs + self.max_waiting

    @property
    def tool_settings(self) -> ToolSettings:
        return ToolSettings(self.tool_call_parser, self.enable_auto_tool_choice,
                            self.exclude_tools_when_tool_choice_none)


class LLMComponent:
    name = "llm"

    def __init__(self, config: LLMServerConfig, registry: CollectorRegistry):
        self.config = config
        self.metrics = LLMMetrics(registry, config.served_model_names[0])
        front = ProcessLLMEngine if config.engine_process else AsyncLLMEngine
        self.front = front(config.engine, self.metrics, max_in_flight=config.max_in_flight, num_threads=config.threads,
                           on_fatal=self._exit_server)
        loras = LoRARegistry(config.served_model_names, config.lora_store) if config.engine.enable_lora else None
        self.context = ServingContext(self.front, list(config.served_model_names), max_n=config.max_n,
                                      max_prompt_chars=config.max_prompt_chars, loras=loras,
                                      tool_settings=config.tool_settings,
                                      reasoning=REASONING_PARSERS.get(config.engine.reasoning_parser or ""),
                                      responses=ResponseStore(config.max_stored_responses),
                                      allowed_local_media_path=config.allowed_local_media_path,
                                      chat_template_content_format=config.chat_template_content_format,
                                      max_images=(config.engine.limit_mm_per_prompt or MultiModalLimits()).image)

    @property
    def fatal_error(self) -> str | None:
        """Why the engine stopped for good (`loom serve` prints it and exits non-zero), if it did."""
        return self.front.fatal_error

    @staticmethod
    def _exit_server(reason: str) -> None:
        # SIGTERM to ourselves: the server stops as on Ctrl-C (drains what it can), then `loom serve` reports reason
        os.kill(os.getpid(), signal.SIGTERM)

    def routers(self) -> list[APIRouter]:
        routers = build_routers(self.context)
        if self.config.allow_runtime_lora_updating:
            routers.append(build_lora_router(self.context))
        return routers

    async def start(self) -> None:
        await self.front.start()
        await asyncio.to_thread(lambda: self.context.encoder)  # builds its own tokenizer copy off the event loop
        for spec in self.config.lora_modules:  # read now: a bad adapter stops the start with its reason
            name, path = parse_lora_module(spec)
            await load_adapter(self.context, name, path, confine=False)

    async def stop(self) -> None:
        await self.front.shutdown(self.config.drain_timeout_s)
        self.context.close()

    def health(self) -> dict:
        stats = self.front.last_stats
        return {
            "ready": self.front.is_ready and not self.front.draining,
            "model": self.context.model_name,
            "in_flight": self.front.num_in_flight,
            "running": stats.num_running if stats else 0,
            "waiting": stats.num_waiting if stats else 0,
            "kv_usage": round(stats.kv_usage, 4) if stats else 0.0,
        }

    def extra_servers(self) -> list[ExtraServer]:
        return []


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LLM (OpenAI-compatible API under /v1)")
    add_config_arguments(group, EngineConfig, defaults={"model": None},
                         helps={"model": "catalogue name (smollm2) or a local HF folder; enables the LLM routes"})
    add_config_arguments(group, LLMServerConfig, skip={"engine"}, names={"served_model_names": "served_model_name"},
                         several=frozenset({"lora_modules"}))


def create_component(args: argparse.Namespace, registry: CollectorRegistry) -> LLMComponent | None:
    if not getattr(args, "model", None):
        return None
    engine = config_from_args(EngineConfig, args)
    if engine.tensor_parallel_size > 1 and launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        run_worker_from_env(engine)  # torchrun started every rank: only rank 0 serves HTTP
        raise SystemExit(0)
    return LLMComponent(config_from_args(LLMServerConfig, args, engine=engine), registry)
