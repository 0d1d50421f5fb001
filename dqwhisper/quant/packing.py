"""Bit packing of unsigned integer codes (2..8 bits) into bytes, little-endian within each byte.

Code i occupies bits [i*b, (i+1)*b) of the stream, bit 0 being the lowest bit of byte 0; 8 codes take exactly b bytes,
so the stream is processed in chunks of 8 codes. A trailing partial chunk is zero-padded to a whole byte.
"""

from __future__ import annotations

import numpy as np

from dqwhisper.utils import DQWhisperError

CHUNK = 1 << 20  # codes per processing step (a multiple of 8): bounds the temporary memory


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes, each < 2**bits -> packed bytes."""
    if not 1 <= bits <= 8:
        raise DQWhisperError(f"cannot pack {bits}-bit codes")
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise DQWhisperError(f"a code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.tobytes()
    out = []
    for start in range(0, codes.size, CHUNK):
        part = codes[start : start + CHUNK]
        pad = (-part.size) % 8
        if pad:
            part = np.concatenate([part, np.zeros(pad, np.uint8)])
        bitplanes = np.unpackbits(part[:, None], axis=1, bitorder="little")[:, :bits]  # (n, bits)
        out.append(np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes())
    data = b"".join(out)
    return data[: packed_nbytes(codes.size, bits)]


def unpack_codes(data: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Packed bytes -> n uint8 codes."""
    if not 1 <= bits <= 8:
        raise DQWhisperError(f"cannot unpack {bits}-bit codes")
    need = packed_nbytes(n, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < need:
        raise DQWhisperError(f"packed data holds {buf.size} bytes, {n} {bits}-bit codes need {need}")
    if bits == 8:
        return buf[:n].copy()
    out = np.empty(n, np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    step_bytes = CHUNK * bits // 8
    for i, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        raw = buf[i * step_bytes : i * step_bytes + packed_nbytes(m, bits)]
        stream = np.unpackbits(raw, bitorder="little")[: m * bits].reshape(m, bits)
        out[start : start + m] = (stream.astype(np.uint16) @ weights).astype(np.uint8)
    return out
