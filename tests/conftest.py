"""Shared fixtures: offline mode, tiny random Llama-family folders, the packaged SmolLM2 folder, a tiny image engine."""

from __future__ import annotations

import glob
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not glob.glob("/dev/nvidia[0-9]*"):  # a container given one GPU of several may see /dev/nvidia3 only
    # Triton's kernels run interpreted on a machine without a GPU. Set before anything imports triton: its standard
    # library (tl.maximum, ...) is jit-decorated at import, interpreted or not for good.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_PREBUILD: subprocess.Popen | None = None


def pytest_sessionstart(session):
    """Build the GGUF kernels' C++ extension in the background (a minute on one core from a cold cache, as on a fresh
    clone) while the first tests build and use the other one, which would otherwise be built one after the other. Both
    are needed; torch's builder locks an extension's folder, so a test that needs this one first waits for it. A build
    that fails here fails again, with its message, in the tests that use it."""
    global _PREBUILD
    if session.config.option.collectonly or _built("loom_gguf_ops"):
        return
    _PREBUILD = subprocess.Popen([sys.executable, "-c", "from loom.ops.cpp_extension import gguf_extension as g; g()"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session, exitstatus):
    if _PREBUILD is not None:
        try:
            _PREBUILD.wait(timeout=600)
        except subprocess.TimeoutExpired:
            _PREBUILD.kill()


def _built(name: str) -> bool:
    """Whether the extension's build for this session's target (``LOOM_CPU_ARCH``, or native) is in torch's cache (a
    fresh clone's is empty)."""
    from torch.utils.cpp_extension import _get_build_directory

    from loom.ops.cpp_extension import cache_name, cpu_arch

    folder = _get_build_directory(cache_name(name, cpu_arch()), verbose=False)
    return bool(glob.glob(os.path.join(folder, "*.so")))


@pytest.fixture(scope="session")
def smollm2_path():
    from loom.models.catalogue import resolve_model

    return resolve_model("smollm2")


def save_tiny_model(path, smollm2_path, arch: str = "llama", **overrides):
    """A tiny random model of the given family with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    from loom.models.tiny import save_tiny_model as save

    return save(path, smollm2_path, arch=arch, **overrides)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_path):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_path)


@pytest.fixture(scope="session")
def tiny_thinker(tmp_path_factory, smollm2_path):
    """The tiny Llama with ``<think>`` and ``</think>`` added to its tokenizer as single tokens (ids 49152, 49153; the
    model's vocabulary has room), as a thinking model's tokenizer has them."""
    from transformers import AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("tiny-thinker"), smollm2_path, vocab_size=49216)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_image_engine():
    """One tiny random image engine (UNet, VAE, CLIP from small configs; a small 2x upscaler) for the session."""
    import torch

    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_pipeline
    from loom.image.upscaler import ESPCNUpscaler

    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return ImageEngine(pipe, name="tiny", upscaler=ESPCNUpscaler(hidden=8, mid=8).eval())
