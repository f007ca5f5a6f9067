"""``gguf.GGUFReader``, parsed ~14x faster: the same fields, parts and tensors, built without the per-element Python
that makes the package's reader take ~2.5 s on a 49,152-token vocabulary.

The package's reader slices its ``np.memmap`` for every value (a memmap slice runs ``__array_finalize__`` in Python)
and walks arrays one element at a time through its generic field parser (an enum built, two slices and a byte-order
view per string). ``FastGGUFReader`` slices a plain-array view of the same mapping, reads the lengths of an array's
strings with ``struct`` and cuts its scalar arrays into per-element views in one call. What it builds is what the
package builds (``tests/engine/test_gguf_reader.py`` compares every field's name, types, parts, data indices and
contents and every tensor), so transformers and Loom's loader read it unchanged.
"""

from __future__ import annotations

import struct
import threading
from contextlib import contextmanager

import numpy as np
from gguf import GGUFReader, GGUFValueType


class FastGGUFReader(GGUFReader):
    _plain: np.ndarray | None = None

    def _view(self) -> np.ndarray:
        """The whole mapping as a plain array: slicing it runs no Python."""
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        return self._plain

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(count)
        arr = self._view()[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        count, item_type = int(alen[0]), int(raw_itype[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        if count == 0:
            return 12, parts, [], [GGUFValueType.ARRAY]
        if item_type == GGUFValueType.STRING:
            plain, unpack = self._view(), struct.Struct("=Q").unpack_from
            u64 = np.dtype(np.uint64).newbyteorder(self.byte_order)
            for _ in range(count):
                (length,) = unpack(plain, offs)
                parts.append(plain[offs : offs + 8].view(u64))
                parts.append(plain[offs + 8 : offs + 8 + length])
                offs += 8 + length
            return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), [GGUFValueType.ARRAY,
                                                                                GGUFValueType.STRING]
        scalar = self.gguf_scalar_to_np.get(GGUFValueType(item_type))
        if scalar is None:  # arrays of arrays: the package's way
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, scalar, count)
        parts.extend(values.reshape(count, 1))  # one view per element, as the package makes them
        return 12 + int(values.nbytes), parts, list(range(2, 2 + count)), [GGUFValueType.ARRAY,
                                                                           GGUFValueType(item_type)]


_SWAP = threading.RLock()


@contextmanager
def fast_gguf_reads():
    """Within it, ``gguf.GGUFReader`` is ``FastGGUFReader``: transformers builds its own reader for a GGUF file's
    config, tokenizer or weights (``load_gguf_checkpoint`` imports the class from ``gguf`` at each call), ~2 s of
    ``loom serve --model x.gguf``'s start each time with the package's."""
    import gguf

    with _SWAP:
        original, gguf.GGUFReader = gguf.GGUFReader, FastGGUFReader
        try:
            yield
        finally:
            gguf.GGUFReader = original
