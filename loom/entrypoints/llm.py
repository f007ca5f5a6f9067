"""``LLM``: offline batched generation in vLLM's shape.

    from loom import LLM, SamplingParams
    llm = LLM(model="smollm2")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=8))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import fields

import torch
from tqdm import tqdm

from loom.engine.beam_search import BeamSearch, BeamSearchParams, beam_output, next_token_logprobs, step_params
from loom.engine.config import EngineConfig
from loom.engine.llm_engine import LLMEngine
from loom.engine.lora import LoRARequest
from loom.engine.outputs import RequestOutput, logprob_objects
from loom.engine.sampling_params import SamplingParams
from loom.entrypoints.openai.media import content_format, load_image, vision_content
from loom.models.vision import image_placeholder

Prompt = str | dict


class LLM:
    def __init__(self, model: str = "smollm2", dtype: str = "auto", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks (nothing to do without tensor parallelism)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Every weight anew, named as in an HF checkpoint (``model.state_dict().items()``), written in place; the
        prefix cache is emptied (``LLMEngine.update_weights``). Returns how many tensors were written."""
        return self.engine.update_weights(weights)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` sample with when given no SamplingParams (vLLM's method): the defaults,
        with the model's own where its generation_config.json sets them (``--generation-config``)."""
        values = self.engine.sampling_defaults.as_dict()
        if "max_tokens" in values:  # the model's default: capped at the room a prompt leaves, never refused over it
            values.update(max_tokens=None, default_max_tokens=values["max_tokens"])
        return SamplingParams(**values)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: int | Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs come back in prompt order. ``lora_request``
        (one for all prompts, or one per prompt, None for the base model) needs ``LLM(..., enable_lora=True)``;
        ``priority`` (one for all, or one per prompt; lower first) ``LLM(..., scheduling_policy="priority")``. A
        prompt the engine refuses raises, and the prompts added before it are dropped. No ``sampling_params``:
        ``get_default_sampling_params()``."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        default = self.get_default_sampling_params() if sampling_params is None else None
        params = _final_only(_per_prompt(len(prompts), sampling_params, SamplingParams, default))
        loras = _per_prompt(len(prompts), lora_request, LoRARequest, None)
        priorities = _per_prompt(len(prompts), priority, int, 0)
        ids = self._add_all((*_split_prompt(prompt), p, lora, rank, _multi_modal_data(prompt))
                            for prompt, p, lora, rank in zip(prompts, params, loras, priorities))
        outputs = self._run(ids, use_tqdm)
        for out, p in zip(outputs, params, strict=True):
            self._logprob_objects(out, p)
        return outputs

    def _logprob_objects(self, out: RequestOutput, params: SamplingParams) -> None:
        """vLLM's ``Logprob`` objects in place of the engine's floats (``loom.engine.outputs.Logprob``: floats too)."""
        decode = self._decode_one
        for completion in out.outputs:
            if completion.logprobs is not None:
                completion.logprobs = [logprob_objects(entries, params.logprobs, decode)
                                       for entries in completion.logprobs]
        if out.prompt_logprobs is not None:
            ranks = out.prompt_ranks or [None] * len(out.prompt_logprobs)
            out.prompt_logprobs = [None if entries is None else
                                   logprob_objects(entries, params.prompt_logprobs, decode, rank)
                                   for entries, rank in zip(out.prompt_logprobs, ranks, strict=True)]

    def _decode_one(self, token: int) -> str:
        return self.engine.tokenizer.decode([token])

    def _add_all(self, requests: Iterable[tuple[str | None, list[int] | None, SamplingParams, LoRARequest | None,
                                               int, dict | None]]) -> list[str]:
        """Add each (text, token ids, params, LoRA, priority, images) as an engine request; their ids. All or none:
        one the engine refuses raises, and those added before it are dropped."""
        ids: list[str] = []
        try:
            for text, token_ids, params, lora, rank, mm in requests:
                rid = str(next(self._ids))
                self.engine.add_request(rid, text, params, prompt_token_ids=token_ids, lora_request=lora,
                                        priority=rank, multi_modal_data=mm)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    lora_request: LoRARequest | None = None) -> list[RequestOutput]:
        """Beam search (``loom.engine.beam_search``; vLLM's ``LLM.beam_search``): per prompt, one finished output
        holding the ``beam_width`` best beams, best first, with their ``cumulative_logprob``. Every prompt's beams
        share each step's batch."""
        prompts = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        searches = []
        for prompt in prompts:
            if _multi_modal_data(prompt):
                raise ValueError("beam_search does not take images yet; use generate()")
            text, token_ids = _split_prompt(prompt)
            ids = token_ids if token_ids is not None else self.engine.tokenizer.encode(text)
            if len(ids) + params.max_tokens > self.engine.max_model_len:
                raise ValueError(f"prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: more than the "
                                 f"model's context of {self.engine.max_model_len}; lower max_tokens")
            searches.append(BeamSearch(ids, params, set(self.engine.eos_token_ids)))
        while not all(s.done for s in searches):
            live = [s for s in searches if not s.done]
            ids = self._add_all((None, prompt_ids, step_params(search), lora_request, 0, None)
                                for search in live for prompt_ids in search.prompts())
            outputs = iter(self._run(ids, False))  # in the order added: search by search, beam by beam
            for search in live:
                search.advance([next_token_logprobs(next(outputs)) for _ in search.live])
        outputs = []
        for prompt, search in zip(prompts, searches):
            beams = search.result()
            texts = [self.engine.tokenizer.decode(b.token_ids, skip_special_tokens=True) for b in beams]
            text = prompt if isinstance(prompt, str) else prompt.get("prompt")
            outputs.append(beam_output(str(next(self._ids)), text, search.prompt_token_ids, beams, texts))
        return outputs

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of messages) or to several. A vision model's
        user messages may hold images as content parts: ``{"type": "image_pil", "image_pil": PIL image}`` or
        ``{"type": "image_url", "image_url": {"url": "data:..." or "file:///..."}}`` (vLLM's parts). ``use_tqdm``:
        a progress bar, as ``generate``'s."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            conversation, images = self._chat_images(conversation)
            prompt = {"prompt_token_ids": self.apply_chat_template(conversation, add_generation_prompt)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation's prompt ids; a vision model's image parts (``{"type": "image"}`` or any of ``chat``'s)
        become its placeholder, one per image (the engine repeats it)."""
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the model at {self.engine.model_path} has no chat template; use generate() instead")
        if self.engine.image_tokens is not None:
            parts = [{**m, "content": [p if p.get("type") == "text" else {"type": "image"} for p in m["content"]]}
                     if isinstance(m.get("content"), list) else m for m in messages]
            image_text = image_placeholder(tok, self.engine.image_tokens.placeholder)
            messages = vision_content(parts, content_format(tok.get_chat_template()), image_text)
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _chat_images(self, messages: list[dict]) -> tuple[list[dict], list]:
        """The messages with their image parts as ``{"type": "image"}``, and the images, read."""
        images, out = [], []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list) and any(p.get("type") != "text" for p in content):
                parts = []
                for p in content:
                    kind = p.get("type")
                    if kind == "image_pil":
                        images.append(p["image_pil"])
                    elif kind == "image_url":
                        url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                        images.append(load_image(url, allowed_local_path="/"))  # offline: the caller's own files
                    elif kind != "text":
                        raise ValueError(f"content part type {kind!r}: Loom takes text, image_url and image_pil")
                    parts.append(p if kind == "text" else {"type": "image"})
                m = {**m, "content": parts}
            out.append(m)
        return out, images

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[i] for i in ids]


def _per_prompt(n: int, value, kind: type, default) -> list:
    """One value for every prompt, or a list of one per prompt."""
    if value is None:
        return [default] * n
    if isinstance(value, kind):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"got {len(value)} {kind.__name__}s for {n} prompts; pass one, or one per prompt")
    return value


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """The same settings asking the engine for finished outputs only (``generate`` keeps nothing else); one copy per
    distinct object, and the caller's own objects untouched."""
    copies: dict[int, SamplingParams] = {}
    return [copies.setdefault(id(p), p if p.output_kind == "final_only" else p.clone(output_kind="final_only"))
            for p in params]


def _split_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"], None
    raise ValueError("a prompt is a string, {'prompt': text} or {'prompt_token_ids': [...]} (either with "
                     "'multi_modal_data' for a vision model)")


def _multi_modal_data(prompt: Prompt) -> dict | None:
    return prompt.get("multi_modal_data") if isinstance(prompt, dict) else None


def _progress(total: int):
    return tqdm(total=total, desc="requests", unit="req")
