"""Bit packing round trips (int2..int8) and the packed size."""

from __future__ import annotations

import numpy as np
import pytest

from dqwhisper.quant.packing import CHUNK, pack_codes, packed_nbytes, unpack_codes
from dqwhisper.utils import DQWhisperError


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, CHUNK + 13])
def test_round_trip(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, n, dtype=np.uint8)
    data = pack_codes(codes, bits)
    assert len(data) == packed_nbytes(n, bits) == (n * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(data, bits, n), codes)


def test_int4_layout_is_low_nibble_first():
    assert pack_codes(np.array([1, 2, 15, 0], np.uint8), 4) == bytes([0x21, 0x0F])
    assert pack_codes(np.array([3, 0, 1, 2], np.uint8), 2) == bytes([0b10010011])


def test_code_too_large_and_short_buffer_fail():
    with pytest.raises(DQWhisperError, match="does not fit in 3 bits"):
        pack_codes(np.array([8], np.uint8), 3)
    with pytest.raises(DQWhisperError, match="need"):
        unpack_codes(b"\x00", 4, 5)
