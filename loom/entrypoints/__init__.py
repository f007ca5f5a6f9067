"""User-facing entry points: the offline ``LLM`` class, the generate / chat commands and, in ``openai/``, the
OpenAI-compatible HTTP API that `loom serve --model` mounts."""

from loom.entrypoints.llm import LLM

__all__ = ["LLM"]
