"""The model server in-process: the real app, routes and worker processes, driven with httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.serve import ModelServerComponent
from loom.server.app import build_app

TOY = str(Path(__file__).with_name("toy_handlers.py"))
ECHO = f"{TOY}#EchoHandler"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serving(*configs: ModelConfig):
    """(inference client, management client, component) over the in-process apps; workers stopped at exit."""
    registry = CollectorRegistry()
    component = ModelServerComponent(list(configs), registry, TOKEN, token_file=None, enable_model_api=True)
    app = build_app([component], registry)
    await component.start()
    try:
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loom", timeout=30) as client,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=component.management.app), base_url="http://mgmt",
                              timeout=60) as mgmt,
        ):
            yield client, mgmt, component
    finally:
        await component.stop()


def echo(name="echo", **settings) -> ModelConfig:
    return ModelConfig(name, ECHO, **settings)


def run(coro):
    return asyncio.run(coro)


async def wait_until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_concurrent_requests_share_one_inference_call():
    async def body():
        config = echo(batch_size=8, max_batch_delay=500, dispatch_when_idle=False)
        async with serving(config) as (client, _, component):
            responses = await asyncio.gather(*(client.post("/predictions/echo", json=i) for i in range(8)))
            pid = component.server.get("echo").slots[0].process.pid
            return responses, pid

    responses, pid = run(body())
    assert [r.status_code for r in responses] == [200] * 8
    results = [r.json() for r in responses]
    assert [r["item"] for r in results] == list(range(8))
    assert {r["batch"] for r in results} == {f"{pid}-1"}  # one inference call in the worker answered all eight
    assert {r["batch_size"] for r in results} == {8}


def test_bad_items_fail_alone():
    async def body():
        async with serving(echo(batch_size=8, max_batch_delay=300, dispatch_when_idle=False)) as (client, _, _c):
            return await asyncio.gather(*(client.post("/predictions/echo", json=x) for x in ["a", "bad", "boom", "b"]))

    a, bad, boom, b = run(body())
    assert (a.status_code, a.json()["item"]) == (200, "a")
    assert (b.status_code, b.json()["item"]) == (200, "b")
    assert bad.status_code == 400 and "'bad' is not accepted" in bad.json()["error"]["message"]
    assert boom.status_code == 500 and "boom poisons its batch" in boom.json()["error"]["message"]


def test_full_queue_answers_503_with_retry_after():
    async def body():
        config = echo(batch_size=1, max_queue_size=2, options={"sleep_s": 0.3})
        async with serving(config) as (client, _, component):
            first = asyncio.create_task(client.post("/predictions/echo", json=0))
            await wait_until(lambda: component.server.get("echo").in_flight_batches == 1)
            responses = await asyncio.gather(first, *(client.post("/predictions/echo", json=i) for i in range(1, 6)))
            metrics = (await client.get("/metrics")).text
            return responses, metrics

    responses, metrics = run(body())
    codes = sorted(r.status_code for r in responses)
    # One runs, two wait in the queue, the other three are refused.
    assert codes == [200, 200, 200, 503, 503, 503]
    refused = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert "overloaded" in refused[0].json()["error"]["message"]
    assert 'loom_model_rejected_total{model="echo"} 3.0' in metrics


def test_deadline_answers_504_before_running():
    async def body():
        config = echo(batch_size=1, request_timeout=150, options={"sleep_s": 0.4})
        async with serving(config) as (client, _, component):
            first = asyncio.create_task(client.post("/predictions/echo", json=0))
            await wait_until(lambda: component.server.get("echo").in_flight_batches == 1)
            responses = await asyncio.gather(first, *(client.post("/predictions/echo", json=i) for i in (1, 2)))
            later = await client.post("/predictions/echo", json=3)
            return responses, later

    responses, later = run(body())
    assert sorted(r.status_code for r in responses) == [200, 504, 504]
    assert later.json()["batch"].endswith("-2")  # the handler ran twice: the expired requests never ran
    timed_out = [r for r in responses if r.status_code == 504]
    assert timed_out[0].json()["error"]["type"] == "timeout_error"


def test_scaling_up_and_down_under_load_loses_nothing():
    async def body():
        config = echo(batch_size=4, max_batch_delay=2, max_queue_size=1000, options={"sleep_s": 0.01})
        async with serving(config) as (client, mgmt, _c):
            load = [asyncio.create_task(client.post("/predictions/echo", json=i)) for i in range(300)]
            await asyncio.sleep(0.05)
            up = await mgmt.put("/models/echo", json={"workers": 3}, headers=AUTH)
            await asyncio.sleep(0.2)
            down = await mgmt.put("/models/echo?min_worker=1", headers=AUTH)
            responses = await asyncio.gather(*load)
            return up, down, responses

    up, down, responses = run(body())
    assert (up.status_code, up.json()["num_workers"]) == (200, 3)
    assert (down.status_code, down.json()["num_workers"]) == (200, 1)
    assert [r.status_code for r in responses] == [200] * 300
    assert sorted(r.json()["item"] for r in responses) == list(range(300))
    assert len({r.json()["pid"] for r in responses}) >= 2  # the added workers really served


def test_unregister_drains_in_flight_requests_first():
    async def body():
        config = echo(batch_size=2, max_batch_delay=1, options={"sleep_s": 0.15})
        async with serving(config) as (client, mgmt, _c):
            load = [asyncio.create_task(client.post("/predictions/echo", json=i)) for i in range(6)]
            await asyncio.sleep(0.05)
            gone = await mgmt.delete("/models/echo", headers=AUTH)
            responses = await asyncio.gather(*load)
            after = await client.post("/predictions/echo", json=1)
            listed = await mgmt.get("/models", headers=AUTH)
            return gone, responses, after, listed

    gone, responses, after, listed = run(body())
    assert gone.status_code == 200 and gone.json()["drained_requests"] == 6
    assert [r.status_code for r in responses] == [200] * 6
    assert after.status_code == 404
    assert listed.json() == {"models": []}


def test_management_refuses_requests_without_the_token():
    async def body():
        async with serving(echo()) as (_, mgmt, _c):
            calls = [
                mgmt.get("/models"), mgmt.get("/models/echo", headers={"Authorization": "Bearer wrong"}),
                mgmt.post("/models", json={"name": "x", "handler": ECHO}),
                mgmt.put("/models/echo", json={"workers": 0}),
                mgmt.delete("/models/echo", headers={"Authorization": TOKEN}),
            ]
            refused = await asyncio.gather(*calls)
            still = await mgmt.get("/models/echo", headers=AUTH)
            return refused, still

    refused, still = run(body())
    assert [r.status_code for r in refused] == [401] * 5
    assert refused[0].json()["error"]["type"] == "authentication_error"
    assert still.status_code == 200 and still.json()["num_workers"] == 1


def test_register_describe_and_errors_on_the_management_api():
    async def body():
        async with serving() as (client, mgmt, _c):
            created = await mgmt.post("/models", headers=AUTH, json={
                "name": "echo2", "handler": ECHO, "batch_size": 4, "max_batch_delay": 7, "workers": 2})
            duplicate = await mgmt.post("/models", headers=AUTH, json={"name": "echo2", "handler": ECHO})
            unknown = await mgmt.post("/models", headers=AUTH, json={"name": "x", "handler": "no_such_handler_mod"})
            broken = await mgmt.post("/models", headers=AUTH,
                                     json={"name": "y", "handler": f"{TOY}#BrokenSetupHandler"})
            bad_field = await mgmt.post("/models", headers=AUTH, json={"name": "z", "handler": ECHO, "batchsize": 2})
            answer = await client.post("/predictions/echo2", json="hi")
            described = await mgmt.get("/models/echo2", headers=AUTH)
            retuned = await mgmt.put("/models/echo2", headers=AUTH, json={"batch_size": 16, "max_batch_delay": 1})
            missing = await mgmt.get("/models/nope", headers=AUTH)
            ping = await client.get("/ping")
            return created, duplicate, unknown, broken, bad_field, answer, described, retuned, missing, ping

    created, duplicate, unknown, broken, bad_field, answer, described, retuned, missing, ping = run(body())
    assert created.status_code == 201 and created.json()["num_workers"] == 2
    assert duplicate.status_code == 409
    assert unknown.status_code == 400 and "neither a built-in" in unknown.json()["error"]["message"]
    assert broken.status_code == 400 and "weights are missing" in broken.json()["error"]["message"]
    assert bad_field.status_code == 400 and "batchsize" in bad_field.json()["error"]["message"]
    assert answer.status_code == 200 and answer.json()["item"] == "hi"
    info = described.json()
    assert (info["batch_size"], info["max_batch_delay"], info["queue_depth"]) == (4, 7.0, 0)
    assert [w["alive"] for w in info["worker_processes"]] == [True, True]
    assert info["worker_processes"][0]["requests"] + info["worker_processes"][1]["requests"] == 1
    assert (retuned.json()["batch_size"], retuned.json()["max_batch_delay"]) == (16, 1.0)
    assert missing.status_code == 404
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"


def test_inference_route_errors_are_json():
    async def body():
        async with serving(echo()) as (client, _, _c):
            return (
                await client.post("/predictions/nope", json=1),
                await client.post("/predictions/echo", content=b"{not json",
                                  headers={"content-type": "application/json"}),
                await client.post("/predictions/echo", content=b""),
                await client.post("/v1/embeddings", json={"model": "echo", "input": [1, 2]}),
                await client.post("/v1/embeddings", json={"model": "echo", "input": "text"}),
            )

    unknown, bad_json, empty, token_ids, not_embedding = run(body())
    assert unknown.status_code == 404 and "echo" in unknown.json()["error"]["message"]
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert empty.status_code == 400
    assert token_ids.status_code == 400 and "list of strings" in token_ids.json()["error"]["message"]
    assert not_embedding.status_code == 400 and "does not return embeddings" in not_embedding.json()["error"]["message"]


def test_metrics_show_batches_queue_time_and_busy_workers():
    async def body():
        async with serving(echo(batch_size=4, max_batch_delay=300, dispatch_when_idle=False)) as (client, _, _c):
            await asyncio.gather(*(client.post("/predictions/echo", json=i) for i in range(4)))
            return (await client.get("/metrics")).text

    text = run(body())
    assert 'loom_model_requests_total{model="echo",status="ok"} 4.0' in text
    assert 'loom_model_batch_size_bucket{le="4.0",model="echo"} 1.0' in text
    assert 'loom_model_batch_size_bucket{le="2.0",model="echo"} 0.0' in text
    assert 'loom_model_queue_seconds_count{model="echo"} 4.0' in text
    assert 'loom_model_inference_seconds_count{model="echo"} 1.0' in text
    assert 'loom_model_queue_depth{model="echo"} 0.0' in text
    assert 'loom_model_worker_busy_fraction{model="echo",worker="0"}' in text
    assert 'loom_model_process_cpu_seconds_total{process="echo/0"}' in text


def test_timing_headers_split_a_requests_time():
    async def body():
        async with serving(echo(options={"sleep_s": 0.05})) as (client, _, _c):
            return await client.post("/predictions/echo", json=1)

    response = run(body())
    assert float(response.headers["x-loom-inference-ms"]) >= 50.0
    assert 0.0 <= float(response.headers["x-loom-queue-ms"]) < 50.0  # a lone request on an idle model is not held


def test_a_dead_worker_fails_its_batch_and_is_replaced():
    async def body():
        config = ModelConfig("crashy", f"{TOY}#CrashHandler", batch_size=1)
        async with serving(config) as (client, _, component):
            model = component.server.get("crashy")
            old_pid = model.slots[0].process.pid
            crashed = await client.post("/predictions/crashy", json="crash")
            await wait_until(lambda: (model.slots and model.slots[0].process.pid != old_pid
                                      and model.slots[0].process.is_alive),
                             timeout=30)
            after = await client.post("/predictions/crashy", json="fine")
            unserialisable = await client.post("/predictions/crashy", json="object")
            return crashed, after, unserialisable

    crashed, after, unserialisable = run(body())
    assert crashed.status_code == 500 and "worker" in crashed.json()["error"]["message"]
    assert (after.status_code, after.json()) == (200, "fine")
    assert unserialisable.status_code == 500 and "not JSON-serialisable" in unserialisable.json()["error"]["message"]


def test_ping_reports_not_ready_and_predictions_503_without_workers():
    async def body():
        async with serving(echo()) as (client, mgmt, _c):
            ready = await client.get("/ping")
            scaled = await mgmt.put("/models/echo", json={"workers": 0}, headers=AUTH)
            not_ready = await client.get("/ping")
            refused = await client.post("/predictions/echo", json=1)
            return ready, scaled, not_ready, refused

    ready, scaled, not_ready, refused = run(body())
    assert ready.status_code == 200
    assert scaled.json()["num_workers"] == 0
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "Unhealthy"
    assert refused.status_code == 503 and "no workers" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"


def test_large_batches_cross_the_pipe_on_uvloop():
    """`loom serve` runs on uvloop, whose fd watcher makes the worker pipe non-blocking: batches larger than the pipe
    buffer (32 x 100 KB here) must still go through whole (before the fix: EAGAIN, the worker marked dead, 500s)."""
    uvloop = pytest.importorskip("uvloop")

    async def body():
        config = echo(batch_size=32, max_batch_delay=50, max_queue_size=256, workers=2)
        async with serving(config) as (client, _, component):
            responses = await asyncio.gather(*(client.post("/predictions/echo", json="x" * 100_000) for _ in range(64)))
            return responses, len(component.server.get("echo").slots)

    responses, workers = uvloop.run(body())
    assert [r.status_code for r in responses] == [200] * 64
    assert workers == 2


class _WithoutRawRoutes:
    """The model server component minus its raw route: POST /predictions/{name} reaches FastAPI's route instead."""

    def __init__(self, component):
        self._component = component

    def __getattr__(self, name):
        if name == "raw_routes":
            raise AttributeError(name)
        return getattr(self._component, name)


def test_the_raw_prediction_route_answers_as_the_fastapi_route_does():
    """PredictionRoute (plain ASGI, ahead of FastAPI's router) and the FastAPI route of the same path: same status,
    content type, JSON body and timing headers for answers, handler errors and bad input alike."""
    requests = [
        ("POST", "/predictions/echo", {"json": 7}),
        ("POST", "/predictions/echo", {"content": b"plain words", "headers": {"content-type": "text/plain"}}),
        ("POST", "/predictions/echo", {"content": "chunks", "headers": {"content-type": "application/json"}}),
        ("POST", "/predictions/echo", {"content": b"", "headers": {"content-type": "application/json"}}),
        ("POST", "/predictions/echo", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/predictions/echo", {"json": "bad"}),
        ("POST", "/predictions/echo", {"json": "boom"}),
        ("POST", "/predictions/crash", {"json": "object"}),  # a result JSON cannot hold
        ("POST", "/predictions/nosuch", {"json": 1}),
        ("POST", "/predictions/echo/extra", {"json": 1}),
        ("POST", "/predictions/", {"json": 1}),
        ("GET", "/predictions/echo", {}),
    ]

    async def chunks():  # a body without a length: sent chunked, read and replayed by the Guard
        yield b'{"parts": '
        yield b"[1, 2]}"

    async def body():
        registry = CollectorRegistry()
        configs = [echo(), ModelConfig("crash", f"{TOY}#CrashHandler")]
        component = ModelServerComponent(configs, registry, TOKEN, token_file=None)
        route = component.raw_routes()[0]
        calls = []

        async def counted(scope, receive, send, name):
            calls.append(name)
            await route(scope, receive, send, name)

        counted.prefix, counted.methods = route.prefix, route.methods
        component.raw_routes = lambda: [counted]
        raw_app = build_app([component], registry)
        plain_app = build_app([_WithoutRawRoutes(component)], CollectorRegistry())
        await component.start()
        answers = []
        try:
            for app in (raw_app, plain_app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loom") as client:
                    answers.append([await client.request(method, path, **(kwargs | {"content": chunks()}
                                                                          if kwargs.get("content") == "chunks"
                                                                          else kwargs))
                                    for method, path, kwargs in requests])
        finally:
            await component.stop()
        return answers, calls

    (raw, plain), calls = run(body())
    assert calls == ["echo"] * 7 + ["crash", "nosuch"]  # the raw app's POSTs to one segment took the raw route
    assert [r.status_code for r in raw] == [200, 200, 200, 400, 400, 400, 500, 500, 404, 404, 404, 405]
    for (_, path, _), a, b in zip(requests, raw, plain, strict=True):
        assert (a.status_code, a.headers["content-type"]) == (b.status_code, b.headers["content-type"]), path
        if a.status_code == 200:
            assert a.json()["item"] == b.json()["item"]
            assert float(a.headers["x-loom-inference-ms"]) > 0 and "x-loom-queue-ms" in b.headers
        else:
            assert a.json() == b.json()
    assert [r.json()["item"] for r in raw[:3]] == [7, "plain words", {"parts": [1, 2]}]
    assert "not JSON-serialisable" in raw[7].json()["error"]["message"]


def test_the_raw_prediction_route_sends_nothing_to_a_client_that_left_mid_body():
    from loom.batching.routes import PredictionRoute

    sent = []
    messages = iter([{"type": "http.request", "body": b'{"a"', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    route = PredictionRoute(server=None)  # never reached: the body did not arrive
    run(route({"type": "http", "method": "POST", "headers": []}, receive, send, "echo"))
    assert sent == []


def test_rerank_and_score_routes_rank_documents_by_the_cross_encoders_scores(tiny_cross_encoder_dir):
    """/v1/rerank (vLLM's, Jina's and Cohere's shape) and /v1/score over a reranker worker: the scores are the
    handler's, documents sorted by them (top_n, return_documents, {"text"} documents), bad input a 400 naming the
    field, too many documents 413, a model that does not score pairs 400."""
    from loom.batching.handler import Context, run_batch
    from loom.batching.handlers.reranker import RerankerHandler

    query = "how do I bake bread"
    documents = ["Mix flour, water, salt and yeast, then bake.", "The stock market fell today.", "Bread", "ovens"]

    async def body():
        async with serving(ModelConfig("rerank", "reranker", str(tiny_cross_encoder_dir), max_batch_delay=50),
                           echo()) as (client, _, _c):
            return (
                await client.post("/v1/rerank", json={"model": "rerank", "query": query, "documents": documents}),
                await client.post("/rerank", json={"model": "rerank", "query": query, "top_n": 2,
                                                   "return_documents": False,
                                                   "documents": [{"text": d} for d in documents]}),
                await client.post("/v1/score", json={"model": "rerank", "text_1": query, "text_2": documents}),
                await client.post("/v1/score", json={"model": "rerank", "text_1": [query, query], "text_2": documents}),
                await client.post("/v1/rerank", json={"model": "rerank", "documents": documents}),
                await client.post("/v1/rerank", json={"model": "rerank", "query": query, "documents": []}),
                await client.post("/v1/rerank", json={"model": "rerank", "query": query, "documents": ["x"] * 1025}),
                await client.post("/v1/rerank", json={"model": "rerank", "query": query, "documents": documents,
                                                      "top_n": 0}),
                await client.post("/v1/rerank", json={"model": "echo", "query": query, "documents": documents}),
            )

    full, top, score, mismatched, no_query, empty, too_many, bad_top, not_reranker = run(body())
    handler = RerankerHandler()
    handler.setup(Context("rerank", str(tiny_cross_encoder_dir), 0, num_threads=1))
    expected = [r.value["score"] for r in run_batch(handler, [{"query": query, "document": d} for d in documents])]
    order = sorted(range(len(documents)), key=lambda i: -expected[i])
    results = full.json()["results"]
    assert full.status_code == 200 and [r["index"] for r in results] == order
    assert [r["relevance_score"] for r in results] == pytest.approx([expected[i] for i in order], abs=1e-6)
    assert [r["document"]["text"] for r in results] == [documents[i] for i in order]
    assert full.json()["usage"]["total_tokens"] > 0 and full.json()["model"] == "rerank"
    assert [r["index"] for r in top.json()["results"]] == order[:2]
    assert all("document" not in r for r in top.json()["results"])
    assert [d["score"] for d in score.json()["data"]] == pytest.approx(expected, abs=1e-6)
    assert mismatched.status_code == 400 and "text_1" in mismatched.json()["error"]["message"]
    assert no_query.status_code == 400 and "'query'" in no_query.json()["error"]["message"]
    assert empty.status_code == 400 and "'documents'" in empty.json()["error"]["message"]
    assert too_many.status_code == 413
    assert bad_top.status_code == 400 and "top_n" in bad_top.json()["error"]["message"]
    assert not_reranker.status_code == 400 and "does not score pairs" in not_reranker.json()["error"]["message"]
