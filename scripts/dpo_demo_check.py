"""Does the tuned model answer in the preferred style? Greedy answers of the base and the tuned model, side by side.

    python scripts/dpo_demo_check.py --base smollm2 --tuned out/ --data eval.jsonl --num 100

Both models run through Loom's own engine (``loom.LLM``, what ``loom serve`` runs) with their own chat templates,
greedy, on the held-out preference prompts. Prints the share of answers in the chosen style (``concise``: no more
words than the answer asked for) and exactly right, base vs tuned, one summary line, and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from loom.finetune.formats import load_records  # noqa: E402
from scripts.dpo_demo_data import style_of  # noqa: E402


def greedy_answers(model: str, prompts: list[str], max_tokens: int) -> list[str]:
    from loom import LLM, SamplingParams  # local: starts the engine (and torch) only when run

    llm = LLM(model)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].text.strip() for o in outputs]


def score(answers: list[str], records: list[dict]) -> dict:
    styles = [style_of(a, r["chosen"]) for a, r in zip(answers, records)]
    return {"concise": sum(s["concise"] for s in styles) / len(styles),
            "correct": sum(s["correct"] for s in styles) / len(styles)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2", help="the model before tuning (catalogue name or folder)")
    parser.add_argument("--tuned", required=True, help="the exported folder (loom finetune --output)")
    parser.add_argument("--data", required=True, help="held-out preference pairs")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--show", type=int, default=4, help="answers to print")
    parser.add_argument("--out", help="write the figures and answers here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    records = load_records(args.data)[: args.num]
    prompts = [r["prompt"] for r in records]
    answers = {name: greedy_answers(model, prompts, args.max_tokens)
               for name, model in (("base", args.base), ("tuned", args.tuned))}
    result = {name: score(a, records) for name, a in answers.items()}
    for r, base, tuned in list(zip(records, answers["base"], answers["tuned"]))[: args.show]:
        print(f"[{r['task']}] expected {r['chosen']!r}\n  base:  {base!r}\n  tuned: {tuned!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "num": len(records), "answers": answers}, indent=2))
    print(f"dpo demo, greedy answers on {len(records)} held-out prompts: chosen style (concise) "
          f"base {result['base']['concise']:.2f} -> tuned {result['tuned']['concise']:.2f}; "
          f"exactly right base {result['base']['correct']:.2f} -> tuned {result['tuned']['correct']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
