"""A step's integers travel to the device as one tensor: the views equal the host lists they came from."""

from __future__ import annotations

import pytest
import torch

from loom.engine.model_runner import StepInputs, Uploader


def step_inputs() -> StepInputs:
    # two decodes (tables padded to width 3), one prefill chunk with a table and one without, four logit rows
    return StepInputs(
        input_ids=[11, 12, 13, 14, 15, 16, 17], positions=[5, 9, 0, 1, 2, 0, 1], slots=[21, 33, 40, 41, 42, 50, 51],
        decode_tables=[[2, 5, 0], [3, 4, 8]], decode_seq_lens=[6, 10],
        prefills=[(2, 5, 0, [10, 11]), (5, 7, 0, None)], logit_rows=[0, 1, 4, 6],
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (pinned staging, non-blocking copy)"))])
def test_upload_views_equal_the_host_lists(device):
    inputs = step_inputs()
    uploader = Uploader(torch.device(device))
    for _ in range(2):  # the second step reuses the staging buffer
        step = uploader.upload(inputs)
        assert step.input_ids.tolist() == [11, 12, 13, 14, 15, 16, 17] and step.input_ids.dtype == torch.long
        assert step.positions.tolist() == [5, 9, 0, 1, 2, 0, 1] and step.slots.tolist() == [21, 33, 40, 41, 42, 50, 51]
        assert step.decode_tables.dtype == torch.int32 and step.decode_tables.tolist() == [[2, 5, 0], [3, 4, 8]]
        assert step.decode_seq_lens.dtype == torch.int32 and step.decode_seq_lens.tolist() == [6, 10]
        assert [None if t is None else t.tolist() for t in step.prefill_tables] == [[10, 11], None]
        assert step.logit_rows.tolist() == [0, 1, 4, 6]
        assert step.input_ids.device.type == device


def test_a_step_without_decodes_or_prefills():
    inputs = StepInputs([7], [0], [3], [], [], [(0, 1, 0, [1])], [0])
    step = Uploader(torch.device("cpu")).upload(inputs)
    assert step.decode_tables.shape == (0, 0) and step.decode_seq_lens.numel() == 0
    assert step.prefill_tables[0].tolist() == [1] and step.logit_rows.tolist() == [0]


def reference_inputs(bm, decodes, prefills):
    """The step's integers from the block tables' lists, token by token (how the runner built them before it gathered
    from ``table_array``)."""
    bs = bm.block_size
    ids, positions, slots = [], [], []
    for c in decodes + prefills:
        table = bm.block_table(c.seq.seq_id)
        ids += c.token_ids
        positions += range(c.start, c.end)
        slots += [table[p // bs] * bs + p % bs for p in range(c.start, c.end)]
    tables, seq_lens = [], []
    for c in decodes:
        tables += [bm.block_table(c.seq.seq_id)] * c.num_tokens
        seq_lens += range(c.start + 1, c.end + 1)
    prefill_chunks, row = [], len(seq_lens)
    for c in prefills:
        table = bm.block_table(c.seq.seq_id)[: bm.blocks_needed(c.end)]
        prefill_chunks.append((row, row + c.num_tokens, c.start, table))
        row += c.num_tokens
    rows, drafts, row = [], [], 0
    for c in decodes + prefills:
        row += c.num_tokens
        if c.samples:
            rows.append(row - 1 - len(c.draft_token_ids))
            drafts += range(row - len(c.draft_token_ids), row)
    return ids, positions, slots, tables, seq_lens, prefill_chunks, rows + drafts


@pytest.mark.parametrize("window", [None, 24])
def test_step_inputs_gathered_from_the_table_array_equal_the_token_by_token_reference(window):
    """A scheduler over random requests (chunked prefills, prefix hits, n-gram-like drafts, preemptions, a sliding
    window giving blocks back): every step's inputs equal the list-built reference; each decode row's table covers
    its context and the width is the longest context's."""
    import random

    from loom.engine.block_manager import BlockManager
    from loom.engine.model_runner import ModelRunner
    from loom.engine.sampling_params import SamplingParams
    from loom.engine.scheduler import Scheduler, SchedulerConfig
    from loom.engine.sequence import Sequence

    rng = random.Random(1)
    bm = BlockManager(num_blocks=60, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40, watermark=0.0, sliding_window=window),
                      bm)
    runner = ModelRunner(None, [], bm, torch.device("cpu"))
    shared = [rng.randrange(1000) for _ in range(12)]
    seen = {"drafts": 0, "prefills": 0, "decodes": 0, "preempted": 0}
    for step in range(160):
        if step < 100 and rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(rng.randrange(1, 50))]
            sched.add(Sequence(step, f"r{step}", 0, prompt, SamplingParams(max_tokens=30), 0.0))
        for seq in sched.running:
            seq.draft_token_ids = [rng.randrange(1000) for _ in range(rng.choice([0, 0, 2, 3]))]
        out = sched.schedule()
        seen["preempted"] += len(out.preempted)
        if out.is_empty:
            continue
        decodes = [c for c in out.chunks if c.is_decode]
        prefills = [c for c in out.chunks if not c.is_decode]
        got, _, prompt_rows = runner._inputs(decodes, prefills)
        assert prompt_rows == []  # no request asks for prompt logprobs
        ids, positions, slots, tables, seq_lens, prefill_chunks, rows = reference_inputs(bm, decodes, prefills)
        assert got.input_ids.tolist() == ids and got.positions.tolist() == positions and got.slots.tolist() == slots
        assert got.decode_seq_lens.tolist() == seq_lens and got.logit_rows.tolist() == rows
        needed = [bm.blocks_needed(n) for n in seq_lens]
        assert got.decode_tables.shape == (len(tables), max(needed, default=0))
        for row, table, n in zip(got.decode_tables.tolist(), tables, needed):
            assert row[:n] == table[:n]
        assert [(a, b, c, t.tolist()) for a, b, c, t in got.prefills] == prefill_chunks
        assert StepInputs.decode(got.encode()) == got
        seen["drafts"] += sum(len(c.draft_token_ids) for c in decodes)
        seen["prefills"] += len(prefills)
        seen["decodes"] += len(decodes)
        sched.update(out)
        for c in out.chunks:  # accept the drafts, then one sampled token
            if c.samples:
                c.seq.output_token_ids += c.draft_token_ids + [rng.randrange(1000)]
                c.seq.draft_token_ids = []
                if c.seq.num_output_tokens >= 30:
                    sched.finish(c.seq, "length")
    assert all(v > 0 for k, v in seen.items() if k != "preempted" or window is None), seen
