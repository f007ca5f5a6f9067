"""Structured outputs: JSON schema, JSON object, regex, choice and Lark grammars, enforced by a token bitmask.

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))
    llm.generate(prompt, params)        # the text parses and validates against the schema

The grammar engine is llguidance (chosen over xgrammar by dependency weight: xgrammar pulls triton, ~640 MB;
llguidance is one small wheel; both run on CPU). A spec compiles to an llguidance grammar once and is cached by
(kind, canonical spec) in a bounded LRU; every sequence gets its own ``LLMatcher`` (n > 1 siblings too). Each step
the engine fills a bitmask for the constrained rows only (free rows cost nothing) and sets the disallowed logits
of those rows to -inf in one ``masked_fill``, before sampling; so constrained and free requests share a step. The
sampled token is then consumed by the matcher; when the grammar is complete (the matcher is stopped) the
sequence finishes with ``finish_reason "stop"``. EOS is allowed by the mask only where the grammar accepts.

With ``reasoning_parser`` (a thinking model) the grammar starts after the ``<think>`` block, as in vLLM
(``loom.engine.reasoning.ReasoningGate``): the block's rows are not masked.

Preemption by recompute keeps a sequence's output tokens, so its matcher stays valid (nothing to roll back).
Log-probabilities are those of the masked distribution (as vLLM V1 reports them).
Measured on SmolLM2 (49,152 tokens), 2 busy CPU cores: ~0.03 ms to fill one row's mask inside a small JSON schema;
fill (in parallel, ``LLExecutor``) + unpack + masked_fill for 16 constrained rows ~2 ms per step, mostly the
masked_fill over [16, 49152]. xgrammar was not timed: it does not install without triton.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loom.engine.reasoning import ReasoningGate, ThinkTokens

if TYPE_CHECKING:
    import torch

JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON (no free whitespace): small models otherwise tend to emit whitespace until max_tokens."""


class StructuredOutputError(ValueError):
    """The spec cannot be compiled (bad JSON schema, regex or grammar): HTTP 400 with the grammar engine's message."""


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams``: exactly one of the fields."""

    json: dict | str | None = None
    """A JSON schema (a dict or its JSON text)."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect)."""
    json_object: bool = False
    """Any JSON object."""
    _compiled: str | None = field(default=None, repr=False, compare=False)
    """The llguidance grammar, once compiled (set off the event loop by the server, before admission)."""

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise StructuredOutputError(
                "structured outputs take exactly one of json, regex, choice, grammar, json_object; got "
                + (", ".join(given) or "none"))
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise StructuredOutputError("choice must be a non-empty list of strings")

    def key(self) -> tuple[str, str]:
        """(kind, canonical spec): the compile-cache key."""
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from None
            return "json", json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


def _to_llguidance(kind: str, spec: str) -> str:
    from llguidance import LLMatcher

    if kind == "json":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:  # pragma: no cover - key() checked it
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise StructuredOutputError("a JSON schema must be a JSON object")
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise StructuredOutputError(f"invalid JSON schema: {exc}") from None
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        alternatives = " | ".join(json.dumps(c) for c in json.loads(spec))
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(spec)


class StructuredOutputs:
    """The engine's grammar side: tokenizer for llguidance, compile cache, matchers, bitmask fill and apply.

    ``prepare`` is thread-safe (the server compiles on its tokenizer thread; the engine thread reuses the result).
    """

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids, cache_size: int = 256,
                 think: ThinkTokens | None = None):
        self._hf_tokenizer = hf_tokenizer
        self.think = think
        """A thinking model's tags: each matcher waits for the end of the block (``ReasoningGate``)."""
        self._eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._tokenizer = None
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None
        self._executor = None
        self.parallel_fill: bool | None = None
        """Fill several rows' masks on llguidance's thread pool; None: only when the machine has cores that the
        engine's torch threads leave free (set on first use)."""
        self.num_cache_hits = 0
        self.num_cache_misses = 0

    @property
    def tokenizer(self):
        """The llguidance tokenizer (built on first use: ~0.3 s)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos)
            return self._tokenizer

    def prepare(self, params: StructuredOutputsParams) -> str:
        """Compile (or find in the cache) the grammar of ``params``, store it on them and return it;
        StructuredOutputError naming the problem when it does not compile."""
        if params._compiled is not None:
            return params._compiled
        from llguidance import LLMatcher

        key = params.key()
        tokenizer = self.tokenizer
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
        if grammar is None:
            grammar = _to_llguidance(*key)
            error = LLMatcher.validate_grammar(grammar, tokenizer)
            if error:
                raise StructuredOutputError(f"cannot compile the {key[0]} structured output: {error}")
            with self._lock:
                self.num_cache_misses += 1
                self._cache[key] = grammar
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        params._compiled = grammar
        return grammar

    def new_matcher(self, params: StructuredOutputsParams, prompt_token_ids: list[int] = ()):
        """A sequence's matcher: llguidance's, behind a ``ReasoningGate`` for a thinking model whose prompt has not
        closed the block."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, self.prepare(params), log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"cannot compile the structured output: {matcher.get_error()}")
        if self.think is not None:
            return ReasoningGate.for_prompt(matcher, self.think, prompt_token_ids)
        return matcher

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """Set to -inf, in place, the logits of tokens each matcher forbids next, for the given rows only (a row
        inside its thinking block is left as is; one whose output may still open the block keeps that tag)."""
        import llguidance.torch as lt
        import torch

        reopen = []
        if self.think is not None:
            kept = [(row, m) for row, m in zip(rows, matchers) if not isinstance(m, ReasoningGate) or m.constrains]
            reopen = [row for row, m in kept if isinstance(m, ReasoningGate) and m.allows_start]
            rows = [row for row, _ in kept]
            matchers = [m.matcher if isinstance(m, ReasoningGate) else m for _, m in kept]
            if not rows:
                return
        if reopen:
            start = self.think.start
            saved = logits[reopen, start]  # a copy (advanced indexing), put back after the mask
        words = (self.tokenizer.vocab_size + 31) // 32  # the grammar's vocabulary; the model's may be padded
        if self._bitmask is None or self._bitmask.shape[0] < len(rows) or self._bitmask.shape[1] != words:
            self._bitmask = torch.full((max(len(rows), 16), words), -1, dtype=torch.int32)
        mask = self._bitmask[: len(rows)]
        if self.parallel_fill is None:
            self.parallel_fill = (os.cpu_count() or 1) > torch.get_num_threads()
        if len(rows) == 1 or not self.parallel_fill:
            # NOTE: on a machine whose cores the torch threads already fill, the pool's threads only compete with
            # them (they spin after each fill): through `loom serve` on 2 cores, 16 constrained rows, the pool gave
            # 0.90-0.91x of free generation's tok/s and this loop 0.97x (benchmarks/structured.py, alternating runs).
            for i, matcher in enumerate(matchers):
                lt.fill_next_token_bitmask(matcher, mask, i)
        else:
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            lt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        with torch.inference_mode():
            apply_bitmask(logits, rows, mask)
            if reopen:
                logits[reopen, start] = saved


def apply_bitmask(logits: torch.Tensor, rows: list[int], mask: torch.Tensor) -> None:
    """-inf, in place, where the int32 bitmask of each of ``rows`` has its bit clear (and past its width).

    NOTE: on CPU, llguidance's own kernel reads the packed bits directly: 0.08 ms for 16 rows of SmolLM2's 49,152
    tokens, where unpacking to a bool mask and a masked_fill took 3.5 ms (measured here, 2 threads) — about 9% of a
    16-sequence decode step, which put structured outputs just under 90% of free generation.
    """
    import llguidance.torch as lt
    import torch

    from loom.ops.sampler import to_device

    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        if len(rows) == logits.shape[0]:  # every row constrained
            lt.apply_token_bitmask_inplace(logits, mask)
        else:
            index = torch.tensor(rows)
            sub = logits[index]
            lt.apply_token_bitmask_inplace(sub, mask)
            logits[index] = sub
        return
    forbidden = _forbidden(to_device(mask, logits.device), logits.shape[-1])
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        index = to_device(rows, logits.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


_BITS: dict = {}


def _forbidden(mask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 bitmask [R, W] (bit set: allowed) -> bool [R, width], True where forbidden (tokens past the grammar's
    vocabulary too)."""
    import torch

    shifts = _BITS.get(mask.device)
    if shifts is None:
        shifts = _BITS[mask.device] = torch.arange(32, dtype=torch.int32, device=mask.device)
    bits = (((mask.unsqueeze(-1) >> shifts) & 1) == 0).reshape(mask.shape[0], -1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.ones(mask.shape[0], width - bits.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([bits, pad], dim=1)
