"""Incremental detokenization that never emits half a UTF-8 character, plus stop-string matching on text.

Each step decodes only a short window (a few tokens of context before the new ones): decoding from the context
start gives the right spacing, and a trailing U+FFFD means a multi-byte character is still incomplete, so the
text is held back until the next token completes it; an output that ends inside a character gets the held-back
text when it finishes (``detokenize_flush``), so the streamed deltas always add up to the final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DetokState:
    prefix_offset: int
    read_offset: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    """Prompt tail + outputs: only the window that decoding needs."""


class FastDecode:
    """``tokenizer.decode`` for the detokenizer's windows, straight through the Rust tokenizer of a fast HF tokenizer
    when transformers would add nothing to it (no clean-up of tokenization spaces): a step decodes two windows per
    sequence, and transformers' Python wrapper around each call cost more than the decode (~5 of ~9 us). Any other
    tokenizer goes through its own ``decode``."""

    __slots__ = ("tokenizer", "backend")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        plain = not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self.backend = backend if plain and hasattr(backend, "decode") else None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def new_state(prompt_token_ids: list[int], context: int = 5) -> DetokState:
    tail = prompt_token_ids[-context:]
    return DetokState(prefix_offset=0, read_offset=len(tail), token_ids=list(tail))


def detokenize_next(tokenizer, state: DetokState, token_id: int, skip_special_tokens: bool) -> str:
    """Append one token and return the text it completes (possibly "")."""
    state.token_ids.append(token_id)
    ids = state.token_ids
    prefix = tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=skip_special_tokens)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    delta = full[len(prefix) :]
    state.text += delta
    state.prefix_offset, state.read_offset = state.read_offset, len(ids)
    if state.prefix_offset > 64:  # keep the window short
        drop = state.prefix_offset
        state.token_ids = ids[drop:]
        state.prefix_offset, state.read_offset = 0, state.read_offset - drop
    return delta


def detokenize_flush(tokenizer, state: DetokState, skip_special_tokens: bool) -> str:
    """At the end of an output: the text still held back (tokens that end inside a UTF-8 character decode to U+FFFD,
    as a full decode gives them), appended to ``state.text`` and returned ("" when nothing is pending)."""
    ids = state.token_ids
    if state.read_offset >= len(ids):
        return ""
    prefix = tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=skip_special_tokens)
    delta = full[len(prefix) :] if full.startswith(prefix) else ""
    state.text += delta
    state.prefix_offset, state.read_offset = state.read_offset, len(ids)
    return delta


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[str, int] | None:
    """The first stop string that ends inside the newest ``delta_len`` characters: (stop, its start index)."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best
