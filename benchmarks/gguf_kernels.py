"""GGUF kernels on decode-shaped projections: one GGUFLinear call (Q4_1, Q8_0, Q4_K, Q6_K; float32 activations
on the AVX-512 path and the portable C++ loops, and int8 dot products on activations quantized per 32, VNNI and
AVX2 and portable) against float32 ``F.linear`` on the same shape, SmolLM2-135M's MLP shapes by default.

    python benchmarks/gguf_kernels.py --repeats 7
    python benchmarks/gguf_kernels.py --rows 1,16,128 --paths int8 --formats Q4_1   # one path, more rows

For each shape (K inputs -> N outputs) and M rows of x: median over ``--repeats`` timings of ``--calls`` calls, in
microseconds a call, and the bytes of weight it reads. The weights are random (Q4_1 from gguf's quantizer; K-quant
super-blocks and IQ4 blocks of random bytes with finite scales: the kernels' cost does not depend on the values). A
K-quant or IQ4_XS needs K a multiple of 256, so SmolLM2's 576-wide projections have no K-quant figure (llama.cpp
quantizes such tensors to another type). Prints a line per case and writes JSON (default results/gguf_kernels.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom.ops.cpp_extension import gguf_extension  # noqa: E402
from loom.ops.quantized import BLOCK_BYTES, BLOCK_WEIGHTS, FLOAT_KERNEL_TYPES, GGMLType, GGUFLinear  # noqa: E402

SCALE_OFFSETS = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.Q3_K: (108,),
                 GGMLType.Q2_K: (80, 82), GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,)}
"""Where a (super-)block's float16 d (and dmin) sit, for the types made of random bytes."""


def quantized_weight(qtype: GGMLType, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, row bytes] uint8 of ``qtype``."""
    if qtype not in SCALE_OFFSETS:  # gguf's quantizer (it has none for IQ4_NL)
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        w = rng.standard_normal((n, k)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(quantize(w, GGMLQuantizationType(int(qtype)))))
    nb = k // BLOCK_WEIGHTS[qtype]
    raw = rng.integers(0, 256, (n, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    d = np.full((n, nb), 1e-3, np.float16).view(np.uint8).reshape(n, nb, 2)
    for offset in SCALE_OFFSETS[qtype]:  # d (and dmin): finite fp16
        raw[..., offset:offset + 2] = d
    return torch.from_numpy(raw.reshape(n, -1))


def median_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(3, calls // 10)):  # warm-up: pages touched, caches and thread pool up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


PATHS = ("float", "float_portable", "int8", "int8_avx2", "int8_portable")


def measure_shape(k: int, n: int, m: int, calls: int, repeats: int, rng: np.random.Generator,
                  formats: list[GGMLType], paths: list[str]) -> dict:
    ext = gguf_extension()
    x = torch.randn(m, k)
    weight = torch.randn(n, k)
    result = {"float32": {"us": median_us(partial(torch.nn.functional.linear, x, weight), calls, repeats),
                          "weight_bytes": weight.numel() * 4}}
    for qtype in formats:
        if k % BLOCK_WEIGHTS[qtype]:
            continue
        q = quantized_weight(qtype, n, k, rng)
        packed = GGUFLinear(q, qtype, k, activations="int8")
        packed = (packed.qs, packed.scales, packed.mins)
        calls_of = {"float": partial(ext.gguf_linear, x, q, int(qtype), None),
                    "int8": partial(ext.gguf_int8_linear, x, *packed, int(qtype), n, None)}
        for path in paths:
            if path.startswith("float") and qtype not in FLOAT_KERNEL_TYPES:
                continue
            kernel, _, variant = path.partition("_")
            option = {"portable": variant == "portable"} if kernel == "float" else {"path": variant or "auto"}
            result[f"{qtype.name}_{path}"] = {
                "us": median_us(partial(calls_of[kernel], **option), calls, repeats),
                "weight_bytes": q.numel() if kernel == "float" else sum(t.numel() * t.element_size() for t in packed)}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x1536,1536x576", help="comma-separated KxN (inputs x outputs)")
    ap.add_argument("--rows", default="1,16", help="comma-separated M (rows of x)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--formats", default="Q4_1,Q8_0,Q4_K,Q6_K",
                    help="comma-separated GGML types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated kernels among {', '.join(PATHS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/gguf_kernels.json")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    formats = [GGMLType[name] for name in args.formats.split(",")]
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        ap.error(f"unknown --paths {sorted(unknown)}; choose among {', '.join(PATHS)}")
    results = {}
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.rows.split(",")):
            results[f"{k}x{n}_m{m}"] = measure_shape(k, n, m, args.calls, args.repeats, rng, formats, paths)
    write_json(args.out, {"results": results, "threads": torch.get_num_threads(), "machine": machine(),
                          "vnni": gguf_extension().has_vnni(), "command": sys.argv})
    for case, row in results.items():
        print(f"gguf kernels {case} (us/call): " + ", ".join(f"{name} {r['us']:.1f}" for name, r in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
