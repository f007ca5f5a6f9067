"""What the completion and chat handlers share: model-name check, admission, streams per prompt, SSE framing,
usage, and the watch that aborts a non-streaming request whose client went away."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
from fastapi import Request, Response

from loom.engine.lora import LoRARequest
from loom.engine.outputs import RequestOutput
from loom.engine.reasoning import ThinkTokens, think_tokens
from loom.engine.sampling_defaults import SamplingDefaults
from loom.engine.sampling_params import SamplingParams
from loom.engine.structured import StructuredOutputError
from loom.entrypoints.openai.async_engine import AsyncLLMEngine, EngineDead, EngineOverloaded, RequestStream
from loom.entrypoints.openai.errors import OpenAIError, bad_request, from_value_error
from loom.entrypoints.openai.logprobs import TokenStrings
from loom.entrypoints.openai.lora import LoRARegistry
from loom.entrypoints.openai.media import MediaError, content_format, load_image, vision_content
from loom.entrypoints.openai.prompts import PromptEncoder
from loom.entrypoints.openai.protocol import ChatMessage
from loom.entrypoints.openai.reasoning import ReasoningParser
from loom.entrypoints.openai.response_store import DEFAULT_STORED_RESPONSES, ResponseStore
from loom.entrypoints.openai.tools import ToolSettings, template_messages
from loom.models.vision import SERVE_A_VISION_MODEL, image_placeholder

MEDIA_THREADS = 2
"""Threads that decode and preprocess chat images (apart from the tokenizer's, which every request waits on)."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class ServingContext:
    front: AsyncLLMEngine
    model_names: list[str]
    """Names accepted in ``model``; the first is the one reported."""
    retry_after_s: int = 1
    max_n: int = 16
    """Most completions one request may ask for (``n``); each counts as a sequence at admission."""
    max_prompt_chars: int | None = None
    """Most characters in a request's prompt(s) before tokenization; None: 32 per token of the model's context."""
    loras: LoRARegistry | None = None
    """The LoRA adapters a request may name in ``model`` (with --enable-lora)."""
    tool_settings: ToolSettings = field(default_factory=ToolSettings)
    reasoning: ReasoningParser | None = None
    """``--reasoning-parser``: chat answers split into reasoning_content and content (``reasoning.py``)."""
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(DEFAULT_STORED_RESPONSES))
    """The stored responses of /v1/responses (``store: true``)."""
    allowed_local_media_path: str | None = None
    """``--allowed-local-media-path``: file:// images are read from under this folder only; None: not at all."""
    max_images: int = 4
    """Images one request may hold (``--limit-mm-per-prompt``); checked before any is decoded."""
    chat_template_content_format: str = "auto"
    """``--chat-template-content-format``: "string", "openai", or "auto" (a vision model's template is read)."""
    _strings: TokenStrings | None = field(default=None)
    _encoder: PromptEncoder | None = field(default=None)
    _template_has_tools: bool | None = field(default=None)
    _special_tokens: frozenset[str] | None = field(default=None)
    _think: ThinkTokens | bool | None = field(default=None)
    _content_format: str | None = field(default=None)
    _media: ThreadPoolExecutor | None = field(default=None)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model's defaults for the sampling parameters a request leaves out (``--generation-config``)."""
        return self.front.engine.sampling_defaults

    @property
    def think(self) -> ThinkTokens | None:
        """The thinking block's tags as token ids, where ``--reasoning-parser`` is on and they are single tokens: the
        engine then starts structured outputs after the block (``loom.engine.reasoning``), so a constrained answer is
        split too, and the prompt's last tag says where an answer starts."""
        if self._think is None:
            self._think = (self.reasoning is not None and think_tokens(self.front.tokenizer, self.reasoning.name)
                           or False)
        return self._think or None

    @property
    def strings(self) -> TokenStrings:
        if self._strings is None:
            self._strings = TokenStrings(self.front.tokenizer)
        return self._strings

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            chars = self.max_prompt_chars or 32 * self.front.max_model_len
            self._encoder = PromptEncoder(self.front.tokenizer, chars)
        return self._encoder

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders ``tools`` at all (one that never names them would drop them)."""
        if self._template_has_tools is None:
            try:
                template = self.front.tokenizer.get_chat_template(tools=[])
            except ValueError:  # no chat template: apply_chat_template answers that
                template = ""
            self._template_has_tools = "tools" in template
        return self._template_has_tools

    def has_special_token(self, tokens: tuple[str, ...]) -> bool:
        """Whether any of ``tokens`` is a special token of the tokenizer (left out of text unless asked)."""
        if self._special_tokens is None:
            decoder = getattr(self.front.tokenizer, "added_tokens_decoder", {})
            self._special_tokens = frozenset(t.content for t in decoder.values() if t.special)
        return any(t in self._special_tokens for t in tokens)

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
        if self._media is not None:
            self._media.shutdown(wait=False, cancel_futures=True)

    def check_model(self, name: str) -> LoRARequest | None:
        """The adapter ``name`` names, None for the base model; 404 for a name this server does not serve."""
        if name in self.model_names:
            return None
        adapter = self.loras.get(name) if self.loras is not None else None
        if adapter is None:
            served = self.model_names + (self.loras.names() if self.loras is not None else [])
            raise OpenAIError(404, f"The model `{name}` does not exist. This server serves: {', '.join(served)}",
                              param="model", code="model_not_found")
        return adapter

    def check_n(self, n: int, num_prompts: int = 1) -> None:
        """Bound ``n`` and the sequences one request may hold, before any work starts."""
        if n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n} on this server (--max-n), got {n}", "n")
        capacity = self.front.max_in_flight
        if capacity is not None and n * num_prompts > capacity:
            raise bad_request(f"{num_prompts} prompt(s) x n={n} is {n * num_prompts} sequences, more than this "
                              f"server ever holds at once ({capacity}); split the request", "prompt")

    async def encode(self, text: str) -> list[int]:
        """A completions prompt, with the tokenizer's special tokens (Llama's BOS) as vLLM and HF encode it; chat
        prompts come from the chat template, which writes its own."""
        return await self.encoder.encode(text, limit=self.front.max_model_len)

    async def apply_chat_template(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                                  within_context: bool = True, tools: list[dict] | None = None,
                                  template: dict | None = None, images: list | None = None) -> list[int]:
        """The chat prompt's ids; with ``within_context``, a prompt longer than the context is a 400. Tools go to
        the template, or into the messages for a template that ignores them (``tools.template_messages``).
        ``template``: ``continue_final_message`` and the template's own variables (``ChatTemplateFields``)."""
        if not getattr(self.front.tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages")
        limit = self.front.max_model_len if within_context else None
        native = self.template_has_tools
        dicts = template_messages(messages, tools, native)
        num_images = sum(len(m.image_urls()) for m in messages)
        if num_images and images is None:  # /tokenize: the images' sizes decide their token counts (no room needed)
            images = await self.load_images(messages, admitting=False)  # a text model's refusal is its
        tokens = self.front.image_tokens
        if tokens is not None or self.chat_template_content_format == "openai":
            image_text = image_placeholder(self.front.tokenizer, tokens.placeholder) if tokens is not None else ""
            dicts = vision_content(dicts, self.content_format, image_text)
        ids = await self.encoder.chat(dicts, add_generation_prompt, limit=limit, tools=tools if native else None,
                                      template=template)
        if num_images:
            try:
                ids = tokens.place(ids, [(image.width, image.height) for image in images])
            except ValueError:
                placed = ids.count(tokens.placeholder)  # ids as the template wrote them
                raise bad_request(f"the chat template placed {placed} image tokens for {num_images} images; this "
                                  "model's template does not take image parts", "messages") from None
            if limit is not None and len(ids) >= limit:
                image_rows = sum(len(tokens.expansion(image.width, image.height, len(images))) for image in images)
                raise bad_request(f"prompt has {len(ids)} tokens ({image_rows} for images) but the "
                                  f"model's context is {limit}; send fewer or smaller images, or less text", "messages")
        return ids

    @property
    def content_format(self) -> str:
        """How the chat template reads a message's content: "openai" (a list of typed parts it loops over, as
        llava-hf's templates do) or "string" (text, image placeholders written into it)."""
        if self._content_format is None:
            if self.chat_template_content_format != "auto":
                self._content_format = self.chat_template_content_format
                return self._content_format
            try:
                template = self.front.tokenizer.get_chat_template()
            except ValueError:
                template = ""
            self._content_format = content_format(template)
        return self._content_format

    async def load_images(self, messages: list[ChatMessage], admitting: bool = True) -> list:
        """The images of the messages' image_url parts, decoded off the event loop (a 400 naming the message for
        one that cannot be read, for too many, or for images sent to a text model or outside a user message)."""
        urls = []
        for i, m in enumerate(messages):
            found = m.image_urls()
            if found and m.role != "user":
                raise bad_request(f"messages[{i}]: images go in user messages (role {m.role} has image_url parts)",
                                  "messages")
            urls.extend((i, url) for url in found)
        if not urls:
            return []
        if self.front.image_tokens is None:
            raise bad_request(f"{self.model_name} is a text model: it takes no images (image_url parts); "
                              f"{SERVE_A_VISION_MODEL}", "messages")
        if len(urls) > self.max_images:
            raise bad_request(f"{len(urls)} images in one request; this server takes at most {self.max_images} "
                              "(--limit-mm-per-prompt)", "messages")
        try:  # a request that would be refused for room is refused before its images cost anything
            if admitting:
                self.front.check_room(1)
        except (EngineOverloaded, EngineDead) as exc:
            raise self._translate(exc) from None
        loop = asyncio.get_running_loop()
        if self._media is None:
            self._media = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="loom-media")
        images = []
        for i, url in urls:
            try:
                images.append(await loop.run_in_executor(self._media, self._prepare_image, url, len(urls) > 1))
            except MediaError as exc:
                raise bad_request(f"messages[{i}]: {exc}", "messages") from None
        return images

    def _prepare_image(self, url: str, several: bool):
        """Decode and preprocess one image (on a media thread) of a request with ``several`` or one: the decoded
        picture is dropped once its pixels are made, so a request holds the model's few hundred pixels a side, not
        the upload's."""
        image = load_image(url, self.allowed_local_media_path)
        processor = getattr(self.front, "image_processor", None)
        return processor.prepare([image], several)[0] if processor is not None else image

    async def compile_grammar(self, params: SamplingParams, param: str) -> None:
        """Compile the request's structured-output grammar (cached by spec) on the tokenizer thread, off the event
        loop and before admission; a spec that does not compile is a 400 naming the problem."""
        spec = params.structured_outputs
        manager = getattr(self.front.engine, "structured", None)
        if spec is None or manager is None:
            return
        try:
            await self.encoder.run(manager.prepare, spec)
        except StructuredOutputError as exc:
            raise bad_request(str(exc), param) from None

    async def open_streams(self, base_id: str, prompts: list[list[int]], params: SamplingParams,
                           arrival: float, lora_request: LoRARequest | None = None,
                           priority: int = 0, held: bool = False,
                           multi_modal_data: dict | None = None) -> list[RequestStream]:
        """Admit one engine request per prompt, each counted as ``params.n`` sequences; all or none (the room for
        all is checked first, and a later rejection closes the earlier ones). ``held``: in room held by ``hold``."""
        streams: list[RequestStream] = []
        try:
            if not held:
                self.front.check_room(len(prompts) * params.n)
            for i, ids in enumerate(prompts):
                streams.append(await self.front.add_request(f"{base_id}-{i}", ids, params, arrival, lora_request,
                                                            priority, held, multi_modal_data))
        except BaseException as exc:
            for s in streams:
                s.close()
            raise self._translate(exc) from exc
        return streams

    @contextlib.contextmanager
    def hold(self, num_seqs: int) -> Iterator[None]:
        """Keep room for ``num_seqs`` sequences while the block runs (``AsyncLLMEngine.hold``); a 503 when there is
        none."""
        try:
            self.front.hold(num_seqs)
        except BaseException as exc:
            raise self._translate(exc) from exc
        try:
            yield
        finally:
            self.front.release(num_seqs)

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, EngineOverloaded):
            self.count_rejection()
            return OpenAIError(503, f"{exc}; retry later", code="server_overloaded",
                               headers={"Retry-After": str(self.retry_after_s)})
        if isinstance(exc, EngineDead):
            return OpenAIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"})
        if isinstance(exc, ValueError):
            return from_value_error(exc)
        return exc

    def count_rejection(self) -> None:
        if self.front.metrics is not None:
            self.front.metrics.rejected.inc()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def sse(payload: dict | str) -> bytes:
    """One server-sent event: compact UTF-8 JSON (orjson: 0.35 µs a completion chunk, json.dumps 5.6 µs)."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def usage(prompt_lens: list[int], finals: list[RequestOutput]) -> dict:
    """Of whole (final, cumulative) outputs."""
    return usage_of(prompt_lens, sum(len(c.token_ids) for out in finals for c in out.outputs),
                    sum(out.num_cached_tokens for out in finals))


def usage_of(prompt_lens: list[int], completion_tokens: int, cached: int) -> dict:
    prompt_tokens = sum(prompt_lens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def prompt_scores(ctx: ServingContext, req, prompt: list[int], out: RequestOutput) -> dict:
    """vLLM's ``prompt_logprobs`` field, where the request asked for it and ``out`` carries the scores: a completion
    choice's, or beside a chat answer's choices."""
    if req.prompt_logprobs is None or out.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": ctx.strings.prompt_entries(prompt, out.prompt_logprobs, out.prompt_ranks,
                                                          req.prompt_logprobs)}


def chunk_usage(req, prompt_lens: list[int], num_tokens: int, cached: int) -> dict:
    """A stream chunk's ``usage`` field: none without ``include_usage``, null in all but the last chunk, or with
    ``continuous_usage_stats`` the counts so far of the chunk's choice: its prompt and its tokens (vLLM's)."""
    if not req.include_usage:
        return {}
    return {"usage": usage_of(prompt_lens, num_tokens, cached) if req.continuous_usage else None}


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except BaseException as exc:  # forwarded to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def finals_of(streams: list[RequestStream]) -> list[RequestOutput]:
    """Run every stream to its end; the last (finished) output of each, in prompt order."""
    last: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merged(streams):
        last[i] = out
    return last  # type: ignore[return-value]


async def unless_disconnected(work: Awaitable, request: Request):
    """Await ``work``; if the client disconnects first, cancel it at once (its finally aborts the engine requests and
    frees their KV blocks and admission slots)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return Response(status_code=499)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message can only be the
    disconnect (what vLLM's ``with_cancellation`` listens for too)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error_event(exc: BaseException) -> bytes:
    if isinstance(exc, OpenAIError):
        return sse(exc.body())
    return sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})


def close_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()
