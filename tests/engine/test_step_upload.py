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
        assert step.input_ids.tolist() == inputs.input_ids and step.input_ids.dtype == torch.long
        assert step.positions.tolist() == inputs.positions and step.slots.tolist() == inputs.slots
        assert step.decode_tables.dtype == torch.int32 and step.decode_tables.tolist() == inputs.decode_tables
        assert step.decode_seq_lens.dtype == torch.int32 and step.decode_seq_lens.tolist() == inputs.decode_seq_lens
        assert [None if t is None else t.tolist() for t in step.prefill_tables] == [[10, 11], None]
        assert step.logit_rows.tolist() == inputs.logit_rows
        assert step.input_ids.device.type == device


def test_a_step_without_decodes_or_prefills():
    inputs = StepInputs([7], [0], [3], [], [], [(0, 1, 0, [1])], [0])
    step = Uploader(torch.device("cpu")).upload(inputs)
    assert step.decode_tables.shape == (0, 0) and step.decode_seq_lens.numel() == 0
    assert step.prefill_tables[0].tolist() == [1] and step.logit_rows.tolist() == [0]
