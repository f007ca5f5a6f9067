"""Quantized linears on a GPU: one ``TritonQuantLinear`` call (GGUF Q4_0, Q4_1, Q8_0, Q4_K, Q6_K blocks and weight-only
int8, dequantized in registers by Triton kernels) against ``F.linear`` on the same weights in bfloat16 (cuBLAS), in
the same run, at decode and prefill row counts. Llama-3-8B's projection shapes by default.

    python benchmarks/gguf_cuda.py                       # on a CUDA machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gguf_cuda.py --shapes 4096x14336 --rows 1,8 --formats Q4_K

For each shape (K inputs -> N outputs), format and M rows of x (bfloat16): the median over ``--repeats`` of
``--calls`` back-to-back calls timed with CUDA events, in microseconds a call; the bytes of weight a call reads and
the bandwidth that makes; the ratio to bfloat16 cuBLAS (> 1: the quantized call is faster). Random weights (the
kernels' cost does not depend on the values). Where the kernels split K across programs (split-K, chosen by the grid
and the SM count), the same call with one slice is timed too, so each run says what the split buys. Prints a line per
case and a summary line (the geometric mean of the ratios at decode rows and at prefill rows, and of the split's
gains), writes JSON (default results/gguf_cuda.json).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.gguf_kernels import quantized_weight  # noqa: E402
from loom.ops.quantized import GGMLType  # noqa: E402

FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "int8")


def cuda_us(fn, calls: int, repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="comma-separated KxN")
    ap.add_argument("--rows", default="1,8,32,256", help="comma-separated M (rows of x)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, among {', '.join(FORMATS)}")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/gguf_cuda.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the same kernels are tested on CPU under TRITON_INTERPRET=1 by make test)")
    from loom.ops.triton.quantized import DEQUANTIZE_ROWS, GEMV_ROWS, TritonQuantLinear

    rng = np.random.default_rng(args.seed)
    cases, decode, prefill, split_gains = [], [], [], []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        dense = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for fmt in args.formats.split(","):
            if fmt == "int8":
                layer = TritonQuantLinear.from_float(dense)
            else:
                qweight = quantized_weight(GGMLType[fmt], n, k, rng)
                layer = TritonQuantLinear.from_gguf(qweight, GGMLType[fmt], k, device="cuda")
            for m in (int(v) for v in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                ours = cuda_us(partial(layer, x), args.calls, args.repeats)
                cublas = cuda_us(partial(torch.nn.functional.linear, x, dense), args.calls, args.repeats)
                ratio = cublas / ours
                (decode if m <= GEMV_ROWS else prefill).append(ratio)
                case = {"k": k, "n": n, "format": fmt, "rows": m, "quantized_us": ours, "bf16_cublas_us": cublas,
                        "weight_bytes": layer.nbytes, "quantized_gb_s": layer.nbytes / ours / 1e3,
                        "bf16_gb_s": n * k * 2 / cublas / 1e3, "speedup_vs_bf16": ratio}
                slices = layer.plan(m, x.device, x.dtype)[2] if m < DEQUANTIZE_ROWS else 1
                split = ""
                if slices > 1:
                    layer.split_k = 1
                    case["one_slice_us"] = cuda_us(partial(layer, x), args.calls, args.repeats)
                    layer.split_k = None
                    case.update(k_slices=slices, split_gain=case["one_slice_us"] / ours)
                    split_gains.append(case["split_gain"])
                    split = f"; {slices} slices of K vs one: {case['one_slice_us']:.1f} us, {case['split_gain']:.2f}x"
                cases.append(case)
                print(f"{k}->{n} {fmt:5s} M={m:4d}: {ours:8.1f} us ({case['quantized_gb_s']:6.0f} GB/s) vs bf16 "
                      f"{cublas:8.1f} us ({case['bf16_gb_s']:6.0f} GB/s): {ratio:.2f}x{split}", flush=True)

    def geomean(values: list[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    summary = {"decode_rows_geomean_speedup": geomean(decode), "prefill_rows_geomean_speedup": geomean(prefill),
               "split_k_gain_geomean": geomean(split_gains), "split_k_cases": len(split_gains)}
    write_json(args.out, {"command": sys.argv, "device": torch.cuda.get_device_name(), "summary": summary,
                          "cases": cases, "machine": machine()})
    print(f"quantized linears vs bf16 cuBLAS on {torch.cuda.get_device_name()}: decode rows (<= {GEMV_ROWS}) "
          f"{summary['decode_rows_geomean_speedup']:.2f}x, more rows {summary['prefill_rows_geomean_speedup']:.2f}x; "
          f"split-K over one slice {summary['split_k_gain_geomean']:.2f}x in {len(split_gains)} cases "
          "(geometric means)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
