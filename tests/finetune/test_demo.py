"""The demo dataset: deterministic, held-out split disjoint from train, every answer checkable from its prompt."""

from __future__ import annotations

import re

from scripts.finetune_demo_data import TASKS, generate, main


def check(record: dict) -> bool:
    task, text, answer = record["task"], record["input"], record["output"]
    if task == "sort":
        return answer.split() == [str(n) for n in sorted(map(int, text.split()))]
    if task == "reverse":
        return answer.split() == text.split()[::-1]
    if task == "year":
        return re.search(r"\b(1[6-9]\d\d|20[0-2]\d)\b", text).group(0) == answer
    a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", record["instruction"]).groups()
    return int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_generate_is_deterministic_disjoint_and_checkable():
    train, held_out = generate(200, 40, seed=3)
    assert (train, held_out) == generate(200, 40, seed=3)
    assert generate(200, 40, seed=4)[0] != train
    keys = {(r["instruction"], r["input"]) for r in train}
    assert not keys & {(r["instruction"], r["input"]) for r in held_out}
    assert len(keys) == 200
    assert {r["task"] for r in held_out} == set(TASKS)
    assert all(check(r) for r in train + held_out)


def test_main_writes_jsonl(tmp_path):
    assert main(["--out", str(tmp_path), "--train", "8", "--eval", "4"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 8
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 4
