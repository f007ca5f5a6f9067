"""Prompts to token ids for the LLM routes: bounded, and never on the event loop.

    encoder = PromptEncoder(tokenizer, max_prompt_chars=262_144)
    ids = await encoder.encode("The capital of France is", limit=max_model_len)   # ValueError -> 400
    ids = await encoder.chat(messages, add_generation_prompt=True, limit=max_model_len)
    text = await encoder.decode(ids)

Tokenizing a long prompt is seconds of CPU. Done on the event loop it stalls every other request and ``/health``
(a 4.8 MB prompt held the loop for 2.6 s), so every call here runs in one dedicated thread. The Rust tokenizer
releases the GIL while it encodes; what holds the GIL is turning the ids into a Python list, so a prompt over
``limit`` tokens is rejected from its count alone and its ids are never materialised, and a prompt far past the
limit is rejected from a prefix of it (a few times the context), not from all of it. Characters are bounded before
any work starts (``max_prompt_chars``).

The encoder works on its own copy of the tokenizer's Rust backend with truncation and padding off (the copy is not
shared with the event loop's tokenizer, and a tokenizer.json that asks for truncation cannot cut a prompt short);
a tokenizer without a Rust backend falls back to its Python ``__call__``.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from tokenizers import Tokenizer

EARLY_CHARS_PER_TOKEN = 16
EARLY_MARGIN = 64


class PromptTooLong(ValueError):
    """The prompt has more characters or tokens than allowed (HTTP 400)."""


class TemplateRefused(ValueError):
    """The chat template raised on these messages (HTTP 400 naming ``messages``)."""


class PromptEncoder:
    def __init__(self, tokenizer, max_prompt_chars: int):
        if max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
        self.tokenizer = tokenizer
        self.max_prompt_chars = max_prompt_chars
        self._backend = _own_backend(tokenizer)
        # NOTE: one thread: prompts are encoded one at a time (the tokenizer's own threads parallelise inside a
        # call), and a huge prompt delays other prompts' tokenization but never the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="loom-tokenize")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, text: str, add_special_tokens: bool = True, limit: int | None = None) -> list[int]:
        """Token ids of ``text``; PromptTooLong past ``max_prompt_chars`` characters or ``limit`` tokens."""
        self.check_chars(len(text))
        return await self._run(self._encode, text, add_special_tokens, limit)

    async def chat(self, messages: list[dict], add_generation_prompt: bool = True,
                   limit: int | None = None, tools: list[dict] | None = None,
                   template: dict | None = None) -> list[int]:
        """The chat template's rendering of ``messages`` (and ``tools``), tokenized as it is written (no extra
        special tokens). ``template``: more keyword arguments of ``apply_chat_template`` (``continue_final_message``,
        the template's variables), checked by the caller."""
        extra_chars = len(json.dumps(tools)) if tools else 0
        extra_chars += len(json.dumps(template, default=str)) if template else 0
        self.check_chars(sum(_content_chars(m.get("content")) for m in messages) + extra_chars)
        return await self._run(self._chat, messages, add_generation_prompt, limit, tools, template)

    async def decode(self, ids: list[int]) -> str:
        return await self._run(self.tokenizer.decode, ids)

    def check_chars(self, num_chars: int) -> None:
        if num_chars > self.max_prompt_chars:
            raise PromptTooLong(f"prompt has {num_chars} characters, more than this server's limit of "
                                f"{self.max_prompt_chars} (--max-prompt-chars); shorten it")

    async def run(self, fn, *args):
        """``fn(*args)`` on the encoder's thread (rendering a large response, say)."""
        return await self._run(fn, *args)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    def _chat(self, messages: list[dict], add_generation_prompt: bool, limit: int | None,
              tools: list[dict] | None, template: dict | None = None) -> list[int]:
        from jinja2 import TemplateError  # local: transformers imports jinja2 only for chat templates

        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools,
                                                      add_generation_prompt=add_generation_prompt, tokenize=False,
                                                      **(template or {}))
        except TemplateError as exc:  # the template's own raise_exception ("roles must alternate", ...)
            raise TemplateRefused(f"messages: the model's chat template refused them: {exc}") from None
        except TypeError as exc:  # a value the template cannot use (a chat_template_kwargs number added to a str)
            raise TemplateRefused(f"messages: the model's chat template failed on this request ({exc}); check "
                                  "chat_template_kwargs and the messages' fields") from None
        self.check_chars(len(text))
        return self._encode(text, False, limit)

    def _encode(self, text: str, add_special_tokens: bool, limit: int | None) -> list[int]:
        if limit is not None:
            self._reject_early(text, add_special_tokens, limit)
        tokens = self._tokens(text, add_special_tokens)
        _check_tokens(len(tokens), limit)  # before .ids: a too-long prompt's ids never become a Python list
        return list(tokens) if isinstance(tokens, list) else tokens.ids

    def _tokens(self, text: str, add_special_tokens: bool):
        """The ids as a list (Python tokenizers) or the backend's Encoding (``len()`` is the count)."""
        if self._backend is None:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        # NOTE: encode_batch(_fast) releases the GIL while it encodes; the fast variant skips character offsets,
        # which halves the time and makes freeing a huge encoding (under the GIL) 10x cheaper.
        encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        return encode([text], add_special_tokens=add_special_tokens)[0]

    def _reject_early(self, text: str, add_special_tokens: bool, limit: int) -> None:
        """PromptTooLong when a prefix of ``text`` alone has more than ``limit`` tokens, so that a prompt far past the
        context costs the tokenization of a few times the context, not of all of it.

        NOTE: the prefix ends at a space, so every word before the cut is split into pre-tokens exactly as in the
        whole text; only the pieces around the cut may differ, and EARLY_MARGIN tokens cover them.
        """
        window = EARLY_CHARS_PER_TOKEN * (limit + EARLY_MARGIN)
        cut = text.rfind(" ", 0, window) if len(text) > window else -1
        if cut <= 0:
            return
        num = len(self._tokens(text[:cut], add_special_tokens))
        if num > limit + EARLY_MARGIN:
            raise PromptTooLong(f"prompt has more than {num - EARLY_MARGIN} tokens (its first {cut} of {len(text)} "
                                f"characters alone) but the model's context is {limit}; shorten it or raise "
                                "max_model_len")


def _content_chars(content) -> int:
    """A template message's characters: its text, or its parts' text (a vision model's messages are part lists)."""
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return len(content or "")


def _check_tokens(num_tokens: int, limit: int | None) -> None:
    if limit is not None and num_tokens > limit:
        raise PromptTooLong(f"prompt has {num_tokens} tokens but the model's context is {limit}; "
                            "shorten it or raise max_model_len")


def _own_backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy
