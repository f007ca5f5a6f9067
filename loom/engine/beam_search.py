"""Beam search over the engine, as vLLM v1 runs it: each step asks the engine for one token of every live beam with
its top 2 × width log-probabilities (the prompt and the beam so far are a prefix-cache hit but for their last partial
block), and keeps the ``beam_width`` best continuations by cumulative log-probability. Pure Python: the drivers are
``LLM.beam_search`` (offline) and the server's ``use_beam_search`` (``loom/entrypoints/openai/beam.py``).

    search = BeamSearch(prompt_ids, BeamSearchParams(beam_width=4, max_tokens=32), eos_token_ids={2})
    while not search.done:
        rows = [logprobs_of_next_token(prompt) for prompt in search.prompts()]   # one engine request each
        search.advance(rows)                                                     # {token id: log-probability}
    best = search.result()          # width beams, best first

A beam that draws an end-of-sequence token (unless ``ignore_eos``) is finished there; the search ends after
``max_tokens`` steps or when no live beam is left, and the finished and live beams are ranked by
``cum_logprob / num_tokens ** length_penalty``, where ``num_tokens`` counts the generated tokens without the end token
(HF transformers' normalisation; vLLM divides by the prompt's length too). Beams rank by the model's own
log-probabilities: sampling settings (temperature, top-p, penalties) do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.engine.outputs import CompletionOutput, RequestOutput
from loom.engine.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10
"""Each step asks for 2 × width log-probabilities per beam, and the engine gives at most 20."""


@dataclass(frozen=True, slots=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    """Scores are divided by the generated length to this power: above 0 favours longer beams."""
    include_stop_str_in_output: bool = False
    """Keep a finished beam's end-of-sequence token in its tokens (and text, if it has one)."""

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(slots=True)
class Beam:
    token_ids: list[int]
    """Generated tokens (the end token only with ``include_stop_str_in_output``)."""
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    """Each generated token's log-probability (the end token's included, in the sum too)."""
    finish_reason: str | None = None
    """"stop" (an end token), "length" (max_tokens), None while live."""

    def score(self, length_penalty: float) -> float:
        return self.cum_logprob / max(len(self.logprobs) - (self.finish_reason == "stop"), 1) ** length_penalty


class BeamSearch:
    """One prompt's search; ``prompts()`` are the token ids to extend this step, ``advance`` takes each one's
    next-token log-probabilities (at least the top 2 × width)."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int]):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.live = [Beam([])]
        self.finished: list[Beam] = []
        self.num_steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.num_steps >= self.params.max_tokens

    def prompts(self) -> list[list[int]]:
        return [self.prompt_token_ids + beam.token_ids for beam in self.live]

    def advance(self, rows: list[dict[int, float]]) -> None:
        """``rows[i]``: {token id: log-probability} after live beam i."""
        assert len(rows) == len(self.live), "one row of log-probabilities per live beam"
        width, candidates = self.params.beam_width, []
        for beam, row in zip(self.live, rows):
            # NOTE: 2 × width per beam, as HF and vLLM take: enough for width live ones even if width of them end
            for token, logprob in sorted(row.items(), key=lambda kv: -kv[1])[:2 * width]:
                child = Beam(beam.token_ids + [token], beam.cum_logprob + logprob, beam.logprobs + [logprob])
                if token in self.eos_token_ids and not self.params.ignore_eos:
                    child.finish_reason = "stop"
                    if not self.params.include_stop_str_in_output:
                        child.token_ids.pop()
                    self.finished.append(child)
                else:
                    candidates.append(child)
        # same length: ranking by the sum is ranking by the score (ties kept in order: beam, then token rank)
        self.live = sorted(candidates, key=lambda b: -b.cum_logprob)[:width]
        self.num_steps += 1

    def result(self) -> list[Beam]:
        """The ``beam_width`` best beams, finished and live (these with finish_reason "length"), best first."""
        for beam in self.live:
            beam.finish_reason = "length"
        ranked = sorted(self.finished + self.live, key=lambda b: -b.score(self.params.length_penalty))
        return ranked[:self.params.beam_width]


def step_params(params: BeamSearchParams) -> SamplingParams:
    """One engine request per live beam and step: one token, the top 2 × width log-probabilities (raw, as the model
    gives them), no text."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, ignore_eos=True,
                          detokenize=False, output_kind="final_only")


def next_token_logprobs(out: RequestOutput) -> dict[int, float]:
    return out.outputs[0].logprobs[0]


def beam_output(request_id: str, prompt: str | None, prompt_token_ids: list[int], beams: list[Beam],
                texts: list[str], num_cached_tokens: int = 0) -> RequestOutput:
    """The best ``beams`` (``BeamSearch.result()``) and their ``texts`` as one finished request's outputs, best first
    (``index``: the rank)."""
    outputs = [CompletionOutput(i, text, b.token_ids, b.cum_logprob,
                                [{t: lp} for t, lp in zip(b.token_ids, b.logprobs)], b.finish_reason)
               for i, (b, text) in enumerate(zip(beams, texts))]
    return RequestOutput(request_id, prompt, prompt_token_ids, outputs, True, num_cached_tokens)
