"""The async front over ``LLMEngine``: one engine thread owns every engine call; asyncio code only sends commands.

    front = AsyncLLMEngine(EngineConfig(model="smollm2"), metrics)
    await front.start()                                   # builds the engine in its thread
    stream = await front.add_request("r1", prompt_ids, SamplingParams(max_tokens=8))   # ValueError -> HTTP 400
    async for out in stream:                              # a RequestOutput after each step that advanced it, of
                                                          # params.output_kind (only what is new for "delta")
        ...
    await stream.close()                                  # aborts (frees the KV blocks) unless it finished

The engine is not thread-safe and ``step()`` is blocking compute, so the engine thread loops: take every queued
command (add / abort / stop), run one step if any request is unfinished, hand each request's output to its own
asyncio queue with ``loop.call_soon_threadsafe``. With nothing to do it blocks on the command queue (no spinning).
Every request that arrives while a step runs joins the next one: that is the continuous batching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from loom.engine.config import EngineConfig
from loom.engine.llm_engine import LLMEngine
from loom.engine.lora import LoRARequest
from loom.engine.outputs import RequestOutput
from loom.engine.sampling_params import SamplingParams
from loom.engine.tensor_parallel import EngineFatalError
from loom.entrypoints.openai.metrics import LLMMetrics, RequestTimes
from loom.models.loader import load_tokenizer
from loom.models.multimodal import Preprocessor, image_processor

log = logging.getLogger("loom.entrypoints.openai.serve")


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (or the server is draining): answer 503 with Retry-After."""


class EngineDead(RuntimeError):
    """The engine thread stopped (start-up failed or the server shut down)."""


_ACCEPTED = object()


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    times: RequestTimes
    lora_request: LoRARequest | None = None
    priority: int = 0
    multi_modal_data: dict | None = None


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass(slots=True)
class _Fatal:
    message: str


@dataclass(slots=True)
class _Call:
    fn: Callable
    args: tuple
    future: concurrent.futures.Future


class RequestStream:
    """One request's outputs, in order; iterate it, then ``close()`` (which aborts an unfinished request).

    An output that arrives while the one before is still unread is merged into it (vLLM's ``RequestOutputCollector``
    does the same): a cumulative one replaces it, a delta is appended to it. A consumer that falls behind the engine
    reads one output with several tokens instead of a backlog of one per step. Anything else (the acceptance, an
    error) queues."""

    def __init__(self, front: AsyncLLMEngine, request_id: str, num_seqs: int = 1, delta: bool = False):
        self.request_id = request_id
        self.num_seqs = num_seqs
        """Sequences this request holds in the engine (its ``n``): what admission counted."""
        self.delta = delta
        """Its outputs are deltas (``output_kind="delta"``)."""
        self.finished = False
        self._front = front
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._closed = False
        self._tail_texts: list[list[str]] | None = None
        """The text pieces of the deltas merged into the last unread output, per completion (joined when it is read
        or something queues behind it: a reader stalled for k steps costs O(k), not O(k^2))."""

    def put(self, item) -> None:  # called on the event loop (via call_soon_threadsafe)
        items = self._items
        if items and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            if self.delta:
                self._append_delta(items[-1], item)
            else:
                items[-1] = item  # cumulative: the newer output holds everything the older one did
        else:
            self._seal()
            items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _append_delta(self, tail: RequestOutput, new: RequestOutput) -> None:
        """``new`` appended to the unread ``tail`` in place: nothing but this queue holds an unread output (the engine
        builds new lists for every delta)."""
        if self._tail_texts is None:
            self._tail_texts = [[c.text] for c in tail.outputs]
        for old, c, pieces in zip(tail.outputs, new.outputs, self._tail_texts, strict=True):
            pieces.append(c.text)
            old.token_ids.extend(c.token_ids)
            if old.logprobs is not None and c.logprobs is not None:
                old.logprobs.extend(c.logprobs)
            old.cumulative_logprob, old.finish_reason, old.stop_reason = (c.cumulative_logprob, c.finish_reason,
                                                                          c.stop_reason)
        tail.finished, tail.num_cached_tokens, tail.metrics = new.finished, new.num_cached_tokens, new.metrics
        if new.prompt_logprobs is not None:  # sent once, in whichever delta completes them
            tail.prompt_logprobs, tail.prompt_ranks = new.prompt_logprobs, new.prompt_ranks

    def _seal(self) -> None:
        """Join the merged text pieces of the last unread output."""
        if self._tail_texts is not None:
            for c, pieces in zip(self._items[-1].outputs, self._tail_texts, strict=True):
                c.text = "".join(pieces)
            self._tail_texts = None

    async def next_item(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._items) == 1:
            self._seal()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out: RequestOutput = await self.next_item()
            self.finished = out.finished
            yield out

    def close(self, abort: bool = True) -> None:
        """Idempotent; aborts the request in the engine unless it finished (or ``abort`` is False: the engine refused
        it, and the id may be another request's)."""
        if self._closed:
            return
        self._closed = True
        if abort and not self.finished:
            self._front.abort(self.request_id)
        self._front.release(self.num_seqs)


class AsyncLLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        metrics: LLMMetrics | None = None,
        max_in_flight: int | None = None,
        engine_factory: Callable | None = None,
        num_threads: int | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        """Sequences admitted at once (running + waiting; a request with n=4 is 4); more get EngineOverloaded.
        None: no bound."""
        self.engine = None
        """The LLMEngine, built by (and only to be called from) the engine thread; tests may read it when idle."""
        self.tokenizer = None
        """A second tokenizer for the event loop (the engine's stays on the engine thread)."""
        self.max_model_len = 0
        self.image_tokens = None
        """A vision model's ``loom.models.vision.ImageTokens`` (``LLMEngine.image_tokens``); None: a text model."""
        self.image_processor: Preprocessor | None = None
        """A vision model's image preprocessing, sized as the engine's, run on the server's media threads
        (``ServingContext``)."""
        self.num_in_flight = 0
        self.last_stats = None
        """The engine's EngineStats after its latest step or command batch."""
        self.draining = False
        self._stopping = False
        self.on_fatal = on_fatal
        """Called with the reason when the engine cannot go on (a tensor-parallel rank died); the server exits."""
        self.fatal_error: str | None = None
        self._factory = engine_factory
        self.num_threads = num_threads
        """torch intra-op threads for the engine (process-wide; restored when the engine thread ends). None: keep."""
        self._commands: queue.Queue = queue.Queue()
        self._live: dict[str, tuple[RequestStream, RequestTimes]] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    # --- event-loop side ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        ready: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="loom-llm-engine", daemon=True)
        self._thread.start()
        await ready
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.engine.tokenizer_path)
        if self.image_tokens is not None:  # chat images are preprocessed here, off the engine's loop
            self.image_processor = await asyncio.to_thread(image_processor, self.engine.model_path,
                                                           self.engine.config.mm_processor_kwargs)

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self._thread is not None and self._thread.is_alive()

    def check_room(self, num_seqs: int) -> None:
        """Raise EngineDead or EngineOverloaded unless ``num_seqs`` more sequences can be admitted now."""
        if not self.is_ready:
            raise EngineDead("the LLM engine is not running")
        if self.draining:
            raise EngineOverloaded("the server is shutting down")
        if self.max_in_flight is not None and self.num_in_flight + num_seqs > self.max_in_flight:
            raise EngineOverloaded(f"the waiting queue is full ({self.num_in_flight} sequences in flight, "
                                   f"{num_seqs} more asked for)")

    def hold(self, num_seqs: int) -> None:
        """Count ``num_seqs`` sequences in flight until ``release``: room kept for a caller whose requests come one
        after another (a beam search's steps), which then add them with ``held=True``. Raises as ``check_room``."""
        self.check_room(num_seqs)
        self.num_in_flight += num_seqs
        self._idle.clear()

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                          priority: int = 0, held: bool = False,
                          multi_modal_data: dict | None = None) -> RequestStream:
        """Admit a request as ``params.n`` sequences; raises EngineOverloaded (503), ValueError from the engine
        (400) or EngineDead. ``held``: in room already held (``hold``), so neither a full queue nor draining refuses
        it, and it is not counted again. ``multi_modal_data``: a vision model's images (``LLMEngine.add_request``),
        their tokens already in ``prompt_token_ids``."""
        if not held:
            self.check_room(params.n)
        elif not self.is_ready or self._stopping:
            raise EngineDead("the LLM engine is not running")
        counted = 0 if held else params.n
        self.num_in_flight += counted
        self._idle.clear()
        stream = RequestStream(self, request_id, counted, delta=params.output_kind == "delta")
        times = RequestTimes(arrival=arrival_time or time.time(), num_prompt_tokens=len(prompt_token_ids))
        self._command(_Add(request_id, prompt_token_ids, params, stream, times, lora_request, priority,
                           multi_modal_data))
        try:
            accepted = await stream.next_item()
        except BaseException as exc:
            # refused by the engine (an exception it delivered): nothing to abort, and aborting the id would end a
            # live request that has it; cancelled while waiting: the add may still go through, so abort it
            stream.close(abort=not isinstance(exc, Exception))
            raise
        assert accepted is _ACCEPTED
        return stream

    def abort(self, request_id: str) -> None:
        self._command(_Abort(request_id))

    async def call(self, fn: Callable, *args):
        """``fn(*args)`` on the engine thread, between steps; its result, or its exception raised here.

        NOTE: torch work belongs on the engine thread. Tensor ops on any other thread give that thread an OpenMP team
        of its own, and once a process has more OpenMP threads than cores, libgomp throttles every team's spin-wait:
        reading four LoRA adapters on a helper thread made the engine's later steps ~10% slower (36 -> 43 ms a
        16-sequence SmolLM2 step, 2 cores), read on the event loop's thread ~50% slower."""
        if not self.is_ready:
            raise EngineDead("the LLM engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._command(_Call(fn, args, future))
        return await asyncio.wrap_future(future)

    def release(self, num_seqs: int = 1) -> None:
        """Sequences leave the in-flight count: a stream's when it closes, a ``hold``'s when its holder is done."""
        self.num_in_flight -= num_seqs
        if self.num_in_flight == 0:
            self._idle.set()

    async def shutdown(self, drain_timeout: float = 60.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to drain_timeout), then stop the engine thread."""
        self.draining = True
        if self._idle is not None and self.num_in_flight:
            log.info("draining %d in-flight LLM requests", self.num_in_flight)
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                log.warning("drain timed out; aborting %d requests", self.num_in_flight)
        if self._thread is not None and self._thread.is_alive():
            self._stopping = True  # a held request (a beam search's next step) is refused from now: never applied
            self._command(_Stop())
            await asyncio.to_thread(self._thread.join)

    def _command(self, command) -> None:
        """Queue a command for the engine thread (from the event loop)."""
        self._commands.put(command)

    def _deliver(self, stream: RequestStream, item) -> None:
        self._to_loop(stream.put, item)

    def _deliver_all(self, routed: list[tuple[RequestStream, RequestOutput]]) -> None:
        """A step's outputs in one hand-off: the event loop wakes once a step, not once per request."""
        self._to_loop(_put_all, routed)

    def _to_loop(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # --- engine thread --------------------------------------------------------------------------------------
    def _thread_main(self, ready: asyncio.Future) -> None:
        previous_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            self._serve(ready)
        finally:
            torch.set_num_threads(previous_threads)

    def _serve(self, ready: asyncio.Future) -> None:
        try:
            self.engine = self._build_engine()
            self.max_model_len = self.engine.max_model_len
            self.image_tokens = self.engine.image_tokens
        except BaseException as exc:  # report start-up failures to start()
            self._loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        self._loop.call_soon_threadsafe(_set_result, ready)
        workers = getattr(self.engine, "workers", None)
        if workers is not None:  # a rank that exits while the engine idles wakes this thread
            workers.on_failure = lambda message: self._command(_Fatal(message))
        self._publish_stats()
        try:
            self._run()
        except EngineFatalError as exc:
            self._stop_for_good(exc)
        finally:
            self._fail_all(EngineDead("the LLM engine stopped"))
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()

    def _run(self) -> None:
        """Apply commands and step until told to stop (EngineFatalError: the engine cannot go on)."""
        while self._take_commands(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                self._step()

    def _stop_for_good(self, exc: EngineFatalError) -> None:
        self.fatal_error = str(exc)
        log.critical("the LLM engine stops: %s", exc)
        for request_id in list(self._live):
            self.engine.abort_request(request_id)
        self._fail_all(EngineDead(f"the LLM engine stopped: {exc}"))
        if self.on_fatal is not None:
            self.on_fatal(str(exc))

    def _build_engine(self):
        return (self._factory or LLMEngine)(self.config)

    def _take_commands(self, block: bool) -> bool:
        """Apply every queued command, waiting for the first one when ``block``; False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Fatal):
                raise EngineFatalError(command.message)
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._publish_stats()
        return True

    def _apply(self, command) -> None:
        if isinstance(command, _Call):
            self._run_call(command)
        elif isinstance(command, _Abort):
            entry = self._live.pop(command.request_id, None)
            if entry is not None:
                self.engine.abort_request(command.request_id)
                entry[1].finished = time.time()
                self._observe_finished(entry[1], "abort")
        else:
            self._add(command)

    def _run_call(self, command: _Call) -> None:
        try:
            command.future.set_result(command.fn(*command.args))
        except Exception as exc:  # handed to the caller, never fatal to the engine thread
            command.future.set_exception(exc)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, None, command.params,
                                    prompt_token_ids=command.prompt_token_ids, arrival_time=command.times.arrival,
                                    lora_request=command.lora_request, priority=command.priority,
                                    multi_modal_data=command.multi_modal_data)
        except Exception as exc:  # ValueError: bad request (400); anything else is reported, not fatal to the thread
            if not isinstance(exc, ValueError):
                log.exception("add_request failed")
            self._deliver(command.stream, exc)
            return
        self._live[command.request_id] = (command.stream, command.times)
        self._deliver(command.stream, _ACCEPTED)

    def _step(self) -> None:
        started = time.time()
        previous = self.engine.last_step
        try:
            outputs = self.engine.step()
        except EngineFatalError:
            raise
        except Exception as exc:
            self._step_failed(exc)
            return
        now = time.time()
        self._stepped(outputs, now, now - started if self.engine.last_step is not previous else None)

    def _step_failed(self, exc: Exception) -> None:
        """A failed step leaves requests in an unknown state: fail and drop them all."""
        log.error("engine step failed", exc_info=exc)
        for request_id in list(self._live):
            self.engine.abort_request(request_id)
        self._fail_all(RuntimeError(f"engine step failed: {exc}"))

    def _stepped(self, outputs: list[RequestOutput], now: float, seconds: float | None) -> None:
        """A step's outputs to their streams, in one hand-off; ``seconds``: the step's time, None if none ran."""
        if seconds is not None and self.metrics is not None:
            step = self.engine.last_step
            self.metrics.observe_step(step.num_batched_tokens, step.num_seqs, seconds)
        routed = [(stream, out) for out in outputs if (stream := self._route(out, now)) is not None]
        if routed:
            self._deliver_all(routed)
        self._publish_stats()

    def _route(self, out: RequestOutput, now: float) -> RequestStream | None:
        """Account for the output (times, metrics, the end of the request); the stream it goes to, if any."""
        entry = self._live.get(out.request_id)
        if entry is None:
            return None
        stream, times = entry
        if times.first_scheduled is None and out.metrics is not None:
            times.first_scheduled = out.metrics.first_scheduled_time
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        times.num_generation_tokens = times.num_generation_tokens + num_tokens if stream.delta else num_tokens
        if times.first_token is None and times.num_generation_tokens:
            # when the engine appended it: a non-streamed request gets only its final output
            metrics = out.metrics
            times.first_token = metrics.first_token_time if metrics and metrics.first_token_time is not None else now
        if out.finished:
            del self._live[out.request_id]
            times.finished = now
            self._observe_finished(times, out.outputs[0].finish_reason or "stop")
        return stream

    def _observe_finished(self, times: RequestTimes, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(times, reason)

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        self.last_stats = stats  # read by /health on the event loop (one attribute store: atomic)
        if self.metrics is not None:
            self.metrics.update_stats(stats, self.engine.block_manager.num_free_blocks)

    def _fail_all(self, exc: BaseException) -> None:
        for stream, _ in self._live.values():
            self._deliver(stream, exc)
        self._live.clear()


def _put_all(routed: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in routed:
        stream.put(out)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
