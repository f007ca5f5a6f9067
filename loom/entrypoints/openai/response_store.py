"""Stored responses (``store: true``, the Responses API's default): what ``previous_response_id``,
``GET /v1/responses/{id}`` and its ``input_items`` read.

Kept in this process's memory, newest last, bounded twice: at most ``max_responses`` of them
(``--max-stored-responses``) and about ``max_chars`` characters of conversation in all; the oldest go first. A server
restart forgets them all. A response's conversation is the messages its prompt was made of (without its
``instructions``, which OpenAI does not carry over) and its answer as an assistant message: the next turn's history.

    store = ResponseStore(max_responses=256)
    store.put(StoredResponse(body, conversation, input_items))
    store.get(response_id)     # None once dropped, deleted or never stored
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from loom.entrypoints.openai.protocol import ChatMessage

DEFAULT_STORED_RESPONSES = 256
MAX_STORED_CHARS = 1 << 26
"""Characters of stored conversations, all responses together (64 Mi: a few hundred MB of Python strings at most)."""


@dataclass(slots=True)
class StoredResponse:
    body: dict
    """The response object, as ``GET /v1/responses/{id}`` returns it."""
    conversation: list[ChatMessage]
    input_items: list[dict]
    """The request's ``input`` as items with ids (``GET /v1/responses/{id}/input_items``)."""
    num_chars: int = field(default=0)

    @property
    def id(self) -> str:
        return self.body["id"]

    def __post_init__(self) -> None:
        self.num_chars = sum(_chars(m) for m in self.conversation)


def _chars(message: ChatMessage) -> int:
    content = message.content if isinstance(message.content, str) else ""
    calls = sum(len(c.function.name) + len(c.function.arguments) for c in message.tool_calls or [])
    return len(content) + calls


class ResponseStore:
    def __init__(self, max_responses: int, max_chars: int = MAX_STORED_CHARS):
        if max_responses < 0:
            raise ValueError(f"max_responses must be >= 0, got {max_responses}")
        self.max_responses = max_responses
        self.max_chars = max_chars
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._num_chars = 0

    @property
    def enabled(self) -> bool:
        return self.max_responses > 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        """Keep ``stored`` (newest); drop the oldest past either bound. One larger than ``max_chars`` alone is not
        kept."""
        if not self.enabled or stored.num_chars > self.max_chars:
            return
        self.delete(stored.id)
        self._responses[stored.id] = stored
        self._num_chars += stored.num_chars
        while len(self._responses) > self.max_responses or self._num_chars > self.max_chars:
            _, oldest = self._responses.popitem(last=False)
            self._num_chars -= oldest.num_chars

    def get(self, response_id: str) -> StoredResponse | None:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self._num_chars -= stored.num_chars
        return True
