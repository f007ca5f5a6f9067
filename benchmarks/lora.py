"""Four LoRA adapters mixed in one batch vs the base model alone, through one `loom serve`, same prompts and lengths.

    nice -n 10 .venv/bin/python benchmarks/lora.py --concurrency 16 --max-tokens 128 --rounds 3

Builds four random rank-16 adapters on every projection of SmolLM2 (peft, seeded; B is not zero, so every delta is
computed for real), serves them unmerged (``--enable-lora --max-loras 4``), and per round sends ``--concurrency``
completions twice, all at once: to the base model, and spread over the four adapters (request i names adapter
i % 4), greedy with ``ignore_eos`` so every answer is exactly ``--max-tokens`` tokens. Base and adapters alternate
within each round (order flipped every round). The figure is output tokens per second of the batch; the issue's
target is adapters >= 70% of base. ``--offline`` runs the same batches through ``LLM.generate`` in-process (the
engine without the server). Prints ONE summary line and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from loom.bench.ab import ab_parser, ab_summary, alternate, post_all, serve_command  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402

TOPICS = ("a lighthouse", "a violin", "a desert town", "a rocket launch", "a market in Hanoi", "an old bridge",
          "a winter forest", "a chess match", "a bakery", "a thunderstorm", "a museum at night", "a harbour",
          "a mountain village", "a robot", "a train journey", "a garden in spring")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(root: Path, num: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loom.models.catalogue import resolve_model

    paths = []
    for i in range(num):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                init_lora_weights=False))
        paths.append(root / f"adapter{i}")
        model.save_pretrained(paths[-1])
    return paths


async def batch(url: str, args: argparse.Namespace, models: list[str]) -> dict:
    bodies = [{"model": models[i % len(models)], "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
               "prompt": f"Describe {TOPICS[i % len(TOPICS)]} in detail (request {i})."}
              for i in range(args.concurrency)]
    return (await post_all(f"{url}/v1/completions", bodies))[0]


def offline(args: argparse.Namespace, paths: list[Path]) -> list[dict]:
    """The same batches through ``LLM.generate`` in this process: the engine alone, without the server."""
    import torch

    from loom import LLM, LoRARequest, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM("smollm2", enable_lora=True, max_loras=len(paths), max_lora_rank=args.rank,
              max_num_seqs=max(32, args.concurrency))
    adapters = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    prompts = [f"Describe {TOPICS[i % len(TOPICS)]} in detail (request {i})." for i in range(args.concurrency)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def run(loras) -> dict:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}

    run(adapters[:1] * len(prompts))  # warm-up
    mixed = [adapters[i % len(adapters)] for i in range(len(prompts))]
    return alternate(args.rounds, {"base": lambda: run(None), "adapters": lambda: run(mixed)})


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser(__doc__, out="results/lora.json")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--offline", action="store_true", help="run the engine in this process (LLM.generate)")
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="loom-lora-bench-") as tmp:
        paths = make_adapters(Path(tmp), args.adapters, args.rank)
        names = [f"adapter{i}" for i in range(args.adapters)]
        if args.offline:
            return report(args, offline(args, paths))
        cmd = serve_command(port, args, "--enable-lora", "--max-loras", str(args.adapters), "--max-lora-rank",
                            str(args.rank), "--lora-modules", *[f"{n}={p}" for n, p in zip(names, paths)])
        with start_server(cmd, url, timeout=300):
            asyncio.run(batch(url, argparse.Namespace(**{**vars(args), "concurrency": 4}), names))  # warm-up
            rounds = alternate(args.rounds, {"base": lambda: asyncio.run(batch(url, args, ["smollm2"])),
                                             "adapters": lambda: asyncio.run(batch(url, args, names))})
    return report(args, rounds)


def report(args: argparse.Namespace, rounds: list[dict]) -> int:
    summary = ab_summary(args, rounds, "base", "adapters")
    where = "offline (LLM.generate)" if args.offline else "loom serve"
    print(f"lora bench, {where}, c={args.concurrency}, {args.max_tokens} tokens each: {args.adapters} adapters (rank "
          f"{args.rank}) mixed {summary['adapters_tokens_per_s']:.1f} vs base {summary['base_tokens_per_s']:.1f} "
          f"output tok/s ({summary['ratio']:.2f}x, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
