"""Compile Loom's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, and report each one's registers
and spills as ptxas counts them.

    python scripts/triton_sm90.py            # one line per kernel and shape; exit 1 if any failed to compile
    python scripts/triton_sm90.py --json     # the same as JSON lines (tests/ops/test_triton_sm90.py reads them)

Each kernel is reached through its real Python wrapper (``paged_decode``, ``TritonOps.rms_norm``, a
``TritonQuantLinear``...) called on CPU tensors of the model shapes below; the launch is intercepted
(``JITFunction.run``), its arguments become the compile signature (tensors: pointers of their dtype, ints: i32 or
i64, floats: fp32; no divisibility hints, so the code is what a launch with unaligned strides would get), and
``triton.compile`` builds the kernel for sm_90 with the ptxas bundled in the triton wheel. Nothing runs: the figures
are static (a kernel that spills to local memory at a real model's shape shows it here, long before a GPU is lent).
Needs triton's NVIDIA backend (the PyPI wheel has it); run without TRITON_INTERPRET (this script unsets it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter replaces jit functions
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}  # fmt: skip
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
"""Keyword arguments of a launch that are compile options, not kernel parameters."""
ATTENTION = {  # name: (heads, kv heads, head dim, window, soft cap)
    "smollm2-135m": (9, 3, 64, None, None),
    "llama-3.1-8b": (32, 8, 128, None, None),
    "gemma-2-9b": (16, 8, 256, 4096, 50.0),
    "deepseek-v3": (128, 1, 576, None, None),  # MLA: 128 query heads on one 576-wide latent, 16 heads a program
}
LATENT = ("deepseek-v3",)
"""Shapes whose cache is one latent tensor, passed as both keys and values."""


def captured_launches(call) -> list[tuple[JITFunction, tuple, dict]]:
    """The kernel launches ``call()`` makes, not run: (kernel, positional args, keyword args) each."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = original
    return launches


def signature(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The launch's argument types and constexpr values, by parameter."""
    types, constants, positional = {}, {}, iter(args)
    for i, param in enumerate(kernel.params):
        value = kwargs[param.name] if param.name in kwargs else next(positional)
        if param.is_constexpr:
            types[param.name] = "constexpr"
            constants[(i,)] = value
        elif isinstance(value, torch.Tensor):
            types[param.name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            types[param.name] = "fp32"
    return types, constants


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes of the kernel in ``ptx``, from ``ptxas -v`` (the ptxas triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([get_ptxas(TARGET.arch).path, "-v", f"--gpu-name=sm_{TARGET.arch}a", f.name, "-o",
                              os.devnull], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = run.stderr + run.stdout
    registers = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(stores.group(1)) + int(loads.group(1)) if stores and loads else None}


def workloads():
    """(label, call) pairs: every Triton kernel Loom launches, at the shapes the GPU script measures."""
    from loom.ops.attention import PrefillChunk
    from loom.ops.triton.paged_attention import paged_decode, paged_prefill
    from loom.ops.triton_ops import TritonOps

    for name, (h, hkv, d, window, cap) in ATTENTION.items():
        for dtype in (torch.bfloat16, torch.float32):
            keys = torch.empty(64, 16, hkv, d, dtype=dtype)
            values = keys if name in LATENT else torch.empty_like(keys)  # MLA: one latent cache, read as both
            tables = torch.zeros(4, 64, dtype=torch.int32)
            lens = torch.full((4,), 1000, dtype=torch.int32)
            tag = f"{name} {DTYPES[dtype]}"
            yield f"paged_decode {tag}", partial(paged_decode, torch.empty(4, h, d, dtype=dtype), keys, values,
                                                 tables, lens, 0.1, window=window, softcap=cap)
            chunks = [PrefillChunk(0, 300, 0, torch.zeros(19, dtype=torch.int32))]
            yield f"paged_prefill {tag}", partial(paged_prefill, torch.empty(300, h, d, dtype=dtype), keys, values,
                                                  chunks, 0.1, window=window, softcap=cap)
    for dtype in (torch.bfloat16, torch.float32):  # Gemma 3 4B's heads, its images' tokens attended both ways
        cache = torch.empty(64, 16, 4, 256, dtype=dtype)
        chunks = [PrefillChunk(0, 300, 0, torch.zeros(19, dtype=torch.int32))]
        yield f"paged_prefill gemma-3-4b image spans {DTYPES[dtype]}", partial(
            paged_prefill, torch.empty(300, 8, 256, dtype=dtype), cache, cache, chunks, 0.0625, window=1024,
            visible=torch.zeros(300, dtype=torch.int32))
    for dtype in (torch.bfloat16, torch.float32):  # gpt-oss-20b's heads: sinks on 128-token windows
        cache, sinks = torch.empty(64, 16, 8, 64, dtype=dtype), torch.empty(64, dtype=dtype)
        tables, lens = torch.zeros(4, 64, dtype=torch.int32), torch.full((4,), 1000, dtype=torch.int32)
        chunks = [PrefillChunk(0, 300, 0, torch.zeros(19, dtype=torch.int32))]
        tag = f"gpt-oss-20b sinks {DTYPES[dtype]}"
        yield f"paged_decode {tag}", partial(paged_decode, torch.empty(4, 64, 64, dtype=dtype), cache, cache, tables,
                                             lens, 0.125, window=128, sinks=sinks)
        yield f"paged_prefill {tag}", partial(paged_prefill, torch.empty(300, 64, 64, dtype=dtype), cache, cache,
                                              chunks, 0.125, window=128, sinks=sinks)
    ops = TritonOps()
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.empty(8, 4096, dtype=dtype), torch.empty(4096, dtype=dtype)
        tag = DTYPES[dtype]
        yield f"rms_norm 4096 {tag}", partial(ops.rms_norm, x, w, 1e-6)
        yield f"add_rms_norm 4096 {tag}", partial(ops.add_rms_norm, x, torch.empty_like(x), w, 1e-6)
        gate_up = torch.empty(8, 2 * 14336, dtype=dtype)
        yield f"silu_and_mul 14336 {tag}", partial(ops.silu_and_mul, gate_up)
        yield f"gelu_and_mul 14336 {tag}", partial(ops.gelu_and_mul, gate_up)
        qkv, cache = torch.empty(8, 48 * 128, dtype=dtype), torch.empty(16, 16, 8, 128, dtype=dtype)
        cos, slots = torch.empty(2048, 128), torch.zeros(8, dtype=torch.long)
        yield f"rotary_and_cache 32/8x128 {tag}", partial(ops.rotary_and_cache, qkv, slots, cos, cos, cache, cache,
                                                          slots, 32, 8)
    yield from moe_workloads()
    yield from quantized_workloads()


MOE = {  # name: (experts, top k, hidden, expert width, biases and gpt-oss' clamped SwiGLU)
    "mixtral-8x7b": (8, 2, 4096, 14336, False),
    "qwen3-30b-a3b": (128, 8, 2048, 768, False),
    "gpt-oss-20b": (32, 4, 2880, 2880, True),
}


def moe_workloads():
    """The grouped MoE matmuls at real experts' shapes, for a decode batch (8 tokens) and a prefill chunk (512)."""
    from types import SimpleNamespace

    from loom.models.llama import StackedExperts
    from loom.ops.triton_ops import TritonOps

    ops = TritonOps()
    for name, (e, k, h, i, gpt_oss) in MOE.items():
        for dtype in (torch.bfloat16, torch.float32):
            stacked = StackedExperts(torch.empty(e, 2 * i, h, dtype=dtype),
                                     torch.empty(e, 2 * i, dtype=dtype) if gpt_oss else None,
                                     torch.empty(e, h, i, dtype=dtype),
                                     torch.empty(e, h, dtype=dtype) if gpt_oss else None)
            expert = SimpleNamespace(clamp=(1.702, 7.0) if gpt_oss else None, gelu=False)
            for tokens in (8, 512):
                experts = torch.randint(0, e, (tokens, k))
                weights = torch.empty(tokens, k, dtype=dtype)
                yield f"fused_moe {name} t={tokens} {DTYPES[dtype]}", partial(
                    ops.fused_moe, torch.empty(tokens, h, dtype=dtype), weights, experts, stacked, expert)


def quantized_workloads():
    """The quantized linears' kernels (GEMV, GEMM, dequantize) for a 4-bit, a 4-bit-with-offset, a 6-bit and an
    8-bit format, on random bytes (the kernels' code depends on the format, not on the values)."""
    from loom.ops.quantized import BLOCK_BYTES, BLOCK_WEIGHTS, GGMLType
    from loom.ops.triton.quantized import DEQUANTIZE_ROWS, TritonQuantLinear

    k, n = 4096, 4096
    generator = torch.Generator().manual_seed(0)
    for qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0):
        raw = torch.randint(0, 256, (n, k // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]), dtype=torch.uint8,
                            generator=generator)
        layer = TritonQuantLinear.from_gguf(raw, qtype, k)
        for rows, kernel in ((1, "gemv"), (2, "gemv"), (4, "gemv"), (8, "gemv"), (16, "gemm"), (64, "gemm"),
                            (DEQUANTIZE_ROWS, "dequantize")):
            x = torch.empty(rows, k, dtype=torch.bfloat16)
            yield f"quantized {kernel} m={rows} {qtype.name} bf16", partial(layer, x)
        split = TritonQuantLinear.from_gguf(raw, qtype, k)
        split.split_k = 4  # what a GPU's SM count picks for an under-filled grid (a CPU tensor has none)
        for rows, kernel in ((1, "gemv"), (16, "gemm")):
            x = torch.empty(rows, k, dtype=torch.bfloat16)
            yield f"quantized {kernel} split-K m={rows} {qtype.name} bf16", partial(split, x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
    args = parser.parse_args()
    failed = 0
    for label, call in workloads():
        for kernel, launch_args, kwargs in captured_launches(call):
            row = {"label": label, "kernel": kernel.fn.__name__}
            try:
                types, constants = signature(kernel, launch_args, kwargs)
                options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
                compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants), target=TARGET,
                                          options=options)
                row.update(ptxas_report(compiled.asm["ptx"]), shared_bytes=compiled.metadata.shared)
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail at the end
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                failed += 1
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                detail = row.get("error") or (f"{row['registers']} registers, {row['spill_bytes']} spill bytes, "
                                              f"{row['shared_bytes']} B shared")
                print(f"{label:44s} {row['kernel']:22s} {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
