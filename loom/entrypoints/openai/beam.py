"""``use_beam_search`` on /v1/completions and /v1/chat/completions (vLLM's extra): the search of
``loom.engine.beam_search``, each step's beams admitted as one-token engine requests beside everyone else's, the
``n`` best beams returned as the choices (best first; ``n`` is the beam width, at most 10).

    {"model": "smollm2", "prompt": "The capital of France is", "n": 3, "max_tokens": 8,
     "use_beam_search": true, "length_penalty": 1.0}

Beams rank by the model's own log-probabilities, so the sampling fields have no effect, and the fields that shape
or stop an output token by token (``stop``, ``logprobs``, structured outputs, tools, ``stream``, ...) are a 400
naming the field rather than dropped. ``ignore_eos`` and ``include_stop_str_in_output`` apply to the end token.
"""

from __future__ import annotations

import asyncio
import time

from loom.engine.beam_search import BeamSearch, BeamSearchParams, beam_output, next_token_logprobs, step_params
from loom.engine.lora import LoRARequest
from loom.engine.outputs import RequestOutput
from loom.entrypoints.openai.errors import bad_request
from loom.entrypoints.openai.serving import ServingContext, close_all, finals_of

REFUSED = ("stream", "logprobs", "top_logprobs", "echo", "stop", "stop_token_ids", "min_tokens", "logit_bias",
           "allowed_token_ids", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
           "guided_grammar", "response_format", "tools", "prompt_logprobs")
"""Fields that act on an output token by token (or on its stream): not supported with beam search."""


def check_beam_request(req) -> None:
    """Before any work: the request's own checks, as ``sampling_params`` makes them (suffix, best_of, stream_options
    without stream, top_logprobs without logprobs, ranges), then a 400 naming each field beam search cannot honour."""
    req.sampling_params()
    for name in REFUSED:
        if _given(req, name):
            raise bad_request(f"{name} is not supported with use_beam_search; leave it out or sample instead", name)


def beam_params(req, max_tokens: int | None, max_model_len: int, prompt_len: int,
                default_max_tokens: int | None = None) -> BeamSearchParams:
    """The search settings of a request ``check_beam_request`` passed, for a prompt of ``prompt_len`` tokens;
    ``default_max_tokens``: the model's, where the request gives none (capped at the room left)."""
    if max_tokens is None:
        room = max_model_len - prompt_len
        max_tokens = room if default_max_tokens is None else min(room, default_max_tokens)
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: more than the model's "
                          f"context of {max_model_len}; lower max_tokens", "max_tokens")
    try:
        return BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                length_penalty=req.length_penalty,
                                include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        param = {"beam_width": "n", "length_penalty": "length_penalty"}.get(str(exc).split(" ")[0], "max_tokens")
        raise bad_request(str(exc).replace("beam_width", "n (the beam width)"), param) from None


def _given(req, name: str) -> bool:
    """Whether the client set ``name`` to anything but its default (a "text" response_format is no format)."""
    if name not in req.model_fields_set:
        return False
    value = getattr(req, name)
    if value in ([], {}):  # an empty list of stops or tools, an empty bias: nothing asked
        return False
    if name == "response_format":
        return value is not None and value.type != "text"
    return value != type(req).model_fields[name].default


async def beam_search(ctx: ServingContext, request_id: str, prompt_ids: list[int], params: BeamSearchParams,
                      lora: LoRARequest | None = None, priority: int = 0,
                      skip_special_tokens: bool = True) -> RequestOutput:
    """Run the search to its end. Room for its ``beam_width`` sequences is held from the start (a 503 then when the
    server is full) to the end, so that no step is refused after the work of the ones before."""
    search = BeamSearch(prompt_ids, params, set(ctx.front.engine.eos_token_ids))
    cached = None
    with ctx.hold(params.beam_width):
        while not search.done:
            streams = await ctx.open_streams(f"{request_id}-{search.num_steps}", search.prompts(),
                                             step_params(search), time.time(), lora, priority, held=True)
            try:
                finals = await finals_of(streams)
            finally:
                close_all(streams)
            cached = finals[0].num_cached_tokens if cached is None else cached  # the prompt's, at the first step
            search.advance([next_token_logprobs(out) for out in finals])
    beams = search.result()
    texts = [await ctx.encoder.run(_text, ctx.encoder.tokenizer, b.token_ids, skip_special_tokens)
             for b in beams]  # off the event loop
    return beam_output(request_id, None, prompt_ids, beams, texts, cached or 0)


def _text(tokenizer, token_ids: list[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


async def beam_searches(ctx: ServingContext, request_id: str, prompts: list[list[int]], params: list[BeamSearchParams],
                        lora: LoRARequest | None, priority: int, skip_special_tokens: bool) -> list[RequestOutput]:
    """One search per prompt, side by side; one failing (or the request cancelled) ends them all."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(beam_search(ctx, f"{request_id}-{i}", p, bp, lora, priority,
                                                   skip_special_tokens))
                     for i, (p, bp) in enumerate(zip(prompts, params))]
    except ExceptionGroup as failed:  # the first failure, as the route answers it (a 503 when full, ...)
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]
