"""Memory the fake engine really holds: "device" regions, the level-1 host copy, the weights file.

"Device" memory is an anonymous private mapping whose pages are all written, so it counts in VmRSS
while mapped and leaves it at once when unmapped, which is what tests and checkpoints look at.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import zlib
from pathlib import Path
from typing import Final

MIB: Final = 1024 * 1024
_CHUNK: Final = MIB


class DeviceRegion:
    """A fixed-size region that is either mapped (resident, every page touched) or released."""

    def __init__(self, name: str, size: int) -> None:
        if size <= 0:
            raise ValueError(f"{name}: size must be positive, got {size}")
        self.name = name
        self.size = size
        self._map: mmap.mmap | None = None

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def map(self, fill: bytes) -> None:
        """Map the region and tile `fill` over it; writing every page is what makes it resident."""
        if self._map is not None:
            return
        self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.tile(fill)

    def release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def tile(self, block: bytes) -> None:
        buf = self._require()
        if len(block) < _CHUNK:
            block = block * (_CHUNK // len(block))
        for offset in range(0, self.size, len(block)):
            end = min(offset + len(block), self.size)
            buf[offset:end] = block[: end - offset]

    def read(self, offset: int, length: int) -> bytes:
        return self._require()[offset : offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self._require()[offset : offset + len(data)] = data

    def checksum(self) -> int:
        return zlib.crc32(self._require())

    def save_to(self, fd: int) -> None:
        """Write the whole region to `fd` from offset 0 without an intermediate copy."""
        with memoryview(self._require()) as view:
            offset = 0
            while offset < self.size:
                offset += os.pwrite(fd, view[offset : offset + _CHUNK], offset)

    def load_from(self, fd: int) -> None:
        """Fill the whole region from `fd` (offset 0); the source must be at least as large."""
        with memoryview(self._require()) as view:
            offset = 0
            while offset < self.size:
                got = os.preadv(fd, [view[offset : offset + _CHUNK]], offset)
                if got == 0:
                    raise OSError(f"{self.name}: source ended at byte {offset} of {self.size}")
                offset += got

    def _require(self) -> mmap.mmap:
        if self._map is None:
            raise RuntimeError(f"{self.name} is not resident")
        return self._map


class HostCopy:
    """The level-1 offload target, standing in for pinned host RAM.

    A memfd holds the bytes in RAM without mapping them into the process, so VmRSS shows only the
    "device" regions; CRIU dumps memfds with their content, so a checkpoint taken at level 1 keeps it.
    """

    def __init__(self, source: DeviceRegion) -> None:
        self.size = source.size
        self._fd = os.memfd_create(f"fake-engine-host-{source.name}", os.MFD_CLOEXEC)
        try:
            source.save_to(self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    def restore_into(self, target: DeviceRegion) -> None:
        target.load_from(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def model_weights_block(model: str) -> bytes:
    """1 MiB of bytes that depend only on the model name; tiled (with chunk numbers) into the weights."""
    return hashlib.shake_256(f"hibernate-fake-weights:{model}".encode()).digest(_CHUNK)


def fill_model_weights(region: DeviceRegion, model: str) -> None:
    region.tile(model_weights_block(model))
    # Number every chunk, so the weights are not one block repeated and any chunk lost shows.
    for index, offset in enumerate(range(0, region.size - 8, _CHUNK)):
        region.write(offset, index.to_bytes(8, "little"))


def garbage_block() -> bytes:
    """Content for memory remapped after a discard: undefined, as vLLM's is after a level-2 wake."""
    return os.urandom(_CHUNK)


def default_weights_file(model: str, size: int) -> Path:
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "hibernate-fake-engine" / f"{digest}-{size}.weights"


def ensure_weights_file(path: Path, region: DeviceRegion) -> None:
    """Write the region to `path` unless the file already holds exactly these bytes."""
    if path.is_file() and path.stat().st_size == region.size and _file_checksum(path) == region.checksum():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so engines starting together never read half a file.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        region.save_to(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def _file_checksum(path: Path) -> int:
    checksum = 0
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def load_weights_file(path: Path, region: DeviceRegion) -> None:
    size = path.stat().st_size
    if size != region.size:
        raise ValueError(f"weights file {path} has {size} bytes, the model needs {region.size}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        region.load_from(fd)
    finally:
        os.close(fd)


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process, from /proc (0 where the field is missing, e.g. for a zombie)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
