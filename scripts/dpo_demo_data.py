"""Deterministic, offline preference pairs for the DPO demo: the SFT demo's four tasks, where the preferred answer is
the bare answer the instruction asks for and the rejected one is the chatty style small instruct models fall into
("The numbers are 45, 50, 65." / "To solve this problem, ...") — and in a third of the pairs also wrong.

Which answer is preferred is checkable on greedy output: ``concise`` (no more words than the answer asked for) and
``correct`` (exact match), see ``style_of``. Held-out pairs never repeat a training prompt::

    python scripts/dpo_demo_data.py --out data/ --train 480 --eval 100     # writes train.jsonl and eval.jsonl
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scripts.finetune_demo_data import generate, write_jsonl  # noqa: E402


def prompt_of(record: dict) -> str:
    """The user turn, as the SFT demo's Alpaca records render (instruction, blank line, input)."""
    return record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")


def wrong_answer(record: dict, rng: random.Random) -> str:
    """A subtly wrong answer of the right shape: two items swapped, a year or a sum off by a little."""
    answer = record["output"]
    if record["task"] in ("sort", "reverse"):
        items = answer.split()
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return " ".join(items)
    return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))


CHATTY = {
    "sort": ("The numbers are {commas}.", "Sure! Sorted in ascending order, the numbers are: {commas}.",
             "Here are the numbers sorted from smallest to largest:\n\n{bullets}"),
    "reverse": ("The words in reverse order are:\n\n{bullets}", "Here are the words reversed: {commas}.",
                "Sure! Reversing the order of the words gives: {answer}."),
    "year": ("According to the sentence, it happened in the year {answer}.", "The year {answer}.",
             "This happened in {answer}, as the sentence says."),
    "arithmetic": ("To solve this problem, we compute the result step by step. The answer is {answer}.",
                   "The answer is {answer}.", "Sure! Let me calculate that for you: the result is {answer}."),
}


def chatty(record: dict, answer: str, rng: random.Random) -> str:
    items = answer.split()
    return rng.choice(CHATTY[record["task"]]).format(
        answer=answer, commas=", ".join(items), bullets="\n".join(f"- {x}" for x in items))


def to_pair(record: dict, rng: random.Random) -> dict:
    answer = wrong_answer(record, rng) if rng.random() < 1 / 3 else record["output"]
    return {"task": record["task"], "prompt": prompt_of(record), "chosen": record["output"],
            "rejected": chatty(record, answer, rng)}


def generate_pairs(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    train, held_out = generate(num_train, num_eval, seed)
    rng = random.Random(seed + 1)
    return [to_pair(r, rng) for r in train], [to_pair(r, rng) for r in held_out]


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text).split()


def style_of(answer: str, expected: str) -> dict[str, bool]:
    """``concise``: no more words than the expected answer (punctuation ignored); ``correct``: the same words."""
    words = _words(answer)
    return {"concise": len(words) <= len(_words(expected)), "correct": words == _words(expected)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=480, help="training pairs")
    parser.add_argument("--eval", type=int, default=100, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = generate_pairs(args.train, args.eval, args.seed)
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held_out, out / "eval.jsonl")
    print(f"wrote {len(train)} training and {len(held_out)} held-out preference pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
