"""Data formats: Alpaca, OpenAI messages and ShareGPT normalise to the same chat messages; bad lines name file:line."""

from __future__ import annotations

import json

import pytest

from loom.finetune.formats import DataError, detect_format, load_records, to_messages


def test_alpaca_joins_instruction_and_input():
    record = {"instruction": "Sort.", "input": "3 1 2", "output": "1 2 3"}
    assert to_messages(record) == [
        {"role": "user", "content": "Sort.\n\n3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0] == {"role": "user", "content": "Hi"}


def test_sharegpt_and_openai_agree():
    openai = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert detect_format(openai) == "openai" and detect_format(sharegpt) == "sharegpt"
    assert to_messages(openai) == to_messages(sharegpt)


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"data\.jsonl:4: invalid JSON"):
        load_records(path)


def test_json_list_and_where(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"foo": 1}]))
    records = load_records(path)
    assert records[0]["_where"].endswith("data.json:item 0")
    with pytest.raises(DataError, match=r"data\.json:item 1: unknown record format"):
        to_messages(records[1])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]"),
        ({"conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\]"),
        ({"instruction": "a", "output": 5}, "'output' must be a string"),
    ],
)
def test_bad_records_say_what_is_wrong(record, message):
    with pytest.raises(DataError, match=message):
        to_messages({**record, "_where": "f.jsonl:7"})


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
