"""Loom's import layers, read from its own imports (scripts/import_layers.py): no cycle, nothing up or sideways."""

from __future__ import annotations

from pathlib import Path

from scripts.import_layers import cycles, module_graph, violations

ROOT = Path(__file__).resolve().parents[1] / "loom"


def test_the_package_has_no_cycle_and_no_upward_or_sideways_import():
    graph = module_graph(ROOT)
    assert len(graph) > 90
    assert violations(graph) == []


def test_the_check_sees_what_it_should():
    graph = {"loom.ops.sampler": {"loom.engine.sampling_params"}, "loom.engine.sampling_params": set(),
             "loom.image.api": {"loom.batching.routes"}, "loom.batching.routes": set(),
             "loom.models.a": {"loom.models.b"}, "loom.models.b": {"loom.models.a"}}
    found = violations(graph)
    assert any(v.startswith("upward: loom.ops.sampler") for v in found)
    assert any(v.startswith("sideways: loom.image.api") for v in found)
    assert cycles(graph) == [["loom.models.a", "loom.models.b"]]
