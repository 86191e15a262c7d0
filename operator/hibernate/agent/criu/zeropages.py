"""Leave pages of zero bytes out of a CRIU image, after the dump.

A driver checkpoint copies the CUDA context's device memory into the process before the dump, and
most of it is zero bytes: 681 of the 688 MiB it added to the reference engine on an H100
(bench/image_anatomy.py, bench/RESULTS.md). CRIU skips only pages mapped to the kernel's shared
zero page; pages that were written with zeros it writes like any other. This module rewrites each
process's page map without them: in a private anonymous mapping a page the image does not list is
restored as a fresh page, zero bytes, and in a mapping inherited from the parent process CRIU drops
the parent's copy of a page the child does not list (criu/mem.c, restore_priv_vma_content), so that
too reads zero. Pages of other mappings (a private file mapping's copied-on-write pages, which would
otherwise read back from the file) are kept, as are entries that are not plain present pages.

The rewrite never leaves a mixed image to an agent that dies. The kept pages go to a new pages
file; the new page map, which names that file, replaces the old one by rename; only then is the old
pages file removed. An agent that dies half-way leaves a consistent image and at most one unused
file (tests/test_faults.py kills the agent right after the rename and wakes the engine from that
image). Like criu's own files, nothing is synced to the disk: an image does not outlive its node's
crash anyway. A page map with less than MIN_SHARE of its pages to leave out is not rewritten.

The image format (criu/include/magic.h, images/pagemap.proto, images/mm.proto): an image file is two
32-bit magics and then entries, each a 32-bit length and a protobuf message; a pages file is raw
pages in page map order. Only the few varint fields used here are decoded.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import os
import re
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hibernate.faults import fault_point

IMG_COMMON_MAGIC: Final = 0x54564319
PAGEMAP_MAGIC: Final = 0x56084025
MM_MAGIC: Final = 0x57492820

PE_PARENT: Final = 1 << 0  # the pages are in a parent image (incremental dumps; none here)
PE_LAZY: Final = 1 << 1  # criu marks private anonymous pages so: a lazy restore may fetch them later
PE_PRESENT: Final = 1 << 2  # the entry's pages are in the pages file
VMA_ANON_PRIVATE: Final = 1 << 9
# Anonymous private mappings whose content criu restores by other means than fresh pages: vsyscall,
# vDSO, vvar, an AIO ring, a shadow stack, a plugin's, an unsupported one (criu/include/image.h).
VMA_SPECIAL: Final = (1 << 2) | (1 << 3) | (1 << 12) | (1 << 13) | (1 << 15) | (1 << 27) | (1 << 31)

PAGEMAP_FILE: Final = re.compile(r"^pagemap-(\d+)\.img$")
PAGES_FILE: Final = re.compile(r"^pages-(\d+)\.img$")
BLOCK_PAGES: Final = 16  # left out only as whole blocks of zero bytes (see _find_zero_blocks)
CHUNK_BLOCKS: Final = 64  # read 4 MiB at a time
COPY_BYTES: Final = 64 << 20  # one copy_file_range at most: a stop is seen within one of these
THREADS: Final = 4
# A page map is rewritten only when at least this share of its pages is left out: below it, the copy
# costs the sleep more than the smaller image saves the wake (a fake engine: 4 %; a driver-checkpointed
# reference engine: 50 %).
MIN_SHARE: Final = 0.125
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


class ImageFormatError(ValueError):
    """The image is not in the format this module knows; it is left as it was."""


class Stopped(Exception):
    """The caller's `stop` was set: the rewrite ended early, the image left consistent (as above)."""


def raise_if_stopped(stop: threading.Event | None) -> None:
    """Stopped once `stop` is set (the rewrite's own checks, and shrink.py's before its exchange)."""
    if stop is not None and stop.is_set():
        raise Stopped()


# -- protobuf, the few varint fields these messages have ----------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ImageFormatError("a protobuf varint runs past its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: an int for varint and fixed fields, bytes for length-delimited."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(message, pos)
            yield number, message[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, int.from_bytes(message[pos : pos + size], "little")
            pos += size
        else:
            raise ImageFormatError(f"protobuf wire type {wire} is not expected in a CRIU image")


# -- image files ------------------------------------------------------------------------------------


def read_entries(path: Path, magic: int) -> list[bytes]:
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, magic):
        raise ImageFormatError(f"{path.name} does not start with the magic of its kind")
    entries, pos = [], 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageFormatError(f"{path.name} ends inside an entry's length")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise ImageFormatError(f"{path.name} ends inside an entry")
        entries.append(data[pos : pos + length])
        pos += length
    return entries


def image_file(magic: int, entries: list[bytes]) -> bytes:
    return struct.pack("<II", IMG_COMMON_MAGIC, magic) + b"".join(
        struct.pack("<I", len(entry)) + entry for entry in entries
    )


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int

    @classmethod
    def decode(cls, message: bytes) -> PagemapEntry:
        fields = dict(_fields(message))
        if 1 not in fields:
            raise ImageFormatError("a pagemap entry without vaddr")
        # in_parent (3) marks a PE_PARENT entry in images older than the flags field (4).
        flags = PE_PARENT if fields.get(3) else int(fields.get(4, PE_PRESENT))
        return cls(int(fields[1]), int(fields.get(5, fields.get(2, 0))), flags)

    def encode(self) -> bytes:
        # As criu 4 writes them: compat_nr_pages 0, flags and nr_pages set.
        return b"".join(
            (
                b"\x08" + _encode_varint(self.vaddr),
                b"\x10\x00",
                b"\x20" + _encode_varint(self.flags),
                b"\x28" + _encode_varint(self.nr_pages),
            )
        )


def anonymous_ranges(mm: Path) -> list[tuple[int, int]]:
    """[start, end) of the private anonymous mappings whose pages restore as fresh ones."""
    entries = read_entries(mm, MM_MAGIC)
    if len(entries) != 1:
        raise ImageFormatError(f"{mm.name} holds {len(entries)} entries, not one")
    ranges = []
    for number, value in _fields(entries[0]):
        if number != 14 or not isinstance(value, bytes):  # repeated vma_entry vmas = 14
            continue
        vma = dict(_fields(value))
        status = int(vma.get(7, 0))
        if status & VMA_ANON_PRIVATE and not status & VMA_SPECIAL:
            ranges.append((int(vma[1]), int(vma[2])))
    return sorted(ranges)


# -- the rewrite ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compaction:
    pages_before: int
    pages_left_out: int
    page_size: int

    @property
    def bytes_saved(self) -> int:
        return self.pages_left_out * self.page_size


def leave_out_zero_pages(
    image: Path, page_size: int | None = None, stop: threading.Event | None = None
) -> Compaction:
    """Rewrite every process's page map and pages in `image` without the blocks of zero bytes of its
    private anonymous mappings (where they are at least MIN_SHARE of its pages). Raises
    ImageFormatError (or OSError) with the image unchanged, or consistent: each page map names
    exactly the pages its pages file holds. Once `stop` is set it raises Stopped, within one read
    of CHUNK_BLOCKS blocks or one copy of COPY_BYTES, the image as consistent."""
    page = page_size or os.sysconf("SC_PAGE_SIZE")
    before = left_out = 0
    used = {int(m.group(1)) for p in image.iterdir() if (m := PAGES_FILE.match(p.name))}
    for pagemap in sorted(image.iterdir()):
        match = PAGEMAP_FILE.match(pagemap.name)
        if not match:
            continue
        fresh = max(used, default=0) + 1
        used.add(fresh)
        raise_if_stopped(stop)
        total, dropped = _rewrite(image, pagemap, image / f"mm-{match.group(1)}.img", fresh, page, stop)
        before += total
        left_out += dropped
    return Compaction(before, left_out, page)


def _rewrite(
    image: Path, pagemap: Path, mm: Path, fresh_id: int, page: int, stop: threading.Event | None
) -> tuple[int, int]:
    entries = read_entries(pagemap, PAGEMAP_MAGIC)
    if not entries:
        raise ImageFormatError(f"{pagemap.name} has no head")
    pages_id = dict(_fields(entries[0])).get(1)
    if not isinstance(pages_id, int):
        raise ImageFormatError(f"{pagemap.name}'s head names no pages file")
    old_pages = image / f"pages-{pages_id}.img"
    anonymous = anonymous_ranges(mm)
    listed = [PagemapEntry.decode(raw) for raw in entries[1:]]
    total = sum(e.nr_pages for e in listed if e.flags & PE_PRESENT)
    new_pages = image / f"pages-{fresh_id}.img"
    with open(old_pages, "rb", buffering=0) as src:
        size = os.fstat(src.fileno()).st_size
        if size != total * page:
            raise ImageFormatError(f"{old_pages.name} holds {size} bytes, its page map names {total * page}")
        pieces, dropped = _find_zero_blocks(src.fileno(), listed, page, anonymous, stop)
        if dropped < total * MIN_SHARE:
            return total, 0  # too little to leave out to pay for the copy
        try:
            with open(new_pages, "xb", buffering=0) as dst:
                os.fchmod(dst.fileno(), 0o600)
                _copy_pieces(src.fileno(), dst.fileno(), pieces, page, stop)
        except BaseException:
            with contextlib.suppress(OSError):
                new_pages.unlink()
            raise
    staged = pagemap.with_name(f".{pagemap.name}.new")
    try:
        head = b"\x08" + _encode_varint(fresh_id)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, image_file(PAGEMAP_MAGIC, [head, *(piece.entry.encode() for piece in pieces)]))
        finally:
            os.close(fd)
        os.replace(staged, pagemap)  # from here the image uses the new pages file
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        new_pages.unlink()
        raise
    fault_point("agent.zero-pages-after-rename")
    old_pages.unlink()
    return total, dropped


@dataclass(frozen=True)
class _Piece:
    """Pages kept of one entry: where they are in the old pages file, and the entry that lists them."""

    source: int  # byte offset in the old pages file
    entry: PagemapEntry


# Two passes, each on THREADS threads over contiguous shares: the first reads the pages and finds the
# zero blocks (pread and memcmp let go of the GIL), the second copies the kept pieces in the kernel
# (copy_file_range) to offsets the first made known. Blocks, not single pages: a Python loop over
# every page costs more than the pages it saves (a lone zero page among data is rare; the big zero
# runs, a CUDA checkpoint's, are blocks).


def _find_zero_blocks(
    src: int,
    listed: list[PagemapEntry],
    page: int,
    anonymous: list[tuple[int, int]],
    stop: threading.Event | None = None,
) -> tuple[list[_Piece], int]:
    """The pieces of `listed` to keep, in order, and how many pages are left out."""
    offsets, at = [], 0
    for entry in listed:
        offsets.append(at)
        at += entry.nr_pages * page if entry.flags & PE_PRESENT else 0
    with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="zeropages") as pool:
        scanned = list(
            pool.map(
                lambda share: _scan(src, [(offsets[i], listed[i]) for i in share], page, anonymous, stop),
                _shares(listed, THREADS),
            )
        )
    return [piece for share in scanned for piece in share[0]], sum(share[1] for share in scanned)


def _copy_pieces(src: int, dst: int, pieces: list[_Piece], page: int, stop: threading.Event | None) -> None:
    """Write the kept pieces' pages one after the other into `dst`."""
    copies, written = [], 0
    for piece in pieces:
        if piece.entry.flags & PE_PRESENT:
            copies.append((piece.source, written, piece.entry.nr_pages * page))
            written += piece.entry.nr_pages * page
    with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="zeropages") as pool:
        list(pool.map(lambda share: _copy(src, dst, share, stop), _split(_coalesce(copies), THREADS)))


def _shares(listed: list[PagemapEntry], count: int) -> list[range]:
    """`count` contiguous ranges of entry indices with about as many pages each."""
    total = sum(e.nr_pages for e in listed) or 1
    shares: list[range] = []
    start = pages = 0
    for i, entry in enumerate(listed):
        pages += entry.nr_pages
        if pages * count >= total * (len(shares) + 1) and len(shares) < count - 1:
            shares.append(range(start, i + 1))
            start = i + 1
    shares.append(range(start, len(listed)))
    return shares


def _scan(
    src: int,
    share: list[tuple[int, PagemapEntry]],
    page: int,
    anonymous: list[tuple[int, int]],
    stop: threading.Event | None = None,
) -> tuple[list[_Piece], int]:
    """The pieces of `share`'s entries to keep, and how many pages are left out."""
    block = BLOCK_PAGES * page
    buffer = bytearray(CHUNK_BLOCKS * block)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    zero = ctypes.create_string_buffer(block)
    pieces: list[_Piece] = []
    dropped = 0
    for source, entry in share:
        plain = entry.flags & ~PE_LAZY == PE_PRESENT  # in this image, not a parent's
        if not plain:
            pieces.append(_Piece(source, entry))  # kept whole; PE_PRESENT or not, as it was
            continue
        run_start = run_pages = 0  # the run of kept pages, in pages from the entry's start
        for chunk_first in range(0, entry.nr_pages, CHUNK_BLOCKS * BLOCK_PAGES):
            raise_if_stopped(stop)
            chunk_pages = min(CHUNK_BLOCKS * BLOCK_PAGES, entry.nr_pages - chunk_first)
            _read_at(src, memoryview(buffer)[: chunk_pages * page], source + chunk_first * page)
            for first in range(chunk_first, chunk_first + chunk_pages, BLOCK_PAGES):
                count = min(BLOCK_PAGES, chunk_first + chunk_pages - first)
                vaddr = entry.vaddr + first * page
                at = base + (first - chunk_first) * page
                if _memcmp(at, zero, count * page) == 0 and _anonymous(
                    anonymous, vaddr, vaddr + count * page
                ):
                    dropped += count
                    if run_pages:
                        pieces.append(_piece(source, entry, run_start, run_pages, page))
                    run_start, run_pages = first + count, 0
                else:
                    run_pages += count
        if run_pages:
            pieces.append(_piece(source, entry, run_start, run_pages, page))
    return pieces, dropped


def _piece(source: int, entry: PagemapEntry, first: int, count: int, page: int) -> _Piece:
    return _Piece(source + first * page, PagemapEntry(entry.vaddr + first * page, count, entry.flags))


def _read_at(fd: int, into: memoryview, offset: int) -> None:
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got <= 0:
            raise ImageFormatError("a pages file ends before its page map does")
        done += got


def _coalesce(copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(source, destination, length) copies, adjacent ones joined."""
    joined: list[tuple[int, int, int]] = []
    for source, destination, length in copies:
        if (
            joined
            and joined[-1][0] + joined[-1][2] == source
            and joined[-1][1] + joined[-1][2] == destination
        ):
            joined[-1] = (joined[-1][0], joined[-1][1], joined[-1][2] + length)
        else:
            joined.append((source, destination, length))
    return joined


def _split(copies: list[tuple[int, int, int]], count: int) -> list[list[tuple[int, int, int]]]:
    """`copies` cut into `count` lists of about as many bytes each (a long copy cut in pieces)."""
    total = sum(c[2] for c in copies)
    share = max(1, -(-total // count))
    pieces: list[tuple[int, int, int]] = []
    for source, destination, length in copies:
        while length:
            n = min(length, share)
            pieces.append((source, destination, n))
            source, destination, length = source + n, destination + n, length - n
    lists: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]
    done = 0
    for piece in pieces:
        lists[min(count - 1, done // share)].append(piece)
        done += piece[2]
    return lists


def _copy(src: int, dst: int, copies: list[tuple[int, int, int]], stop: threading.Event | None) -> None:
    for source, destination, length in copies:
        while length:
            raise_if_stopped(stop)
            n = os.copy_file_range(src, dst, min(length, COPY_BYTES), source, destination)
            if n <= 0:
                raise OSError(f"copy_file_range copied {n} bytes")
            source, destination, length = source + n, destination + n, length - n


def _anonymous(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside one of `ranges` (sorted, disjoint)."""
    index = bisect.bisect_right(ranges, (start, 2**64)) - 1
    return index >= 0 and ranges[index][0] <= start and end <= ranges[index][1]
