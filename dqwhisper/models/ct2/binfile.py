"""CTranslate2's model.bin: read, write, join a file shipped in parts.

Layout (ctranslate2 4.x, binary version 6, little-endian):
    u32 version | str spec name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | raw row-major bytes)
    u32 n_aliases | n_aliases x (str alias | str target)
where a str is a u16 length that counts a trailing NUL, then the bytes and the NUL. Variables are sorted by name.
Quantized weights: an int8 tensor `q` plus a float32 `<name>_scale` with one value per output row, `w ~= q / scale`.
"""

from __future__ import annotations

import io
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dqwhisper.utils import DQWhisperError, atomic_write_bytes

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
PRUNED_LOGIT = -1.0e4  # projection bias at pruned token ids (representable in float16)

_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class CT2ModelFile:
    """The contents of a model.bin: variables by name (any order; written sorted) and aliases (alias -> target)."""

    variables: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    spec: str = SPEC_NAME
    revision: int = SPEC_REVISION

    def get(self, name: str) -> Tensor | None:
        name = self.aliases.get(name, name)
        return self.variables.get(name)


@dataclass(frozen=True)
class Int8Weight:
    """A weight already quantized per output row: `w ~= q / scale` (CTranslate2's convention).

    q: int8 (rows, ...) ; scale: float32 (rows,). Holding a step size instead (w ~= q * step)? Use `from_step`.
    """

    q: Tensor
    scale: Tensor

    @classmethod
    def from_step(cls, q: Tensor, step: Tensor) -> "Int8Weight":
        return cls(q, 1.0 / step.float())

    def dequantize(self) -> Tensor:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return self.q.float() / self.scale.float().reshape(shape)


# ----------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DQWhisperError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"length of {what}")
        raw = self.take(n, what)
        if n == 0 or raw[-1:] != b"\0":
            raise DQWhisperError(f"{self.path} is corrupt: {what} at offset {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise DQWhisperError(f"{self.path} is corrupt: {what} at offset {self.pos - n} is not UTF-8") from e


def read_model_bin(path: str | Path) -> CT2ModelFile:
    """Parse a CTranslate2 model.bin. Errors name the file and the problem (missing, truncated, wrong version...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise DQWhisperError(f"CTranslate2 model file {path} does not exist")
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I", "the format version")
    if version != BINARY_VERSION:
        raise DQWhisperError(
            f"{path} has format version {version}, this reader knows version {BINARY_VERSION} "
            f"(not a CTranslate2 model.bin, or written by an unsupported ctranslate2)"
        )
    spec = r.string("the spec name")
    revision = r.unpack("I", "the spec revision")
    count = r.unpack("I", "the variable count")
    variables: dict[str, Tensor] = {}
    for i in range(count):
        name = r.string(f"the name of variable {i}")
        rank = r.unpack("B", f"the rank of {name}")
        shape = [r.unpack("I", f"the shape of {name}") for _ in range(rank)]
        type_id = r.unpack("B", f"the dtype of {name}")
        if type_id >= len(_DTYPES):
            raise DQWhisperError(f"{path} is corrupt: variable {name} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        n_bytes = r.unpack("I", f"the byte count of {name}")
        expected = torch.Size(shape).numel() * dtype.itemsize
        if n_bytes != expected:
            raise DQWhisperError(
                f"{path} is corrupt: variable {name} of shape {shape} and {dtype} "
                f"should take {expected} bytes, the file says {n_bytes}"
            )
        raw = r.take(n_bytes, f"the data of {name}")
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    n_aliases = r.unpack("I", "the alias count")
    aliases = {}
    for i in range(n_aliases):
        alias = r.string(f"alias {i}")
        aliases[alias] = r.string(f"the target of alias {alias}")
        if aliases[alias] not in variables:
            raise DQWhisperError(f"{path} is corrupt: alias {alias} points to a missing variable {aliases[alias]}")
    if r.pos != len(r.data):
        raise DQWhisperError(f"{path} is corrupt: {len(r.data) - r.pos} unexpected bytes after the last alias")
    return CT2ModelFile(variables, aliases, spec, revision)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def model_bin_bytes(model: CT2ModelFile) -> bytes:
    out = io.BytesIO()
    out.write(struct.pack("<I", BINARY_VERSION) + _string(model.spec) + struct.pack("<I", model.revision))
    out.write(struct.pack("<I", len(model.variables)))
    for name in sorted(model.variables):
        t = model.variables[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise DQWhisperError(f"variable {name} has dtype {t.dtype}, which CTranslate2 cannot store")
        out.write(_string(name) + struct.pack("<B", t.ndim) + struct.pack(f"<{t.ndim}I", *t.shape))
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.write(struct.pack("<BI", _DTYPES.index(t.dtype), len(raw)) + raw)
    out.write(struct.pack("<I", len(model.aliases)))
    for alias in sorted(model.aliases):
        out.write(_string(alias) + _string(model.aliases[alias]))
    return out.getvalue()


def write_model_bin(path: str | Path, model: CT2ModelFile) -> None:
    atomic_write_bytes(path, model_bin_bytes(model))


def join_parts(parts: list[str | Path], out: str | Path, expected_size: int | None = None) -> Path:
    """Concatenate a model.bin shipped in pieces (e.g. model.bin.part1 + part2), in the order given; atomic."""
    parts = [Path(p) for p in parts]
    for p in parts:
        if not p.is_file():
            raise DQWhisperError(
                f"part file {p} is missing: every part of {Path(out).name} is needed, in order "
                f"{[q.name for q in parts]}"
            )
    total = sum(p.stat().st_size for p in parts)
    if expected_size is not None and total != expected_size:
        raise DQWhisperError(f"parts {[str(p) for p in parts]} add up to {total} bytes, expected {expected_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    tmp.replace(out)
    return out
