"""Stored responses (``store: true``, the Responses API's default): what ``previous_response_id``,
``GET /v1/responses/{id}`` and its ``input_items`` read.

Kept in this process's memory, newest last, bounded twice: at most ``max_responses`` of them
(``--max-stored-responses``) and ``max_bytes`` in all (each counted as its JSON and its conversation's text: the
answer's log-probabilities, a client's tools and input items included); the oldest go first. A server
restart forgets them all. A response's conversation is the messages its prompt was made of (without its
``instructions``, which OpenAI does not carry over) and its answer as an assistant message: the next turn's history.

    store = ResponseStore(max_responses=256)
    store.put(StoredResponse(body, conversation, input_items))
    store.get(response_id)     # None once dropped, deleted or never stored
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson

from loom.entrypoints.openai.protocol import ChatMessage

DEFAULT_STORED_RESPONSES = 256
MAX_STORED_BYTES = 1 << 26
"""Stored responses' size, all together (64 MiB of JSON and text; their Python objects take a few times that)."""


@dataclass(slots=True)
class StoredResponse:
    body: dict
    """The response object, as ``GET /v1/responses/{id}`` returns it."""
    conversation: list[ChatMessage]
    input_items: list[dict]
    """The request's ``input`` as items with ids (``GET /v1/responses/{id}/input_items``)."""
    num_bytes: int = field(default=0)

    @property
    def id(self) -> str:
        return self.body["id"]

    def __post_init__(self) -> None:
        self.num_bytes = (len(orjson.dumps(self.body)) + len(orjson.dumps(self.input_items))
                          + sum(_chars(m) for m in self.conversation))


def _chars(message: ChatMessage) -> int:
    content = message.content if isinstance(message.content, str) else ""
    if isinstance(message.content, list):  # text and image parts (an image's data: URL counts whole)
        content = "".join(p.text if p.type == "text" else p.image_url.url for p in message.content)
    calls = sum(len(c.function.name) + len(c.function.arguments) for c in message.tool_calls or [])
    return len(content) + calls


class ResponseStore:
    def __init__(self, max_responses: int, max_bytes: int = MAX_STORED_BYTES):
        if max_responses < 0:
            raise ValueError(f"max_responses must be >= 0, got {max_responses}")
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._num_bytes = 0
        self.tasks: dict[str, asyncio.Task] = {}
        """Background responses being made, by id (``POST /v1/responses/{id}/cancel`` stops them)."""

    @property
    def enabled(self) -> bool:
        return self.max_responses > 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        """Keep ``stored`` (newest); drop the oldest past either bound. One larger than ``max_bytes`` alone is not
        kept."""
        if not self.enabled or stored.num_bytes > self.max_bytes:
            return
        self.delete(stored.id)
        self._responses[stored.id] = stored
        self._num_bytes += stored.num_bytes
        while len(self._responses) > self.max_responses or self._num_bytes > self.max_bytes:
            # background responses being made stay (they can still be read and cancelled)
            oldest = next((rid for rid in self._responses if rid not in self.tasks), None)
            if oldest is None:
                break
            self._num_bytes -= self._responses.pop(oldest).num_bytes

    def get(self, response_id: str) -> StoredResponse | None:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self._num_bytes -= stored.num_bytes
        return True
