"""Bounds enforced before work starts: n and stop lists (finding 3), body size, prompt characters and tokenization off
the event loop (4), image sizes and decoding (5), model registration (6), embeddings admission (7), deep JSON (8),
JSON content types and waiting without threads (10)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from loom.image.jobs import Job
from loom.image.request import ImageRequest
from tests.security.conftest import AUTH, ECHO
from tests.server.conftest import start_llm_server, tiny_config

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON_ROUTES = [("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}), ("/v1/chat/completions", CHAT),
               ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]}),
               ("/v1/embeddings", {"model": "echo", "input": "hi"}),
               ("/v1/images/generations", {"prompt": "a sneaker", "size": "64x64", "steps": 1}),
               ("/v1/images/jobs", {"prompt": "a sneaker", "steps": 1})]
BODY_ROUTES = [path for path, _ in JSON_ROUTES] + ["/predictions/echo"]


def _client(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers=AUTH, timeout=120)


# ---- finding 3: n and stop lists ------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 17}, "n"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"stop_token_ids": list(range(17))}, "stop_token_ids"),
])
def test_n_and_stop_lists_are_bounded(stack, extra, param):
    with _client(stack) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param


def test_n_counts_as_n_sequences_at_admission(tiny_llama):
    """Before: a request with n=2000 counted as one, so one request could hold every slot and stall everyone."""
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=64, max_num_seqs=2, max_waiting=2))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            too_many = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2})
            assert too_many.status_code == 400 and "sequences" in too_many.json()["error"]["message"]
            body = {"model": "tiny", "prompt": "hi", "n": 4, "max_tokens": 1000, "ignore_eos": True}
            held = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
            held.start()
            for _ in range(200):  # until its four sequences are admitted
                if client.get("/health").json()["components"]["llm"]["in_flight"] == 4:
                    break
                time.sleep(0.01)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 503 and r.headers["retry-after"]
            held.join(60)
    finally:
        server.stop()


# ---- finding 4: body size, prompt characters, tokenization off the loop -------------------------------------------
@pytest.mark.parametrize("path", BODY_ROUTES)
def test_every_body_route_answers_413_over_the_limit(stack, path):
    big = b'{"x": "' + b"a" * (1 << 20) + b'"}'
    with _client(stack) as client:
        r = client.post(path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():
            for _ in range(5):
                yield b"a" * (300 << 10)

        r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_prompt_characters_are_bounded_before_tokenization(tiny_llama):
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=64, max_prompt_chars=1000))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for path, body in [("/v1/completions", {"model": "tiny", "prompt": "a" * 1001}),
                               ("/v1/completions", {"model": "tiny", "prompt": ["a" * 600, "b" * 600]}),
                               ("/v1/chat/completions",
                                {**CHAT, "messages": [{"role": "user", "content": "a" * 1001}]}),
                               ("/tokenize", {"prompt": "a" * 1001})]:
                r = client.post(path, json=body)
                assert r.status_code == 400 and "--max-prompt-chars" in r.json()["error"]["message"], (path, r.text)
            assert client.post("/tokenize", json={"prompt": "a" * 900}).status_code == 200
    finally:
        server.stop()


def test_a_prompt_longer_than_the_context_is_rejected_from_its_count(stack):
    with _client(stack) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 500})
        err = r.json()["error"]
        assert r.status_code == 400 and "501 tokens" in err["message"] and "256" in err["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 1200})  # counted from a prefix
        assert r.status_code == 400 and "more than" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 1400})  # past 8192 chars
        assert r.status_code == 400 and "--max-prompt-chars" in r.json()["error"]["message"]
    assert err["param"] == "prompt"


class _Recorder:
    """Wraps a callable and records the thread each call ran on."""

    def __init__(self, fn):
        self.fn, self.threads = fn, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.fn(*args, **kwargs)


class _BackendRecorder:
    def __init__(self, backend):
        self.encode_batch = _Recorder(backend.encode_batch)


def test_tokenization_templating_and_detokenization_run_off_the_event_loop(stack):
    """Before: a 4.8 MB /tokenize held the event loop (and /health) for 2.6 s."""
    encoder = stack.llm.context.encoder
    tokenizer = encoder.tokenizer
    backend = encoder._backend
    encoder._backend = recorder = _BackendRecorder(backend)
    template, decode = _Recorder(tokenizer.apply_chat_template), _Recorder(tokenizer.decode)
    tokenizer.apply_chat_template, tokenizer.decode = template, decode
    try:
        with _client(stack) as client:
            assert client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                        "echo": True}).status_code == 200
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert client.post("/tokenize", json={"prompt": "hello"}).status_code == 200
            assert client.post("/detokenize", json={"tokens": [1, 2, 3]}).status_code == 200
    finally:
        encoder._backend = backend
        del tokenizer.apply_chat_template, tokenizer.decode
    threads = recorder.encode_batch.threads + template.threads + decode.threads
    assert recorder.encode_batch.threads and template.threads and decode.threads
    assert all(name.startswith("loom-tokenize") for name in threads), threads


# ---- finding 5: images ----------------------------------------------------------------------------------------
def _png_b64(size: tuple[int, int], mode: str = "L") -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_sizes_are_bounded_before_queueing(stack):
    with _client(stack) as client:
        ratio = client.post("/v1/images/jobs", json={"prompt": "x", "aspect_ratio": "100000:1", "steps": 1})
        assert ratio.status_code == 400 and "aspect_ratio" in ratio.json()["detail"]
        for bad in ("0:1", "nan:1", "inf:1", "a:b"):
            assert client.post("/v1/images/jobs", json={"prompt": "x", "aspect_ratio": bad}).status_code == 400
        big = client.post("/v1/images/jobs", json={"prompt": "x", "width": 128, "height": 128, "steps": 1})
        assert big.status_code == 413 and "--image-max-pixels" in big.json()["detail"]
        upscale = client.post("/v1/images/jobs",
                              json={"task": "upscale", "image": _png_b64((48, 48), "RGB"), "steps": 1})
        assert upscale.status_code == 413  # 96x96 after the 2x upscale
        steps = client.post("/v1/images/jobs", json={"prompt": "x", "steps": 5})
        assert steps.status_code == 400 and "steps" in steps.json()["detail"]
        prompt = client.post("/v1/images/jobs", json={"prompt": "x" * 4001})
        assert prompt.status_code == 422
        assert stack.images.queue.queued == 0


def test_input_images_are_measured_on_their_header(stack, monkeypatch):
    from PIL import ImageFile

    header_only = _png_b64((9000, 9000))  # ~80 KB of PNG that would decode to 81 M pixels
    bomb = _png_b64((20000, 10000), mode="1")  # past PIL's own decompression-bomb limit

    def no_decoding(self):
        raise AssertionError("an oversized input image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with _client(stack) as client:
        for data in (header_only, bomb):
            r = client.post("/v1/images/jobs", json={"task": "vary_subtle", "image": data, "steps": 1})
            assert r.status_code == 413, r.text


# ---- finding 6: model registration ----------------------------------------------------------------------------
def test_registration_is_off_unless_enabled_and_bounded(stack, tmp_path):
    from loom.batching.config import ModelConfig, max_workers
    from loom.batching.management import check_in_store

    mgmt = {"Authorization": "Bearer mgmt-token"}
    app = stack.models.management.app
    transport = httpx.ASGITransport(app=app)

    async def calls():
        async with httpx.AsyncClient(transport=transport, base_url="http://mgmt", timeout=30) as client:
            register = await client.post("/models", json={"name": "x", "handler": ECHO}, headers=mgmt)
            scale = await client.put("/models/echo", json={"workers": max_workers() + 1}, headers=mgmt)
            return register, scale

    register, scale = asyncio.run(calls())
    assert register.status_code == 403 and "--enable-model-api" in register.json()["error"]["message"]
    assert scale.status_code == 400 and len(stack.models.server.get("echo").slots) == 1
    for field, value in [("workers", max_workers() + 1), ("max_queue_size", 65537), ("batch_size", 1025),
                         ("max_batch_delay", 60_001)]:
        with pytest.raises(ValueError, match=field):
            ModelConfig("m", ECHO, **{field: value})
    store = tmp_path / "store"
    store.mkdir()
    (store / "h.py").write_text("")
    check_in_store(ModelConfig("m", str(store / "h.py")), store.resolve())
    with pytest.raises(ValueError, match="outside the model store"):
        check_in_store(ModelConfig("m", ECHO), store.resolve())
    with pytest.raises(ValueError, match="outside the model store"):
        check_in_store(ModelConfig("m", "embedding", path=str(tmp_path)), store.resolve())


# ---- finding 7: embeddings are admitted all or nothing ------------------------------------------------------------
def test_embeddings_inputs_are_admitted_all_or_nothing(stack):
    model = stack.models.server.get("echo")
    before = sum(s.num_requests for s in model.slots)
    with _client(stack) as client:
        r = client.post("/v1/embeddings", json={"model": "echo", "input": ["x"] * 9})  # the queue holds 8
    assert r.status_code == 503 and r.headers["retry-after"]
    assert sum(s.num_requests for s in model.slots) == before and len(model.queue) == 0


# ---- finding 8: deep JSON -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", BODY_ROUTES)
def test_deeply_nested_json_is_400(stack, path):
    with _client(stack) as client:
        r = client.post(path, content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_deeply_nested_json_is_400_on_the_management_api(stack):
    async def call():
        transport = httpx.ASGITransport(app=stack.models.management.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mgmt") as client:
            return await client.put("/models/echo", content=b"[" * 100_000,
                                    headers={"Authorization": "Bearer mgmt-token", "content-type": "application/json"})

    assert asyncio.run(call()).status_code == 400


# ---- finding 10: content types, waiting without threads -----------------------------------------------------------
@pytest.mark.parametrize(("path", "body"), JSON_ROUTES)
def test_json_routes_refuse_other_content_types(stack, path, body):
    import json

    with _client(stack) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = client.post(path, content=json.dumps(body), headers={"content-type": content_type})
            assert r.status_code == 415, (path, content_type, r.text)
        assert client.post("/predictions/echo", content=b"raw text", headers={"content-type": "text/plain"}).json()[
            "item"] == "raw text"


def test_waiting_for_a_job_holds_no_thread():
    """Before: every SSE stream and /generations waiter held one of the default executor's few threads."""
    job = Job(id="j", request=ImageRequest(prompt="x"))

    async def main():
        threads = threading.active_count()
        waiters = [asyncio.create_task(job.changed(job.version, 10.0)) for _ in range(50)]
        await asyncio.sleep(0.05)
        assert threading.active_count() == threads
        assert not any(w.done() for w in waiters)
        threading.Thread(target=job.touch, kwargs={"step": 1}).start()  # the worker thread's change wakes them
        return await asyncio.wait_for(asyncio.gather(*waiters), 5)

    assert asyncio.run(main()) == [1] * 50
    assert not job._waiters


def test_the_sse_route_waits_on_the_event_loop(stack, monkeypatch):
    def no_thread(*args, **kwargs):
        raise AssertionError("an API route waited for a job in a thread")

    monkeypatch.setattr(Job, "wait_change", no_thread)
    with _client(stack) as client:
        job = client.post("/v1/images/jobs", json={"prompt": "a sneaker", "steps": 2}).json()
        events = client.get(f"/v1/images/jobs/{job['id']}/events").text
        assert "succeeded" in events and events.rstrip().endswith("data: [DONE]")
        gen = client.post("/v1/images/generations", json={"prompt": "a sneaker", "size": "64x64", "steps": 1})
        assert gen.status_code == 200
