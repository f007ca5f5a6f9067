"""Instruction data formats: Alpaca, OpenAI ``messages`` and ShareGPT ``conversations``, read into chat messages.

Every record becomes a list of ``{"role": "system"|"user"|"assistant", "content": str}``; the template module turns
those into token ids and labels. Files are JSON (a list of records) or JSONL (one record a line); a malformed line or
record raises ``DataError`` naming the file and the line::

    records = load_records("train.jsonl")          # list[dict], the records as written
    messages = to_messages(records[0])               # list[dict], normalised chat messages
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A record that cannot be used, with the file and line it came from."""


def load_records(path: str | Path) -> list[dict]:
    """Read a JSON list or a JSONL file of records; each record gets ``_where`` = "file:line" for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass a JSON or JSONL file of records")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _load_json_list(path, text)
    return _load_jsonl(path, text)


def _load_json_list(path: Path, text: str) -> list[dict]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); the file must be one JSON list") from None
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is {type(item).__name__}, expected an object with the record's fields")
        records.append({**item, "_where": f"{path}:item {i}"})
    return records


def _load_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(item, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
        records.append({**item, "_where": f"{path}:{lineno}"})
    return records


def detect_format(record: dict) -> str:
    """"alpaca", "openai" or "sharegpt", from the record's keys."""
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    keys = sorted(k for k in record if not k.startswith("_"))
    raise DataError(
        f"{where(record)}: unknown record format (keys {keys}); use Alpaca (instruction, input, output), "
        "OpenAI (messages) or ShareGPT (conversations)"
    )


def where(record: dict) -> str:
    return record.get("_where", "<record>")


def to_messages(record: dict, input_joiner: str = "\n\n") -> list[dict]:
    """Normalise one record to chat messages; Alpaca's ``input`` follows the instruction after ``input_joiner``."""
    fmt = detect_format(record)
    if fmt == "alpaca":
        messages = _alpaca_messages(record, input_joiner)
    elif fmt == "openai":
        messages = _openai_messages(record)
    else:
        messages = _sharegpt_messages(record)
    _check_messages(record, messages)
    return messages


def _alpaca_messages(record: dict, input_joiner: str) -> list[dict]:
    instruction, context, output = record["instruction"], record.get("input") or "", record["output"]
    for name, value in (("instruction", instruction), ("input", context), ("output", output)):
        if not isinstance(value, str):
            raise DataError(f"{where(record)}: field {name!r} must be a string, got {type(value).__name__}")
    user = instruction + (input_joiner + context if context else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(record.get("system"), str) and record["system"]:
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def _openai_messages(record: dict) -> list[dict]:
    items = record["messages"]
    if not isinstance(items, list):
        raise DataError(f"{where(record)}: 'messages' must be a list of {{role, content}} objects")
    messages = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where(record)}: messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}"
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _sharegpt_messages(record: dict) -> list[dict]:
    items = record["conversations"]
    if not isinstance(items, list):
        raise DataError(f"{where(record)}: 'conversations' must be a list of {{from, value}} objects")
    messages = []
    for i, m in enumerate(items):
        role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
        if role is None or not isinstance(m.get("value"), str):
            raise DataError(
                f"{where(record)}: conversations[{i}] must be {{'from': one of {sorted(SHAREGPT_ROLES)}, "
                f"'value': str}}, got {m!r}"
            )
        messages.append({"role": role, "content": m["value"]})
    return messages


def _check_messages(record: dict, messages: list[dict]) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where(record)}: the record has no assistant turn, so nothing to learn; add a response")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where(record)}: the conversation starts with an assistant turn; start with a user turn")


def as_messages(value, record: dict, name: str, default_role: str) -> list[dict]:
    """A record field that holds a string (one turn of ``default_role``) or a list of {role, content} messages, checked
    and copied to plain messages (preference pairs' sides, GRPO prompts)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where(record)}: {name!r} must be a string or a non-empty list of {{role, content}} "
                        f"messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where(record)}: {name}[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}, "
                            f"got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]
