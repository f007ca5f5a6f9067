"""`loom bench load` end to end on a toy handler: a real server process, a 2 x 2 sweep, CSV + JSON + PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loom.cli import main

TOY = str(Path(__file__).with_name("toy_handlers.py"))


@pytest.mark.slow
def test_sweep_writes_one_row_per_cell(tmp_path, capsys):
    prefix = tmp_path / "sweep"
    code = main(["bench", "load", "--serve", f"echo={TOY}#EchoHandler", "--batch-sizes", "1,4", "--workers", "1,2",
                 "--concurrency", "8", "--duration", "0.6", "--warmup", "0.2", "--out", str(prefix)])
    assert code == 0
    rows = list(csv.DictReader(prefix.with_suffix(".csv").open()))
    assert [(int(r["workers"]), int(r["batch_size"])) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in rows:
        assert float(row["requests_per_s"]) > 0 and int(row["errors"]) == 0
        assert 1.0 <= float(row["mean_batch_size"]) <= int(row["batch_size"])
        assert 0.0 < float(row["busy_fraction"]) <= 1.0
        assert float(row["p50_ms"]) <= float(row["p99_ms"])
    assert [float(r["mean_batch_size"]) for r in rows if r["batch_size"] == "1"] == [1.0, 1.0]
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["meta"]["concurrency"] == 8 and len(data["cells"]) == 4
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best" in capsys.readouterr().out


def test_bad_lists_are_refused_with_a_hint():
    from loom.bench.load import _int_list

    assert _int_list("1, 8,32", "--batch-sizes") == [1, 8, 32]
    with pytest.raises(ValueError, match="comma-separated integers"):
        _int_list("1;8", "--batch-sizes")
    with pytest.raises(ValueError, match="positive"):
        _int_list("0,8", "--workers")
