"""Ask the exported model held-out questions through Loom's own engine (``loom.LLM``, what ``loom serve`` runs).

    python scripts/finetune_serve_check.py --model out/ --data eval.jsonl --num 20

It sends each record's conversation (without the reference answer) through ``LLM.chat`` — the model folder's own
chat template, greedy, stopping at EOS — and prints the exact-match rate and a few answers.
"""

from __future__ import annotations

import argparse
import os

from loom.finetune.formats import load_records, to_messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the exported folder (loom finetune --output)")
    parser.add_argument("--data", required=True, help="held-out records with reference answers")
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--show", type=int, default=4, help="answers to print")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from loom import LLM, SamplingParams

    records = load_records(args.data)[: args.num]
    conversations = [to_messages(r) for r in records]
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
    refs = [c[len(p)]["content"] for c, p in zip(conversations, prompts)]
    llm = LLM(model=args.model, dtype="float32")
    outputs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    answers = [o.outputs[0].text.strip() for o in outputs]
    correct = sum(a == r.strip() for a, r in zip(answers, refs))
    for prompt, answer, ref in list(zip(prompts, answers, refs))[: args.show]:
        print(f"Q: {prompt[-1]['content']!r}\n   loom: {answer!r}  reference: {ref!r}")
    print(f"loom engine on {args.model}: exact match {correct}/{len(records)} = {correct / max(1, len(records)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
