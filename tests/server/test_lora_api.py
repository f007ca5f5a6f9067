"""Multi-LoRA over HTTP with the official ``openai`` client: adapters named in ``model`` answer as the engine does
offline, /v1/models lists them under their parent, runtime load/unload (only when allowed, confined to the store)
loses no request under load, and the metrics show adapters sharing steps."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from loom import LLM, LoRARequest, SamplingParams
from loom.engine.config import EngineConfig
from loom.entrypoints.openai.serve import LLMServerConfig
from tests.engine.test_lora import TARGETS_ALL, make_adapter
from tests.server.conftest import start_llm_server

PROMPT = [1, 42, 7, 99, 13, 5]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama):
    """An adapter store with three adapters (a1, a2, a3) of the tiny Llama."""
    root = tmp_path_factory.mktemp("store")
    make_adapter(root / "a1", tiny_llama, seed=1, r=8, alpha=16, targets=TARGETS_ALL)
    make_adapter(root / "a2", tiny_llama, seed=2, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    make_adapter(root / "a3", tiny_llama, seed=3, r=4, alpha=4, targets=["o_proj", "gate_proj"])
    return root


def server_config(tiny_llama, store, **overrides) -> LLMServerConfig:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_num_seqs=32, enable_lora=True, max_loras=3,
                          max_lora_rank=8)
    options = {"served_model_names": ["tiny"], "threads": 1, "lora_modules": [f"a1={store / 'a1'}"], **overrides}
    return LLMServerConfig(engine, **options)


@pytest.fixture(scope="module")
def server(tiny_llama, store):
    server = start_llm_server(server_config(tiny_llama, store, allow_runtime_lora_updating=True,
                                            lora_store=str(store)))
    yield server
    server.stop()


def complete(url: str, model: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_adapter_named_in_model_answers_as_offline(server, tiny_llama, store):
    offline = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=8, num_kv_blocks=32)
    want = offline.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                            lora_request=LoRARequest("a1", 1, str(store / "a1")))[0].outputs[0].text
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        got = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        models = {m.id: m for m in client.models.list().data}
    assert got.choices[0].text == want and got.model == "a1"
    assert base.choices[0].text != want
    assert models["a1"].parent == "tiny" and models["tiny"].parent is None
    missing = complete(server.url, "nope")
    assert missing.status_code == 404 and "a1" in missing.json()["error"]["message"]


def test_runtime_load_and_unload(server, store, tmp_path):
    url = server.url
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert r.status_code == 200, r.text
    assert complete(url, "a2").status_code == 200
    assert "a2" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert again.status_code == 400 and "already served" in again.json()["error"]["message"]
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "a3", outside)
    for path in (str(outside), "../elsewhere", "/etc"):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and "--lora-store" in r.json()["error"]["message"]
        assert str(tmp_path) not in r.text
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "missing"})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status_code == 200
    assert complete(url, "a2").status_code == 404
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404


def test_load_and_unload_under_load_lose_no_request(server):
    """24 requests over the base model and adapters while a3 is loaded and a2 loaded then unloaded: every request
    is answered (200, or 404 for a2 once it is gone), none fails, and no KV block is left held."""
    url = server.url
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"}).status_code == 200
    models = ["tiny", "a1", "a2"] * 8
    started = threading.Barrier(2)

    def churn() -> list[int]:
        started.wait()
        codes = [httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": "a3"}).status_code,
                 httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code]
        return codes

    with ThreadPoolExecutor(16) as pool:
        changer = pool.submit(churn)
        started.wait()
        results = list(pool.map(lambda m: (m, complete(url, m, max_tokens=16).status_code), models))
    assert changer.result() == [200, 200]
    assert all(code == 200 or (model == "a2" and code == 404) for model, code in results), results
    assert complete(url, "a3").status_code == 200
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 200
    metrics = server.metrics()
    assert metrics["loom_lora_step_adapters_max"] >= 2  # adapters (and the base model) shared steps
    assert metrics["loom_kv_cache_free_blocks"] == metrics["loom_kv_cache_num_blocks"]


def test_runtime_routes_are_off_unless_allowed(tiny_llama, store):
    server = start_llm_server(server_config(tiny_llama, store), api_key="k")
    try:
        headers = {"Authorization": "Bearer k"}
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"},
                       headers=headers)
        assert r.status_code == 404
        assert httpx.post(f"{server.url}/v1/completions", json={"model": "a1", "prompt": "hi"}).status_code == 401
        assert complete_with(server.url, "a1", headers).status_code == 200
    finally:
        server.stop()


def complete_with(url: str, model: str, headers: dict) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def test_lora_flags_need_enable_lora(tiny_llama):
    with pytest.raises(ValueError, match="need --enable-lora"):
        LLMServerConfig(EngineConfig(model=str(tiny_llama)), lora_modules=["a=b"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        LLMServerConfig(EngineConfig(model=str(tiny_llama), enable_lora=True), lora_modules=["nopath"])


def test_engine_calls_run_on_the_engine_thread_and_return_or_raise(server):
    """Adapters are read through ``AsyncLLMEngine.call``: on the engine's own thread (torch work on any other thread
    gives it an OpenMP team and slows every later step), its result or its exception handed back."""
    import asyncio

    front = server.component.front

    async def calls():
        thread = await front.call(lambda: threading.current_thread())
        with pytest.raises(ValueError, match="boom"):
            await front.call(_raise, ValueError("boom"))
        return thread, await front.call(lambda a, b: a + b, 2, 3)

    future = asyncio.run_coroutine_threadsafe(calls(), front._loop)
    thread, total = future.result(timeout=30)
    assert thread is front._thread and total == 5


def _raise(exc: Exception):
    raise exc


def test_loading_into_a_stopped_engine_is_a_503(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from loom.entrypoints.openai.async_engine import EngineDead
    from loom.entrypoints.openai.errors import OpenAIError
    from loom.entrypoints.openai.lora import LoRARegistry
    from loom.entrypoints.openai.routes import load_adapter
    from loom.entrypoints.openai.serving import ServingContext

    async def call(fn, *args):
        raise EngineDead("the LLM engine is not running")

    front = SimpleNamespace(call=call, engine=SimpleNamespace(lora=SimpleNamespace(get=None)))
    ctx = ServingContext(front, ["tiny"], loras=LoRARegistry(["tiny"]))
    with pytest.raises(OpenAIError) as err:
        asyncio.run(load_adapter(ctx, "a", str(tmp_path), confine=False))
    assert err.value.status == 503 and "a" not in ctx.loras


def test_adapters_load_serve_and_unload_in_the_engine_process(server, tiny_llama, store):
    """With ``--engine-process`` the adapter is read in the child (``front.call`` waits for its answer): a start-up
    adapter and one loaded at run time answer as the in-thread server does; a bad one is a 400; unloaded, a 404."""
    process = start_llm_server(server_config(tiny_llama, store, allow_runtime_lora_updating=True,
                                             lora_store=str(store), engine_process=True))
    try:
        assert complete(process.url, "a1").json()["choices"][0]["text"] == \
            complete(server.url, "a1").json()["choices"][0]["text"]
        loaded = httpx.post(f"{process.url}/v1/load_lora_adapter", json={"lora_name": "p2", "lora_path": "a2"},
                            timeout=60)
        assert loaded.status_code == 200, loaded.text
        want = offline_text(tiny_llama, store / "a2")
        assert complete(process.url, "p2").json()["choices"][0]["text"] == want
        (store / "broken").mkdir(exist_ok=True)  # exists, so only reading it in the child can refuse it
        (store / "broken" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "target_modules": ["x"]}')
        bad = httpx.post(f"{process.url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "broken"},
                         timeout=60)
        assert bad.status_code == 400 and "bad" in bad.json()["error"]["message"]
        assert complete(process.url, "bad").status_code == 404
        gone = httpx.post(f"{process.url}/v1/unload_lora_adapter", json={"lora_name": "p2"}, timeout=60)
        assert gone.status_code == 200 and complete(process.url, "p2").status_code == 404
    finally:
        process.stop()


def offline_text(tiny_llama, adapter) -> str:
    offline = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=8, num_kv_blocks=32)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return offline.generate({"prompt_token_ids": PROMPT}, params,
                            lora_request=LoRARequest("p2", 7, str(adapter)))[0].outputs[0].text
