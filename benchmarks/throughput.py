"""Offline throughput: a seeded workload of varied prompt/output lengths (ignore_eos), through Loom's engine and,
in the same run, through transformers' static ``generate`` (``hf``) and its continuous batching (``hf-cb``).

    python benchmarks/throughput.py --backend loom,hf,hf-cb --num-prompts 64

Prints one summary line per backend and a final ratio line; writes JSON (default results/throughput.json).
Useful tokens = prompt + requested output tokens of every request (padding and extra tokens are not counted).
Achieved GFLOP/s = useful tokens/s x 2 x parameters; the float32 matmul peak is measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, matmul_peak_gflops, sync, write_json  # noqa: E402
from loom.devices import resolve_device  # noqa: E402
from loom.engine.config import EngineConfig  # noqa: E402
from loom.flags import add_config_arguments, config_from_args  # noqa: E402

ENGINE_SKIP = {"model", "seed"}  # the benchmark's own flags


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                  seed: int) -> Workload:
    rng = random.Random(seed)
    low_id = 100  # skip special tokens at the bottom of the vocabulary
    prompts = [[rng.randrange(low_id, vocab) for _ in range(rng.randint(*input_range))] for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return Workload(prompts, outputs)


def run_loom(model_path: str, w: Workload, args) -> dict:
    from loom import LLM, SamplingParams

    llm = LLM.from_config(config_from_args(EngineConfig, args, skip=ENGINE_SKIP, model=model_path, seed=args.seed))
    warm = [{"prompt_token_ids": p[:32]} for p in w.prompts[:4]]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True))
    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    engine = llm.engine
    base = engine.stats()
    engine._slots_used = engine._slots_held = 0
    sync(_device(args))
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params)
    sync(_device(args))
    elapsed = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == w.num_output_tokens, f"Loom produced {produced} tokens, expected {w.num_output_tokens}"
    s = engine.stats()
    return {
        "elapsed_s": elapsed,
        "kv_waste_mean": s.kv_waste_mean,
        "num_preemptions": s.num_preemptions - base.num_preemptions,
        "num_steps": s.num_steps - base.num_steps,
        "num_kv_blocks": s.num_kv_blocks,
    }


def hf_model(model_path: str, args):
    """transformers' model of the folder on the run's device and dtype; with ``--load-format dummy``, random weights
    from its config.json, drawn on the device (as Loom's dummy format: the values do not matter to speed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if getattr(args, "load_format", "auto") == "dummy":
        with torch.device(_device(args)):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path),
                                                    dtype=_torch_dtype(args)).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=_torch_dtype(args)).to(_device(args)).eval()


def run_hf_static(model_path: str, w: Workload, args) -> dict:
    model = hf_model(model_path, args)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    bs = args.hf_batch_size
    with torch.inference_mode():
        model.generate(torch.tensor([w.prompts[0][:16]], device=_device(args)), max_new_tokens=2, do_sample=False)
        sync(_device(args))
        t = time.perf_counter()
        for i in range(0, len(w.prompts), bs):
            batch = w.prompts[i : i + bs]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=_device(args))
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=_device(args))
            new = max(w.output_lens[i : i + bs])
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                top_k=0, top_p=1.0, temperature=1.0, pad_token_id=pad,
            )  # fmt: skip
        sync(_device(args))
    return {"elapsed_s": time.perf_counter() - t, "batch_size": bs}


def run_hf_cb(model_path: str, w: Workload, args) -> dict:
    from transformers import GenerationConfig

    model = hf_model(model_path, args)
    model.set_attn_implementation("paged|sdpa")
    cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max(w.output_lens))
    cb = {}
    if _device(args) == "cpu":
        # NOTE: on CPU transformers sizes its cache from system RAM and was OOM-killed at 14 GB here; give it the same
        # KV memory and step budget as Loom (pages of 256 tokens).
        from transformers import ContinuousBatchingConfig

        c = model.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
        tokens = int((args.kv_cache_memory_gb or 4.0) * 2**30 // per_token)
        cb["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=max(1, tokens // 256), max_batch_tokens=args.max_num_batched_tokens
        )
    with model.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=30, **cb) as manager:
        sync(_device(args))
        t = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(w.prompts, w.output_lens)]
        done = 0
        produced = 0
        while done < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
                produced += len(result.generated_tokens)
        sync(_device(args))
        elapsed = time.perf_counter() - t
    return {"elapsed_s": elapsed, "generated_tokens": produced}


BACKENDS = {"loom": run_loom, "hf": run_hf_static, "hf-cb": run_hf_cb}


def _device(args) -> str:
    return str(resolve_device(args.device))


def _torch_dtype(args) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if _device(args) == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def matmul_params(c) -> tuple[int, int]:
    """(the decoder layers' matmul parameters, the LM head's) of a dense Llama-family config (an HF config or anything
    with its attributes): q, k, v, o and gate, up, down per layer; the embedding lookup is no matmul."""
    d, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    attn = d * hd * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
    return layers * (attn + 3 * d * i), d * c.vocab_size


def model_flops_per_token(model_path: str) -> tuple[float, int]:
    """2 x parameters (embedding lookup excluded, LM head included, tied or not)."""
    from transformers import AutoConfig

    params = sum(matmul_params(AutoConfig.from_pretrained(model_path)))
    return 2.0 * params, params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:f32",
                    help="the weights every backend loads (default: the packaged model's float32 folder)")
    ap.add_argument("--backend", default="loom", help="comma list of: " + ", ".join(BACKENDS))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0, help="the workload's seed (and the engine's)")
    add_config_arguments(ap.add_argument_group("engine (dtype and device apply to every backend)"), EngineConfig,
                         skip=ENGINE_SKIP)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="results/throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from loom.models.catalogue import resolve_model

    torch.manual_seed(args.seed)
    model_path = str(resolve_model(args.model))
    flops_per_token, params = model_flops_per_token(model_path)
    from transformers import AutoConfig

    w = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len),
                      AutoConfig.from_pretrained(model_path).vocab_size, args.seed)
    device = _device(args)
    peak_dtype = _torch_dtype(args)
    results = {"workload": {"num_prompts": args.num_prompts, "prompt_tokens": w.num_prompt_tokens,
                            "output_tokens": w.num_output_tokens, "input_len": args.input_len,
                            "output_len": args.output_len, "seed": args.seed},
               "model": args.model, "params": params, "machine": machine(), "backends": {}}  # fmt: skip
    for name in args.backend.split(","):
        size = 2048 if device == "cpu" else 8192
        peak_before = matmul_peak_gflops(device=device, dtype=peak_dtype, size=size)
        try:
            r = BACKENDS[name](model_path, w, args)
        except Exception as exc:  # a peer that fails (missing API, OOM) must not lose the others' figures
            print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
            results["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        # NOTE: the peak is the better of two measurements, before and after the backend ran: on a shared machine
        # one sample can land in a busy moment, and a low peak would flatter the fraction.
        peak = max(peak_before, matmul_peak_gflops(device=device, dtype=peak_dtype, size=size))
        total = w.num_prompt_tokens + w.num_output_tokens
        r.update(
            requests_per_s=args.num_prompts / r["elapsed_s"],
            output_tokens_per_s=w.num_output_tokens / r["elapsed_s"],
            total_tokens_per_s=total / r["elapsed_s"],
            achieved_gflops=total * flops_per_token / r["elapsed_s"] / 1e9,
            peak_gflops=peak,
        )
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
        results["backends"][name] = r
        extra = f" kv_waste={r['kv_waste_mean']:.2%} preemptions={r['num_preemptions']}" if name == "loom" else ""
        print(
            f"{name}: {r['requests_per_s']:.3f} req/s, {r['output_tokens_per_s']:.1f} output tok/s, "
            f"{r['total_tokens_per_s']:.1f} total tok/s, {r['achieved_gflops']:.1f} GFLOP/s achieved of "
            f"{peak:.1f} peak ({r['fraction_of_peak']:.0%}), {r['elapsed_s']:.1f} s{extra}",
            flush=True,
        )
        write_json(args.out, results)
    b = {k: v for k, v in results["backends"].items() if "error" not in v}
    if "loom" in b:
        ratios = {k: b["loom"]["output_tokens_per_s"] / v["output_tokens_per_s"] for k, v in b.items() if k != "loom"}
        results["loom_speedup_output_tokens"] = ratios
        if ratios:
            print("loom output tok/s ratio: " + ", ".join(f"{r:.2f}x vs {k}" for k, r in ratios.items()))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
