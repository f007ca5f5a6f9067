"""Per-request sampling settings, in vLLM's shape (``SamplingParams``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.engine.structured import StructuredOutputsParams

OUTPUT_KINDS = ("cumulative", "delta", "final_only")
MAX_LOGIT_BIAS = 1024
"""Entries in ``logit_bias`` (OpenAI allows 300)."""
MAX_ALLOWED_TOKEN_IDS = 8192
"""Entries in ``allowed_token_ids``: the sampler reads them every step (to allow nearly every token, ban the others
with ``logit_bias`` instead)."""


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    """Completions to return for the prompt; they share the prompt's KV blocks through the prefix cache."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Keep the most likely tokens whose probabilities sum to top_p."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 or -1 disables top-k."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float = 1.0
    """Divides the logits of tokens already in the prompt or output (> 1 discourages repeats)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logits of tokens already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logits per time it was generated."""
    max_tokens: int | None = 16
    """Tokens to generate at most; None means up to the model's context."""
    default_max_tokens: int | None = None
    """Where ``max_tokens`` is None, generate at most this many, fewer where the context leaves less room (the
    model's default from its generation_config.json, ``--generation-config``)."""
    min_tokens: int = 0
    """Tokens to generate before EOS or a stop token may end the output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the output (not included in it)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the output."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    seed: int | None = None
    """Seed of this request's own random generator (the same seed, the same tokens, whatever shares the batch)."""
    logprobs: int | None = None
    """Top log-probabilities to return per generated token (0 = only the sampled token's); None = none."""
    prompt_logprobs: int | None = None
    """Top log-probabilities to return per prompt token (0 = only the prompt token's own), from the model's raw
    logits as vLLM returns them; the first token has none. The prompt is then computed whole (no prefix-cache hit)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    detokenize: bool = True
    """False: token ids only, no text (vLLM's flag: throughput benchmarks, random-weight models whose vocabulary
    the tokenizer does not cover); stop strings need text."""
    output_kind: str = "cumulative"
    """What ``LLMEngine.step`` returns for this request (vLLM's ``RequestOutputKind``): "cumulative", its output so far
    at every step that advanced it; "delta", only what is new since its last output (text, token ids and logprobs;
    ``cumulative_logprob``, ``finish_reason`` and ``stop_reason`` as in a cumulative one), what a stream sends on:
    a cumulative output copies every token and logprob list so far, O(length) at each step; "final_only", only the
    finished output, cumulative (``LLM.generate`` asks for this: it keeps nothing else)."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, JSON object, regex, choice or Lark grammar (see loom.engine.structured);
    a dict is taken as StructuredOutputsParams' fields."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling (OpenAI's ``logit_bias``: -100 bans a token, 100 all but
    forces it); string keys are taken as ids. Log-probabilities stay the model's own, as vLLM returns them."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled (vLLM's ``allowed_token_ids``); None: any."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:
            self.logit_bias = _token_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids(self.allowed_token_ids, "allowed_token_ids")
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is empty: no token could be sampled; give at least one id")
            if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(f"allowed_token_ids has {len(self.allowed_token_ids)} entries; at most "
                                 f"{MAX_ALLOWED_TOKEN_IDS} (ban tokens with logit_bias -100 instead)")
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}"),
            (0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be 0/-1 (off) or >= 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.default_max_tokens is None or self.default_max_tokens >= 1,
             f"default_max_tokens must be >= 1, got {self.default_max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (self.detokenize or not self.stop, "stop strings are matched on text: drop stop or keep detokenize on"),
            (self.output_kind in OUTPUT_KINDS,
             f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> SamplingParams:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)


def _token_ids(values, name: str) -> list[int]:
    """Token ids given as ints or integer strings (JSON object keys), each >= 0."""
    ids = []
    for value in values:
        try:
            token = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} takes token ids (integers), got {value!r}") from None
        if token < 0 or (isinstance(value, float) and value != token):
            raise ValueError(f"{name} takes token ids (integers >= 0), got {value!r}")
        ids.append(token)
    return ids


def _token_bias(bias) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias maps token ids to biases, e.g. {{\"50256\": -100}}; got {type(bias).__name__}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    ids = _token_ids(bias, "logit_bias")
    values = []
    for value in bias.values():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r}")
        values.append(float(value))
    return dict(zip(ids, values))
