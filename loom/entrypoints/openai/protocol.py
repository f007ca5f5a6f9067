"""Request schemas of the OpenAI-compatible API (pydantic), and their mapping to ``SamplingParams``.

Ranges are checked by ``SamplingParams`` itself (its ValueError becomes a 400 naming the field); pydantic checks
types and shapes. Unknown fields are ignored, as vLLM does, so clients' ``extra_body`` extras never break a call.
OpenAI's ``logit_bias`` (token id strings to biases in [-100, 100]). Loom's extra sampling fields: ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``allowed_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``priority`` (vLLM's, with ``--scheduling-policy
priority``), ``use_beam_search`` and ``length_penalty`` (``beam.py``), and vLLM's ``structured_outputs``
(``{"json" | "regex" | "choice" | "grammar" | "json_object"}``; the older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` too). Chat's ``response_format`` takes ``json_object`` and ``json_schema``.
Chat's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are OpenAI's (their meaning: ``tools.py``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loom.engine.sampling_defaults import SamplingDefaults
from loom.engine.sampling_params import SamplingParams
from loom.engine.structured import StructuredOutputsParams
from loom.entrypoints.openai.errors import bad_request

MAX_STOP = 16
"""Entries in ``stop`` and in ``stop_token_ids`` (OpenAI allows 4 stop strings); both are checked every step."""
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
MAX_TOOLS = 128
"""Tools per request (OpenAI's limit): each is rendered into the prompt, and "required" makes one grammar of all."""


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk carries the usage so far (not only the last, usage-only one)."""


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs``; its other options (``disable_any_whitespace``, ...) are ignored: JSON is always
    generated compact."""

    model_config = ConfigDict(extra="ignore")

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # Loom / vLLM extras
    allowed_token_ids: list[int] | None = None
    top_k: int | None = None
    """None (left out): the model's default (``--generation-config``), else 0 (off); likewise min_p and
    repetition_penalty, and temperature and top_p (else 1.0)."""
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    """vLLM's: lower is served first, with --scheduling-policy priority (a 400 otherwise unless 0)."""
    prompt_logprobs: int | None = None
    """vLLM's: every prompt token's log-probability and rank, and the top ones' (in [0, 20]); whole answers, and
    completions streams (in each choice's first chunk)."""
    use_beam_search: bool = False
    """vLLM's: the n best beams of a beam search of width n (``beam.py``) instead of sampling."""
    length_penalty: float = 1.0
    """Beam search: scores are cumulative log-probabilities over the generated length to this power."""
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    def _guided(self) -> dict:
        return {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                "grammar": self.guided_grammar}

    def _asks_structured(self) -> bool:
        """Whether ``structured_outputs`` or a ``guided_*`` field is given (valid or not)."""
        return self.structured_outputs is not None or any(v is not None for v in self._guided().values())

    def _structured(self) -> StructuredOutputsParams | None:
        """The request's structured-output spec (``structured_outputs`` or a ``guided_*`` field), or None."""
        spec = None
        if self.structured_outputs is not None:
            so = self.structured_outputs
            spec = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                    "json_object": bool(so.json_object)}
            param = "structured_outputs"
        guided = self._guided()
        if any(v is not None for v in guided.values()):
            if spec is not None:
                raise bad_request("give structured_outputs or a guided_* field, not both", "structured_outputs")
            spec, param = {**guided, "json_object": False}, "guided_json"
        if spec is None:
            return None
        try:
            return StructuredOutputsParams(**spec)
        except ValueError as exc:
            raise bad_request(str(exc), param) from None

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  structured: StructuredOutputsParams | None, defaults: SamplingDefaults | None) -> SamplingParams:
        """``defaults``: the model's (``--generation-config``) for what the request leaves out; None: the API's."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        defaults = defaults or SamplingDefaults()
        return SamplingParams(
            n=self.n,
            temperature=defaults.value("temperature", self.temperature, 1.0),
            top_p=defaults.value("top_p", self.top_p, 1.0),
            top_k=defaults.value("top_k", self.top_k, 0),
            min_p=defaults.value("min_p", self.min_p, 0.0),
            repetition_penalty=defaults.value("repetition_penalty", self.repetition_penalty, 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens,
            default_max_tokens=defaults.max_tokens if max_tokens is None else None,  # capped at the room left
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=structured,
            logit_bias=self.logit_bias or None,
            allowed_token_ids=self.allowed_token_ids,
            # a stream sends on only what is new; a whole answer needs only the finished output (no per-step
            # hand-off to the event loop)
            output_kind="delta" if self.stream else "final_only",
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def sampling_params(self, defaults: SamplingDefaults | None = None) -> SamplingParams:
        """``defaults``: the model's sampling defaults for the fields left out (max_tokens keeps its 16)."""
        if self.suffix:
            raise bad_request("suffix is not supported; put the text in the prompt", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (it must equal n); use n", "best_of")
        params = self._sampling(self.max_tokens, self.logprobs, self._structured(), defaults)
        _check_prompt_logprobs(self.prompt_logprobs)
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if wanted:  # the echoed prompt's tokens are scored too (vLLM, OpenAI); each view takes its top ones
            params = params.clone(prompt_logprobs=max(wanted))  # its range checked
        return params

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids; a list of ints is one tokenized prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is empty; give a string, a list of strings or token ids", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def _check_prompt_logprobs(k: int | None) -> None:
    if k is not None and not 0 <= k <= 20:
        raise bad_request(f"prompt_logprobs must be in [0, 20], got {k}", "prompt_logprobs")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted and ignored: a LLaVA model sees every image at its processor's one size."""


class ImagePart(BaseModel):
    """An image in a user message (OpenAI's shape); a vision model only (``media.load_image`` reads it)."""

    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as a JSON object's text (OpenAI's shape)."""

    @field_validator("arguments")
    @classmethod
    def _is_json_object(cls, value: str) -> str:
        if not is_json_object(value):
            raise ValueError("function arguments must be the text of a JSON object, e.g. '{\"city\": \"Paris\"}'")
        return value


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates take it: text content (a list of ``{"type": "text" | "image"}`` parts where
        it holds images: ``vision_content`` shapes it for the template); calls' arguments as dicts (templates write
        them with ``tojson``, as vLLM passes them)."""
        content = self.content
        if isinstance(content, list):
            if any(part.type == "image_url" for part in content):
                content = [{"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
                           for part in content]
            else:
                content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [{**({"id": c.id} if c.id else {}), "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if part.type == "image_url"]


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None
    """The arguments' JSON schema (an object's); None: the function takes none."""
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _is_object_schema(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f"parameters must be the JSON schema of an object (type: object), got type "
                             f"{json.dumps(value['type'])[:40]}")
        return value


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
        return StructuredOutputsParams(json=self.json_schema.schema_)


RESERVED_TEMPLATE_KWARGS = frozenset({
    "self", "chat_template", "conversation", "conversations", "messages", "tools", "documents", "tokenize",
    "add_generation_prompt", "continue_final_message", "sanitize_control_tokens", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs"})
"""``apply_chat_template``'s own arguments: a request's chat_template_kwargs may not set them (a ``chat_template``
there would run a client's Jinja in the server, whose sandbox does not bound the work: vLLM's advisory
GHSA-jmjw-q4x3-hmc2)."""


class ChatTemplateFields(BaseModel):
    """vLLM's chat template extras: ``chat_template_kwargs`` (the template's own variables, e.g. Qwen3's
    ``{"enable_thinking": false}``) and ``continue_final_message`` (the answer continues the last, assistant,
    message instead of opening a new one; needs ``add_generation_prompt: false``)."""

    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    """OpenAI's field: the template's ``reasoning_effort`` variable (gpt-oss' template writes "Reasoning: high" into
    its system message; templates without it ignore it), unless ``chat_template_kwargs`` sets it."""

    def template_options(self, messages: list, add_generation_prompt: bool) -> dict:
        """The extra keyword arguments of ``apply_chat_template``; a 400 naming the field for what cannot be."""
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {}))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)} (apply_chat_template's own "
                              "arguments); give the template's variables only", "chat_template_kwargs")
        options = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            options.setdefault("reasoning_effort", self.reasoning_effort)
        if self.continue_final_message:
            if add_generation_prompt:
                raise bad_request("continue_final_message needs add_generation_prompt: false (the answer continues "
                                  "the last message instead of opening a new one)", "continue_final_message")
            if not messages or messages[-1].role != "assistant":
                raise bad_request("continue_final_message needs an assistant message last: the one to continue",
                                  "continue_final_message")
            options["continue_final_message"] = True
        return options


class ChatCompletionRequest(_Common, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Any = None
    """"none", "auto", "required" or a NamedToolChoice; checked by ``tools.plan_tools`` (a 400 naming the field)."""
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

    def sampling_params(self, tool_structured: StructuredOutputsParams | None = None,
                        defaults: SamplingDefaults | None = None) -> SamplingParams:
        """``tool_structured``: the output constraint of a named or "required" tool_choice; ``defaults``: the
        model's sampling defaults for the fields left out (max_tokens / max_completion_tokens included)."""
        structured = self.response_format.structured() if self.response_format is not None else None
        if structured is not None and self._asks_structured():
            raise bad_request("give response_format or structured_outputs, not both", "response_format")
        if tool_structured is not None and (structured is not None or self._asks_structured()):
            raise bad_request("a named or \"required\" tool_choice already constrains the output; remove "
                              "response_format / structured_outputs", "tool_choice")
        structured = tool_structured or structured
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise bad_request(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request("prompt_logprobs comes with whole chat answers; leave out stream (completions streams "
                              "carry them)", "prompt_logprobs")
        params = self._sampling(max_tokens, logprobs, structured or self._structured(), defaults)
        _check_prompt_logprobs(self.prompt_logprobs)
        return params if self.prompt_logprobs is None else params.clone(prompt_logprobs=self.prompt_logprobs)


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    add_special_tokens: bool = True  # for `prompt`, as /v1/completions encodes it (vLLM's default too)
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 20)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
