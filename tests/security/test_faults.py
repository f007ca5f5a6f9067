"""Fault runs (benchmarks/faults.py), bounded and on loopback: 1,000 LLM requests with random disconnects and a 10x
burst, a finetune killed with SIGKILL and resumed, a model-server worker killed mid-batch."""

from __future__ import annotations

import pytest

from benchmarks.faults import LLMFaults, run_finetune, run_llm, run_worker

pytestmark = pytest.mark.slow


def test_disconnects_and_a_burst_leave_nothing_behind(tiny_llama):
    result = run_llm(tiny_llama, LLMFaults(requests=1000, seed=0))
    outcomes, burst = result["outcomes"], result["burst_outcomes"]
    assert set(outcomes) <= {"200", "503", "disconnected"}, outcomes
    assert sum(outcomes.values()) == 1000 and outcomes["200"] > 500 and outcomes["disconnected"] > 100
    assert set(burst) == {"200", "503"}, burst  # over capacity: some run, the rest are shed with 503
    assert result["health"]["failures"] == 0 and result["health"]["polls"] > 10
    assert result["kv_blocks_leaked"] == 0 and result["engine_unfinished"] == 0
    idle = result["idle"]
    assert (idle["in_flight"], idle["running"], idle["waiting"], idle["kv_usage"]) == (0, 0, 0, 0.0)


def test_a_finetune_killed_mid_run_resumes_to_the_same_weights(tmp_path, tiny_llama):
    result = run_finetune(tmp_path, tiny_llama, steps=20, seed=1)
    assert result["corrupt_checkpoints"] == 0 and result["checkpoints_after_kill"] >= 1
    assert int(result["resumed_from"].split("-")[1]) >= result["killed_after_checkpoint"]
    assert result["same_tensors"] and result["max_abs_diff"] <= 1e-6


def test_a_worker_killed_mid_batch_fails_its_batch_in_time_and_is_replaced():
    result = run_worker(batch=4, timeout_ms=10_000)
    assert all(500 <= status < 600 for status in result["statuses"]), result
    assert result["answered_s_after_kill"] < result["deadline_s"]
    assert result["new_pid"] != result["old_pid"]
    assert result["later_statuses"] == [200, 200]
