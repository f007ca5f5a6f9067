"""Issue 11's GPU table in one run: random-weight Llama models at real shapes, drawn on the device from a config
(``load_format="dummy"``: no weights travel), bfloat16.

    python benchmarks/gpu_shapes.py --tokenizer .device_carry/smollm2-tokenizer          # on the GPU machine
    python benchmarks/gpu_shapes.py --tiny                                               # tiny shapes on CPU: a check

1. **Machine**: copy bandwidth (a 1 GiB device-to-device copy, read + write bytes) and the bf16 matmul peak (8192^2),
   both measured in this run.
2. **Decode step** (8B shape, context ``--context`` 1024, batch 1 and 64): the mean of 20 decode-only steps, timed
   on the host around ``engine.step()`` (the step ends with its sampled ids on the host); bytes read per step =
   weights + the batch's KV; the fraction of the copy bandwidth those bytes would need. Targets: batch 1 >= 70%,
   batch 64 >= 50%.
3. **Offline throughput** (Loom, every request at once, ignore_eos, no detokenizing): 1B shape 1,024 requests,
   8B shape 256, prompts U[128, 1024], outputs U[128, 512]. Roofline = the sum over Loom's own steps (each step's
   chunks recorded from the scheduler) of max(bytes / copy bandwidth, FLOPs / matmul peak): weights once a step,
   every chunk's KV read up to its end and written for its tokens, 2 x parameters per token plus attention's
   4 x query x context x heads x head dim per layer, the LM head on one row per sampling sequence. Targets: >= 35%
   (1B), >= 40% (8B).
4. **Against transformers** on subsets (64 requests of the 1B workload, 16 of the 8B one), in this run: ``hf``
   (static batches of --hf-batch-size) and ``hf-cb`` (its continuous batching), Loom on the same requests.
   Targets: 1B >= 10x hf and >= 3x hf-cb; 8B >= 3x hf-cb.

SmolLM2-135M's row of the table (>= 10x 603 tok/s, >= 5x hf-cb) is benchmarks/throughput.py's, in gpu_check.sh.
Prints one summary line and writes JSON (default results/gpu_shapes.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, matmul_peak_gflops, sync, write_json  # noqa: E402
from benchmarks.throughput import Workload, make_workload, matmul_params, run_hf_cb, run_hf_static  # noqa: E402

SHAPES = {  # HF LlamaConfig fields; vocab 128256 as Llama 3's
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=4096),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, tie_word_embeddings=True,
                 max_position_embeddings=1024),
}  # fmt: skip
RUNS = {  # shape: (requests, hf subset, targets)
    "llama-3.2-1b": (1024, 64, {"roofline": 0.35, "hf": 10.0, "hf-cb": 3.0}),
    "llama-3.1-8b": (256, 16, {"roofline": 0.40, "hf-cb": 3.0}),
}
INPUT_RANGE, OUTPUT_RANGE = (128, 1024), (128, 512)


def config_folder(shape: str, tokenizer: Path, root: Path) -> Path:
    """A folder with the shape's config.json and the tokenizer (saved as loom.models.tiny saves it, so a model folder
    given as the tokenizer lends no weights): all load_format="dummy" reads."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = root / shape
    LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(folder)
    return folder


def engine(folder: Path, args, **overrides):
    from loom import LLM

    kwargs = dict(load_format="dummy", dtype=args.dtype, device=args.device, seed=0, max_num_seqs=256,
                  max_num_batched_tokens=8192, gpu_memory_utilization=0.85, async_scheduling=args.async_scheduling)
    return LLM(str(folder), **{**kwargs, **overrides})


class Shape:
    """Bytes and FLOPs of one model's steps, from its config (bf16/fp16: 2 bytes a value)."""

    def __init__(self, cfg: dict, elem: int):
        c = SimpleNamespace(**cfg)
        self.layers, self.h, self.hd = c.num_hidden_layers, c.num_attention_heads, c.head_dim
        self.layer_params, self.head_params = matmul_params(c)
        self.weight_bytes = (self.layer_params + self.head_params) * elem
        self.kv_bytes_per_token = 2 * self.layers * c.num_key_value_heads * self.hd * elem

    def step(self, chunks: list[tuple[int, int, bool]]) -> tuple[float, float]:
        """(bytes, FLOPs) of a step of chunks (query tokens, context at the chunk's end, samples)."""
        tokens = sum(q for q, _, _ in chunks)
        kv = sum((ctx + q) * self.kv_bytes_per_token for q, ctx, _ in chunks)
        attention = sum(4 * q * (ctx - q / 2) * self.h * self.hd * self.layers for q, ctx, _ in chunks)
        sampling = sum(1 for *_, samples in chunks if samples)
        flops = 2 * self.layer_params * tokens + attention + 2 * self.head_params * sampling
        return self.weight_bytes + kv, flops


@contextmanager
def recorded_steps(llm):
    """Yields a list that gets every step the engine schedules inside the block, as its chunks: (query tokens,
    context at the chunk's end, samples); the scheduler is as it was after the block."""
    steps: list = []
    scheduler = llm.engine.scheduler

    def recording():
        out = type(scheduler).schedule(scheduler)
        steps.append([(c.num_tokens, c.start + c.num_tokens, c.start + c.num_tokens >= c.seq.num_tokens)
                      for c in out.chunks])
        return out

    scheduler.schedule = recording
    try:
        yield steps
    finally:
        del scheduler.schedule


def run_loom(llm, w: Workload, device: str) -> tuple[float, list]:
    from loom import SamplingParams

    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in w.output_lens]
    sync(device)
    start = time.perf_counter()
    with recorded_steps(llm) as steps:
        outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params)
    sync(device)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == w.num_output_tokens
    return elapsed, [s for s in steps if s]


def decode_steps(llm, shape: Shape, batch: int, context: int, steps: int, device: str) -> dict:
    """Mean time of ``steps`` decode-only steps of ``batch`` sequences at ``context`` tokens."""
    from loom import SamplingParams

    engine_ = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=steps + 8, ignore_eos=True, detokenize=False)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine_.add_request(rid, None, params, prompt_token_ids=[(7 * i + t) % 1000 + 100 for t in range(context)])
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine_.scheduler.running) or \
            engine_.scheduler.waiting:
        engine_.step()
    engine_.step()  # a first decode-only step (graphs captured for this bucket)
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine_.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine_.abort_request(rid)
    step_s = statistics.mean(times)
    read = shape.weight_bytes + batch * (context + steps) * shape.kv_bytes_per_token
    return {"batch": batch, "context": context, "step_ms": 1e3 * step_s, "tok_per_s": batch / step_s,
            "bytes_per_step": read, "achieved_gb_per_s": read / step_s / 1e9}


def release(device: str) -> None:
    """Give the memory of dropped engines and models back to the device, so the next engine's start-up profile (which
    counts what is taken) sizes its KV pool from the whole GPU."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth_gb_per_s(device: str, size: int) -> float:
    """Best of 5 device-to-device copies of ``size`` bytes: (read + written bytes) / time."""
    src = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the packaged SmolLM2's)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and workloads on this machine (a check)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--async-scheduling", action="store_true", help="Loom's runs with async scheduling")
    ap.add_argument("--out", default="results/gpu_shapes.json")
    args = ap.parse_args()
    if args.tokenizer is None:
        from loom.models.catalogue import resolve_model

        args.tokenizer = resolve_model("smollm2:f32")
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = "float32" if args.tiny else "bfloat16"
    runs = {"tiny": (12, 4, {"roofline": 0.0})} if args.tiny else RUNS
    decode_shape = "tiny" if args.tiny else "llama-3.1-8b"
    context, batches = (64, (1, 4)) if args.tiny else (args.context, (1, 64))
    io = ((8, 48), (4, 16)) if args.tiny else (INPUT_RANGE, OUTPUT_RANGE)
    elem = 4 if args.tiny else 2
    result = {"machine": machine(), "command": sys.argv, "device": args.device}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gb_per_s(args.device, 2**26 if args.tiny else 2**30)
    peak = matmul_peak_gflops(1024 if args.tiny else 8192, device=args.device,
                              dtype=torch.float32 if args.tiny else torch.bfloat16)
    result.update(copy_gb_per_s=bandwidth, matmul_peak_gflops=peak)
    with tempfile.TemporaryDirectory() as root:
        shape = Shape(SHAPES[decode_shape], elem)
        llm = engine(config_folder(decode_shape, args.tokenizer, Path(root)), args)
        result["decode"] = [decode_steps(llm, shape, b, context, 20, args.device) for b in batches]
        for row in result["decode"]:
            row["fraction_of_copy_bw"] = row["achieved_gb_per_s"] / bandwidth
        del llm
        release(args.device)
        write_json(args.out, result)  # after each part: a later failure or timeout keeps what was measured
        result["throughput"] = {}
        for name, (n, subset, targets) in runs.items():
            folder = config_folder(name, args.tokenizer, Path(root))
            shape = Shape(SHAPES[name], elem)
            w = make_workload(n, *io, SHAPES[name]["vocab_size"], args.seed)
            llm = engine(folder, args)
            elapsed, steps = run_loom(llm, w, args.device)
            costs = [shape.step(s) for s in steps]
            roofline_s = sum(max(b / (bandwidth * 1e9), f / (peak * 1e9)) for b, f in costs)
            row = {"requests": n, "elapsed_s": elapsed, "output_tok_per_s": w.num_output_tokens / elapsed,
                   "steps": len(steps), "roofline_s": roofline_s, "fraction_of_roofline": roofline_s / elapsed,
                   "targets": targets}
            sub = Workload(w.prompts[:subset], w.output_lens[:subset])
            loom_sub, _ = run_loom(llm, sub, args.device)
            del llm
            release(args.device)
            row["subset"] = {"requests": subset, "loom_s": loom_sub}
            hf_args = Namespace(device=args.device, dtype=args.dtype, hf_batch_size=args.hf_batch_size,
                                load_format="dummy", kv_cache_memory_gb=0.25 if args.tiny else None,
                                max_num_batched_tokens=256 if args.tiny else 8192)
            for backend, run in (("hf", run_hf_static), ("hf-cb", run_hf_cb)):
                if backend in targets or args.tiny:
                    try:
                        seconds = run(str(folder), sub, hf_args)["elapsed_s"]
                    except Exception as exc:  # a peer's failure (OOM, an API change) must not lose Loom's figures
                        row["subset"][f"{backend}_error"] = f"{type(exc).__name__}: {exc}"
                        continue
                    finally:
                        release(args.device)
                    row["subset"][f"{backend}_s"] = seconds
                    row["subset"][f"vs_{backend}"] = seconds / loom_sub
            result["throughput"][name] = row
            write_json(args.out, result)
    write_json(args.out, result)
    decode = ", ".join(f"batch {r['batch']} {r['step_ms']:.2f} ms ({r['fraction_of_copy_bw']:.0%} of copy BW)"
                       for r in result["decode"])
    runs_line = "; ".join(
        f"{name} {r['output_tok_per_s']:.0f} tok/s, {r['fraction_of_roofline']:.0%} of roofline, "
        + ", ".join(f"{r['subset'][k]:.1f}x {k[3:]}" for k in r["subset"] if k.startswith("vs_"))
        for name, r in result["throughput"].items())
    print(f"gpu_shapes ({result.get('gpu', args.device)}): copy {bandwidth:.0f} GB/s, matmul peak {peak:.0f} "
          f"GFLOP/s | decode {decode_shape} ctx {context}: {decode} | {runs_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
