"""Thinking models' ``<think> ... </think>`` block in the engine: structured outputs start after it (vLLM's rule with
``--reasoning-parser``), so a thinking model thinks freely and its answer follows the grammar.

    gate = ReasoningGate.for_prompt(matcher, ThinkTokens(start=151667, end=151668, start_in_output=True), prompt_ids)
    gate.consume_token(token)   # what the engine calls on any matcher; the grammar sees the tokens after the block

Where the block stands is read from the prompt's last tag: an end tag (Qwen3's template with ``enable_thinking:
false`` closes an empty block) means the grammar applies from the first token; a start tag (DeepSeek-R1's template
opens the block) means the output starts inside it. With no tag, ``qwen3`` models open the block themselves when
they think: the first token may be the start tag or what the grammar allows, and anything but the start tag is the
grammar's from there on; ``deepseek_r1`` outputs start inside the block. Inside it nothing is masked; the end tag
closes it and the grammar takes over at the next token. The tags must be single tokens of the vocabulary (they are
added tokens in Qwen3, SmolLM3 and DeepSeek-R1); where they are not, ``think_tokens`` is None and the engine
enforces the grammar from the first token.

``gpt_oss`` (the harmony format): the template's generation prompt ``<|start|>assistant`` opens the block, and
everything up to the final channel's header ``<|channel|>final<|message|>`` (analysis and commentary messages) is
free; the grammar applies to the final message. That end is three tokens, the last closing the block only after the
other two (``ThinkTokens.before_end``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReasoningTags:
    start: str
    end: str
    start_in_output: bool
    """True (qwen3): the output opens the block when the model thinks. False (deepseek_r1): the template opened it,
    so the output starts inside it."""
    end_tokens: int = 1
    """How many tokens the end tag is (gpt-oss' final header: 3); the start tag is always one."""


REASONING_TAGS = {
    "qwen3": ReasoningTags("<think>", "</think>", start_in_output=True),
    "deepseek_r1": ReasoningTags("<think>", "</think>", start_in_output=False),
    # DeepSeek-V3.1: the template opens the block (chat_template_kwargs {"thinking": true}) or writes it closed; a
    # prompt with neither: all content unless the output opens a block (vLLM's parser: content without "thinking")
    "deepseek_v3": ReasoningTags("<think>", "</think>", start_in_output=True),
    "glm45": ReasoningTags("<think>", "</think>", start_in_output=True),  # GLM-4.5: qwen3's rule
    "gpt_oss": ReasoningTags("<|start|>", "<|channel|>final<|message|>", start_in_output=False, end_tokens=3),
}
"""``--reasoning-parser`` names (vLLM's): Qwen3 and SmolLM3 (hybrid), DeepSeek-R1 and Qwen3 ``*-Thinking-2507``,
DeepSeek-V3.1 (the prompt's last tag says whether it thinks), GLM-4.5 (hybrid, as Qwen3), gpt-oss (harmony's
channels)."""


@dataclass(frozen=True, slots=True)
class ThinkTokens:
    start: int
    end: int
    start_in_output: bool
    before_end: tuple[int, ...] = ()
    """Tokens that must come right before ``end`` for it to close the block (gpt-oss: ``<|channel|>``, ``final``
    before ``<|message|>``, which also ends the analysis channel's header)."""

    def closes(self, token_ids: list[int], i: int) -> bool:
        """Whether token ``i`` of ``token_ids`` closes the block."""
        n = len(self.before_end)
        return token_ids[i] == self.end and i >= n and tuple(token_ids[i - n : i]) == self.before_end

    def block_end(self, token_ids: list[int]) -> int | None:
        """The index after the token that closes the block in an output's ``token_ids``; None while it is open."""
        return next((i + 1 for i in range(len(token_ids)) if self.closes(token_ids, i)), None)


def think_tokens(tokenizer, parser: str | None) -> ThinkTokens | None:
    """The tags of ``parser`` as token ids of ``tokenizer``; None without a parser or where the start tag is not one
    token, or the end tag not as many as the parser's format has."""
    if parser is None:
        return None
    tags = REASONING_TAGS[parser]
    start, end = (tokenizer.encode(tag, add_special_tokens=False) for tag in (tags.start, tags.end))
    if len(start) != 1 or len(end) != tags.end_tokens:
        return None
    return ThinkTokens(start[0], end[-1], tags.start_in_output, tuple(end[:-1]))


OPEN, MAY_OPEN, DONE = "open", "may_open", "done"


def prompt_block(prompt_token_ids: list[int], tokens: ThinkTokens) -> str | None:
    """Where the prompt leaves the thinking block, from its last tag: DONE (closed), OPEN (opened), None (no tag)."""
    for i in range(len(prompt_token_ids) - 1, -1, -1):
        if tokens.closes(prompt_token_ids, i):
            return DONE
        if prompt_token_ids[i] == tokens.start:
            return OPEN
    return None


class ReasoningGate:
    """A grammar matcher held back while the output is inside the thinking block (the module docstring's rule).
    The engine uses it as a matcher (``consume_token``, ``is_stopped``); ``StructuredOutputs.apply`` masks a row only
    while ``constrains``, and lets the start tag through as well while ``allows_start``."""

    __slots__ = ("matcher", "tokens", "state", "recent")

    def __init__(self, matcher: Any, tokens: ThinkTokens, state: str):
        self.matcher, self.tokens, self.state = matcher, tokens, state
        self.recent: tuple[int, ...] = ()
        """The last ``len(tokens.before_end)`` tokens inside the block (a multi-token end tag's first part)."""

    @classmethod
    def for_prompt(cls, matcher: Any, tokens: ThinkTokens, prompt_token_ids: list[int]) -> Any:
        """The gate for a prompt, or ``matcher`` itself where the prompt has closed the block already."""
        state = prompt_block(prompt_token_ids, tokens)
        if state == DONE:
            return matcher
        gate = cls(matcher, tokens, state or (MAY_OPEN if tokens.start_in_output else OPEN))
        if tokens.before_end:  # the end tag may have begun in the prompt (``<|channel|>final`` written by the user)
            gate.recent = tuple(prompt_token_ids[-len(tokens.before_end) :])
        return gate

    @property
    def constrains(self) -> bool:
        """Whether the grammar masks the next token."""
        return self.state != OPEN

    @property
    def allows_start(self) -> bool:
        """Whether the next token may also open the block (the first token of a ``qwen3`` output)."""
        return self.state == MAY_OPEN

    def consume_token(self, token: int) -> bool:
        if self.state == OPEN:
            before = self.tokens.before_end
            if token == self.tokens.end and self.recent == before:
                self.state = DONE
            elif before:
                self.recent = (*self.recent, token)[-len(before) :]
            return True
        if self.state == MAY_OPEN:
            if token == self.tokens.start:
                self.state = OPEN
                return True
            self.state = DONE
        return self.matcher.consume_token(token)

    def is_stopped(self) -> bool:
        return self.state == DONE and self.matcher.is_stopped()
