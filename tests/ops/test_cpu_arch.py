"""The C++ kernels built for another CPU than this one (``LOOM_CPU_ARCH``): the AVX2 build must compile and pass the
kernel parity tests on any machine, because an AVX-512 machine never compiles its non-AVX-512 branches otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loom.ops.cpp_extension import cache_name, cpu_arch

ROOT = Path(__file__).resolve().parents[2]


def test_the_target_comes_from_the_environment_and_must_be_a_march_name(monkeypatch):
    monkeypatch.delenv("LOOM_CPU_ARCH", raising=False)
    assert cpu_arch() == "native"
    monkeypatch.setenv("LOOM_CPU_ARCH", " x86-64-v3 ")
    assert cpu_arch() == "x86-64-v3"
    for bad in ("x86-64-v3 -O0", "native;rm", "-mavx512f", "$(id)"):
        monkeypatch.setenv("LOOM_CPU_ARCH", bad)
        with pytest.raises(ValueError, match="not a gcc -march name"):
            cpu_arch()


def test_a_build_for_another_target_is_cached_under_its_own_name():
    assert cache_name("loom_cpu_ops", "native") == "loom_cpu_ops"
    assert cache_name("loom_cpu_ops", "x86-64-v3") == "loom_cpu_ops_x86_64_v3"
    assert cache_name("loom_gguf_ops", "znver2") == "loom_gguf_ops_znver2"


def test_the_avx2_build_passes_the_kernel_parity_tests():
    """The int8 GGUF kernels (whose "auto" path is then vpmaddubsw), the fused layer ops, the panel matmul (its AVX2
    tiles), the sampler and the whole-layer decode calls on both, built for x86-64-v3 (AVX2 + FMA, no AVX-512),
    against the same references as the native build, in a fresh process."""
    env = {**os.environ, "LOOM_CPU_ARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2"}
    # the two extensions build at once (each compiles on one core): about a minute each from a cold cache
    builds = [subprocess.Popen([sys.executable, "-c", f"from loom.ops.cpp_extension import {name}; {name}()"], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for name in ("extension", "gguf_extension")]
    for build in builds:
        build.wait(timeout=900)  # a failed build fails again below, with its message
    probe = ("from loom.ops.cpp_extension import extension, gguf_extension; e, g = extension(), gguf_extension(); "
             "print(e.has_avx512(), hasattr(e, 'panel_linear'), g.has_vnni(), g.has_avx2())")
    built = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    # no AVX-512: the panel matmul's 3 x 32 tiles, the AVX2 int8 path, no VNNI
    assert built.stdout.split() == ["False", "True", "False", "True"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/engine/test_gguf_int8.py", "tests/ops/test_layer_ops.py", "tests/ops/test_sampler.py",
                          "tests/engine/test_parity.py::"
                          "test_fused_decode_layers_compute_exactly_what_the_op_by_op_layers_do",
                          "tests/engine/test_parity.py::"
                          "test_fused_decode_layers_on_int8_executed_weights_compute_what_the_op_by_op_layers_do"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) > 200 and "skipped" not in tail, tail
