"""Engine configuration: one dataclass that checks itself."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from typing import Literal

import torch

from loom.devices import resolve_device
from loom.engine.sampling_defaults import SamplingDefaults
from loom.models.vision import language_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding with vLLM's ``--speculative-config`` keys. One method: ``ngram`` (prompt lookup), which
    proposes the tokens that followed the latest earlier occurrence of the sequence's last n tokens."""

    method: str
    """ngram: drafts looked up in the sequence's own prompt and output (vLLM's "[ngram]" is taken too)."""
    num_speculative_tokens: int
    """Draft tokens proposed per sequence and step (k); the model verifies them in one pass."""
    prompt_lookup_max: int | None = None
    """Longest suffix n-gram to look up; None: prompt_lookup_min (both None: 5, as vLLM)."""
    prompt_lookup_min: int | None = None
    """Shortest suffix n-gram to look up; None: prompt_lookup_max (both None: 5, as vLLM)."""
    disable_by_batch_size: int | None = None
    """Propose nothing while this many sequences or more are running (a large batch is compute-bound, where
    verifying drafts costs more than it saves); None: always propose."""

    def __post_init__(self) -> None:
        if self.method == "[ngram]":
            self.method = "ngram"
        if self.method != "ngram":
            raise ValueError(f"speculative_config method must be 'ngram' (prompt lookup, the one method Loom has), "
                             f"got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}")
        if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
            self.prompt_lookup_min = self.prompt_lookup_max = 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got prompt_lookup_min="
                             f"{self.prompt_lookup_min} and prompt_lookup_max={self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1 or None, got {self.disable_by_batch_size}")

    @classmethod
    def from_dict(cls, values: dict) -> SpeculativeConfig:
        """From a JSON object such as ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}``."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {', '.join(unknown)}; "
                             f"Loom takes {', '.join(known)}")
        missing = [k for k in ("method", "num_speculative_tokens") if k not in values]
        if missing:
            raise ValueError(f"speculative_config needs {' and '.join(missing)}, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
        return cls(**values)


@dataclass(slots=True)
class MultiModalLimits:
    """vLLM's ``--limit-mm-per-prompt``: how many inputs of each kind one prompt of a vision model may hold."""

    image: int = 4
    """Images per prompt (each is the model's tokens per image in the context: 576 for LLaVA-1.5)."""

    def __post_init__(self) -> None:
        if not isinstance(self.image, int) or isinstance(self.image, bool) or self.image < 0:
            raise ValueError(f"limit_mm_per_prompt image must be an integer >= 0, got {self.image!r}")

    @classmethod
    def from_dict(cls, values: dict) -> MultiModalLimits:
        """From a JSON object such as ``{"image": 2}``."""
        unknown = sorted(set(values) - {"image"})
        if unknown:
            raise ValueError(f"limit_mm_per_prompt has unknown key(s) {', '.join(unknown)}; Loom's vision models take "
                             'images only: {"image": N}')
        return cls(**values)


@dataclass(slots=True)
class ImageResize:
    """vLLM's ``--mm-processor-kwargs`` for the vision models that resize a picture to its own resolution (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL): how many pixels the resized picture holds, and so how many tokens it takes (one per
    28 x 28; Qwen3-VL: 32 x 32)."""

    min_pixels: int | None = None
    """A smaller picture is scaled up to about this many pixels; None: the checkpoint's (3136 for Qwen2-VL)."""
    max_pixels: int | None = None
    """A larger picture is scaled down to at most this many; None: the checkpoint's (12845056 for Qwen2-VL: up to
    16384 tokens a picture; vLLM's docs suggest e.g. 1003520, 1280 tokens)."""

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"mm_processor_kwargs {name} must be a positive integer, got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"mm_processor_kwargs min_pixels ({self.min_pixels}) must not exceed max_pixels "
                             f"({self.max_pixels})")

    @classmethod
    def from_dict(cls, values: dict) -> ImageResize:
        """From a JSON object such as ``{"max_pixels": 1003520}``."""
        unknown = sorted(set(values) - {"min_pixels", "max_pixels"})
        if unknown:
            raise ValueError(f"mm_processor_kwargs has unknown key(s) {', '.join(unknown)}; Loom takes min_pixels "
                             "and max_pixels")
        return cls(**values)


@dataclass(slots=True)
class EngineConfig:
    model: str = "smollm2"
    """A catalogue name (``loom models list``; ``smollm2`` runs its 4-bit GGUF on CPU, ``smollm2:f32`` the float32
    folder), a local HF folder or a .gguf file."""
    tokenizer: str | None = None
    """An HF folder whose tokenizer (and chat template) to use instead of the model's own; None: the model's (a GGUF
    file's from its metadata)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV cache; auto: float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1 ..."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_gb: float | None = None
    """Memory for the KV pool; None: 4 GiB on CPU; on CUDA what gpu_memory_utilization leaves."""
    gpu_memory_utilization: float = 0.9
    """CUDA: the fraction of the GPU this engine may fill (vLLM's flag): the KV pool gets it less the weights, a
    profiled forward at the largest step and what other processes hold."""
    num_kv_blocks: int | None = None
    """Overrides kv_cache_memory_gb with an exact pool size (tests)."""
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's context."""
    max_num_seqs: int = 128
    """Sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Tokens in one step (prefill chunks + decodes)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix seen before."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps, beside the decodes."""
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """fcfs: requests wait and are preempted in arrival order. priority: by each request's priority (lower first;
    the API's "priority" field), then arrival; the running request of the largest priority value is preempted
    first."""
    attention_backend: Literal["auto", "torch", "cpp", "triton"] = "auto"
    """cpp: the fused CPU kernels (compiled on first use); triton: Triton's paged decode attention (CUDA); torch: the
    plain-PyTorch reference; auto: cpp on a CPU where the kernels build, triton on CUDA where triton is installed,
    torch otherwise."""
    quantization: Literal["int8"] | None = None
    """Weights of an HF folder quantized at load: int8 (one float32 scale per output feature). On CPU (float32 dtype)
    activations are quantized per 32 at run time for integer dot products; on CUDA Triton kernels dequantize the
    weights in registers (weight-only). A GGUF file runs its own quantized blocks."""
    load_format: Literal["auto", "dummy"] = "auto"
    """auto: the folder's safetensors (or the GGUF file); dummy: random weights of the folder's config.json, seeded
    by ``seed`` and drawn on the device (vLLM's name: benchmarks of real shapes with no weights to move)."""
    seed: int = 0
    """Seeds the generator of requests that bring no seed of their own."""
    generation_config: str = "auto"
    """Default sampling parameters for requests that leave them out (vLLM's flag): "auto" takes the model folder's
    generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty; max_new_tokens as the default
    max_tokens), "vllm" ignores it (the API's defaults), a folder path reads that folder's file."""
    override_generation_config: SamplingDefaults | None = None
    """Sampling defaults set over --generation-config's, e.g. '{"temperature": 0.5}' (vLLM's flag)."""
    enforce_eager: bool = False
    """Never replay decode steps as CUDA graphs (vLLM's name); graphs are captured only on CUDA, per batch bucket."""
    async_scheduling: bool = False
    """Schedule and queue each step while the device still runs the one before, reading its sampled ids back after
    (vLLM's name): on a GPU the host's work per step hides behind the device's. Outputs are the same; on CPU, where
    the forward runs in the calling thread, it changes nothing but when outputs come. Not with speculative decoding
    or tensor parallelism."""
    enable_lora: bool = False
    """Serve LoRA adapters unmerged beside the base model (requests name one; see loom.engine.lora)."""
    max_loras: int = 1
    """Distinct adapters in one step (the adapter slots beside the base weights)."""
    max_lora_rank: int = 16
    """Largest adapter rank the slots hold; a higher-rank adapter is refused."""
    max_cpu_loras: int | None = None
    """Adapters kept read in host memory (least recently used out first); None: max_loras."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over (Megatron-style, by KV-head groups); each is a process with cores / N threads
    (CPU, gloo) or a GPU (NCCL). Loom starts them itself, or torchrun does (see docs/scale-out.md)."""
    speculative_config: SpeculativeConfig | None = None
    """Speculative decoding as JSON, vLLM's keys: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 3} (a dict is taken as its fields); None: off."""
    limit_mm_per_prompt: MultiModalLimits | None = None
    """A vision model's inputs per prompt as JSON, vLLM's keys: {"image": 2} (a dict is taken as its fields); None:
    {"image": 4}."""
    max_num_encoder_tokens: int | None = None
    """A vision model's image tokens whose pictures the tower may start encoding in one step (vLLM's encoder
    budget): a burst of pictured prompts is spread over steps, so the steps of the requests decoding beside them stay
    short (a step's first picture runs whatever its size); None: max_num_batched_tokens."""
    mm_encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """A vision model's tower (and projector) dtype: auto, the model's. bfloat16 on a float32 CPU model runs the
    tower 1.7x faster where the CPU has AVX-512 BF16 (rows within ~1% of float32's, then cast to the model's dtype)."""
    mm_processor_kwargs: ImageResize | None = None
    """Qwen2-VL / Qwen2.5-VL's picture size as JSON, vLLM's keys: {"min_pixels": 3136, "max_pixels": 1003520} (a
    picture takes a token per 28 x 28 pixels once resized to between the two); None: the checkpoint's
    preprocessor_config.json."""
    reasoning_parser: Literal["qwen3", "deepseek_r1", "deepseek_v3", "glm45", "gpt_oss"] | None = None
    """A thinking model's <think>...</think> block: the chat route splits it into reasoning_content and content, and
    structured outputs start after it (vLLM's rule). qwen3 (Qwen3, SmolLM3: an output that opens the block),
    deepseek_r1 (DeepSeek-R1, Qwen3 Thinking-2507: the template opens it, the output is reasoning up to </think>),
    deepseek_v3 (DeepSeek-V3.1: as deepseek_r1 where the template opened the block, all content where it closed it,
    as qwen3 where the prompt has neither tag),
    glm45 (GLM-4.5: as qwen3),
    gpt_oss (the harmony format: the analysis channel is reasoning, the final channel content)."""

    def __post_init__(self) -> None:
        if isinstance(self.override_generation_config, dict):  # LLM(override_generation_config={...})
            self.override_generation_config = SamplingDefaults.from_dict(self.override_generation_config)
        if not self.generation_config:
            raise ValueError("generation_config must be auto, vllm or a folder holding a generation_config.json")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype not in (*_DTYPES, "auto"):
            raise ValueError(f"dtype must be one of {', '.join([*_DTYPES, 'auto'])}, got {self.dtype!r}")
        if self.mm_encoder_dtype not in (*_DTYPES, "auto"):
            raise ValueError(f"mm_encoder_dtype must be one of {', '.join([*_DTYPES, 'auto'])}, got "
                             f"{self.mm_encoder_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "cpp", "triton"):
            raise ValueError(f"attention_backend must be auto, torch, cpp or triton, got {self.attention_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {self.max_loras} and {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_num_encoder_tokens is not None and self.max_num_encoder_tokens < 1:
            raise ValueError(f"max_num_encoder_tokens must be >= 1, got {self.max_num_encoder_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be int8 (or unset), got {self.quantization!r}")
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if isinstance(self.limit_mm_per_prompt, dict):
            self.limit_mm_per_prompt = MultiModalLimits.from_dict(self.limit_mm_per_prompt)
        if isinstance(self.mm_processor_kwargs, dict):
            self.mm_processor_kwargs = ImageResize.from_dict(self.mm_processor_kwargs)
        if self.async_scheduling and (self.speculative_config is not None or self.tensor_parallel_size > 1):
            what = "speculative decoding" if self.speculative_config is not None else "tensor parallelism"
            raise ValueError(f"async scheduling does not run with {what} yet: drop --async-scheduling or {what}")

    def gguf_unsupported(self) -> str | None:
        """Why this engine cannot run a GGUF file at all (quantized weights run on CPU in float32 with the C++ kernels,
        on CUDA with the Triton ones, split over tensor-parallel ranks by their stored rows and blocks; LoRA adapters
        add their deltas to the quantized projections), or None."""
        if self.quantization:
            return f"--quantization {self.quantization}"
        device = self.torch_device().type
        if device == "cpu" and self.dtype not in ("auto", "float32"):
            return f"dtype {self.dtype} on CPU"
        if device != "cpu" and importlib.util.find_spec("triton") is None:
            return "a GPU without triton"
        return None

    def needs_float(self) -> str | None:
        """Why a catalogue model without a format tag runs its float32 folder rather than its GGUF file, or None: the
        reasons of ``gguf_unsupported``, tensor parallelism (int8 activations make a split GGUF's outputs drift from
        one rank's: the all-reduce's summation order flips roundings, 30 layers deep), LoRA (adapters are trained on
        the float weights) and a GPU (where the bfloat16 folder is the tested, measured default); in the last three
        cases the GGUF runs when named."""
        if reason := self.gguf_unsupported():
            return reason
        if self.tensor_parallel_size > 1:  # the split float weights are the tested default; a named GGUF splits too
            return "tensor parallelism"
        if self.enable_lora:  # adapters are trained on float weights: run them there unless the GGUF is named
            return "LoRA"
        if self.torch_device().type != "cpu":
            return "a GPU"
        return None

    def context_length(self, hf_config) -> int:
        """Longest prompt + output: max_model_len, never past the model's own context (``model_context``)."""
        limit = model_context(hf_config)
        return min(self.max_model_len or limit, limit)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def encoder_dtype(self) -> torch.dtype:
        """The vision tower's dtype (``mm_encoder_dtype``; auto: the model's)."""
        return self.torch_dtype() if self.mm_encoder_dtype == "auto" else _DTYPES[self.mm_encoder_dtype]


def model_context(hf_config) -> int:
    """The model's context: ``max_position_embeddings``, or with YaRN rope scaling the original context times the
    factor where that is longer (vLLM's rule: Qwen2.5 / Qwen3 ship 32,768 / 40,960 and document yarn with factor 4
    for 131,072; the config's max_position_embeddings is left as it was)."""
    hf_config = language_config(hf_config)
    limit = hf_config.max_position_embeddings
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope = rope.get("full_attention", rope)  # per layer type (Gemma 3)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or limit
        limit = max(limit, int(original * rope["factor"]))
    return limit
