"""Beam search over the engine, driven as vLLM v1 drives it: each step asks the engine for one token of every live
beam with its top log-probabilities (the prompt and the beam so far are a prefix-cache hit but for their last partial
block); the choice of beams follows HF transformers' ``generate(num_beams=...)``. Pure Python: the drivers are
``LLM.beam_search`` (offline) and the server's ``use_beam_search`` (``loom/entrypoints/openai/beam.py``).

    search = BeamSearch(prompt_ids, BeamSearchParams(beam_width=4, max_tokens=32), eos_token_ids={2})
    while not search.done:
        rows = [logprobs_of_next_token(prompt) for prompt in search.prompts()]   # one engine request each
        search.advance(rows)                                                     # {token id: log-probability}
    best = search.result()          # width beams, best first

Each step weighs the best ``width × (1 + end tokens)`` continuations (at least ``2 × width``); an end token among the
first ``width`` finishes a beam, the first ``width`` others live on, and at ``max_tokens`` the first ``width`` finish.
Finished beams rank by ``cum_logprob / generated_length ** length_penalty``, the end token counted (HF's; vLLM
divides by the prompt's length too and weighs every end token it meets). The search stops early when ``width`` beams
have finished and the best live one cannot beat them at its length (HF's heuristic). Beams rank by the model's own
log-probabilities: sampling settings (temperature, top-p, penalties) do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.engine.outputs import CompletionOutput, RequestOutput
from loom.engine.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10
"""Each step asks for (at least) 2 × width log-probabilities per beam, and the engine gives at most 20."""
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    """Scores are divided by the generated length to this power (in [-10, 10]): above 0 favours longer beams."""
    include_stop_str_in_output: bool = False
    """Keep a finished beam's end-of-sequence token in its tokens (and text, if it has one)."""

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not -10.0 <= self.length_penalty <= 10.0:  # NaN fails too
            raise ValueError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")


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
        """The summed log-probability over the generated length, end token included (HF's), to the penalty."""
        return self.cum_logprob / max(len(self.logprobs), 1) ** length_penalty


class BeamSearch:
    """One prompt's search; ``prompts()`` are the token ids to extend this step, ``advance`` takes each one's
    next-token log-probabilities (at least the top ``num_candidates`` of them)."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int]):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.live = [Beam([])]
        self.finished: list[Beam] = []
        self.num_steps = 0

    @property
    def num_candidates(self) -> int:
        """Continuations weighed each step: width × (1 + end tokens), at least 2 × width (HF's ``beams_to_keep``):
        enough for ``width`` live ones whatever ends."""
        return max(2, 1 + len(self.eos_token_ids)) * self.params.beam_width

    @property
    def done(self) -> bool:
        return not self.live or self.num_steps >= self.params.max_tokens

    def prompts(self) -> list[list[int]]:
        return [self.prompt_token_ids + beam.token_ids for beam in self.live]

    def advance(self, rows: list[dict[int, float]]) -> None:
        """``rows[i]``: {token id: log-probability} after live beam i.

        NOTE: HF transformers' rules (``_beam_search``): of the best ``num_candidates`` continuations of all beams,
        an end token among the first ``width`` finishes a beam (one further down is dropped); the first ``width``
        others live on; at ``max_tokens`` the first ``width`` all finish. The search stops early when ``width`` beams
        have finished and the best live one scores no better than the worst of them at its length."""
        assert len(rows) == len(self.live), "one row of log-probabilities per live beam"
        width, keep = self.params.beam_width, self.num_candidates
        candidates = [(beam.cum_logprob + logprob, beam, token, logprob)
                      for beam, row in zip(self.live, rows)
                      for token, logprob in sorted(row.items(), key=lambda kv: -kv[1])[:keep]]
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then token rank
        self.num_steps += 1
        last = self.num_steps >= self.params.max_tokens
        live = []
        for rank, (cum, beam, token, logprob) in enumerate(candidates[:keep]):
            child = Beam(beam.token_ids + [token], cum, beam.logprobs + [logprob])
            ends = token in self.eos_token_ids
            if rank < width and (ends or last):
                child.finish_reason = "stop" if ends else "length"
                if ends and not self.params.include_stop_str_in_output:
                    child.token_ids.pop()
                self.finished.append(child)
            elif not ends and not last and len(live) < width:
                live.append(child)
        self.live = [] if self._cannot_improve(live) else live

    def _cannot_improve(self, live: list[Beam]) -> bool:
        """HF's early-stop heuristic: ``width`` beams finished, and the best live one, scored at its current length,
        is no better than the worst of them."""
        if not live or len(self.finished) < self.params.beam_width:
            return False
        penalty = self.params.length_penalty
        worst = sorted((b.score(penalty) for b in self.finished), reverse=True)[self.params.beam_width - 1]
        return live[0].score(penalty) <= worst

    def result(self) -> list[Beam]:
        """The ``beam_width`` best finished beams, best first."""
        return sorted(self.finished, key=lambda b: -b.score(self.params.length_penalty))[:self.params.beam_width]


def step_params(search: BeamSearch) -> SamplingParams:
    """One engine request per live beam and step: one token, the top ``num_candidates`` log-probabilities (raw, as
    the model gives them), no text. NOTE: the engine gives at most 20, so a model with more than 20 − width end
    tokens, all among a row's best, may keep fewer than width beams live where HF keeps width."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=min(search.num_candidates, MAX_LOGPROBS),
                          ignore_eos=True, detokenize=False, output_kind="final_only")


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
