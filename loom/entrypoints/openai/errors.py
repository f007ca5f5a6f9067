"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Routes raise ``OpenAIError``; ``OpenAIRoute`` (the router's route class) turns it, FastAPI's request-validation
error (which would be a 422) and the engine's ``ValueError`` into that body, so the /v1 routes answer like OpenAI's
API without touching the app-wide handlers that other components rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from loom.server.guard import ErrorResponse

log = logging.getLogger("loom.entrypoints.openai.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 500: "server_error", 503: "overloaded_error"}


_ERROR_CASES = {
    400: "bad input (the message names the field)",
    404: "unknown model",
    503: "overloaded or starting: retry after Retry-After seconds",
}
ERROR_RESPONSES: dict[int | str, dict] = {code: {"model": ErrorResponse, "description": text}
                                          for code, text in _ERROR_CASES.items()}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = _TYPES.get(self.status, HTTPStatus(self.status).phrase.lower().replace(" ", "_"))
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def from_validation(errors: list[dict]) -> OpenAIError:
    """The first pydantic/FastAPI validation error, naming the field (``messages.0.role``)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "missing":
        return OpenAIError(400, f"missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter")
    message = f"invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    return OpenAIError(400, message, param=param, code="invalid_value")


def from_value_error(exc: ValueError) -> OpenAIError:
    """Engine/SamplingParams messages start with the field they are about ("top_p must be in (0, 1], got 2")."""
    message = str(exc)
    word = message.split(" ", 1)[0]
    param = word if word.isidentifier() and word in _KNOWN_PARAMS else None
    if message.startswith("prompt"):
        param = "prompt"
    elif message.startswith("messages:"):
        param, message = "messages", message.removeprefix("messages: ")
    return OpenAIError(400, message, param=param, code="invalid_value")


_KNOWN_PARAMS = {"n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "max_tokens", "min_tokens", "logprobs", "seed", "stop", "logit_bias",
                 "allowed_token_ids", "priority"}


class OpenAIRoute(APIRoute):
    """Route class for the /v1 router: every error leaves as an OpenAI error body (400 instead of FastAPI's 422)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return from_validation(list(exc.errors())).response()
            except ValidationError as exc:
                return from_validation(exc.errors()).response()
            except ValueError as exc:
                return from_value_error(exc).response()
            except HTTPException as exc:  # FastAPI's own (a body it could not parse is 400): keep its status
                return OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers).response()
            except RecursionError:  # JSON nested deeper than the parser's recursion limit
                return OpenAIError(400, "the request body nests too deeply; flatten it", code="invalid_json").response()
            except Exception:  # an answer in OpenAI's shape, and the traceback (never the client) gets the details
                log.exception("unhandled error in %s", request.url.path)
                return OpenAIError(500, "internal server error; the server log has the details").response()

        return openai_handler
