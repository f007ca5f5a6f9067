"""User-facing entry points: the offline ``LLM`` class and the generate / chat commands."""

from loom.entrypoints.llm import LLM

__all__ = ["LLM"]
