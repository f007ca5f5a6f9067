"""Decode steps with one C++ call per layer against the op-by-op layers, in the same process, alternated request by
request: SmolLM2-135M as the packaged Q4_1 GGUF, as the float32 folder, and as that folder with --quantization int8;
and random-weight models of SmolLM2-135M's shape with Mistral's, Gemma 2's and Gemma 3's layers (windows of 512
tokens, Gemma 3 1B's: every layer for Mistral, alternate ones for Gemma 2, five of six for Gemma 3; Gemma 2's soft
caps, GeGLU, sandwich norms, Gemma 3's q/k norms and two rope bases).

    python benchmarks/layer_calls.py --pairs 12                  # all six, 32-token prompts
    python benchmarks/layer_calls.py --weights mistral,gemma2,gemma3 --prompt-len 1024 --pairs 6

Per weights: one engine; a --prompt-len-token prompt generates 64 tokens (greedy, ignore_eos) with the whole-layer
calls (``CpuOps.decode_layers``) on, then off (the engine's layer plan emptied, so every layer runs op by op), the order
swapped every pair. For the windowed models a third run per pair, ``reference_attention``, is the op-by-op path with
the windowed and soft-capped attention through the plain-PyTorch reference (gather + SDPA) and GeGLU through torch,
as Loom ran those layers before its kernels took windows and soft caps. Step = the request's wall time / its engine
steps; the figure is the median over pairs of on/off (and of reference/on). Prints one summary line and writes JSON
(default results/layer_calls.json).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, names_arg, write_json  # noqa: E402
from benchmarks.quantized import packaged_gguf  # noqa: E402

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, initializer_range=0.02, max_position_embeddings=4096,
             sliding_window=512)  # fmt: skip
"""SmolLM2-135M's shape (tiny.py gives the vocabulary, 49152, and ties the embeddings), with a 512-token window."""
RANDOM = {"mistral": {}, "gemma2": {"query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0,
                                    "final_logit_softcapping": 30.0},
          "gemma3": {"query_pre_attn_scalar": 64}}  # fmt: skip
WEIGHTS = {"q4_1": (None, None), "float32": ("smollm2:f32", None), "int8": ("smollm2:f32", "int8"),
           **{arch: (arch, None) for arch in RANDOM}}  # fmt: skip


def random_model(arch: str, folder: Path) -> str:
    """A random-weight ``arch`` model of SHAPE with SmolLM2's tokenizer, saved under ``folder``."""
    from loom.models.catalogue import resolve_model
    from loom.models.tiny import save_tiny_model

    return str(save_tiny_model(folder / arch, resolve_model("smollm2:f32"), arch=arch, **SHAPE, **RANDOM[arch]))


def reference_attention(ops):
    """The op-by-op path as it ran windowed and soft-capped layers before the kernels took them: their decode
    attention through the plain-PyTorch reference, GeGLU through torch (set on the engine's ops instance)."""
    from loom.ops.attention import decode_attention_reference
    from loom.ops.layers import TorchOps

    fused = type(ops).decode_attention

    def decode_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None, sinks=None):
        if window is None and softcap is None and sinks is None:
            return fused(q, k_cache, v_cache, meta, scale)
        return decode_attention_reference(q, k_cache, v_cache, meta, scale, window, softcap, sinks)

    ops.decode_attention = decode_attention
    ops.gelu_and_mul = lambda gate_up: TorchOps.gelu_and_mul(ops, gate_up)


def measure(model: str, quantization: str | None, pairs: int, seed: int, prompt_len: int, windowed: bool) -> dict:
    from loom import LLM, SamplingParams

    llm = LLM(model, seed=seed, quantization=quantization)
    ops, engine = llm.engine.model.ops, llm.engine
    rng = random.Random(seed)
    prompt = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(prompt_len)]}]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=4))  # warm-up: kernels built, the layer plan made
    plan = ops._decode_plan
    if not plan:
        raise SystemExit(f"{model}: its layers have no whole-layer call here (no C++ kernels, or a layer kind they "
                         "do not compute)")
    modes = ("layer_calls", "op_by_op") + (("reference_attention",) if windowed else ())
    steps: dict[str, list[float]] = {name: [] for name in modes}
    for k in range(pairs):
        for name in modes if k % 2 == 0 else modes[::-1]:
            ops._decode_plan = plan if name == "layer_calls" else ()
            if name == "reference_attention":
                reference_attention(ops)
            before = engine.stats().num_steps
            start = time.perf_counter()
            llm.generate(prompt, params)
            steps[name].append(1e3 * (time.perf_counter() - start) / (engine.stats().num_steps - before))
            vars(ops).pop("decode_attention", None)
            vars(ops).pop("gelu_and_mul", None)
    result = {"step_ms": {name: statistics.median(v) for name, v in steps.items()}, "steps_ms": steps,
              "ratio_median_of_pairs": statistics.median(a / b for a, b in zip(steps["layer_calls"],
                                                                                steps["op_by_op"]))}
    if windowed:
        result["reference_over_layer_calls"] = statistics.median(
            a / b for a, b in zip(steps["reference_attention"], steps["layer_calls"]))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=names_arg(WEIGHTS), default=list(WEIGHTS),
                    help=f"comma-separated, among {', '.join(WEIGHTS)}")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default="results/layer_calls.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.weights:
            model, quantization = WEIGHTS[name]
            windowed = name in RANDOM
            model = random_model(model, Path(folder)) if windowed else model or packaged_gguf()
            results[name] = measure(model, quantization, args.pairs, args.seed, args.prompt_len, windowed)
    write_json(args.out, {"results": results, "prompt_len": args.prompt_len, "machine": machine(),
                          "command": sys.argv})
    print(f"decode step at {args.prompt_len}-token prompts, one call per layer / op by op: " + ", ".join(
        f"{name} {r['step_ms']['layer_calls']:.2f} / {r['step_ms']['op_by_op']:.2f} ms "
        f"({r['ratio_median_of_pairs']:.3f}x over {args.pairs} pairs"
        + (f"; reference attention {r['step_ms']['reference_attention']:.2f} ms, "
           f"{r['reference_over_layer_calls']:.2f}x the layer calls)" if "reference_attention" in r["step_ms"] else ")")
        for name, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
