"""The demo dataset: deterministic, held-out split disjoint from train, every answer checkable from its prompt."""

from __future__ import annotations

import re

import pytest

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


def test_tasks_can_be_chosen(tmp_path):
    train, held_out = generate(6, 3, seed=1, tasks=("year", "sort"))
    assert [r["task"] for r in train] == ["year", "sort"] * 3 and {r["task"] for r in held_out} == {"year", "sort"}
    assert main(["--out", str(tmp_path), "--train", "4", "--eval", "2", "--tasks", "year"]) == 0
    assert {r for r in (tmp_path / "train.jsonl").read_text().splitlines() if '"task": "year"' not in r} == set()
    with pytest.raises(ValueError, match="unknown tasks"):
        generate(2, 2, tasks=("poetry",))


def test_dpo_pairs_prefer_the_bare_right_answer_and_style_is_checkable():
    from scripts.dpo_demo_data import generate_pairs, style_of

    train, held_out = generate_pairs(120, 40, seed=3)
    assert (train, held_out) == generate_pairs(120, 40, seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for pair in train + held_out:
        assert style_of(pair["chosen"], pair["chosen"]) == {"concise": True, "correct": True}
        assert style_of(pair["rejected"], pair["chosen"])["concise"] is False  # every rejected answer is chatty
    sorts = [p for p in train if p["task"] == "sort"]
    wrong = sum(re.findall(r"\d+", p["rejected"]) != p["chosen"].split() for p in sorts)
    assert 0.15 < wrong / len(sorts) < 0.6  # about a third of the rejected answers are also wrong
    assert style_of("The year 1930.", "1930") == {"concise": False, "correct": False}
    assert style_of("1930.", "1930") == {"concise": True, "correct": True}
    assert style_of("1931", "1930") == {"concise": True, "correct": False}
    assert style_of("4, 9, 12", "4 9 12") == {"concise": True, "correct": True}
