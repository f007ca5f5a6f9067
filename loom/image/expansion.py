"""Prompt expansion (Fooocus' "V2" style), offline, through Loom's own LLM engine.

A short prompt ("an ankle boot") becomes a detailed one ("an ankle boot, elegant, leather, soft lighting, ...") before
the image model sees it. Fooocus runs a GPT-2 finetuned on image prompts and lets it continue the prompt, with every
token outside a list of positive words masked out. Loom asks an instruction model (the packaged SmolLM2, or the LLM
the same ``loom serve`` already serves) with a fixed instruction, and keeps it on topic with a structured-output
regex: the reply must be a comma-separated list of 4..12 phrases, each one of ``expansion_words.txt`` (visual,
positive words on no particular subject). The grammar is enforced token by token by the engine's llguidance bitmask,
so the model cannot drift into sentences, names or other subjects; and being the same for every prompt, it compiles
once.

The expansion is sampled with a seed derived from the image's seed (``seed % 2**31``): the same seed gives the same
expansion, so a PNG's recorded settings remake the same prompt. Phrases the reply repeats, or that the prompt already
holds, are dropped.

    expander = PromptExpander.load("smollm2")         # its own offline engine
    expander.expand(["an ankle boot"], seeds=[7])     # ['an ankle boot, elegant, leather, soft lighting, ...']
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import Callable
from importlib import resources

from loom.engine.sampling_params import SamplingParams

INSTRUCTION = (
    "You expand short image prompts for a text-to-image model. Reply with a comma-separated list of descriptive "
    "keywords for the picture: details, materials, lighting, colors, composition, style. Example: for 'a red dress' "
    "reply: elegant, silk, flowing, soft lighting, vivid colors, fashion photography, sharp focus"
)
MIN_PHRASES, MAX_PHRASES = 4, 12
MAX_TOKENS = 64
SAMPLING = dict(temperature=0.8, top_k=100, top_p=0.95, repetition_penalty=1.3, presence_penalty=1.0)
"""Fooocus samples its expansion with top-k 100; the penalties keep a 135M model from repeating one phrase."""

Generate = Callable[[list[list[int]], list[SamplingParams]], list[str]]
"""Token ids of each prompt and its sampling params -> each reply's text, in order."""


def expansion_words() -> list[str]:
    text = resources.files("loom.image").joinpath("expansion_words.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def phrase_regex(phrases: list[str]) -> str:
    """A regex for ``MIN_PHRASES..MAX_PHRASES`` of ``phrases`` separated by ", " (longest alternatives first)."""
    item = "(" + "|".join(re.escape(p) for p in sorted(set(phrases), key=lambda p: (-len(p), p))) + ")"
    return f"{item}(, {item}){{{MIN_PHRASES - 1},{MAX_PHRASES - 1}}}"


def join_expansion(prompt: str, reply: str, allowed: set[str]) -> str:
    """``prompt, phrase, phrase, ...``: the reply's phrases in order, each once, none already in the prompt, none
    outside ``allowed`` (a reply cut by the token limit may end in part of a phrase)."""
    seen = {p.strip().lower() for p in prompt.split(",")}
    kept = []
    for phrase in (p.strip() for p in reply.split(",")):
        if phrase in allowed and phrase not in seen:
            seen.add(phrase)
            kept.append(phrase)
    return ", ".join([prompt.rstrip(" ,")] + kept) if kept else prompt


class PromptExpander:
    """Expands prompts with an LLM reached through ``generate`` (an offline ``LLM`` or a served engine)."""

    def __init__(self, generate: Generate, load_tokenizer: Callable[[], object], name: str):
        self._generate = generate
        self._load_tokenizer = load_tokenizer
        self._tokenizer = None
        self.name = name
        self.vocabulary = expansion_words()
        self.regex = phrase_regex(self.vocabulary)

    @property
    def tokenizer(self):
        """The LLM's tokenizer, loaded on first use (a served engine may start after the image component)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @classmethod
    def load(cls, model: str = "smollm2", **engine_kwargs) -> PromptExpander:
        """An expander with an engine of its own (an ``LLMEngine``), stepped on the caller's thread."""
        # local: the LLM engine loads only when expansion is asked for
        from loom.engine.config import EngineConfig
        from loom.engine.llm_engine import LLMEngine

        engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        ids = itertools.count()

        def generate(prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
            request_ids = [f"expansion-{next(ids)}" for _ in prompts]
            for request_id, prompt, p in zip(request_ids, prompts, params):
                engine.add_request(request_id, None, p, prompt_token_ids=prompt)
            texts: dict[str, str] = {}
            while len(texts) < len(request_ids):
                for out in engine.step():
                    if out.finished:
                        texts[out.request_id] = out.outputs[0].text
            return [texts[r] for r in request_ids]

        return cls(generate, lambda: engine.tokenizer, model)

    @classmethod
    def served(cls, front, loop: asyncio.AbstractEventLoop, name: str) -> PromptExpander:
        """An expander on the LLM engine ``loom serve`` already runs (an ``AsyncLLMEngine`` on ``loop``), for
        callers on other threads (the image job worker): requests join the served traffic's batches."""
        from loom.models.loader import load_tokenizer  # local: as above

        async def collect(prompt: list[int], params: SamplingParams) -> str:
            request_id = f"image-expansion-{uuid.uuid4().hex}"
            stream = await front.add_request(request_id, prompt, params)
            text = ""
            try:
                async for out in stream:
                    text = out.outputs[0].text
            finally:
                stream.close()
            return text

        def generate(prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
            if _running_loop() is loop:
                raise RuntimeError("PromptExpander.served blocks: call it from a worker thread, not the event loop")
            futures = [asyncio.run_coroutine_threadsafe(collect(p, s), loop) for p, s in zip(prompts, params)]
            return [f.result() for f in futures]

        return cls(generate, lambda: load_tokenizer(front.engine.tokenizer_path), name)

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(**SAMPLING, seed=seed % 2**31, max_tokens=MAX_TOKENS,
                              structured_outputs={"regex": self.regex}, output_kind="final_only")

    def chat_ids(self, prompt: str) -> list[int]:
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer.encode(f"{INSTRUCTION}\nPrompt: {prompt}\nKeywords:")

    def expand(self, prompts: list[str], seeds: list[int]) -> list[str]:
        """Each prompt expanded with its own seed (one batch for all of them)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        todo = [i for i, p in enumerate(prompts) if p.strip()]  # an empty prompt stays empty
        params = [self.params(seeds[i]) for i in todo]
        replies = self._generate([self.chat_ids(prompts[i]) for i in todo], params)
        out = list(prompts)
        for i, reply in zip(todo, replies):
            out[i] = join_expansion(prompts[i], reply, set(self.vocabulary))
        return out


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
