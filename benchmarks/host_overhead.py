"""The engine's host work per decode step: scheduling, step inputs, sampling, detokenization, outputs.

A random 1-layer model of hidden size 32 (SmolLM2's tokenizer and 49,152-token vocabulary) makes the model's own
time small, so a step is mostly what the engine does around the model: on a GPU this is the time the device waits
for the host unless it is overlapped. B sequences with 1,000-token random prompts are prefilled, then --steps decode
steps are timed (temperature 1, text on, ``ignore_eos``). ``--generated N`` first decodes N tokens untimed, so the
timed steps make outputs that long (what grows with a stream's length shows); ``--logprobs K`` asks every request for
its sampled token's log-probability and the K most likely; ``--output-kind`` what each step returns (a stream's
server asks for "delta"). Besides the step, it times the part of it spent building the step's outputs.

    python benchmarks/host_overhead.py                          # batches 1,32,128
    PYTHONPATH=/path/to/older/tree python benchmarks/host_overhead.py --out before.json   # the same, older code

It uses only the engine's public calls, so it runs against an older tree as well (the second line). Prints one
summary line and writes JSON (default results/host_overhead.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an older tree's loom comes first
from benchmarks.common import machine, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--generated", type=int, default=0, help="tokens decoded (untimed) before the timed steps")
    ap.add_argument("--logprobs", type=int, default=None, help="log-probabilities per token (default: none)")
    ap.add_argument("--output-kind", default=None, choices=["cumulative", "delta", "final_only"],
                    help="SamplingParams.output_kind (default: the engine's, cumulative)")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="queue each step before reading the last one back (on a GPU: host work beside the device's)")
    ap.add_argument("--out", default="results/host_overhead.json")
    args = ap.parse_args()

    import loom
    from loom import LLM, SamplingParams
    from loom.models.catalogue import resolve_model
    from loom.models.tiny import save_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="loom-host-")) / "tiny"
    save_tiny_model(folder, tokenizer_dir=resolve_model("smollm2"), num_hidden_layers=1, hidden_size=32,
                    intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    batches = [int(b) for b in args.batches.split(",")]
    results, outputs_ms = {}, {}
    for batch in batches:
        extra = {"async_scheduling": True} if args.async_scheduling else {}  # an older tree has no such option
        llm = LLM(model=str(folder), max_num_seqs=batch, max_num_batched_tokens=8192, seed=0, max_model_len=4096,
                  kv_cache_memory_gb=2, **extra)
        engine = llm.engine
        gen = torch.Generator().manual_seed(batch)
        for i in range(batch):
            prompt = torch.randint(10, 40000, (args.context,), generator=gen).tolist()
            kind = {"output_kind": args.output_kind} if args.output_kind else {}  # an older tree may lack "delta"
            engine.add_request(str(i), prompt_token_ids=prompt,
                               params=SamplingParams(max_tokens=args.generated + args.steps + 20, ignore_eos=True,
                                                     logprobs=args.logprobs, **kind))
        while engine.scheduler.waiting or any(s.num_computed_tokens < args.context for s in engine.scheduler.running):
            engine.step()
        for _ in range(5 + args.generated):
            engine.step()
        building = timed_outputs(engine)
        times, output_times = [], []
        for _ in range(args.steps):
            building[0] = 0.0
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            output_times.append(building[0])
        results[batch] = round(statistics.median(times) * 1e3, 3)
        outputs_ms[batch] = round(statistics.median(output_times) * 1e3, 3)
        print(f"  batch {batch:4d}: {results[batch]:.2f} ms a decode step, {outputs_ms[batch]:.3f} ms of it building "
              "outputs", flush=True)
    write_json(args.out, dict(benchmark="host_overhead", loom=str(Path(loom.__file__).parent), context=args.context,
                              steps=args.steps, generated=args.generated, logprobs=args.logprobs,
                              output_kind=args.output_kind or "cumulative",
                              async_scheduling=args.async_scheduling, machine=machine(),
                              ms_per_step=results, outputs_ms_per_step=outputs_ms))
    print("host overhead: " + ", ".join(f"batch {b} {ms:.2f} ms/step ({outputs_ms[b]:.3f} building outputs)"
                                        for b, ms in results.items())
          + f" (1-layer hidden-32 model, {args.context}-token prompts, {args.generated} tokens generated before,"
          + f" logprobs {args.logprobs}, {args.output_kind or 'cumulative'} outputs, temperature 1, text on"
          + (", async scheduling)" if args.async_scheduling else ")"))
    return 0


def timed_outputs(engine) -> list[float]:
    """Add the time the engine spends building ``RequestOutput``s (its ``_request_output``, in every tree since
    outputs were built per request) to the returned cell, which the caller resets."""
    total = [0.0]
    inner = engine._request_output

    def timed(req):
        t = time.perf_counter()
        out = inner(req)
        total[0] += time.perf_counter() - t
        return out

    engine._request_output = timed
    return total


if __name__ == "__main__":
    raise SystemExit(main())
