"""``FastGGUFReader`` builds what the ``gguf`` package's reader builds: every field's name, offset, types, data indices,
parts (dtype, shape, bytes) and contents, and every tensor, on the packaged SmolLM2 file, on a file with every kind of
value (string, scalar, boolean, nested and empty arrays, multi-byte UTF-8), and on a Gemma 3 file with K-quants."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from loom.models.gguf_reader import FastGGUFReader, fast_gguf_reads
from tests.engine.test_gguf_archs import write_tiny_gguf


def assert_same_reader(want, got) -> None:
    assert list(got.fields) == list(want.fields)
    for name, a in want.fields.items():
        b = got.fields[name]
        assert (b.name, b.offset, b.types, b.data) == (a.name, a.offset, a.types, a.data), name
        assert len(b.parts) == len(a.parts), name
        for x, y in zip(a.parts, b.parts, strict=True):
            assert (y.dtype, y.shape, y.tobytes()) == (x.dtype, x.shape, x.tobytes()), name
        assert b.contents() == a.contents(), name
    assert (got.alignment, got.data_offset) == (want.alignment, want.data_offset)
    assert len(got.tensors) == len(want.tensors)
    for a, b in zip(want.tensors, got.tensors, strict=True):
        assert (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset) == (
            a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset)
        assert np.array_equal(b.shape, a.shape) and b.field.data == a.field.data
        assert (b.data.dtype, b.data.shape) == (a.data.dtype, a.data.shape)
        assert np.array_equal(b.data.view(np.uint8), a.data.view(np.uint8)), a.name


def test_the_packaged_file_reads_the_same():
    from gguf import GGUFReader

    from loom.models.catalogue import packaged_file

    path = packaged_file("smollm2")
    assert_same_reader(GGUFReader(path), FastGGUFReader(path))


def test_every_kind_of_value_and_a_k_quant_file_read_the_same(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "values.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("t.strings", ["a", "Grüße 🙂", "", "x" * 300])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.nested", [[1, 2], [3, 4, 5]])
    writer.add_array("t.nested_strings", [["a", "bc"], ["d"]])
    writer.add_uint64("t.u64", 2**40)
    writer.add_bool("t.bool", True)
    writer.add_string("t.string", "héllo")
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.arange(8, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_reader(GGUFReader(path), FastGGUFReader(path))
    gemma = tmp_path / "gemma3.gguf"
    write_tiny_gguf(gemma, "gemma3")
    assert_same_reader(GGUFReader(gemma), FastGGUFReader(gemma))


def test_an_empty_array_reads_the_same(tmp_path):
    """GGUFWriter leaves empty arrays out; a file may still hold one (written here byte by byte)."""
    from gguf import GGUFReader

    key = b"t.empty"
    raw = (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 5, 0)
           + struct.pack("<Q", 3) + b"t.x" + struct.pack("<II", 4, 7))
    path = tmp_path / "empty.gguf"
    path.write_bytes(raw + b"\0" * (-len(raw) % 32))
    want, got = GGUFReader(path), FastGGUFReader(path)
    assert want.fields["t.empty"].types == [9] and want.fields["t.empty"].contents() == []
    assert_same_reader(want, got)


def test_transformers_reads_with_the_fast_reader_only_inside_the_block():
    import gguf

    original = gguf.GGUFReader
    with fast_gguf_reads():
        assert gguf.GGUFReader is FastGGUFReader
    assert gguf.GGUFReader is original
    with pytest.raises(RuntimeError), fast_gguf_reads():
        raise RuntimeError("a failed load")
    assert gguf.GGUFReader is original
