"""Which device each worker process gets: the visible GPUs in turn, over every worker of every model (TorchServe's
round-robin), or the CPU where there is no GPU.

    placer = DevicePlacer(device_list("0,1"))     # --gpus 0,1 -> ["cuda:0", "cuda:1"]
    placer.next(), placer.next(), placer.next()    # "cuda:0", "cuda:1", "cuda:0"

A handler reads its device in ``setup`` as ``ctx.device``. The list is a plain argument, so tests place workers on
a fake list of GPUs without touching CUDA.
"""

from __future__ import annotations

import glob
import re
import sys

_GPUS = re.compile(r"^\d+(,\d+)*$")


def device_list(gpus: str | None = None, cuda_count: int | None = None) -> list[str]:
    """``--gpus``: "0,1" -> ["cuda:0", "cuda:1"]; None -> every visible CUDA device, or ["cpu"] without one.

    cuda_count: how many CUDA devices are visible (None asks torch; tests pass a number).
    """
    count = visible_cuda_devices() if cuda_count is None else cuda_count
    if gpus is None:
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    spec = gpus.replace(" ", "")
    if not _GPUS.match(spec):
        raise ValueError(f"--gpus takes GPU indices separated by commas, like 0,1; got {gpus!r}")
    indices = [int(i) for i in spec.split(",")]
    if len(set(indices)) != len(indices):
        raise ValueError(f"--gpus names a GPU twice: {gpus!r}")
    if not count:
        raise ValueError(f"--gpus {gpus}: no CUDA device is visible; leave out --gpus to run the workers on the CPU")
    missing = [i for i in indices if i >= count]
    if missing:
        raise ValueError(f"--gpus {gpus}: GPU {missing[0]} is not visible ({count} CUDA devices: pick among "
                         f"0..{count - 1})")
    return [f"cuda:{i}" for i in indices]


def visible_cuda_devices() -> int:
    """CUDA devices torch sees (CUDA_VISIBLE_DEVICES applies)."""
    # NOTE: no /dev/nvidiaN (no NVIDIA driver; macOS) means no CUDA, answered without importing torch, which the
    # model server process otherwise never loads (about a second and 200 MB)
    if sys.platform != "win32" and not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    import torch  # local: see above

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class DevicePlacer:
    """Hands out devices in turn; one placer per server, so the turn runs across all its models' workers."""

    def __init__(self, devices: list[str]):
        if not devices:
            raise ValueError("DevicePlacer needs at least one device (\"cpu\" for CPU workers)")
        self.devices = list(devices)
        self.num_placed = 0

    def next(self) -> str:
        """The device for the next worker started (a replacement for a dead worker counts as a new one)."""
        device = self.devices[self.num_placed % len(self.devices)]
        self.num_placed += 1
        return device
