"""The OpenAI-compatible LLM API: schemas, routes, the async engine front and Prometheus metrics.

The serve plugin that mounts it is ``loom.entrypoints.openai.serve`` (``loom serve --model smollm2``).
"""
