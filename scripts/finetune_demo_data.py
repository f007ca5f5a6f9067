"""A deterministic, offline demo dataset of instruction records with checkable answers and a held-out split.

Four synthetic tasks (Alpaca records with a ``task`` field): sort numbers, reverse the words, extract the year from
a sentence that also holds a distracting number, and two-digit arithmetic. The same seed always writes the same
files; held-out records never repeat a training prompt::

    python scripts/finetune_demo_data.py --out data/ --train 2000 --eval 120     # writes train.jsonl and eval.jsonl
    python scripts/finetune_demo_data.py --out data/ --mc 200                    # also mc.jsonl (multiple choice)

``--mc N`` adds N multiple-choice questions from the same tasks (the answer and 3 plausible wrong ones, prompts
disjoint from both splits) for ``loom.finetune.mc_eval``; it leaves train.jsonl and eval.jsonl as they are.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window candle forest silver dragon pencil mirror ocean ladder rabbit "
    "tiger violin castle lemon orange rocket planet bottle jacket carpet valley winter summer island harbor "
    "meadow basket button camera desert engine feather glove hammer kettle lantern marble needle pillow "
    "puzzle saddle teacup tunnel wagon yellow zebra anchor bridge cactus dolphin falcon guitar helmet igloo "
    "jungle koala lizard magnet nectar olive parrot quartz radish salmon tomato umbrella velvet walnut"
).split()
NAMES = "Alice Bruno Chen Dara Elena Farid Grace Hugo Ines Jonas Kofi Lena Mateo Nadia Omar Priya".split()
PLACES = "Lisbon Oslo Nairobi Lima Kyoto Dublin Quebec Tunis Perth Krakow Bergen Porto Accra Hanoi".split()
THINGS = "library bridge museum lighthouse railway school theatre harbour tower hospital observatory".split()
YEAR_SENTENCES = (
    "The {thing} in {place} was completed in {year} by a crew of {n} workers.",
    "In {year}, {name} moved to {place} with {n} boxes of books.",
    "{name} was born in {place} in {year} and grew up with {n} cousins.",
    "After {n} months of delays, the {thing} in {place} opened in {year}.",
    "{name} bought {n} paintings in {place} during {year}.",
    "The old {thing} of {place}, home to {n} cats, closed its doors in {year}.",
)
TASKS = ("sort", "reverse", "year", "arithmetic")


def sort_record(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    return {
        "task": "sort",
        "instruction": "Sort these numbers in ascending order. Reply with the numbers separated by spaces.",
        "input": " ".join(map(str, numbers)),
        "output": " ".join(map(str, sorted(numbers))),
    }


def reverse_record(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "task": "reverse",
        "instruction": "Reverse the order of these words. Reply with the words only.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def year_record(rng: random.Random) -> dict:
    year = rng.randint(1620, 2024)
    sentence = rng.choice(YEAR_SENTENCES).format(
        thing=rng.choice(THINGS), place=rng.choice(PLACES), name=rng.choice(NAMES), year=year, n=rng.randint(2, 90)
    )
    return {
        "task": "year",
        "instruction": "In which year did this happen? Answer with the year only.",
        "input": sentence,
        "output": str(year),
    }


def arithmetic_record(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        question, answer = f"What is {a} + {b}?", a + b
    else:
        a, b = max(a, b), min(a, b)
        question, answer = f"What is {a} - {b}?", a - b
    return {"task": "arithmetic", "instruction": f"{question} Answer with the number only.", "input": "",
            "output": str(answer)}


MAKERS = {"sort": sort_record, "reverse": reverse_record, "year": year_record, "arithmetic": arithmetic_record}


def generate(num_train: int, num_eval: int, seed: int = 0,
             tasks: tuple[str, ...] | None = None) -> tuple[list[dict], list[dict]]:
    """Round-robin over the tasks (all, or ``tasks``); the held-out split comes after, skipping any prompt already in
    train."""
    if num_train <= 0 or num_eval <= 0:
        raise ValueError(f"num_train and num_eval must be positive, got {num_train} and {num_eval}")
    tasks = tuple(tasks or TASKS)
    unknown = [t for t in tasks if t not in MAKERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the tasks are {list(MAKERS)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    splits: list[list[dict]] = [[], []]
    for split, size in ((0, num_train), (1, num_eval)):
        while len(splits[split]) < size:
            record = MAKERS[tasks[len(splits[split]) % len(tasks)]](rng)
            key = (record["instruction"], record["input"])
            if key in seen:
                continue
            seen.add(key)
            splits[split].append(record)
    return splits[0], splits[1]


def _distractors(record: dict, rng: random.Random) -> list[str]:
    """Plausible wrong answers to a demo record, likeliest mistakes first."""
    task, answer = record["task"], record["output"]
    if task in ("sort", "reverse"):
        items = record["input"].split()
        right = answer.split()
        swaps = []
        for i in rng.sample(range(len(right) - 1), len(right) - 1):  # the right answer with two neighbours swapped
            swapped = list(right)
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            swaps.append(" ".join(swapped))
        backwards = sorted(items, key=int, reverse=True) if task == "sort" else items  # descending / not reversed
        return [" ".join(backwards), record["input"], *swaps]
    if task == "year":
        year = int(answer)
        others = [n for n in re.findall(r"\d+", record["input"]) if n != answer]  # the distracting number
        return [*others, *(str(year + d) for d in rng.sample([1, -1, 10, -10, 2, -2, 100, -100], 8))]
    a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", record["instruction"]).groups()
    other = int(a) - int(b) if op == "+" else int(a) + int(b)  # the other operation
    offsets = [1, -1, 10, -10, 2, -2, 3, -3, 5, -5, 11, -11, 20, -20]
    return [str(other), *(str(int(answer) + d) for d in rng.sample(offsets, len(offsets)) if int(answer) + d >= 0)]


def mc_record(record: dict, rng: random.Random, wrong: int = 3) -> dict:
    """A multiple-choice question from a demo record: its answer and ``wrong`` plausible wrong ones, shuffled.

    The question is the user turn the chat template gets in training (instruction, blank line, input). No choice is
    a prefix of another: without an EOS scored, a choice's prefix is always at least as likely as the choice.
    """
    choices = [record["output"]]
    for candidate in _distractors(record, rng):
        if len(choices) == wrong + 1:
            break
        if not any(candidate.startswith(c) or c.startswith(candidate) for c in choices):
            choices.append(candidate)
    if len(choices) != wrong + 1:
        raise ValueError(f"found only {len(choices) - 1} wrong answers for {record}")
    rng.shuffle(choices)
    question = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
    return {"task": record["task"], "question": question, "choices": choices, "answer": choices.index(record["output"])}


def generate_mc(num: int, seed: int = 0, exclude: Iterable[dict] = ()) -> list[dict]:
    """``num`` multiple-choice records, round-robin over the tasks, skipping the prompts of ``exclude`` (the
    train and held-out records); seeded on its own, so asking for them changes neither split."""
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    rng = random.Random(f"mc:{seed}")
    seen = {(r["instruction"], r["input"]) for r in exclude}
    records: list[dict] = []
    while len(records) < num:
        record = MAKERS[TASKS[len(records) % len(TASKS)]](rng)
        key = (record["instruction"], record["input"])
        if key in seen:
            continue
        seen.add(key)
        records.append({"id": f"mc-{len(records)}", **mc_record(record, rng)})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training records")
    parser.add_argument("--eval", type=int, default=120, help="held-out records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mc", type=int, default=0, help="also write this many multiple-choice questions to mc.jsonl")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {','.join(TASKS)}")
    args = parser.parse_args(argv)
    try:
        train, held_out = generate(args.train, args.eval, args.seed, tuple(t for t in args.tasks.split(",") if t))
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held_out, out / "eval.jsonl")
    print(f"wrote {len(train)} training and {len(held_out)} held-out records to {out}")
    if args.mc:
        mc = generate_mc(args.mc, args.seed, exclude=train + held_out)
        write_jsonl(mc, out / "mc.jsonl")
        print(f"wrote {len(mc)} multiple-choice questions to {out / 'mc.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
