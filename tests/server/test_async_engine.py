"""The hand-off between the engine thread and the event loop: one wake-up per step, and outputs a slow reader has
not read yet merged into one (the latest of cumulative outputs; deltas appended)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loom.engine.config import EngineConfig
from loom.engine.outputs import CompletionOutput, RequestOutput
from loom.engine.sampling_params import SamplingParams
from loom.entrypoints.openai.async_engine import AsyncLLMEngine, RequestStream


def _output(tokens: list[int], finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(0, "".join(f"<{t}>" for t in tokens), list(tokens), None, None,
                                  "length" if finished else None)
    return RequestOutput("r", None, [1, 2], [completion], finished)


def _stream(delta: bool = False) -> RequestStream:
    return RequestStream(SimpleNamespace(abort=lambda request_id: None, release=lambda n: None), "r", delta=delta)


def test_unread_outputs_merge_into_the_latest_and_other_items_keep_their_place():
    async def run():
        stream = _stream()
        marker = object()
        stream.put(marker)
        for n in range(1, 5):  # four steps' outputs before the reader looks: it gets the last one only
            stream.put(_output(list(range(n))))
        first, second = await stream.next_item(), await stream.next_item()
        stream.put(_output([0, 1, 2, 3, 4]))
        stream.put(ValueError("the engine failed"))
        stream.put(_output([0, 1, 2, 3, 4, 5]))  # behind the error: never merged into what came before it
        third = await stream.next_item()
        with pytest.raises(ValueError, match="the engine failed"):
            await stream.next_item()
        return first, second, third, await stream.next_item()

    first, second, third, fourth = asyncio.run(run())
    assert first is not None and not isinstance(first, RequestOutput)
    assert second.outputs[0].token_ids == [0, 1, 2, 3] and second.outputs[0].text == "<0><1><2><3>"
    assert third.outputs[0].token_ids == [0, 1, 2, 3, 4]
    assert fourth.outputs[0].token_ids == [0, 1, 2, 3, 4, 5]


def test_unread_deltas_are_appended_into_one_and_other_items_keep_their_place():
    async def run():
        stream = _stream(delta=True)
        for tokens in ([0, 1], [2], [], [3, 4]):  # four steps' deltas before the reader looks (one added nothing)
            stream.put(_output(tokens))
        first = await stream.next_item()
        stream.put(_output([5]))
        stream.put(_output([6]))
        stream.put(ValueError("the engine failed"))  # queued behind the merged output, which is complete
        stream.put(_output([7], finished=True))  # behind the error: never merged into what came before it
        second = await stream.next_item()
        with pytest.raises(ValueError, match="the engine failed"):
            await stream.next_item()
        return first, second, await stream.next_item()

    first, second, third = asyncio.run(run())
    assert first.outputs[0].token_ids == [0, 1, 2, 3, 4] and first.outputs[0].text == "<0><1><2><3><4>"
    assert second.outputs[0].token_ids == [5, 6] and second.outputs[0].text == "<5><6>" and not second.finished
    assert third.outputs[0].token_ids == [7] and third.finished and third.outputs[0].finish_reason == "length"


def test_prompt_scores_in_a_merged_delta_are_kept():
    """The delta that completes the prompt's scores (sent once) may land on an unread one: they stay."""
    async def run():
        stream = _stream(delta=True)
        stream.put(_output([0]))
        scored = _output([1])
        scored.prompt_logprobs, scored.prompt_ranks = [None, {2: -1.5}], [None, 3]
        stream.put(scored)
        stream.put(_output([2]))
        return await stream.next_item()

    merged = asyncio.run(run())
    assert merged.outputs[0].token_ids == [0, 1, 2]
    assert (merged.prompt_logprobs, merged.prompt_ranks) == ([None, {2: -1.5}], [None, 3])


def test_a_reader_that_keeps_up_gets_every_output_and_stops_at_the_finished_one():
    async def run():
        stream = _stream()
        seen = []

        async def read():
            async for out in stream:
                seen.append(out.outputs[0].token_ids)

        reader = asyncio.create_task(read())
        for n in range(1, 4):
            await asyncio.sleep(0)  # the reader waits on its future before each output arrives
            stream.put(_output(list(range(n)), finished=n == 3))
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 5)
        return seen, stream.finished

    seen, finished = asyncio.run(run())
    assert seen == [[0], [0, 1], [0, 1, 2]] and finished


def test_a_step_hands_all_its_outputs_to_the_event_loop_at_once(tiny_llama):
    """Three requests decoding together: each engine step is one ``call_soon_threadsafe`` carrying every request's
    output (not one wake-up per request), and every stream still ends with its whole output."""
    front = AsyncLLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_num_seqs=8), num_threads=1)

    async def run():
        await front.start()
        real_loop, wakeups = front._loop, []

        class CountingLoop:  # the engine thread reaches the event loop only through call_soon_threadsafe
            def call_soon_threadsafe(self, fn, *args):
                wakeups.append(len(args[0]) if fn.__name__ == "_put_all" else 0)
                return real_loop.call_soon_threadsafe(fn, *args)

            def __getattr__(self, name):
                return getattr(real_loop, name)

        front._loop = CountingLoop()
        per_step, step = [], front.engine.step
        front.engine.step = lambda: (outs := step(), per_step.append(len(outs)))[0]
        params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
        streams = await asyncio.gather(*(front.add_request(str(i), [5, 6, 7 + i], params) for i in range(3)))
        finals = []
        for stream in streams:
            async for out in stream:
                final = out
            finals.append(final)
            stream.close()
        await front.shutdown()
        return wakeups, per_step, finals

    wakeups, per_step, finals = asyncio.run(run())
    handoffs = [n for n in wakeups if n]
    assert handoffs == [n for n in per_step if n]  # one hand-off per step that produced outputs, all of them in it
    assert 3 in handoffs  # the three requests decoded in the same steps
    assert len(wakeups) - len(handoffs) == 3  # the other wake-ups: one acceptance per request
    assert all(f.finished and len(f.outputs[0].token_ids) == 6 for f in finals)
