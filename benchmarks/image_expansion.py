"""What prompt expansion does on the Fashion-MNIST demo model, and what it costs.

    nice -n 10 .venv/bin/python benchmarks/image_expansion.py          # CPU; ~2 minutes on 2 cores

Agreement: the demo's evaluation (``scripts/train_image_demo.py``: its cached Fashion-MNIST classifier judges
``--per-class`` images for each of the 10 class prompts, seeds 1000 * (class + 1) + i, ``--steps`` steps of the Speed
preset's sampler, CFG 4) run twice on the same seeds, with ``expansion`` off and on (SmolLM2 through Loom's LLM engine,
the packaged expander); the figure is the share of images the classifier puts in the prompted class.

Cost: the median seconds of expanding one job's prompts (5 images, one LLM batch) against the median seconds of one
sampler step of the same job on the demo model (a 32x32 toy: its step is far cheaper than an SD step, so this ratio
is an upper bound of what expansion costs in steps of a real model on the same machine).

Prints one summary line; writes results/image_expansion.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def agreement(engine, classifier, per_class: int, steps: int, expansion: bool, log) -> tuple[float, list[dict]]:
    from loom.image.request import ImageRequest
    from scripts.train_image_demo import CLASS_PROMPTS, classify, generated_to_classifier_input

    hits, rows = 0, []
    for label, prompt in enumerate(CLASS_PROMPTS):
        images, prompts = [], []
        for first in range(0, per_class, 5):
            n = min(5, per_class - first)
            req = ImageRequest(prompt=prompt, seed=1000 * (label + 1) + first, steps=steps, guidance=4.0,
                               num_images=n, expansion=expansion)
            result = engine.generate(req)
            images += result.images
            prompts += [s["final_prompt"] for s in result.settings]
        correct = int((classify(classifier, generated_to_classifier_input(images)) == label).sum())
        hits += correct
        rows.append({"prompt": prompt, "correct": correct, "of": per_class, "example": prompts[0]})
        log(f"  expansion {'on ' if expansion else 'off'} {prompt!r}: {correct}/{per_class}  e.g. {prompts[0]!r}")
    return hits / (per_class * len(CLASS_PROMPTS)), rows


def cost(engine, repeats: int, steps: int) -> dict:
    """Median seconds to expand one 5-image job's prompts vs one sampler step of that job."""
    from loom.image.request import ImageRequest

    expand_s, step_s = [], []
    for i in range(repeats):
        seeds = [100 + 5 * i + k for k in range(5)]
        t0 = time.perf_counter()
        engine.expander.expand(["a sneaker"] * 5, seeds)
        expand_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.generate(ImageRequest(prompt="a sneaker", seed=seeds[0], steps=steps, num_images=5))
        step_s.append((time.perf_counter() - t0) / steps)
    return {"expand_s": statistics.median(expand_s), "step_s": statistics.median(step_s),
            "expand_over_step": statistics.median(expand_s) / statistics.median(step_s)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from loom.image.engine import ImageEngine
    from scripts.train_image_demo import cached_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--expansion-model", default="smollm2")
    parser.add_argument("--out", default=str(ROOT / "results" / "image_expansion.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)  # noqa: E731

    engine = ImageEngine.load("demo", device="cpu", upscaler=None, expansion=args.expansion_model)
    classifier = cached_classifier(log)
    off, rows_off = agreement(engine, classifier, args.per_class, args.steps, False, log)
    on, rows_on = agreement(engine, classifier, args.per_class, args.steps, True, log)
    timing = cost(engine, args.repeats, args.steps)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "per_class": args.per_class, "steps": args.steps,
        "expansion_model": args.expansion_model, "agreement_without": off, "agreement_with": on,
        "per_prompt_without": rows_off, "per_prompt_with": rows_on, "demo_cost": timing,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"image_expansion: demo classifier agreement {off:.1%} without expansion, {on:.1%} with; expanding a "
          f"5-image job {timing['expand_s'] * 1000:.0f} ms = {timing['expand_over_step']:.1f} demo sampler steps "
          f"({timing['step_s'] * 1000:.1f} ms each); {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
