"""A Responses answer's output items, and the events that build them from the chat route's stream deltas
(``ResponseEvents``): one item open at a time, reasoning, a message or a function call, each opened, filled in pieces
and closed with OpenAI's event types. ``responses.py`` numbers and frames the events, or keeps only the last one.
"""

from __future__ import annotations

import uuid

from loom.entrypoints.openai.logprobs import TokenStrings


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"id": rid, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def message_item(mid: str, text: str, logprobs: list[dict], status: str = "completed") -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": [part]}


def call_item(fid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": fid, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


Event = tuple[str, dict]
"""An event's type and its fields (``_stream`` numbers and frames it)."""


class ResponseEvents:
    """An answer's chat deltas (``ChoiceStream.feed``) -> Responses events; ``output`` holds the items finished so
    far. One item is open at a time: reasoning, a message, or a function call.

    NOTE: log-probabilities go with the text they made, step by step: a step whose delta has message text gives its
    tokens to it; one that sends nothing while no item or the message is open holds them for the next text (a
    possible stop string, a tag's start) or the message's end (its end token); thinking, a call, or a step that sends
    nothing inside them, drops them with what was held. Deltas merged for a slow reader are one step here.
    """

    def __init__(self, strings: TokenStrings | None, top: int = 0):
        self.output: list[dict] = []
        self._strings, self._top = strings, top
        self._open: dict | None = None
        self._logprobs: list[dict] = []  # of tokens not yet given to a message text
        self._blank = ""  # whitespace content not yet sent: a message only if something else follows it

    def feed(self, delta: dict, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[Event]:
        entries = (self._strings.chat_entries(token_ids, logprobs, self._top)
                   if self._strings is not None and logprobs is not None else [])
        if delta.get("content"):
            self._logprobs += entries  # given to the message text below (or held with its leading whitespace)
        elif delta.get("reasoning_content") or delta.get("tool_calls"):
            self._logprobs = []  # thinking or a call's markup, with what was held back before it
        elif self._open is None or self._open["type"] == "message":
            self._logprobs += entries  # held back (a possible stop string or tag), or the end token
        events = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._content(delta["content"])
        for call in delta.get("tool_calls", ()):
            events += self._call(call)
        return events

    def close(self, cut: bool) -> list[Event]:
        """The last item's end (``incomplete`` where the output was ``cut``); the held whitespace (or an empty
        message) when the answer made no item at all."""
        events = self._text("message", self._blank) if not self.output and self._open is None else []
        return events + self._close("incomplete" if cut else "completed")

    @property
    def _index(self) -> int:
        return len(self.output)

    def _content(self, piece: str) -> list[Event]:
        if not (self._open is not None and self._open["type"] == "message") and not piece.strip():
            self._blank += piece
            return []
        piece, self._blank = self._blank + piece, ""
        return self._text("message", piece)

    def _text(self, kind: str, piece: str) -> list[Event]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close() + self._open_text(kind)
        item = self._open
        part = item["content"][0]
        part["text"] += piece
        where = {"item_id": item["id"], "output_index": self._index, "content_index": 0}
        if kind == "reasoning":
            return [*events, ("response.reasoning_text.delta", {**where, "delta": piece})]
        logprobs, self._logprobs = self._logprobs, []
        part["logprobs"] += logprobs
        return [*events, ("response.output_text.delta", {**where, "delta": piece, "logprobs": logprobs})]

    def _open_text(self, kind: str) -> list[Event]:
        if kind == "reasoning":
            self._open = reasoning_item(item_id("rs"), "", status="in_progress")
        else:
            self._open = message_item(item_id("msg"), "", [], status="in_progress")
        item = {**self._open, "content": []}
        part = {**self._open["content"][0]}
        return [("response.output_item.added", {"output_index": self._index, "item": item}),
                ("response.content_part.added", {"item_id": self._open["id"], "output_index": self._index,
                                                 "content_index": 0, "part": part})]

    def _call(self, call: dict) -> list[Event]:
        events = []
        function = call.get("function", {})
        if "id" in call:  # a new call: its first delta has the id and name
            events += self._close()
            self._open = call_item(item_id("fc"), call["id"], function["name"], "", status="in_progress")
            events.append(("response.output_item.added", {"output_index": self._index, "item": {**self._open}}))
        piece = function.get("arguments") or ""
        if piece:
            self._open["arguments"] += piece
            events.append(("response.function_call_arguments.delta",
                           {"item_id": self._open["id"], "output_index": self._index, "delta": piece}))
        return events

    def _close(self, status: str = "completed") -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        where = {"item_id": item["id"], "output_index": self._index}
        if item["type"] == "function_call":
            events = [("response.function_call_arguments.done",
                       {**where, "name": item["name"], "arguments": item["arguments"]})]
        else:
            part = item["content"][0]
            if item["type"] == "message":
                part["logprobs"] += self._logprobs  # the end token's
                self._logprobs = []
                done = ("response.output_text.done", {**where, "content_index": 0, "text": part["text"],
                                                       "logprobs": part["logprobs"]})
            else:
                done = ("response.reasoning_text.done", {**where, "content_index": 0, "text": part["text"]})
            events = [done, ("response.content_part.done", {**where, "content_index": 0, "part": part})]
        events.append(("response.output_item.done", {"output_index": self._index, "item": item}))
        self.output.append(item)
        return events
