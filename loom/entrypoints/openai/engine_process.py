"""The LLM engine in a process of its own (``loom serve --engine-process``), as vLLM v1 runs its EngineCore.

With the engine on a thread of the server's process, the engine's Python (scheduling, step inputs, stop checks,
detokenization, outputs) and the event loop's (HTTP, one SSE chunk per stream per step) share one GIL: at 128
streams on a fast device each waits for the other every step. Here the engine runs in a child process that
steps on its own, as long as it has requests, and the server's engine thread becomes a relay:

    parent (event loop + relay thread)                  child (LLMEngine, steps while it has requests)
    add / abort / LoRA calls ----------------------->   answered between two steps, in order
                             <-- answers ------------
                             <-- each step's outputs --  deltas: only what is new since the last output

The child never waits for the parent between steps (a step-by-step round trip would put the parent's GIL back on
the engine's path). ``EngineProcess`` is the parent's end; ``ProcessLLMEngine`` is ``AsyncLLMEngine`` with that
relay in place of its engine loop. The child is a fresh ``python -m loom.entrypoints.openai.engine_process``
talking over a socket pair (as tensor-parallel ranks are started: unlike multiprocessing's spawn it never re-imports
the caller's ``__main__``). Outputs cross as deltas (new token ids, text, logprobs), so a step's message grows with
the batch, not with the outputs' lengths; the parent rebuilds cumulative outputs for requests that asked for them.
The child ignores SIGINT and SIGTERM (Ctrl-C, ``timeout`` and systemd signal the whole process group: the server
drains, then stops it) and exits when the parent's end of the socket closes, so it never outlives the server. A
child that dies mid-run is an ``EngineFatalError``: the server fails what is in flight and exits, as when a
tensor-parallel rank dies.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

from loom.engine.config import EngineConfig
from loom.engine.lora import LoRARequest
from loom.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, merge_deltas
from loom.engine.sampling_defaults import SamplingDefaults
from loom.engine.sampling_params import SamplingParams
from loom.engine.tensor_parallel import EngineFatalError
from loom.entrypoints.openai.async_engine import (
    _ACCEPTED,
    AsyncLLMEngine,
    _Add,
    _Call,
)
from loom.entrypoints.openai.metrics import LLMMetrics

log = logging.getLogger("loom.entrypoints.openai.serve")


def _send(conn, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (ValueError, EngineFatalError, ...), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --- what crosses the pipe -----------------------------------------------------------------------------------
# Outputs cross as plain tuples: pickling 128 of them takes 0.03 ms where slotted dataclasses take 0.44 (and 0.04 vs
# 0.23 ms to load), every step, on both sides. The child's engine makes "delta" outputs of a request the parent asked
# "cumulative" for (only what is new crosses, and no step copies what came before); the parent rebuilds them.
#   output:     (request_id, finished, num_cached_tokens, metrics fields, [completion, ...])
#   completion: CompletionOutput's fields in order (index, text, token_ids, cumulative_logprob, logprobs,
#               finish_reason, stop_reason)
# The prompt never crosses back: the parent has it from the request.
WireOutput = tuple


@dataclass(slots=True)
class EngineState:
    """What the relay reads between messages, sent with every one so that reading it costs no round trip."""

    has_unfinished: bool
    stats: Any
    num_free_blocks: int
    last_step: Any
    """The step just run (``StepStats``), None if the message follows no new step."""
    step_seconds: float | None = None


def wire_params(params: SamplingParams) -> SamplingParams:
    """What the child's engine runs: "delta" in place of "cumulative" (the parent rebuilds the cumulative outputs)."""
    return params.clone(output_kind="delta") if params.output_kind == "cumulative" else params


def encode(out: RequestOutput) -> WireOutput:
    m = out.metrics
    metrics = None if m is None else (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time)
    completions = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
                   for c in out.outputs]
    return (out.request_id, out.finished, out.num_cached_tokens, metrics, completions, out.prompt_logprobs,
            out.prompt_ranks)


class OutputDecoder:
    """Parent side: each request's ``RequestOutput`` again, of the kind it asked for (a new object each time: handlers
    on the event loop may still hold the last one while the relay thread builds the next)."""

    def __init__(self) -> None:
        self._requests: dict[str, tuple[list[int], bool, RequestOutput | None]] = {}
        """request id -> (prompt ids, cumulative, its last output if cumulative)."""

    def expect(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Before the request is sent: its outputs may follow the child's answer at once."""
        self._requests[request_id] = (prompt_token_ids, params.output_kind == "cumulative", None)

    def decode(self, item: WireOutput) -> RequestOutput | None:
        """The output; None for one of a request forgotten since (aborted while the step ran)."""
        request_id, finished, num_cached, metrics, completions, prompt_logprobs, prompt_ranks = item
        entry = self._requests.get(request_id)
        if entry is None:
            return None
        prompt_token_ids, cumulative, last = entry
        out = RequestOutput(request_id, None, prompt_token_ids, [CompletionOutput(*c) for c in completions], finished,
                            num_cached, RequestMetrics(*metrics) if metrics is not None else None, prompt_logprobs,
                            prompt_ranks)
        if last is not None:
            out = merge_deltas(last, out)
        if finished:
            del self._requests[request_id]
        elif cumulative:
            self._requests[request_id] = (prompt_token_ids, True, out)
        return out

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


# --- the child ---------------------------------------------------------------------------------------------
def engine_main(conn: Connection) -> None:
    """The engine process: build the engine, then step while there are requests, answering calls between steps,
    until told to stop or the parent goes away."""
    # Ctrl-C, `timeout` and systemd signal the whole process group: the server drains its requests first, then
    # stops this process (or its socket closes if the server is killed outright)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config, num_threads, log_level = _recv(conn)
    logging.basicConfig(level=log_level, format="%(levelname)s:     [engine] %(message)s")
    import torch

    from loom.engine.llm_engine import LLMEngine

    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        _send(conn, (0, "raise", _portable(exc), None))
        return
    info = {"max_model_len": engine.max_model_len, "model_path": engine.model_path,
            "tokenizer_path": engine.tokenizer_path, "eos_token_ids": list(engine.eos_token_ids),
            "sampling_defaults": engine.sampling_defaults.as_dict(),
            "image_tokens": engine.image_tokens}
    _send(conn, (0, "ok", info, _state(engine, None)))
    try:
        while True:
            if (not engine.has_unfinished_requests() or conn.poll()) and not _answer_calls(engine, conn):
                break
            if engine.has_unfinished_requests() and not _step(engine, conn):
                break
    finally:
        engine.shutdown()
        conn.close()


def _answer_calls(engine, conn: Connection) -> bool:
    """Answer calls (waiting for the first) until none is pending; False once told to stop or the parent is gone."""
    while True:
        try:
            call_id, call, args = _recv(conn)
        except (EOFError, OSError):
            return False
        if call == "stop":
            return False
        previous = engine.last_step
        try:
            answer = (call_id, "ok", _answer(engine, call, args))
        except BaseException as exc:  # the parent raises it where the call was made
            answer = (call_id, "raise", _portable(exc))
        _send(conn, (*answer, _state(engine, previous)))
        if not conn.poll():
            return True


def _step(engine, conn: Connection) -> bool:
    """One step, its outputs pushed to the parent (call id None); False after a fatal error."""
    previous, started = engine.last_step, time.perf_counter()
    try:
        outputs = engine.step()
    except EngineFatalError as exc:  # a tensor-parallel rank died: the parent stops the server
        _send(conn, (None, "fatal", _portable(exc), _state(engine, previous)))
        return False
    except Exception as exc:  # the parent fails every request in flight and aborts them
        _send(conn, (None, "raise", _portable(exc), _state(engine, previous)))
        return True
    state = _state(engine, previous, time.perf_counter() - started)
    _send(conn, (None, "ok", [encode(out) for out in outputs], state))
    return True


def _answer(engine, call: str, args: tuple):
    if call == "add":
        request_id, params, prompt_token_ids, arrival_time, lora_request, priority, multi_modal_data = args
        engine.add_request(request_id, None, wire_params(params), prompt_token_ids=prompt_token_ids,
                           arrival_time=arrival_time, lora_request=lora_request, priority=priority,
                           multi_modal_data=multi_modal_data)
        return None
    if call == "abort":
        return engine.abort_request(args[0])
    if call == "lora.get":
        engine.lora.get(args[0])  # read and kept in the child; the weights do not travel
        return None
    if call == "lora.remove":
        return engine.lora.remove(args[0])
    raise ValueError(f"unknown engine call {call!r}")


def _state(engine, previous_step, seconds: float | None = None) -> EngineState:
    step = engine.last_step if engine.last_step is not previous_step else None
    return EngineState(engine.has_unfinished_requests(), engine.stats(), engine.block_manager.num_free_blocks, step,
                       seconds if step is not None else None)


# --- the parent --------------------------------------------------------------------------------------------
class _BlockCounts:
    def __init__(self) -> None:
        self.num_free_blocks = 0


class _RemoteLoRA:
    """``engine.lora`` for ``front.call``: each method returns the future of its answer."""

    def __init__(self, engine: EngineProcess):
        self._engine = engine

    def get(self, request: LoRARequest) -> Future:
        return self._engine.request("lora.get", request)

    def remove(self, lora_int_id: int) -> Future:
        return self._engine.request("lora.remove", lora_int_id)


class EngineProcess:
    """The parent's end of the engine process: start it, send it calls (``request``: a future of the answer), and
    receive what it sends (``receive``, on the relay thread only). The engine's state the relay reads
    (``has_unfinished_requests``, ``stats``, ``block_manager.num_free_blocks``, ``last_step``) comes with every
    message."""

    def __init__(self, config: EngineConfig, num_threads: int | None = None):
        self.config = config
        mine, theirs = socket.socketpair()
        self.connection = Connection(mine.detach())
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._decoder = OutputDecoder()
        self.block_manager = _BlockCounts()
        self.lora = _RemoteLoRA(self)
        self.last_step = None
        self.step_seconds: float | None = None
        self._has_unfinished = False
        self._stats = None
        fd = theirs.fileno()
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(fd)], pass_fds=(fd,))
        theirs.close()
        try:
            _send(self.connection, (config, num_threads, logging.getLogger().level))
            _, status, info, state = self._recv()
        except BaseException:
            self.shutdown()
            raise
        if status == "raise":
            self.shutdown()
            raise info
        self._update(state)
        self.max_model_len = info["max_model_len"]
        self.model_path = info["model_path"]
        self.tokenizer_path = info["tokenizer_path"]
        self.eos_token_ids = info["eos_token_ids"]
        self.sampling_defaults = SamplingDefaults(**info["sampling_defaults"])
        self.image_tokens = info["image_tokens"]

    # --- any thread --------------------------------------------------------------------------------------
    def request(self, call: str, *args) -> Future:
        """Send a call; its answer (or its exception) arrives through ``receive`` into the returned future."""
        future: Future = Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        try:
            with self._send_lock:
                _send(self.connection, (call_id, call, args))
        except OSError:
            self._pending.pop(call_id, None)
            future.set_exception(EngineFatalError(f"the engine process exited (exit code {self.process.poll()})"))
        return future

    # --- the relay thread --------------------------------------------------------------------------------
    def add_request(self, request_id: str, params: SamplingParams, prompt_token_ids: list[int],
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    priority: int = 0, multi_modal_data: dict | None = None) -> Future:
        self._decoder.expect(request_id, prompt_token_ids, params)
        future = self.request("add", request_id, params, prompt_token_ids, arrival_time, lora_request, priority,
                              multi_modal_data)
        future.add_done_callback(partial(self._added, request_id))
        return future

    def _added(self, request_id: str, future: Future) -> None:
        if future.exception() is not None:  # refused: no output will come
            self._decoder.forget(request_id)

    def abort_request(self, request_id: str) -> None:
        """Abort without waiting: the child drops the request before its next step."""
        self._decoder.forget(request_id)
        self.request("abort", request_id)

    def receive(self) -> list[RequestOutput] | None:
        """The next message: a step's outputs (of the kinds asked for), or None for an answer (now in its future).
        Raises the error of a step that failed, and EngineFatalError once the child is gone."""
        call_id, status, payload, state = self._recv()
        if state is not None:
            self._update(state)
        if call_id is not None:
            future = self._pending.pop(call_id)
            if status == "raise":
                future.set_exception(payload)
            else:
                future.set_result(payload)
            return None
        if status != "ok":
            raise payload
        return [out for item in payload if (out := self._decoder.decode(item)) is not None]

    def has_unfinished_requests(self) -> bool:
        return self._has_unfinished

    def stats(self):
        return self._stats

    def shutdown(self) -> None:
        if self.process.poll() is None:
            try:
                with self._send_lock:
                    _send(self.connection, (None, "stop", ()))
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
        self.connection.close()
        self._fail_pending(EngineFatalError("the engine process was stopped"))

    def _recv(self):
        try:
            return _recv(self.connection)
        except (EOFError, OSError) as exc:
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            error = EngineFatalError(f"the engine process exited (exit code {code})")
            self._fail_pending(error)
            raise error from exc

    def _fail_pending(self, error: BaseException) -> None:
        for call_id in list(self._pending):
            future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(error)

    def _update(self, state: EngineState) -> None:
        self._has_unfinished = state.has_unfinished
        self._stats = state.stats
        self.block_manager.num_free_blocks = state.num_free_blocks
        if state.last_step is not None:
            self.last_step = state.last_step
            self.step_seconds = state.step_seconds


class ProcessLLMEngine(AsyncLLMEngine):
    """``AsyncLLMEngine`` with the engine in a child process. Its engine thread relays: it waits on the child's
    socket and on a wake-up socket the event loop writes to when it queues a command, sends commands on as they come
    (never waiting for their answers), and routes each step's outputs as the in-thread loop does."""

    def __init__(self, config: EngineConfig, metrics: LLMMetrics | None = None, max_in_flight: int | None = None,
                 num_threads: int | None = None, on_fatal: Callable[[str], None] | None = None):
        super().__init__(config, metrics, max_in_flight=max_in_flight, on_fatal=on_fatal)
        self.engine_threads = num_threads
        """torch threads in the engine's process (None: torch's default there)."""
        self._wake_read, self._wake_write = socket.socketpair()  # sockets: once closed, a write fails cleanly
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)

    def _command(self, command) -> None:
        self._commands.put(command)
        try:
            self._wake_write.send(b"\0")
        except OSError:  # BlockingIOError: wake-ups already pending; otherwise the relay has stopped
            pass

    def _build_engine(self) -> EngineProcess:
        try:
            return EngineProcess(self.config, self.engine_threads)
        except BaseException:  # the relay loop that closes the wake-up sockets will never run
            self._wake_write.close()
            self._wake_read.close()
            raise

    def _run(self) -> None:
        """Wait on the child's socket and the wake-up socket: commands go on as they come, answers and outputs are
        routed as they arrive, until told to stop."""
        connection = self.engine.connection
        try:
            while True:
                sources = wait([connection, self._wake_read])
                if self._wake_read in sources:
                    _drain(self._wake_read)  # then every queued command, not one per byte
                    if not self._take_commands(block=False):
                        break
                if connection in sources:
                    self._receive()
        finally:
            self._wake_write.close()
            self._wake_read.close()

    def _receive(self) -> None:
        try:
            outputs = self.engine.receive()
        except EngineFatalError:
            raise
        except Exception as exc:
            self._step_failed(exc)
            return
        if outputs is None:  # an answer: its future's callbacks have run
            self._publish_stats()
            return
        self._stepped(outputs, time.time(), self.engine.step_seconds)

    def _run_call(self, command: _Call) -> None:
        """``fn(*args)`` here; a future it returns (``engine.lora.get``: the child's answer) completes the call."""
        try:
            result = command.fn(*command.args)
        except Exception as exc:
            command.future.set_exception(exc)
            return
        if isinstance(result, Future):
            result.add_done_callback(partial(_copy_outcome, command.future))
        else:
            command.future.set_result(result)

    def _add(self, command: _Add) -> None:
        """Live from now, so that outputs right behind the child's answer find their stream; accepted or refused
        when the answer comes (``_added``). A request id already live is refused here: the child would refuse it,
        and the refusal would then drop the live request's stream and outputs."""
        if command.request_id in self._live:
            self._deliver(command.stream, ValueError(f"request id {command.request_id!r} is already in use"))
            return
        self._live[command.request_id] = (command.stream, command.times)
        future = self.engine.add_request(command.request_id, command.params, command.prompt_token_ids,
                                         command.times.arrival, command.lora_request, command.priority,
                                         command.multi_modal_data)
        future.add_done_callback(partial(self._added, command))

    def _added(self, command, future: Future) -> None:  # on this thread, from receive()
        exc = future.exception()
        if exc is None:
            self._deliver(command.stream, _ACCEPTED)
            return
        self._live.pop(command.request_id, None)
        if not isinstance(exc, ValueError | EngineFatalError):
            log.error("add_request failed", exc_info=exc)
        self._deliver(command.stream, exc)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _copy_outcome(target: Future, source: Future) -> None:
    if target.done():
        return
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


if __name__ == "__main__":  # the module's own objects, not __main__'s copies, so that pickles name the module
    from loom.entrypoints.openai.engine_process import engine_main as _engine_main

    _engine_main(Connection(int(sys.argv[1])))
