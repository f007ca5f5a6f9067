"""The model's default sampling parameters (``loom.engine.sampling_defaults``, vLLM's --generation-config): read from
generation_config.json, applied to what a request leaves out, never over what it gives; off with "vllm"."""

from __future__ import annotations

import argparse
import json
import shutil

import httpx
import pytest

from loom import LLM, SamplingParams
from loom.engine.config import EngineConfig
from loom.engine.sampling_defaults import SamplingDefaults, read_generation_config, sampling_defaults
from loom.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from loom.entrypoints.openai.serve import add_serve_arguments
from loom.flags import config_from_args
from tests.server.conftest import start_llm_server, tiny_config

QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}
"""Qwen3-8B's generation_config.json."""


def test_a_generation_config_gives_its_sampling_parameters_only(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({**QWEN3, "max_new_tokens": 256, "min_p": 0.05}))
    assert read_generation_config(tmp_path).as_dict() == {"temperature": 0.6, "top_k": 20, "top_p": 0.95,
                                                          "min_p": 0.05, "max_tokens": 256}
    assert read_generation_config(tmp_path / "missing").as_dict() == {}
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        read_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"top_k": 20.0, "max_new_tokens": 8.0}')
    assert read_generation_config(tmp_path) == SamplingDefaults(top_k=20, max_tokens=8)  # whole numbers as ints
    for bad, match in (('{"temperature": -1}', "temperature"), ('{"top_p": 0}', "top_p"),
                       ('{"max_new_tokens": Infinity}', "finite"), ('{"temperature": NaN}', "finite")):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(ValueError, match=f"generation_config.json: .*{match}"):
            read_generation_config(tmp_path)


def test_modes_and_overrides(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3))
    assert sampling_defaults("vllm", None, tmp_path).as_dict() == {}
    assert sampling_defaults("auto", None, tmp_path / "model.gguf").as_dict() == {}  # a file: nothing to read
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text('{"temperature": 0.3}')
    assert sampling_defaults(str(other), None, tmp_path).as_dict() == {"temperature": 0.3}
    override = SamplingDefaults.from_dict({"temperature": 0.1, "max_new_tokens": 9})
    assert sampling_defaults("auto", override, tmp_path).as_dict() == {"temperature": 0.1, "top_k": 20, "top_p": 0.95,
                                                                       "max_tokens": 9}
    with pytest.raises(ValueError, match="no generation_config.json there"):
        sampling_defaults(str(tmp_path / "nowhere"), None, tmp_path)
    with pytest.raises(ValueError, match="unknown sampling default"):
        SamplingDefaults.from_dict({"temperatur": 0.5})
    assert EngineConfig(override_generation_config={"top_k": 5}).override_generation_config == SamplingDefaults(top_k=5)


def test_the_override_flag_takes_vllms_json():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", "m", "--override-generation-config", '{"temperature": 0.5, '
                              '"max_new_tokens": 12}', "--generation-config", "vllm"])
    engine = config_from_args(EngineConfig, args)
    assert engine.override_generation_config == SamplingDefaults(temperature=0.5, max_tokens=12)
    assert engine.generation_config == "vllm"
    for bad in ('{"temp": 0.5}', '{"max_new_tokens": 1e400}', '{"top_p": 2}'):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--override-generation-config", bad])


def test_requests_get_the_defaults_for_what_they_leave_out():
    defaults = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1,
                                max_tokens=7)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    params = chat.sampling_params(defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens, params.default_max_tokens) == (0.6, 0.95, 20, 0.05, 1.1, None, 7)
    given = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, top_p=1,
                                  top_k=0, min_p=0, repetition_penalty=1, max_tokens=3)
    params = given.sampling_params(defaults=defaults)  # given values, zeros included, stand
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens, params.default_max_tokens) == (0, 1, 0, 0, 1, 3, None)
    plain = chat.sampling_params()
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty, plain.max_tokens) == (
        1.0, 1.0, 0, 0.0, 1.0, None)
    completion = CompletionRequest(model="m", prompt="hi").sampling_params(defaults)
    assert completion.max_tokens == 16 and completion.temperature == 0.6  # OpenAI's completions default stands


@pytest.fixture(scope="module")
def greedy_by_default(tiny_llama, tmp_path_factory):
    """The tiny model with a generation_config.json asking for greedy answers of 5 tokens."""
    path = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("defaults") / "model")
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    return path


def test_the_offline_api_samples_with_the_models_defaults(greedy_by_default):
    llm = LLM(str(greedy_by_default), num_kv_blocks=64, seed=1)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    default = llm.generate(prompt)[0].outputs[0].token_ids
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids
    assert len(default) == 5 and default == greedy
    assert llm.get_default_sampling_params().temperature == 0.0
    capped = LLM(str(greedy_by_default), num_kv_blocks=64, max_model_len=16,
                 override_generation_config={"max_new_tokens": 4096})  # past the context: capped, not refused
    assert len(capped.generate({"prompt_token_ids": list(range(5, 15))})[0].outputs[0].token_ids) <= 6
    plain = LLM(str(greedy_by_default), num_kv_blocks=64, generation_config="vllm")
    assert plain.get_default_sampling_params().max_tokens == 16  # the file ignored: SamplingParams' own


def test_a_default_max_tokens_past_the_context_is_capped_not_refused(greedy_by_default):
    server = start_llm_server(tiny_config(greedy_by_default, num_kv_blocks=64, max_model_len=40))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea"}],
                "ignore_eos": True, "max_tokens": None}
        server.component.front.engine.sampling_defaults = SamplingDefaults(max_tokens=4096)
        answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 40  # the room the prompt left
    finally:
        server.stop()


def test_the_server_fills_in_the_models_defaults(greedy_by_default):
    server = start_llm_server(tiny_config(greedy_by_default, num_kv_blocks=64))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea"}]}
        first = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
        again = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
        assert first["usage"]["completion_tokens"] <= 5
        assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]  # greedy
        longer = httpx.post(f"{server.base_url}/chat/completions", json={**body, "max_tokens": 9, "temperature": 0,
                                                                            "ignore_eos": True}, timeout=60).json()
        assert longer["usage"]["completion_tokens"] == 9  # the request's own values stand
        response = httpx.post(f"{server.base_url}/responses", json={"model": "tiny", "input": "Hello"},
                              timeout=60).json()
        assert response["temperature"] == 0.0 and response["usage"]["output_tokens"] <= 5
        beams = httpx.post(f"{server.base_url}/chat/completions", json={**body, "use_beam_search": True, "n": 2,
                                                                           "ignore_eos": True}, timeout=60).json()
        assert beams["usage"]["completion_tokens"] == 2 * 5  # each beam stops at the model's default
    finally:
        server.stop()
