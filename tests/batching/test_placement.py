"""Workers on GPUs, checked on the CPU with a fake list of GPUs: the TorchServe round-robin over every worker of
every model, ``--gpus`` parsing, and the ``ctx.device`` a handler sees (the toy handler never touches CUDA)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import httpx
import pytest
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.placement import DevicePlacer, device_list
from loom.batching.serve import ModelServerComponent, add_serve_arguments

from .test_server_inprocess import AUTH, TOKEN, TOY

DEVICE = f"{TOY}#DeviceHandler"


def test_gpus_flag_and_default_device_list():
    assert device_list("0,1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert device_list("1", cuda_count=2) == ["cuda:1"]
    assert device_list(None, cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert device_list(None, cuda_count=0) == ["cpu"]
    for bad, message in [("0,0", "names a GPU twice"), ("a,b", "like 0,1"), ("2", "GPU 2 is not visible"),
                         ("-1", "like 0,1")]:
        with pytest.raises(ValueError, match=message):
            device_list(bad, cuda_count=2)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        device_list("0", cuda_count=0)


def test_the_placer_takes_the_devices_in_turn():
    placer = DevicePlacer(["cuda:0", "cuda:1"])
    assert [placer.next() for _ in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match="at least one device"):
        DevicePlacer([])


def test_serve_parses_gpus():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args(["--gpus", "0,1"]).gpus == "0,1" and parser.parse_args([]).gpus is None


@contextlib.asynccontextmanager
async def serving_on(devices: list[str], *configs: ModelConfig):
    component = ModelServerComponent(list(configs), CollectorRegistry(), TOKEN, token_file=None, devices=devices)
    await component.start()
    try:
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=component.management.app), base_url="http://mgmt",
                              timeout=60) as mgmt,
        ):
            yield component, mgmt
    finally:
        await component.stop()


def test_workers_of_all_models_round_robin_over_the_gpus_and_handlers_see_their_device():
    async def body():
        # registered one after the other: the turn is then a fixed order (a: 0, 1, 2; b: 3)
        async with serving_on(["cuda:0", "cuda:1"], ModelConfig("a", DEVICE, workers=3)) as (component, mgmt):
            await component.server.register(ModelConfig("b", DEVICE, workers=1))
            answer_b = await component.server.get("b").submit("x")
            await component.server.scale("a", 4)  # the 5th worker of the server
            described = (await mgmt.get("/models/a", headers=AUTH)).json()
            answers_a = await asyncio.gather(*component.server.get("a").submit_all(["x"] * 64))
            return answer_b, described, answers_a

    answer_b, described, answers_a = asyncio.run(body())
    assert answer_b == {"device": "cuda:1", "worker": 0}  # b's only worker came 4th: cuda:1
    assert [w["device"] for w in described["worker_processes"]] == ["cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    seen = {(a["worker"], a["device"]) for a in answers_a}  # each worker's handler reports its own ctx.device
    assert seen <= {(0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0"), (3, "cuda:0")} and len(seen) >= 1


def test_without_gpus_workers_run_on_the_cpu():
    async def body():
        async with serving_on(["cpu"], ModelConfig("a", DEVICE, workers=2)) as (component, _):
            return await component.server.get("a").submit("x")

    assert asyncio.run(body())["device"] == "cpu"
