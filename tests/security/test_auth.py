"""Finding 2: one API key for the whole app. Every route of every component answers 401 without it, except the four
public ones; the key works whichever components are enabled; the image UI sends it and asks for it at login."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.serve import ModelServerComponent
from loom.cli import build_parser
from loom.image.ui import ApiClient, build_ui_app
from loom.server.app import build_app
from loom.server.cli import policy_from_args
from loom.server.guard import PUBLIC_PATHS, HTTPPolicy
from tests.security.conftest import AUTH, ECHO, KEY

DOC_ROUTES = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect")]


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route in the app's OpenAPI schema, path parameters filled in, plus the docs."""
    routes = []
    for path, operations in app.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "echo", path)
        routes += [(method.upper(), concrete) for method in sorted(operations)]
    return routes + DOC_ROUTES


def test_every_route_but_the_public_four_needs_the_key(stack):
    routes = every_route(stack.app)
    protected = [(m, p) for m, p in routes if p not in PUBLIC_PATHS]
    assert {p for _, p in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
                                      "/detokenize", "/v1/responses/echo", "/v1/responses/echo/input_items",
                                      "/v1/embeddings", "/predictions/echo", "/v1/images/generations",
                                      "/v1/images/jobs", "/v1/models", "/openapi.json"}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for method, path in protected:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
        for path in sorted(PUBLIC_PATHS):
            assert client.get(path).status_code == 200, path
        # With the key, the same requests reach their routes (whatever those then answer).
        for method, path in protected:
            assert client.request(method, path, headers=AUTH).status_code != 401, (method, path)


def test_odd_spellings_of_public_paths_stay_protected(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for path in ("/health/", "//health", "/HEALTH", "/metrics/x", "/version/"):
            r = client.get(path)
            assert r.status_code in (401, 404) and r.status_code != 200, (path, r.status_code)
        assert client.get("/health/").status_code == 401


def test_key_protects_a_server_without_an_llm(tmp_path):
    """Before: --api-key was an LLM flag, so `loom serve --serve ... --api-key K` left every route open."""
    args = build_parser(["serve", "--serve", f"echo={ECHO}", "--api-key", "k2"]).parse_args(
        ["serve", "--serve", f"echo={ECHO}", "--api-key", "k2"])
    policy = policy_from_args(args)
    assert policy.api_key == "k2"
    registry = CollectorRegistry()
    component = ModelServerComponent([ModelConfig("echo", ECHO)], registry, "t", token_file=None)
    with TestClient(build_app([component], registry, policy)) as client:
        assert client.post("/predictions/echo", json=1).status_code == 401
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 401
        assert client.get("/openapi.json").status_code == 401
        ok = client.post("/predictions/echo", json=1, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200 and ok.json()["item"] == 1


def test_empty_key_is_refused():
    with pytest.raises(ValueError, match="empty"):
        HTTPPolicy(api_key="  ")


def test_image_ui_sends_the_key_and_asks_for_it(stack):
    assert ApiClient(stack.url, KEY).options()["model"]["model"] == "tiny"
    with pytest.raises(httpx.HTTPStatusError):
        ApiClient(stack.url).options()
    with TestClient(build_ui_app(stack.url, KEY)) as ui:
        assert ui.get("/config").status_code == 401  # the UI itself wants a login
        assert ui.post("/login", data={"username": "any", "password": "wrong"}).status_code != 200
        assert ui.post("/login", data={"username": "any", "password": KEY}).status_code == 200
        assert ui.get("/config").status_code == 200
