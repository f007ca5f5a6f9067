"""`loom generate`: complete prompts with an LLM, offline (prompts as arguments, or one per line on stdin)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from loom.engine.config import EngineConfig
from loom.engine.lora import LoRARequest
from loom.engine.sampling_params import SamplingParams
from loom.entrypoints.llm import LLM
from loom.entrypoints.openai.media import decode_image
from loom.flags import add_config_arguments, config_from_args
from loom.models.lora import read_adapter_config
from loom.models.vision import SERVE_A_VISION_MODEL, image_placeholder

SAMPLING_SKIP = {"n", "logprobs", "structured_outputs", "default_max_tokens"}
"""Sampling fields with no use on a command line that prints one completion per prompt (structured outputs: not
offered here yet)."""
ENGINE_SKIP = {"seed", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "generation_config",
               "override_generation_config"}
"""The engine's default seed: here ``--seed`` is the requests' own (a sampling flag); one ``--lora`` folder stands
for the LoRA settings; every sampling parameter is a flag of its own (the model's defaults would never apply)."""


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """EngineConfig's fields as flags (the request seed is a sampling flag here, so the engine's is left out), and
    ``--lora``."""
    group = parser.add_argument_group("engine")
    add_config_arguments(group, EngineConfig, skip=ENGINE_SKIP)
    group.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                       help="a LoRA adapter folder (peft; e.g. OUTPUT/adapter of `loom finetune --lora`) applied "
                            "unmerged to every prompt")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    """SamplingParams' fields as flags; greedy by default."""
    add_config_arguments(parser.add_argument_group("sampling"), SamplingParams, skip=SAMPLING_SKIP,
                         defaults={"max_tokens": max_tokens, "temperature": 0.0})


def engine_config(args: argparse.Namespace) -> EngineConfig:
    config = config_from_args(EngineConfig, args, skip=ENGINE_SKIP)
    if getattr(args, "lora", None):
        rank = int(read_adapter_config(Path(args.lora)).get("r", 16))
        config = dataclasses.replace(config, enable_lora=True, max_lora_rank=rank)
    return config


def lora_request(args: argparse.Namespace) -> LoRARequest | None:
    return LoRARequest(Path(args.lora).name or "adapter", 1, args.lora) if getattr(args, "lora", None) else None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return config_from_args(SamplingParams, args, skip=SAMPLING_SKIP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser, max_tokens=32)
    parser.add_argument("prompts", nargs="*", help="prompts; none reads one prompt per line from stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="a picture for a vision model (repeat for several), given to every prompt; a prompt "
                             "without image tokens gets one per picture in front")


def _with_images(llm: LLM, prompts: list[str], images: list) -> list:
    """The prompts as vLLM's {"prompt", "multi_modal_data"} when there are pictures (one image token per picture put
    in front of a prompt that has none)."""
    if not images:
        return prompts
    tokens = llm.engine.image_tokens
    if tokens is None:
        raise ValueError(f"--image: {llm.engine.model_path} is a text model; {SERVE_A_VISION_MODEL}")
    placeholder = llm.tokenizer.convert_ids_to_tokens(tokens.placeholder)  # Gemma 3's <start_of_image>
    marked = image_placeholder(llm.tokenizer, tokens.placeholder)  # Qwen2-VL's between its markers
    return [{"prompt": p if placeholder in p else f"{marked}\n" * len(images) + p,
             "multi_modal_data": {"image": images}} for p in prompts]


def run(args: argparse.Namespace) -> int:
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("no prompts: pass them as arguments or on stdin", file=sys.stderr)
        return 2
    try:
        params = sampling_params(args)
        images = [decode_image(Path(path).read_bytes()) for path in args.image]
        llm = LLM.from_config(engine_config(args))
        outputs = llm.generate(_with_images(llm, prompts, images), params, lora_request=lora_request(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out in outputs:
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "finish_reason": c.finish_reason}))
        else:
            print(f"{out.prompt}{c.text}")
    return 0
