"""Tool-call parsers: OpenAI tool calls found in a model's text, whole or while it streams.

    parser = TOOL_PARSERS["hermes"]
    content, calls = parser.extract('Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    # "Sure. ", [{"id": "call_…", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    stream = parser.stream()
    delta = stream.feed(text_so_far)               # {"content": …} and/or {"tool_calls": [{"index": 0, …}]}
    delta = stream.feed(final_text, final=True)

Every format is content, then a region of JSON call objects ``{"name": …, "arguments" | "parameters": {…}}``:
hermes (Hermes 2 Pro, Qwen 2.5/3) ``<tool_call>{…}</tool_call>`` (several allowed); llama3_json ``{"name": …,
"parameters": {…}}`` (after an optional ``<|python_tag|>``, several separated by ``;``); mistral
``[TOOL_CALLS] [{…}, …]``; openai (gpt-oss): harmony's messages to ``functions.NAME``, which the ``gpt_oss``
reasoning parser rewrites as hermes calls; and the JSON array that ``tool_choice: "required"`` holds the output to.
So a parser is data (the pattern that opens the region, the text allowed between calls) and one incremental
scanner does the rest.

Arguments are the model's own JSON text of the value, not re-serialised, so streamed pieces concatenate to exactly
the string the non-streaming answer has. Text before the region is content; text after the last call is dropped
(as vLLM does). Output that does not hold a well-formed call is returned as content, never an error.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass

import regex

ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    """An id in OpenAI's shape (``call_`` + 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ToolParser:
    name: str
    start: regex.Pattern
    """Where the region of calls begins (the region starts at the match: a ``{`` in it belongs to the first call)."""
    gap: regex.Pattern
    """What may stand between calls (and before the first one); anything else closes the region."""
    markers: tuple[str, ...] = ()
    """Literal tokens of the format: where the tokenizer has them as special tokens, the text must keep them."""

    def stream(self, max_calls: int | None = None, strict: bool = True) -> ToolCallStream:
        """``strict``: as ``extract``'s, for an output that ends before any call was sent."""
        return ToolCallStream(self, max_calls, strict)

    def extract(self, text: str, max_calls: int | None = None,
                strict: bool = True) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a whole output; content is None when only whitespace precedes the calls.

        strict: a call must be complete, well-formed JSON with object arguments, else the whole text is content
        and there are no calls (free text, tool_choice "auto"). Not strict: every named call as far as it goes,
        as a stream would have sent it (a constrained output cut by max_tokens)."""
        search = 0
        while (m := self.start.search(text, search)) is not None:
            region = text[m.start():]
            scanner = _Scanner(self.gap)
            scanner.scan(region)
            found = scanner.calls[:max_calls]
            if strict and not all(_is_well_formed(region, call) for call in found):
                break
            calls = [tool_call(call.name, _arguments(region, call)) for call in found if call.name is not None]
            if calls:
                content = text[: m.start()]
                return (content if content.strip() else None), calls
            search = m.end()
        return text, []


@dataclass(slots=True)
class _Call:
    """One call object of the region; offsets are into the region's text."""

    start: int
    end: int | None = None
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None


class _Scanner:
    """Incremental scan of a region of JSON objects: each object's extent, its ``name`` and the span of its
    arguments value. It follows strings and nesting only; the non-streaming path checks the JSON itself."""

    def __init__(self, gap: regex.Pattern):
        self.gap = gap
        self.pos = 0
        self.calls: list[_Call] = []
        self.closed = False
        """Text that is neither a call nor allowed between calls came: the region is over."""
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._gap_start = 0
        self._key_span: tuple[int, int] | None = None  # the last string closed at depth 1 (a key if ':' follows)
        self._key: str | None = None  # the key whose value comes next, at depth 1
        self._value_start: int | None = None

    def scan(self, text: str) -> None:
        """Scan ``text`` (the region so far; it only ever grows) from where the last call stopped."""
        for i in range(self.pos, len(text)):
            if self.closed:
                break
            self._step(text, i, text[i])
        self.pos = len(text)

    def is_false_start(self, text: str) -> bool:
        """No call has begun and what follows the start can no longer lead to one."""
        return not self.calls and self.gap.fullmatch(text, 0, len(text), partial=True) is None

    def _step(self, text: str, i: int, ch: str) -> None:
        if self._depth == 0:
            if ch == "{":
                if self.gap.fullmatch(text, self._gap_start, i) is None:
                    self.closed = True
                    return
                self.calls.append(_Call(i))
                self._depth, self._key, self._key_span, self._value_start = 1, None, None, None
            return
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._depth == 1:
                    self._string_closed(text, i + 1)
            return
        if self._depth == 1 and self._key is not None and self._value_start is None and not ch.isspace():
            self._value_begins(i)
        if ch == '"':
            self._in_string, self._string_start = True, i
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._close(text, i)
        elif ch == ":" and self._depth == 1 and self._key_span is not None:
            self._key = _loads(text[self._key_span[0]:self._key_span[1]])
            self._key_span = None
        elif ch == "," and self._depth == 1 and self._value_start is not None:
            self._value_ends(text, i)  # a number, true, false or null

    def _close(self, text: str, i: int) -> None:
        self._depth -= 1
        if self._depth == 1 and self._value_start is not None:  # an object or array value is complete
            self._value_ends(text, i + 1)
        elif self._depth == 0:
            if self._value_start is not None:
                self._value_ends(text, i)
            self.calls[-1].end = i + 1
            self._gap_start = i + 1

    def _string_closed(self, text: str, end: int) -> None:
        if self._value_start == self._string_start:
            self._value_ends(text, end)
        else:
            self._key_span = (self._string_start, end)

    def _value_begins(self, i: int) -> None:
        self._value_start = i
        call = self.calls[-1]
        if self._key in ARGUMENT_KEYS and call.args_start is None:
            call.args_start = i

    def _value_ends(self, text: str, end: int) -> None:
        raw = text[self._value_start:end].rstrip()
        call = self.calls[-1]
        if self._key == "name" and call.name is None:
            name = _loads(raw)
            call.name = name if isinstance(name, str) and name else None
        elif self._key in ARGUMENT_KEYS and call.args_start == self._value_start:
            call.args_end = self._value_start + len(raw)
        self._key, self._value_start = None, None


def _loads(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _arguments(region: str, call: _Call) -> str:
    """The call's arguments as far as known: an object streams as it comes; a string holding JSON (some models
    quote the object) and other scalars only once complete. No arguments at all read as ``{}``."""
    if call.args_start is None:
        return "{}" if call.end is not None else ""
    raw = region[call.args_start: call.args_end if call.args_end is not None else len(region)]
    if raw[:1] in ("{", "["):
        return raw
    if call.args_end is None:
        return ""
    decoded = _loads(raw)
    return decoded if isinstance(decoded, str) else raw


def _is_well_formed(region: str, call: _Call) -> bool:
    """Complete, named, valid JSON, and the arguments a JSON object."""
    return (call.end is not None and call.name is not None and isinstance(_loads(region[call.start:call.end]), dict)
            and isinstance(_loads(_arguments(region, call)), dict))


def tool_call(name: str, arguments: str) -> dict:
    """A tool call in OpenAI's shape, with a fresh id."""
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


class ToolCallStream:
    """One choice's stream: ``feed`` the whole text so far, get the OpenAI delta to send (possibly ``{}``).

    Content streams until the region may begin (a partial start such as ``<tool_`` is held back). Calls stream in
    order: the first delta of each has its index, id, type and name, later ones pieces of its arguments. If the
    output ends without a named call, the held text is sent as content, so the pieces always add up to the text.
    """

    def __init__(self, parser: ToolParser, max_calls: int | None = None, strict: bool = True):
        self.parser = parser
        self.max_calls = max_calls
        self.strict = strict
        self._search = 0
        self._content_end = 0
        self._content_sent = 0
        self._region: int | None = None
        self._start_end = 0
        self._scanner: _Scanner | None = None
        self._args_sent: list[int] = []  # per call sent: characters of arguments sent

    @property
    def called(self) -> bool:
        return bool(self._args_sent)

    def feed(self, text: str, final: bool = False) -> dict:
        self._advance(text, final)
        delta: dict = {}
        if self._content_end > self._content_sent:
            delta["content"] = text[self._content_sent:self._content_end]
            self._content_sent = self._content_end
        calls = self._call_deltas(text[self._region:]) if self._region is not None else []
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _advance(self, text: str, final: bool) -> None:
        while True:
            if self._region is None:
                m = self.parser.start.search(text, self._search, partial=not final)
                if m is None or m.partial:
                    self._content_end = len(text) if m is None else m.start()
                    return
                self._region, self._content_end, self._start_end = m.start(), m.start(), m.end()
                self._scanner = _Scanner(self.parser.gap)
            region = text[self._region:]
            self._scanner.scan(region)
            if not self._scanner.is_false_start(region):
                break
            self._region, self._search = None, self._start_end  # a start marker in prose: look further on
        # nothing sent as a call yet: the whole answer's reading decides (a call that arrives whole in this last feed,
        # as merged deltas or accepted drafts bring it, is still a call; a malformed one is content)
        if final and not self.called and not self.parser.extract(text, self.max_calls, strict=self.strict)[1]:
            self._region, self._content_end = None, len(text)

    def _call_deltas(self, region: str) -> list[dict]:
        out = []
        for index, call in enumerate(self._scanner.calls[: self.max_calls]):
            if call.name is None:
                break
            if index == len(self._args_sent):
                self._args_sent.append(0)
                out.append({"index": index, **tool_call(call.name, "")})
            piece = _arguments(region, call)[self._args_sent[index]:]
            if not piece:
                continue
            self._args_sent[index] += len(piece)
            if out and out[-1]["index"] == index:
                out[-1]["function"]["arguments"] += piece
            else:
                out.append({"index": index, "function": {"arguments": piece}})
        return out


def _parser(name: str, start: str, gap: str, markers: tuple[str, ...] = ()) -> ToolParser:
    return ToolParser(name, regex.compile(start), regex.compile(gap), markers)


class RewrittenToolParser:
    """A format whose calls are not JSON objects (GLM-4.5's XML-like arguments), rewritten into hermes' calls as the
    text arrives, so that hermes' scanner finds, checks and streams them. ``for_tools``: the request's tools tell which
    arguments are strings (written raw by the template) and which are JSON."""

    def __init__(self, name: str, rewrite, markers: tuple[str, ...] = (), string_args: dict | None = None):
        self.name, self.markers, self._rewrite, self.string_args = name, markers, rewrite, string_args

    def for_tools(self, tools: list[dict] | None) -> RewrittenToolParser:
        strings = {}
        for tool in tools or []:
            function = tool.get("function") or {}
            properties = (function.get("parameters") or {}).get("properties") or {}
            strings[function.get("name")] = {k for k, v in properties.items() if (v or {}).get("type") == "string"}
        return RewrittenToolParser(self.name, self._rewrite, self.markers, strings)

    def rewrite(self, text: str, final: bool) -> str:
        return self._rewrite(text, final, self.string_args or {})

    def extract(self, text: str, max_calls: int | None = None, strict: bool = True) -> tuple[str | None, list[dict]]:
        content, calls = TOOL_PARSERS["hermes"].extract(self.rewrite(text, True), max_calls, strict)
        return (text if not calls else content), calls  # no call: the model's own text, not the rewrite

    def stream(self, max_calls: int | None = None, strict: bool = True) -> _RewrittenStream:
        return _RewrittenStream(self, TOOL_PARSERS["hermes"].stream(max_calls, strict))


class _RewrittenStream:
    def __init__(self, parser: RewrittenToolParser, inner: ToolCallStream):
        self.parser, self.inner = parser, inner

    @property
    def called(self) -> bool:
        return self.inner.called

    def feed(self, text: str, final: bool = False) -> dict:
        return self.inner.feed(self.parser.rewrite(text, final), final=final)


def glm45_as_hermes(text: str, final: bool, string_args: dict[str, set[str]]) -> str:
    """GLM-4.5's calls, ``<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...</tool_call>``, as
    hermes' ``<tool_call>{"name": NAME, "arguments": {"K": V, ...}}</tool_call>``: V as a JSON string where the tool
    says the argument is one (the template writes strings raw), else V itself where it is JSON. A call's name is
    written once its line ends, each argument once its value closes: the rewrite of a text is a start of the rewrite
    of any longer one (a stream's rule)."""
    out, pos = [], 0
    while (start := text.find("<tool_call>", pos)) >= 0:
        out.append(text[pos:start])
        name_start = start + len("<tool_call>")
        ends = [i for i in (text.find("\n", name_start), text.find("<arg_key>", name_start),
                            text.find("</tool_call>", name_start)) if i >= 0]
        if not ends:  # the name is still arriving (or never ends: hermes finds no call in what is left)
            return "".join(out) + (text[start:] if final else "<tool_call>")
        name = text[name_start : min(ends)].strip()
        out.append(f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {{')
        pos, first = min(ends), True
        while True:
            key_at, close_at = text.find("<arg_key>", pos), text.find("</tool_call>", pos)
            if close_at >= 0 and (key_at < 0 or close_at < key_at):
                out.append("}}</tool_call>")
                pos = close_at + len("</tool_call>")
                break
            key_end = text.find("</arg_key>", key_at) if key_at >= 0 else -1
            value_at = text.find("<arg_value>", key_end) if key_end >= 0 else -1
            value_end = text.find("</arg_value>", value_at) if value_at >= 0 else -1
            if value_end < 0:  # an argument still arriving
                return "".join(out)
            key = text[key_at + len("<arg_key>") : key_end].strip()
            raw = text[value_at + len("<arg_value>") : value_end]
            value = _glm_value(raw, key in string_args.get(name, ()))
            out.append(("" if first else ", ") + f"{json.dumps(key)}: {value}")
            pos, first = value_end + len("</arg_value>"), False
    return "".join(out) + text[pos:]


def _glm_value(raw: str, is_string: bool) -> str:
    if not is_string:
        try:
            json.loads(raw)
            return raw.strip()
        except ValueError:
            pass
    return json.dumps(raw)


DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DEEPSEEK_CALL_BEGIN, DEEPSEEK_SEP, DEEPSEEK_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
DEEPSEEK_MARKERS = (DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALL_BEGIN, DEEPSEEK_SEP, DEEPSEEK_CALL_END, DEEPSEEK_CALLS_END)
"""DeepSeek's tool-call tokens (full-width bars, U+2581 in place of spaces)."""


def deepseek_as_hermes(text: str, final: bool, string_args: dict[str, set[str]], v31: bool = False) -> str:
    """DeepSeek-V3's (and R1-0528's) calls, ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
    <｜tool▁call▁end｜>``, or V3.1's, ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>``, all within
    ``<｜tool▁calls▁begin｜>`` ... ``<｜tool▁calls▁end｜>``, as hermes' ``<tool_call>{"name": NAME, "arguments":
    ARGS}</tool_call>``: ARGS is JSON already, so it streams through as it arrives (a V3 call without the fence: up to
    its end token). A header that breaks off (a name over more than one line, a format token inside it) is no call:
    its text stays as written. The wrapping tokens around calls are dropped (an output without a call keeps its text
    as written), and while the text may still grow, a header still arriving, or a tail that could begin one of the
    format's tokens or end the arguments, is held back: the rewrite of a text is a start of the rewrite of any longer
    one."""
    out, pos, called = [], 0, False
    while (start := text.find(DEEPSEEK_CALL_BEGIN, pos)) >= 0:
        lead = _between_calls(text[pos:start]) if called else _DEEPSEEK_LEAD.sub("", text[pos:start])
        state, name, at, args_end = _deepseek_header(text, start + len(DEEPSEEK_CALL_BEGIN), v31, final)
        if state == "waiting":  # the name is still arriving (or never ends: hermes finds no call in what is left)
            return "".join(out) + (text[pos:] if final else lead)
        if state == "broken":  # no call: as written, up to what broke it off
            out.append(text[pos:at])
            pos = at
            continue
        out.append(lead)
        out.append(f'<tool_call>{{"name": {json.dumps(name)}, "arguments": ')
        called = True
        if args_end is None:  # V3: whether a fence opens the arguments is not known yet
            return "".join(out)
        close = text.find(args_end, at)
        if close < 0:  # the arguments still arriving
            return "".join(out) + (text[at:] if final else _held_back(text[at:], (args_end,)))
        out.append(text[at:close] + "}</tool_call>")
        pos = close + len(args_end)
    rest = text[pos:]
    if called:  # after a call: hermes drops what follows the last one
        return "".join(out) + (_between_calls(rest) if final else _held_back(_between_calls(rest), DEEPSEEK_MARKERS))
    if final:
        return "".join(out) + rest
    rest = _held_back(rest, (DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALL_BEGIN))
    return "".join(out) + _DEEPSEEK_LEAD.sub("", rest)  # it may open calls: held back until they do (or it ends)


_FENCE = "```json"
_HEADER_STOPS = ("\n", DEEPSEEK_CALL_BEGIN, DEEPSEEK_CALL_END, DEEPSEEK_SEP)
"""What ends a line of a DeepSeek call's header: its separator or its line (V3's name), else it is broken off."""


def _deepseek_header(text: str, at: int, v31: bool, final: bool) -> tuple[str, str, int, str | None]:
    """A DeepSeek call's header from ``at`` (after its begin token): ("named", name, where the arguments start, what
    ends them: None while V3's fence may still be arriving), ("waiting", "", at, None) while it arrives, or ("broken",
    "", where it broke off, None). V3.1's name ends at the separator; V3's type at the separator, then its name at the
    line's end; each within one line, before any of the format's tokens."""
    for end_mark in (DEEPSEEK_SEP,) if v31 else (DEEPSEEK_SEP, "\n"):
        stops = [i for m in _HEADER_STOPS if (i := text.find(m, at)) >= 0]
        if not stops:
            return "waiting", "", at, None
        stop = min(stops)
        if not text.startswith(end_mark, stop):
            return "broken", "", stop, None
        name, at = text[at:stop].strip(), stop + len(end_mark)
    if v31:
        return "named", name, at, DEEPSEEK_CALL_END
    after = text[at : at + len(_FENCE)]
    if after == _FENCE:
        return "named", name, at + len(_FENCE), "\n```"
    if _FENCE.startswith(after) and not final:  # the fence may be arriving
        return "named", name, at, None
    return "named", name, at, DEEPSEEK_CALL_END  # no fence: the arguments run to the call's end token


_DEEPSEEK_LEAD = regex.compile(regex.escape(DEEPSEEK_CALLS_BEGIN) + r"\s*$")
"""The token that opens DeepSeek's calls (and what whitespace follows it) at the end of the content before them."""


def _between_calls(text: str) -> str:
    """What stands between (or after) DeepSeek's calls, without the format's tokens."""
    for marker in (DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALLS_END, DEEPSEEK_CALL_END):
        text = text.replace(marker, "")
    return text


def _held_back(text: str, markers: tuple[str, ...]) -> str:
    """``text`` less its longest tail that is a proper start of one of ``markers``."""
    for cut in range(max(map(len, markers)) - 1, 0, -1):
        if len(text) >= cut and any(m.startswith(text[-cut:]) for m in markers):
            return text[:-cut]
    return text


TOOL_PARSERS: dict[str, ToolParser | RewrittenToolParser] = {
    "hermes": _parser("hermes", r"<tool_call>", r"(?:\s|</?tool_call>)*", ("<tool_call>", "</tool_call>")),
    "llama3_json": _parser("llama3_json", r'<\|python_tag\|>|\{\s*"name"\s*:', r"(?:\s|;|<\|python_tag\|>)*",
                           ("<|python_tag|>",)),
    "mistral": _parser("mistral", r"\[TOOL_CALLS\]", r"(?:\s|,|\[TOOL_CALLS\]|\[|\])*", ("[TOOL_CALLS]",)),
    # gpt-oss: the harmony reasoning parser (reasoning.py) hands each message to functions.* on as a hermes call
    "openai": _parser("openai", r"<tool_call>", r"(?:\s|</?tool_call>)*"),
    "glm45": RewrittenToolParser("glm45", glm45_as_hermes, ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                                                             "<arg_value>", "</arg_value>")),
    "deepseek_v3": RewrittenToolParser("deepseek_v3", deepseek_as_hermes, DEEPSEEK_MARKERS),
    "deepseek_v31": RewrittenToolParser("deepseek_v31", functools.partial(deepseek_as_hermes, v31=True),
                                        DEEPSEEK_MARKERS),
}
"""The parsers ``--tool-call-parser`` chooses from (vLLM's names)."""

REQUIRED_PARSER = _parser("required", r"\[", r"[\s\[,]*")
"""The JSON array of ``{"name", "parameters"}`` that tool_choice "required" constrains the output to."""
