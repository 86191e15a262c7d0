"""Pages of zero bytes left out of a CRIU image (hibernate.agent.criu.zeropages, issue 17).

The format tests build small images by hand; the last test dumps and restores a real process tree
with CRIU and checks every page it wrote, in the parent and in a forked child, after the restore.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hibernate.agent import criu
from hibernate.agent.criu import zeropages
from hibernate.agent.criu.zeropages import PE_LAZY, PE_PRESENT, PagemapEntry
from hibernate.localnode.simpod import SimPod

PAGE = 4096
ANON = 0x7F0000000000
FILE = 0x7F1000000000
PARENT_ONLY = 0x7F2000000000
PE_PARENT = 1
VMA_ANON_PRIVATE = 1 << 9
VMA_FILE_PRIVATE = 1 << 6


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def write_image(directory: Path, pages: list[bytes], entries: list[PagemapEntry]) -> None:
    """An image of one process: mm-1.img with an anonymous and a file-backed private mapping,
    pagemap-1.img naming pages-1.img, and those pages."""
    vmas = [
        (ANON, ANON + 64 * PAGE, VMA_ANON_PRIVATE),
        (FILE, FILE + 32 * PAGE, VMA_FILE_PRIVATE),
    ]
    mm = field(1, 0x400000) + b"".join(
        field(14, field(1, s) + field(2, e) + field(7, st)) for s, e, st in vmas
    )
    (directory / "mm-1.img").write_bytes(zeropages.image_file(zeropages.MM_MAGIC, [mm]))
    head = field(1, 1)
    (directory / "pagemap-1.img").write_bytes(
        zeropages.image_file(zeropages.PAGEMAP_MAGIC, [head, *(e.encode() for e in entries)])
    )
    (directory / "pages-1.img").write_bytes(b"".join(pages))


def page_map(directory: Path) -> tuple[int, list[PagemapEntry]]:
    pagemap = next(directory.glob("pagemap-*.img"))
    head, *entries = zeropages.read_entries(pagemap, zeropages.PAGEMAP_MAGIC)
    pages_id = dict(zeropages._fields(head))[1]
    assert isinstance(pages_id, int)
    return pages_id, [PagemapEntry.decode(e) for e in entries]


def data(n: int) -> bytes:
    return bytes([n + 1]) * PAGE


ZERO = bytes(PAGE)


def test_a_page_map_entry_reads_back_as_written() -> None:
    entry = PagemapEntry(vaddr=0x7FFF_F000_0000, nr_pages=300_000, flags=PE_PRESENT)
    assert PagemapEntry.decode(entry.encode()) == entry
    # As criu 3 wrote them: no flags and no nr_pages, the count in compat_nr_pages.
    assert PagemapEntry.decode(field(1, 0x1000) + field(2, 7)) == PagemapEntry(0x1000, 7, PE_PRESENT)
    assert PagemapEntry.decode(field(1, 0x1000) + field(2, 7) + field(3, 1)).flags == PE_PARENT


def test_blocks_of_zero_pages_of_anonymous_memory_are_left_out_and_the_rest_kept_in_order(
    tmp_path: Path,
) -> None:
    block = zeropages.BLOCK_PAGES
    data_block = [data(i) for i in range(block)]
    mixed = [ZERO] * (block - 1) + [data(99)]  # zero pages beside data: kept, a whole block or nothing
    tail = [ZERO] * 4  # the entry's last, shorter block
    anon = data_block + [ZERO] * block + mixed + tail
    file_backed = [ZERO] * block + data_block  # a file's copied-on-write pages: all kept
    write_image(
        tmp_path,
        anon + file_backed,
        [
            PagemapEntry(ANON, len(anon), PE_PRESENT | PE_LAZY),  # as criu marks anonymous pages
            PagemapEntry(FILE, len(file_backed), PE_PRESENT),
            PagemapEntry(PARENT_ONLY, 2, PE_PARENT),  # no data in this image: kept as it is
        ],
    )

    done = zeropages.leave_out_zero_pages(tmp_path, page_size=PAGE)

    assert (done.pages_before, done.pages_left_out) == (len(anon) + len(file_backed), block + 4)
    assert done.bytes_saved == (block + 4) * PAGE
    pages_id, entries = page_map(tmp_path)
    assert entries == [
        PagemapEntry(ANON, block, PE_PRESENT | PE_LAZY),
        PagemapEntry(ANON + 2 * block * PAGE, block, PE_PRESENT | PE_LAZY),
        PagemapEntry(FILE, len(file_backed), PE_PRESENT),
        PagemapEntry(PARENT_ONLY, 2, PE_PARENT),
    ]
    kept = data_block + mixed + file_backed
    assert (tmp_path / f"pages-{pages_id}.img").read_bytes() == b"".join(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mm-1.img", "pagemap-1.img", f"pages-{pages_id}.img"]
    )


def test_many_entries_split_over_the_threads_come_out_in_order_with_every_kept_byte(tmp_path: Path) -> None:
    block = zeropages.BLOCK_PAGES
    entries, pages, expected_entries, expected = [], [], [], []
    for n in range(40):  # entries of two blocks: data/data, zero/data, data/zero, zero/zero
        vaddr = ANON + n * 2 * block * PAGE
        halves = [[data(n)] * block if (n >> k) % 2 == 0 else [ZERO] * block for k in (0, 1)]
        entries.append(PagemapEntry(vaddr, 2 * block, PE_PRESENT | PE_LAZY))
        pages += halves[0] + halves[1]
        kept = [k for k in (0, 1) if halves[k][0] != ZERO]
        if kept == [0, 1]:
            expected_entries.append(PagemapEntry(vaddr, 2 * block, PE_PRESENT | PE_LAZY))
        elif kept:
            expected_entries.append(PagemapEntry(vaddr + kept[0] * block * PAGE, block, PE_PRESENT | PE_LAZY))
        expected += [p for k in kept for p in halves[k]]
    vmas = field(14, field(1, ANON) + field(2, ANON + 80 * block * PAGE) + field(7, VMA_ANON_PRIVATE))
    (tmp_path / "mm-1.img").write_bytes(zeropages.image_file(zeropages.MM_MAGIC, [vmas]))
    (tmp_path / "pagemap-1.img").write_bytes(
        zeropages.image_file(zeropages.PAGEMAP_MAGIC, [field(1, 1), *(e.encode() for e in entries)])
    )
    (tmp_path / "pages-1.img").write_bytes(b"".join(pages))

    done = zeropages.leave_out_zero_pages(tmp_path, page_size=PAGE)

    pages_id, written = page_map(tmp_path)
    assert written == expected_entries
    assert (tmp_path / f"pages-{pages_id}.img").read_bytes() == b"".join(expected)
    assert done.pages_left_out == len(pages) - len(expected)


def test_an_image_with_too_few_zero_blocks_is_left_as_criu_wrote_it(tmp_path: Path) -> None:
    block = zeropages.BLOCK_PAGES
    pages = [ZERO] * block + [data(i) for i in range(8 * block - 1)]  # one zero block in eight, less 1
    write_image(tmp_path, pages, [PagemapEntry(ANON, len(pages), PE_PRESENT | PE_LAZY)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    done = zeropages.leave_out_zero_pages(tmp_path, page_size=PAGE)

    assert (done.pages_before, done.pages_left_out) == (len(pages), 0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_pages_file_shorter_than_its_page_map_is_refused_and_the_image_left_as_it_was(
    tmp_path: Path,
) -> None:
    write_image(tmp_path, [data(0), ZERO], [PagemapEntry(ANON, 3, PE_PRESENT)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(
        zeropages.ImageFormatError, match=r"pages-1\.img holds 8192 bytes, its page map names 12288"
    ):
        zeropages.leave_out_zero_pages(tmp_path, page_size=PAGE)

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_file_that_is_no_criu_image_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path, [ZERO], [PagemapEntry(ANON, 1, PE_PRESENT)])
    (tmp_path / "mm-1.img").write_bytes(struct.pack("<II", 1, 2))
    with pytest.raises(zeropages.ImageFormatError, match="magic"):
        zeropages.leave_out_zero_pages(tmp_path, page_size=PAGE)
    assert (tmp_path / "pages-1.img").exists() and len(list(tmp_path.glob("pages-*.img"))) == 1


# The process tree under test: 4096 pages of private anonymous memory (10 random, 3990 written with
# zero bytes, 96 never touched: more than an eighth of the image, zeropages.MIN_SHARE) and a private mapping of a file with one page overwritten with zero
# bytes; then a forked child overwrites page 5 with zeros and page 20 with random bytes, so its
# copy of the mapping differs from its parent's both ways. /check has each process compare every
# page with what it wrote.
TREE = r"""
import http.server, json, mmap, os, sys
PAGE = mmap.PAGESIZE
anon = mmap.mmap(-1, 4096 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
want = {i: os.urandom(PAGE) for i in range(10)}
for i, page in want.items():
    anon[i * PAGE:(i + 1) * PAGE] = page
anon[10 * PAGE:4000 * PAGE] = bytes(3990 * PAGE)
fd = os.open("/.hibernate/data.bin", os.O_RDONLY)
backed = mmap.mmap(fd, 4 * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
backed[PAGE:2 * PAGE] = bytes(PAGE)
file_want = [b"x" * PAGE, bytes(PAGE), b"x" * PAGE, b"x" * PAGE]

def check():
    bad = [i for i in range(4096) if anon[i * PAGE:(i + 1) * PAGE] != want.get(i, bytes(PAGE))]
    bad += [f"file {i}" for i in range(4) if backed[i * PAGE:(i + 1) * PAGE] != file_want[i]]
    return {"pid": os.getpid(), "bad": bad}

ask_r, ask_w = os.pipe()
say_r, say_w = os.pipe()
if os.fork() == 0:
    want[5] = bytes(PAGE)
    want[20] = os.urandom(PAGE)
    anon[5 * PAGE:6 * PAGE] = want[5]
    anon[20 * PAGE:21 * PAGE] = want[20]
    while os.read(ask_r, 1):
        os.write(say_w, json.dumps(check()).encode() + b"\n")
    os._exit(0)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        os.write(ask_w, b"?")
        child = json.loads(os.read(say_r, 65536))
        body = json.dumps({"parent": check(), "child": child}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""


@contextlib.contextmanager
def tree_in_a_pod(tmp_path: Path, name: str) -> Iterator[tuple[SimPod, Path, dict[str, Any]]]:
    """TREE running in a simulated pod, where its image would go, and what it reads before a dump;
    skips without root or a CRIU bundle with hibernate-nsjoin.so."""
    try:
        bundle = criu.locate()
        criu.version(bundle)
    except criu.CriuError as e:
        pytest.skip(f"no usable CRIU bundle: {e}")
    if os.geteuid() != 0 or bundle.nsjoin is None:
        pytest.skip("needs root and a CRIU bundle with hibernate-nsjoin.so (hack/build-criu.sh)")
    files = {"tree.py": TREE, "data.bin": "x" * 4 * PAGE}
    image = criu.image_dir(tmp_path / "checkpoints", "default", name, "engine")
    with SimPod.start([sys.executable, "/.hibernate/tree.py"], files=files, ready_path="/check") as pod:
        before = pod.get_json("/check")
        assert before == {"parent": {"pid": pod.engine_ns_pid(), "bad": []}, "child": before["child"]}
        assert before["child"]["bad"] == []
        yield pod, image, before


@pytest.mark.criu
def test_a_restored_tree_reads_back_every_page_it_wrote_with_the_zero_pages_left_out(tmp_path: Path) -> None:
    with tree_in_a_pod(tmp_path, "zero-0") as (pod, image, before):
        result = criu.dump(
            image, pod.engine_ns_pid(), criu.Pod(pod.init_pid), checkpoint_root=image.parents[2]
        )

        # Whole blocks of the 3990 pages each process wrote with zeros (in the child, page 5 is zero
        # and page 20 is not): at least 247 blocks of 16 in the parent and 246 in the child.
        assert result.metadata.zero_pages_left_out >= (247 + 246) * zeropages.BLOCK_PAGES
        assert criu.check_image(image) == [] and criu.verify_image(image).files == result.metadata.files
        criu.restore(image, criu.Pod(pod.init_pid))
        after = pod.get_json("/check")
        assert after == before
