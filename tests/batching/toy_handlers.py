"""Handlers for the model-server tests: no torch, so worker processes start in a fraction of a second."""

from __future__ import annotations

import os
import time

from loom.batching.handler import Context, Handler, ItemError


class EchoHandler(Handler):
    """Answers each item with the id of the inference call that served it.

    "bad" fails in decode, "boom" makes its whole batch raise (so the server must isolate it); option sleep_s makes
    every inference call take that long.
    """

    def setup(self, ctx: Context) -> None:
        self.pid = os.getpid()
        self.calls = 0
        self.sleep_s = float(ctx.options.get("sleep_s", 0.0))
        self.threads = ctx.num_threads

    def decode(self, item):
        if item == "bad":
            raise ItemError("'bad' is not accepted")
        return item

    def inference(self, batch: list) -> list:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if "boom" in batch:
            raise RuntimeError("boom poisons its batch")
        batch_id = f"{self.pid}-{self.calls}"
        return [{"item": x, "batch": batch_id, "batch_size": len(batch), "pid": self.pid} for x in batch]


class BrokenSetupHandler(Handler):
    def setup(self, ctx: Context) -> None:
        raise RuntimeError("weights are missing")


class CrashHandler(Handler):
    """Exits its worker process on "crash" (as an OOM kill would); returns a tensor-like object on "object"."""

    def inference(self, batch: list) -> list:
        if "crash" in batch:
            os._exit(3)
        return [object() if x == "object" else x for x in batch]


class DeviceHandler(Handler):
    """Answers with the device its worker was given (ctx.device) and the worker's index; touches no GPU."""

    def setup(self, ctx: Context) -> None:
        self.device, self.index = ctx.device, ctx.worker_index

    def inference(self, batch: list) -> list:
        return [{"device": self.device, "worker": self.index} for _ in batch]
