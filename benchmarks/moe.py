"""Mixture of experts on CPU: a random Mixtral-shaped model through Loom and through HF transformers' ``generate``
in the same run, on the offline throughput workload of benchmarks/throughput.py, alternated round by round.

    python benchmarks/moe.py --num-prompts 32 --rounds 2
    python benchmarks/moe.py --model gpt_oss --num-prompts 32 --rounds 2
    python benchmarks/moe.py --model gpt_oss --mxfp4 --num-prompts 32 --rounds 2
    python benchmarks/moe.py --model deepseek_v3 --num-prompts 32 --rounds 2
    python benchmarks/moe.py --device cuda --num-prompts 64 --rounds 1     # on a GPU: also the per-expert path

The model (``--model mixtral``): 8 experts, top-2 routing, hidden 512, expert MLP width 1024, 4 layers, 8 query / 2 KV
heads, SmolLM2's tokenizer (vocabulary 49152), random weights (seeded), float32. ``--model gpt_oss``: gpt-oss-20b's
layout at that scale: 32 experts, top-4 (its router: bias, top-k before the softmax; experts with biases and the
clamped SwiGLU), expert width 512, attention sinks, 128-token windows on every other layer, head dim 64, YaRN. Loom
groups each step's tokens by expert (one pair of matmuls per chosen expert and layer) inside its paged, continuously
batched engine; transformers runs its default experts implementation with static batches of ``--hf-batch-size``.
Prints one summary line (median useful tokens/s of each and the ratio) and writes JSON (default results/moe.json).
``--mxfp4`` (gpt_oss): Loom serves the experts as the hub stores them (MXFP4, kept as Q8_0 rows), transformers the
same weights expanded to float32 (what it runs with ``Mxfp4Config(dequantize=True)``); the JSON also gives the
experts' bytes in Loom. ``--model deepseek_v3``: DeepSeek-V3's layout at that scale: multi-head latent attention
(latent 128 + rotary 16, a query bottleneck of 192; Loom caches the latent and absorbs the up-projections,
transformers expands keys and values per head), a dense first layer, then 32 sigmoid-routed experts (top-4 within
the best 2 of 4 groups) of width 256 and a shared expert.

``--device cuda`` (bfloat16, Triton backend): Loom as it runs there by default (the experts in grouped matmuls,
decode steps under CUDA graphs: ``loom/ops/triton/moe.py``) and ``loom-per-expert`` (the experts grouped on the host,
one matmul pair per chosen expert, eager: the path before the grouped kernels), beside transformers, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, sync, write_json  # noqa: E402
from benchmarks.throughput import make_workload, run_hf_static  # noqa: E402

SHAPES = {
    "mixtral": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
                    initializer_range=0.02),
    "gpt_oss": dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                    sliding_window=128, swiglu_limit=7.0, max_position_embeddings=2048, initializer_range=0.02,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=512)),
    "deepseek_v3": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
                        qk_rope_head_dim=16, v_head_dim=32, num_local_experts=32, num_experts_per_tok=4,
                        moe_intermediate_size=256, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        max_position_embeddings=2048, initializer_range=0.02),
}


def run_loom(path: str, w, seed: int, device: str = "cpu", per_expert: bool = False) -> dict:
    """``per_expert``: without the backend's grouped experts (and so without CUDA graphs for the MoE)."""
    from loom import LLM, SamplingParams
    from loom.ops.triton_ops import TritonOps

    grouped = TritonOps.fused_moe
    if per_expert:
        TritonOps.fused_moe = None  # prepare still stacks; the layers see no fused_moe and group on the host
    try:
        llm = LLM(path, seed=seed, device=device, dtype="bfloat16" if device == "cuda" else "auto")
    finally:
        TritonOps.fused_moe = grouped
    experts = [m for layer in llm.engine.model.layers for e in getattr(layer.mlp, "experts", ())
               for m in (e.gate_up_proj, e.down_proj)]
    expert_bytes = sum(getattr(m, "nbytes", None) or m.in_features * m.out_features * (2 if device == "cuda" else 4)
                       for m in experts)
    llm.generate([{"prompt_token_ids": p[:32]} for p in w.prompts[:4]], SamplingParams(max_tokens=4))
    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    if per_expert:
        llm.engine.model.ops.fused_moe = None  # the instance keeps the per-expert path after the class is restored
    sync(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params)
    sync(device)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == w.num_output_tokens
    graphs = llm.engine.runner.graphs
    return {"elapsed_s": elapsed, "expert_bytes": expert_bytes, "cuda_graphs": bool(graphs and graphs.graphs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--mxfp4", action="store_true", help="gpt_oss: Loom reads MXFP4 experts (see the docstring)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None, help="default: results/moe.json (results/moe_gpt_oss.json)")
    args = ap.parse_args()

    from loom.models.catalogue import resolve_model
    from loom.models.tiny import save_mxfp4_copy, save_tiny_model

    if args.mxfp4 and args.model != "gpt_oss":
        ap.error("--mxfp4 is gpt_oss' format")
    shape = SHAPES[args.model]
    tag = args.model + ("_mxfp4" if args.mxfp4 else "")
    out = args.out or ("results/moe.json" if args.model == "mixtral" else f"results/moe_{tag}.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(save_tiny_model(Path(tmp) / args.model, resolve_model("smollm2"), arch=args.model, seed=args.seed,
                                   **shape))
        loom_path = path
        if args.mxfp4:  # Loom: the MXFP4 folder; transformers: the same values as floats
            loom_path = str(save_mxfp4_copy(path, Path(tmp) / "mxfp4", expanded_copy=Path(tmp) / "expanded"))
            path = str(Path(tmp) / "expanded")
        w = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), 49152, args.seed)
        hf_args = Namespace(device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
                            hf_batch_size=args.hf_batch_size)
        runs = {"loom": lambda: run_loom(loom_path, w, args.seed, args.device),
                "hf": lambda: run_hf_static(path, w, hf_args)}
        if args.device == "cuda":
            runs["loom-per-expert"] = lambda: run_loom(loom_path, w, args.seed, args.device, per_expert=True)
        rounds = []
        for i in range(args.rounds):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            rounds.append({name: runs[name]() for name in order})
    tokens = w.num_prompt_tokens + w.num_output_tokens
    rate = {name: statistics.median(tokens / r[name]["elapsed_s"] for r in rounds) for name in runs}
    summary = {"loom_tokens_per_s": rate["loom"], "hf_tokens_per_s": rate["hf"], "ratio": rate["loom"] / rate["hf"]}
    if "loom-per-expert" in rate:
        summary["loom_per_expert_tokens_per_s"] = rate["loom-per-expert"]
        summary["grouped_vs_per_expert"] = rate["loom"] / rate["loom-per-expert"]
    summary["loom_expert_bytes"] = rounds[0]["loom"]["expert_bytes"]
    write_json(out, {"summary": summary, "rounds": rounds, "model": tag, "shape": shape, "machine": machine(),
                          "threads": torch.get_num_threads(),
                          "workload": {"num_prompts": args.num_prompts, "prompt_tokens": w.num_prompt_tokens,
                                       "output_tokens": w.num_output_tokens, "seed": args.seed}})
    experts = f"{shape['num_local_experts']}x top-{shape['num_experts_per_tok']}"
    per_expert = (f" per-expert={rate['loom-per-expert']:.0f} tok/s (grouped "
                  f"{summary['grouped_vs_per_expert']:.2f}x)" if "loom-per-expert" in rate else "")
    print(f"moe {tag}-shaped {experts} hidden 512 ({args.device}): loom={rate['loom']:.0f} tok/s{per_expert} "
          f"hf={rate['hf']:.0f} tok/s ratio={summary['ratio']:.2f}x "
          f"experts={summary['loom_expert_bytes'] / 2**20:.1f} MiB (prompts={args.num_prompts}, rounds={args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
