"""Bad input gets 400 (404 for an unknown model, 401 without the key) with OpenAI's error body naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import start_llm_server, tiny_config


def _post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        ({"model": "tiny"}, "messages", "missing"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "role"),
        ({**CHAT, "temperature": "hot"}, "temperature", "number"),
        ({**CHAT, "temperature": 500}, "temperature", "[0, 100]"),
        ({**CHAT, "top_p": 0}, "top_p", "(0, 1]"),
        ({**CHAT, "n": 0}, "n", ">= 1"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", ">= 1"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs", "logprobs: true"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools.0.function", "missing"),
        ({**CHAT, "logit_bias": {"5": 200}}, "logit_bias", "[-100, 100]"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({**CHAT, "logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
        ({**CHAT, "allowed_token_ids": []}, "allowed_token_ids", "empty"),
        ({**CHAT, "priority": 1}, "priority", "--scheduling-policy priority"),  # an FCFS server
    ],
)
def test_chat_validation_is_400_naming_the_field(tiny_server, body, param, phrase):
    err = _error(_post(tiny_server, "/chat/completions", body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert phrase in err["message"]


def test_invalid_json_is_400(tiny_server):
    r = httpx.post(f"{tiny_server.base_url}/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400)["message"]


def test_prompt_over_the_context_names_both_lengths(tiny_server):
    err = _error(_post(tiny_server, "/completions", {"model": "tiny", "prompt": [7] * 1500}), 400)
    assert "1500" in err["message"] and "1024" in err["message"] and err["param"] == "prompt"
    err = _error(_post(tiny_server, "/completions", {"model": "tiny", "prompt": [7] * 1000, "max_tokens": 100}), 400)
    assert "1000" in err["message"] and "1024" in err["message"]


def test_unknown_model_is_404(tiny_server):
    err = _error(_post(tiny_server, "/chat/completions", {**CHAT, "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"] and "tiny" in err["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_api_key_guards_v1_but_not_health(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=64), api_key="sekrit")
    try:
        err = _error(_post(server, "/chat/completions", CHAT), 401)
        assert err["type"] == "authentication_error"
        assert httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=server.base_url, api_key="sekrit", max_retries=0)
        answer = ok.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=2)
        assert answer.usage.completion_tokens >= 1
    finally:
        server.stop()
