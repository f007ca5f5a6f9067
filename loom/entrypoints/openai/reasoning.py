"""Reasoning outputs (``--reasoning-parser``, vLLM's flag): a thinking model's ``<think> ... </think>`` text goes to
the message's ``reasoning_content`` and what follows it to ``content`` (and to the tool parser), streamed as
``delta.reasoning_content`` then ``delta.content``.

    parser = REASONING_PARSERS["qwen3"]
    reasoning, content = parser.split("<think>\nThe user greets me.\n</think>\n\nHello!")
    # ("\nThe user greets me.\n", "\n\nHello!")

Two rules, after vLLM's parsers of the same names (one difference: an output cut off inside the block is reasoning
here in a whole answer too, where recent vLLM's qwen3 returns it as content, so a stream and the whole answer agree):

- ``qwen3`` — hybrid models whose output opens the block itself when they think (Qwen3, SmolLM3; with
  ``chat_template_kwargs: {"enable_thinking": false}`` their template closes an empty block in the prompt): an output
  that starts with ``<think>`` is reasoning up to ``</think>``; any other output is all content.
- ``deepseek_r1`` — models whose template opens the block in the prompt (DeepSeek-R1, Qwen3-*-Thinking-2507): the
  output is reasoning up to ``</think>`` (a leading ``<think>`` is dropped), content after it.

An output that ends (``max_tokens``) before ``</think>`` is all reasoning and has no content. A stream holds back the
characters that could be the start of a tag, so a tag is never split between the two fields, and the split of a
streamed output is the split of the whole one (one code path: ``split`` feeds the whole text to a stream).

- ``gpt_oss`` — the harmony format (``HarmonyParser``): the output is messages, each a header
  (``<|channel|>analysis``, ``<|start|>assistant<|channel|>final``, ...) then ``<|message|>`` and a body up to
  ``<|end|>`` / ``<|return|>`` / ``<|call|>``. The analysis channel's bodies are reasoning, the final channel's (and
  commentary addressed to no one: preambles the user is meant to see) content; the headers are neither. A message
  to a function (``to=functions.NAME``, its body the JSON arguments) joins the content as a hermes call,
  ``<tool_call>{"name": "NAME", "arguments": BODY}</tool_call>``, which ``--tool-call-parser openai`` returns as a
  tool call (streamed as its body arrives). An output without the format at all is content as it stands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from loom.engine.reasoning import DONE, OPEN, REASONING_TAGS


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    name: str
    start_in_output: bool
    """True (qwen3): only an output that opens with the start tag has reasoning. False (deepseek_r1): the template
    opened the block, so the output starts inside it (a start tag there is dropped)."""
    start: str = "<think>"
    end: str = "</think>"

    @property
    def markers(self) -> tuple[str, ...]:
        """The tags, which must stay in the decoded text (``skip_special_tokens`` off where they are special)."""
        return (self.start, self.end)

    def after_prompt(self, block: str | None) -> ReasoningParser | None:
        """The rule for an answer to a prompt that leaves the block ``block`` (``loom.engine.reasoning.prompt_block``,
        from the prompt's last tag): closed, the answer is all content (None: no split); opened, the answer starts
        inside it, whatever the parser's name says; no tag, the parser's own rule."""
        if block == DONE:
            return None
        if block == OPEN and self.start_in_output:
            return replace(self, start_in_output=False)
        return self

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a finished output; None where either is empty or absent (as vLLM answers)."""
        reasoning, content = self.stream().feed(text, final=True)
        return reasoning or None, content or None


class ReasoningStream:
    """One choice's text so far -> (new reasoning, content so far or None): ``feed`` is called with the whole text at
    every step; content starts after the end tag and is handed on whole (the tool parser takes text so far)."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self._begin: int | None = None  # where the reasoning starts in the text, once known
        self._sent = 0  # reasoning characters sent
        self._content: int | None = None  # where the content starts, once known

    def feed(self, text: str, final: bool = False) -> tuple[str, str | None]:
        p = self.parser
        if self._content is None and self._begin is None:
            if text.startswith(p.start):
                self._begin = len(p.start)
            elif p.start.startswith(text) and not final:
                return "", None  # could still become the start tag
            elif p.start_in_output:
                self._content = 0  # no reasoning block: all content
            else:
                self._begin = 0
        if self._content is None:
            end = text.find(p.end, self._begin)
            if end >= 0:
                self._content = end + len(p.end)
                upto = end
            else:
                upto = len(text) if final else len(text) - _partial_suffix(text, p.end, self._begin)
            piece = text[self._begin + self._sent:upto] if upto > self._begin + self._sent else ""
            self._sent += len(piece)
            if self._content is None:
                return piece, None
            return piece, text[self._content:]
        return "", text[self._content:]


def _partial_suffix(text: str, tag: str, begin: int) -> int:
    """Length of the longest end of ``text[begin:]`` that is a proper start of ``tag`` (held back from a stream)."""
    for n in range(min(len(tag) - 1, len(text) - begin), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")
"""The harmony format's special tokens (o200k_harmony's), which must stay in the text the parser reads."""
_BODY_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")


@dataclass(frozen=True, slots=True)
class HarmonyParser:
    """gpt-oss' channels as reasoning and content (the module docstring's ``gpt_oss``); the interface of
    ``ReasoningParser``."""

    name: str = "gpt_oss"

    @property
    def markers(self) -> tuple[str, ...]:
        return HARMONY_MARKERS

    def after_prompt(self, block: str | None) -> HarmonyParser | None:
        """A prompt that ends inside the final channel's header (``<|channel|>final<|message|>``): the answer is all
        content (None: no split); otherwise the messages are read."""
        return None if block == DONE else self

    def stream(self) -> HarmonyStream:
        return HarmonyStream()

    def split(self, text: str) -> tuple[str | None, str | None]:
        reasoning, content = self.stream().feed(text, final=True)
        return reasoning or None, content or None


class HarmonyStream:
    """One choice's text so far -> (new reasoning, content so far or None), as ``ReasoningStream``; the messages are
    read again from the start at each call (a header's end may arrive later than its start)."""

    def __init__(self):
        self._sent = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, str | None]:
        reasoning, content = _harmony(text, final)
        piece = reasoning[self._sent :]
        self._sent = len(reasoning)
        return piece, content


def _harmony(text: str, final: bool) -> tuple[str, str | None]:
    """(all reasoning, all content or None) of harmony text; unless ``final``, a body's last characters that could
    begin a marker are held back."""
    reasoning, content, pos = [], None, 0
    while (m := text.find("<|message|>", pos)) >= 0:
        channel, to = _header(text[pos:m])
        start = m + len("<|message|>")
        ends = [(i, tag) for tag in _BODY_ENDS if (i := text.find(tag, start)) >= 0]
        end, tag = min(ends) if ends else (len(text), None)
        body = text[start:end]
        if tag is None and not final:
            body = body[: len(body) - _marker_prefix(body)]
        if to is not None and to.startswith("functions."):
            call = f'<tool_call>{{"name": {json.dumps(to.removeprefix("functions."))}, "arguments": {body}'
            content = (content or "") + call + ("" if tag is None else "}</tool_call>")
        elif to is not None:
            pass  # a built-in tool's (browser.*, python): neither the user's answer nor a function call
        elif channel == "analysis":
            reasoning.append(body)
        elif channel in ("final", "commentary"):
            content = (content or "") + body
        if tag is None:
            break
        pos = end + (0 if tag == "<|start|>" else len(tag))
    if final and "<|message|>" not in text and not text.startswith(("<|channel|>", "<|start|>")):
        return "", text  # no harmony at all (not a header cut short): the text is the answer
    return "".join(reasoning), content


def _header(header: str) -> tuple[str | None, str | None]:
    """(channel, recipient) of a message header such as ``<|start|>assistant<|channel|>commentary to=functions.f
    <|constrain|>json``; the recipient may also stand before the channel."""
    def word_after(key: str) -> str | None:
        if key not in header:
            return None
        words = header.split(key, 1)[1].split("<|", 1)[0].split()
        return words[0] if words else None

    return word_after("<|channel|>"), word_after("to=")


def _marker_prefix(body: str) -> int:
    """Length of the end of ``body`` that could be the start of a harmony marker (held back from a stream)."""
    i = body.rfind("<")
    if i < 0 or len(body) - i > max(map(len, HARMONY_MARKERS)):
        return 0
    tail = body[i:]
    return len(tail) if any(marker.startswith(tail) for marker in HARMONY_MARKERS) else 0


REASONING_PARSERS: dict[str, ReasoningParser | HarmonyParser] = {
    name: ReasoningParser(name, tags.start_in_output, tags.start, tags.end)
    for name, tags in REASONING_TAGS.items() if name != "gpt_oss"}
REASONING_PARSERS["gpt_oss"] = HarmonyParser()
