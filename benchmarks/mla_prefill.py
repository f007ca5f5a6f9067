"""DeepSeek's latent attention on CPU, prefill: one long prompt's time to first token in Loom with its prefill chunks
expanded (the default: every head's keys and values made from the context's latents, attention at the heads' width),
in Loom with them absorbed (every head against the 576-wide latent keys, as its decodes run), and in transformers'
forward, in the same run, the three alternated round by round.

    python benchmarks/mla_prefill.py --lengths 512 2048 4096 --rounds 3

The model: benchmarks/moe.py's DeepSeek-V3 layout at CPU scale (8 heads, latent 128 + rotary 16, nope 32, v 32, a
query bottleneck of 192, 32 grouped sigmoid-routed experts top-4 and a shared expert), random weights (seeded),
float32, SmolLM2's tokenizer; Loom's default step of 2,048 tokens (a 4,096-token prompt is two chunks, the second
reading the first's latents from the cache). Prints one summary line (prompt tokens/s at the longest length, and the
ratios) and writes JSON (default results/mla_prefill.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.moe import SHAPES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/mla_prefill.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from loom import LLM, SamplingParams
    from loom.models.catalogue import resolve_model
    from loom.models.llama import LatentAttention
    from loom.models.tiny import save_tiny_model

    shape = dict(SHAPES["deepseek_v3"], max_position_embeddings=max(8192, max(args.lengths)))
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {n: torch.randint(100, 40000, (n,), generator=generator).tolist() for n in args.lengths}
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(save_tiny_model(Path(tmp) / "v3", resolve_model("smollm2"), arch="deepseek_v3", seed=args.seed,
                                   **shape))
        llm = LLM(path, enable_prefix_caching=False, seed=args.seed)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def loom(expanded: bool, ids: list[int]) -> float:
            LatentAttention.expand_prefills = expanded
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params)
            return time.perf_counter() - start

        def transformers(ids: list[int]) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                hf(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
            return time.perf_counter() - start

        runs = {"expanded": lambda ids: loom(True, ids), "absorbed": lambda ids: loom(False, ids), "hf": transformers}
        for run in runs.values():  # warm-up
            run(prompts[args.lengths[0]][:64])
        rounds = []
        for i in range(args.rounds):
            order = list(runs) if i % 2 == 0 else list(reversed(runs))
            rounds.append({n: {name: runs[name](ids) for name in order} for n, ids in prompts.items()})
        LatentAttention.expand_prefills = True
    rates = {n: {name: statistics.median(n / r[n][name] for r in rounds) for name in runs} for n in args.lengths}
    longest = max(args.lengths)
    top = rates[longest]
    summary = {"prompt_tokens": longest, **{f"{name}_tokens_per_s": rate for name, rate in top.items()},
               "expanded_vs_absorbed": top["expanded"] / top["absorbed"], "expanded_vs_hf": top["expanded"] / top["hf"]}
    write_json(args.out, {"summary": summary, "tokens_per_s": rates, "rounds": rounds, "shape": shape,
                          "machine": machine(), "threads": torch.get_num_threads(), "seed": args.seed})
    print(f"mla_prefill deepseek_v3-shaped, {longest}-token prompt: expanded={top['expanded']:.0f} tok/s "
          f"absorbed={top['absorbed']:.0f} tok/s hf={top['hf']:.0f} tok/s "
          f"(expanded/absorbed={summary['expanded_vs_absorbed']:.2f}x, expanded/hf={summary['expanded_vs_hf']:.2f}x, "
          f"rounds={args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
