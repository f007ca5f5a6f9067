"""What every request to `loom serve` passes before any route sees it: the API key, the body bound, the content type.

    app = build_app(components, registry, HTTPPolicy(api_key="K", max_body_bytes=32 << 20))

``Guard`` is a plain ASGI middleware in front of the whole app, so one rule covers the LLM, model-server and image
routes alike, whichever of them are enabled:

- With an API key, every path but ``/health``, ``/ping``, ``/metrics`` and ``/version`` needs
  ``Authorization: Bearer KEY`` (compared in constant time); anything else is 401. A path is public only by exact
  match, so odd spellings (``//health``, ``/health/``) fall on the protected side.
- A body larger than ``max_body_bytes`` is 413 before it is read (by its Content-Length) or once the bytes read
  pass the bound (chunked bodies, which are read here, bounded, and replayed to the app).
- A request with a body must say it is JSON (``application/json`` or ``*/*+json``), else 415, except on the paths
  that take raw bodies (the model server's ``/predictions/``). Browsers send cross-site "simple" POSTs only as
  form or text content types, so this also closes cross-site requests to JSON routes.

Errors leave in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, which every component uses.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from pydantic import BaseModel

PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(slots=True)
class HTTPPolicy:
    api_key: str | None = None
    """Bearer key every non-public route requires; None: no authentication."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body on any route; larger ones get 413."""
    raw_body_prefixes: tuple[str, ...] = ()
    """Path prefixes whose bodies may have any content type (images, text); every other body must be JSON."""
    key_name: str = "API key (--api-key)"
    """What the key is called in a 401's message."""
    public_paths: frozenset[str] = PUBLIC_PATHS
    """Paths that need no key."""

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; pass a non-empty --api-key (or unset LOOM_API_KEY)")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error Loom's routes answer: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


GUARD_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key (with --api-key)"},
    413: {"model": ErrorResponse, "description": "body over --max-body-mb"},
    415: {"model": ErrorResponse, "description": "a body without a JSON content type"},
}
"""What the Guard may answer on any route, for the OpenAPI schema."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """The error shape every Loom route answers with."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_json_content_type(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def bearer_matches(authorization: str, key: str) -> bool:
    """True when the header is ``Bearer <key>`` (scheme case-insensitive, constant-time comparison of the key)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware enforcing an ``HTTPPolicy`` on every http and websocket request."""

    def __init__(self, app, policy: HTTPPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.policy.api_key and scope["path"] not in self.policy.public_paths:
            if not bearer_matches(headers.get("authorization", ""), self.policy.api_key):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await _reply(send, 401, f"missing or wrong {self.policy.key_name}: send 'Authorization: Bearer <key>'",
                             "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"})
                return
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS:
            receive = await self._checked_body(scope, headers, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _checked_body(self, scope, headers: dict[str, str], receive, send):
        """The receive callable to hand on, or None when an error was already sent."""
        limit = self.policy.max_body_bytes
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(send, limit, int(length))
            return None
        has_body = chunked or (length is not None and length.isdigit() and int(length) > 0)
        if has_body and not self._raw_body_allowed(scope["path"]):
            content_type = headers.get("content-type", "")
            if not is_json_content_type(content_type):
                await _reply(send, 415, f"this route takes JSON: send the body with 'Content-Type: application/json' "
                             f"(got {content_type[:64]!r})", "invalid_request_error", "unsupported_media_type")
                return None
        if chunked:  # no length to check up front: read it here, bounded, then replay it to the app
            try:
                body = await _read_bounded(receive, limit)
            except BodyTooLarge:
                await _too_large(send, limit, None)
                return None
            return _replay(body, receive)
        return receive

    def _raw_body_allowed(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.policy.raw_body_prefixes)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


async def _read_bounded(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would report it

    return replay


async def _too_large(send, limit: int, length: int | None) -> None:
    size = f"a body of {length} bytes" if length is not None else "a body"
    await _reply(send, 413, f"{size} exceeds this server's limit of {limit} bytes (--max-body-mb); send less per "
                 "request", "invalid_request_error", "body_too_large")


async def _reply(send, status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, kind, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
