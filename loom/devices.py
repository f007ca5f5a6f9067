"""What "auto" means for a device, in one place: the GPU when torch sees one, the CPU otherwise.

    resolve_device("auto")   -> device("cuda") on a GPU machine, device("cpu") elsewhere
    resolve_device("cuda:1") -> device("cuda", 1)
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
