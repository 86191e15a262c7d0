"""safetensors files written and read by hand, for the reference engine (no `safetensors` package).

The format: an 8-byte little-endian header length N, N bytes of a JSON object (one entry per
tensor: `{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}`, offsets relative to the
first byte after the header, plus an optional `"__metadata__"` object of strings), then the raw
tensor bytes. The header is padded with spaces so that the data starts at an 8-byte boundary.

This module knows only bytes: the engine packs a shard's tensors back to back in one device
buffer, so a shard's data section is that buffer's exact image and loads with plain `preadv`.
Standard library only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DTYPE_SIZES: Final = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
METADATA_KEY: Final = "__metadata__"
_MAX_HEADER: Final = 100 * 2**20  # the reference implementation's own limit
_ALIGN: Final = 8


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    entries: tuple[TensorEntry, ...]  # in data order
    metadata: dict[str, str]
    data_offset: int  # absolute file offset of the data section
    data_bytes: int

    def entry(self, name: str) -> TensorEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    try:
        size = DTYPE_SIZES[dtype]
    except KeyError:
        raise SafetensorsError(f"unknown dtype {dtype!r}") from None
    return size * math.prod(shape)


def layout(tensors: Iterable[tuple[str, str, Sequence[int]]]) -> list[TensorEntry]:
    """Back-to-back offsets for (name, dtype, shape) in the given order."""
    entries, offset = [], 0
    for name, dtype, shape in tensors:
        nbytes = tensor_bytes(dtype, shape)
        entries.append(TensorEntry(name, dtype, tuple(int(s) for s in shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def encode_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus the padded JSON header; the data section follows it."""
    body: dict[str, object] = {}
    if metadata:
        body[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    for e in entries:
        body[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return len(text).to_bytes(8, "little") + text


def decode_header(prefix: bytes, file_size: int | None = None) -> Header:
    """Parse a header from the first bytes of a file (at least 8 + N of them)."""
    if len(prefix) < 8:
        raise SafetensorsError("shorter than the 8-byte header length")
    size = int.from_bytes(prefix[:8], "little")
    if size > _MAX_HEADER:
        raise SafetensorsError(f"header length {size} is implausibly large")
    if len(prefix) < 8 + size:
        raise SafetensorsError(f"the header needs {size} bytes, only {len(prefix) - 8} there")
    try:
        body = json.loads(prefix[8 : 8 + size].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"the header is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SafetensorsError("the header is not a JSON object")
    raw_meta = body.pop(METADATA_KEY, None) or {}
    if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
        raise SafetensorsError(f"{METADATA_KEY} must be an object of strings")
    entries = [_entry(name, spec) for name, spec in body.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    offset = 0
    for e in entries:
        if e.begin != offset:
            raise SafetensorsError(
                f"tensor {e.name!r} starts at {e.begin}, expected {offset} (gap or overlap)"
            )
        offset = e.end
    if file_size is not None and 8 + size + offset != file_size:
        raise SafetensorsError(
            f"the data section holds {file_size - 8 - size} bytes, the header says {offset}"
        )
    return Header(tuple(entries), dict(raw_meta), 8 + size, offset)


def _entry(name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict):
        raise SafetensorsError(f"entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"entry {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SafetensorsError(f"entry {name!r}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"entry {name!r}: bad data_offsets {offsets!r}")
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.nbytes != tensor_bytes(dtype, shape):
        raise SafetensorsError(
            f"entry {name!r}: {entry.nbytes} bytes for {dtype} {shape}, expected {tensor_bytes(dtype, shape)}"
        )
    return entry


def read_header(path: Path | str) -> Header:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        first = os.pread(fd, 8, 0)
        if len(first) < 8:
            raise SafetensorsError(f"{path}: shorter than the 8-byte header length")
        size = int.from_bytes(first, "little")
        if size > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {size} is implausibly large")
        return decode_header(first + _pread_exact(fd, size, 8), file_size)
    except SafetensorsError as exc:
        raise SafetensorsError(f"{path}: {exc}") from None
    finally:
        os.close(fd)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise SafetensorsError(f"the file ends at byte {offset + done}, {size - done} bytes early")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def write_file(
    path: Path,
    entries: Sequence[TensorEntry],
    chunks: Iterable[memoryview | bytes],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the header, then `chunks` (the data section in order), atomically (temp + rename).

    The chunks must add up to exactly the entries' data size.
    """
    header = encode_header(entries, metadata)
    expected = entries[-1].end if entries else 0
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(header))
        written = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            _write_all(fd, view)
            written += len(view)
        if written != expected:
            raise SafetensorsError(f"{path}: wrote {written} data bytes, the header says {expected}")
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(partial, path)


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        done = os.write(fd, view)
        view = view[done:]


def save_bytes(
    path: Path,
    tensors: Mapping[str, tuple[str, Sequence[int], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Small files (tests, tools): name -> (dtype, shape, raw bytes)."""
    entries = layout((name, dtype, shape) for name, (dtype, shape, _) in tensors.items())
    write_file(path, entries, (data for _, _, data in tensors.values()), metadata)


def load_bytes(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], dict[str, str]]:
    """Small files: every tensor's dtype, shape and raw bytes, and the metadata."""
    header = read_header(path)
    with open(path, "rb") as source:
        source.seek(header.data_offset)
        data = source.read(header.data_bytes)
    tensors = {e.name: (e.dtype, e.shape, data[e.begin : e.end]) for e in header.entries}
    return tensors, header.metadata
