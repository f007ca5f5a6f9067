"""benchmarks/gpu_shapes.py, the GPU table's script (issue 11): its roofline arithmetic by hand, and a whole run on
tiny shapes on CPU (the H200 run is the same code at real shapes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_shapes import SHAPES, Shape

ROOT = Path(__file__).resolve().parents[2]


def test_step_bytes_and_flops_by_hand():
    shape = Shape(SHAPES["llama-3.1-8b"], elem=2)
    layer = 4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336  # q, k, v, o + gate, up, down
    assert shape.layer_params == 32 * layer and shape.head_params == 4096 * 128256
    assert shape.weight_bytes == 2 * (32 * layer + 4096 * 128256)  # untied: the head is its own matrix
    kv = 2 * 32 * 8 * 128 * 2  # K and V, every layer, 8 KV heads of 128, bf16
    # a decode at context 1024 (the new token included) and a 100-token prefill chunk ending at 300 that samples
    bytes_, flops = shape.step([(1, 1024, True), (100, 300, True)])
    assert bytes_ == shape.weight_bytes + (1025 + 400) * kv
    attention = 4 * 32 * 128 * 32 * (1 * 1023.5 + 100 * 250)
    assert flops == pytest.approx(2 * 32 * layer * 101 + attention + 2 * 2 * 4096 * 128256)


@pytest.mark.slow
def test_the_script_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_shapes.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_shapes.py", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 4]
    assert all(0 < row["fraction_of_copy_bw"] and row["step_ms"] > 0 for row in result["decode"])
    tiny = result["throughput"]["tiny"]
    assert 0 < tiny["fraction_of_roofline"] < 1 and tiny["steps"] > 0
    assert tiny["subset"]["vs_hf"] > 0 and tiny["subset"]["vs_hf-cb"] > 0
    assert run.stdout.startswith("gpu_shapes (cpu)")
