"""Loom: serve LLMs fast, serve every other model with dynamic batching, finetune instruction models, generate images.

The offline LLM API mirrors vLLM's: ``from loom import LLM, SamplingParams``.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchParams", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import loom` stays cheap (no torch) for the CLI and for tools that only need a submodule.
    if name == "LLM":
        from loom.entrypoints import LLM

        return LLM
    if name == "SamplingParams":
        from loom.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "BeamSearchParams":
        from loom.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "LoRARequest":
        from loom.engine.lora import LoRARequest

        return LoRARequest
    if name == "StructuredOutputsParams":
        from loom.engine.structured import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
