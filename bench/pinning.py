"""The floors under a CudaSuspend wake (issue 17): how fast host memory is pinned, unpinned and
copied to the GPU on this machine, each way the reference engine could do it.

A CudaSuspend wake is the driver's restore of the context plus the copy of the level-1 host copy
back to the GPU. Pinned host memory in a checkpointed context is registered again by the driver's
restore, serially; the reference engine therefore unpins its copy before the suspend and pins it
again while copying it back. This script measures the pieces, for SIZE GiB of host memory:

- `h2d pinned`: the copy alone, all of it already pinned (the floor of any wake);
- `register` / `unregister`: cudaHostRegister of the whole buffer in 256 MiB pieces on N threads,
  for each kind of page asked for (`--pages`): transparent huge pages (`thp`), 4 KiB pages (`4k`), or
  hugetlbfs pages of 2 MiB or 1 GiB (`hugetlb-2m`, `hugetlb-1g`: fewer pages to pin, if the kernel's
  pool can give them; the script grows the pool for the run and puts it back after);
- `pipelined`: pieces registered on N threads, each copied as soon as it is pinned (the engine's wake);
- `ring`: the buffer left pageable, N threads each copy through two pinned 64 MiB buffers of their own;
- `both ends`: one thread pins pieces from the front and copies each as it is pinned (`pipelined`, one
  thread), while N ring threads copy pieces from the back, until they meet (`--ring-threads` of the
  reference engine).

    python3 bench/pinning.py [--size-gib 16] [--threads 1 2 4 8 16] [--ring-threads 1 2 4] [--pages thp 4k hugetlb-2m hugetlb-1g]
                             [--results RESULTS.md --section S]

It needs torch and a GPU; the table goes to stdout, and with --results into that markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import mmap
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch  # type: ignore[import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import write_section

MIB = 2**20
GIB = 2**30
PIECE = 256 * MIB
RING = 64 * MIB


# mmap flags Python's module does not name (linux/mman.h): a hugetlbfs mapping, and its page size
# as log2 in the bits from MAP_HUGE_SHIFT.
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
HUGETLB_KIB = {"hugetlb-2m": 2048, "hugetlb-1g": 1048576}
PAGE_KINDS = ("thp", "4k", *HUGETLB_KIB)


class HostBuffer:
    """SIZE bytes of anonymous memory of one kind of page (PAGE_KINDS), filled so every page exists."""

    def __init__(self, nbytes: int, pages: str) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if pages in HUGETLB_KIB:
            flags |= MAP_HUGETLB | ((HUGETLB_KIB[pages] * 1024).bit_length() - 1) << MAP_HUGE_SHIFT
        self.map = mmap.mmap(-1, nbytes, flags)
        if pages == "thp" and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):
                self.map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        self.tensor.fill_(7)
        self.ptr = self.tensor.data_ptr()
        self.pieces = [(off, min(PIECE, nbytes - off)) for off in range(0, nbytes, PIECE)]
        self.registered: set[int] = set()  # offsets of the pieces pinned now

    def register(self, piece: tuple[int, int]) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(self.ptr + piece[0], piece[1], 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {rc}")
        self.registered.add(piece[0])

    def unregister(self, piece: tuple[int, int]) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.ptr + piece[0])
        self.registered.discard(piece[0])

    def unregister_all(self) -> None:
        on_threads(8, self.unregister, [p for p in self.pieces if p[0] in self.registered])

    def view(self, piece: tuple[int, int]) -> torch.Tensor:
        return self.tensor[piece[0] : piece[0] + piece[1]]


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def on_threads(threads: int, fn: Callable[[tuple[int, int]], None], pieces: list[tuple[int, int]]) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fn, pieces))


def copy_pinned(buf: HostBuffer, device: torch.Tensor, streams: list[torch.cuda.Stream]) -> None:
    for i, piece in enumerate(buf.pieces):
        with torch.cuda.stream(streams[i % len(streams)]):
            device[piece[0] : piece[0] + piece[1]].copy_(buf.view(piece), non_blocking=True)


def pipelined(buf: HostBuffer, device: torch.Tensor, streams: list[torch.cuda.Stream], threads: int) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ready: list[Future[None]] = [pool.submit(buf.register, piece) for piece in buf.pieces]
        for i, piece in enumerate(buf.pieces):
            ready[i].result()
            with torch.cuda.stream(streams[i % len(streams)]):
                device[piece[0] : piece[0] + piece[1]].copy_(buf.view(piece), non_blocking=True)


def ring_copy(
    buf: HostBuffer,
    device: torch.Tensor,
    take: Callable[[], tuple[int, int] | None],
    errors: list[BaseException],
) -> None:
    """One ring thread: copy each piece `take` gives through two pinned 64 MiB buffers, until None."""
    try:
        stream = torch.cuda.Stream()
        pair = [torch.empty(RING, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done = [torch.cuda.Event(), torch.cuda.Event()]
        slot = 0
        while (piece := take()) is not None:
            for off in range(piece[0], piece[0] + piece[1], RING):
                length = min(RING, piece[0] + piece[1] - off)
                done[slot].synchronize()
                pair[slot][:length].copy_(buf.tensor[off : off + length])
                with torch.cuda.stream(stream):
                    device[off : off + length].copy_(pair[slot][:length], non_blocking=True)
                    done[slot].record(stream)
                slot ^= 1
        stream.synchronize()
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def both_ends(
    buf: HostBuffer, device: torch.Tensor, streams: list[torch.cuda.Stream], ring_threads: int
) -> None:
    """`ring_threads` threads copy through rings from the back while this one pins from the front."""
    pending = deque(buf.pieces)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def take(front: bool) -> tuple[int, int] | None:
        with lock:
            return (pending.popleft() if front else pending.pop()) if pending else None

    workers = [
        threading.Thread(target=ring_copy, args=(buf, device, lambda: take(False), errors))
        for _ in range(ring_threads)
    ]
    for w in workers:
        w.start()
    turn = 0
    while (piece := take(True)) is not None:
        buf.register(piece)
        with torch.cuda.stream(streams[turn % len(streams)]):
            device[piece[0] : piece[0] + piece[1]].copy_(buf.view(piece), non_blocking=True)
        turn += 1
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def ring(buf: HostBuffer, device: torch.Tensor, threads: int) -> None:
    """`threads` ring threads, each given every `threads`-th 64 MiB piece."""
    nbytes = buf.tensor.numel()
    errors: list[BaseException] = []
    shares = [
        deque((off, min(RING, nbytes - off)) for off in range(n * RING, nbytes, threads * RING))
        for n in range(threads)
    ]
    workers = [
        threading.Thread(target=ring_copy, args=(buf, device, lambda q=q: q.popleft() if q else None, errors))
        for q in shares
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def registered(buf: HostBuffer, threads: int) -> Iterator[None]:
    on_threads(threads, buf.register, buf.pieces)
    try:
        yield
    finally:
        on_threads(threads, buf.unregister, buf.pieces)


def measure_buffer(
    buf: HostBuffer, device: torch.Tensor, thread_counts: list[int], ring_threads: list[int], pages: str
) -> list[tuple[str, str, float]]:
    streams = [torch.cuda.Stream() for _ in range(4)]
    rows: list[tuple[str, str, float]] = []
    with registered(buf, 8):
        timed(lambda: copy_pinned(buf, device, streams))  # warm
        rows.append(("h2d pinned, 4 streams", pages, timed(lambda: copy_pinned(buf, device, streams))))
    for n in thread_counts:
        rows.append(
            (f"register, {n} threads", pages, timed(lambda n=n: on_threads(n, buf.register, buf.pieces)))
        )
        rows.append(
            (f"unregister, {n} threads", pages, timed(lambda n=n: on_threads(n, buf.unregister, buf.pieces)))
        )
    for n in thread_counts:
        seconds = timed(lambda n=n: pipelined(buf, device, streams, n))
        rows.append((f"pipelined register+h2d, {n} threads", pages, seconds))
        buf.unregister_all()
    for n in thread_counts:
        rows.append(
            (f"ring 2x64 MiB per thread, {n} threads", pages, timed(lambda n=n: ring(buf, device, n)))
        )
    for n in ring_threads:
        seconds = timed(lambda n=n: both_ends(buf, device, streams, n))
        pinned = len(buf.registered) * PIECE / GIB
        rows.append(
            (f"both ends: pipelined 1 thread + {n} ring threads ({pinned:.1f} GiB pinned)", pages, seconds)
        )
        buf.unregister_all()
    return rows


@contextlib.contextmanager
def hugetlb_pool(pages: str, nbytes: int) -> Iterator[str]:
    """The kernel's pool of `pages` grown to hold `nbytes` for the block, then put back as it was.
    Yields "" when it holds enough, else why not (a fragmented machine may not find 1 GiB pages)."""
    if pages not in HUGETLB_KIB:
        yield ""
        return
    knob = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGETLB_KIB[pages]}kB/nr_hugepages")
    if not knob.exists():
        yield f"{knob} does not exist"
        return
    before = int(knob.read_text())
    needed = before + -(-nbytes // (HUGETLB_KIB[pages] * 1024))
    try:
        knob.write_text(str(needed))
        got = int(knob.read_text())
        yield "" if got >= needed else f"the kernel gave {got - before} of {needed - before} pages"
    except OSError as exc:
        yield f"growing {knob}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            knob.write_text(str(before))


def measure(
    size_gib: float, thread_counts: list[int], ring_threads: list[int], kinds: list[str]
) -> list[tuple[str, str, float]]:
    nbytes = int(size_gib * GIB) // PIECE * PIECE
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows: list[tuple[str, str, float]] = []
    for pages in kinds:
        with hugetlb_pool(pages, nbytes) as missing:
            if missing:
                print(f"{pages}: skipped, {missing}", file=sys.stderr)
                continue
            buf = HostBuffer(nbytes, pages)
            rows += measure_buffer(buf, device, thread_counts, ring_threads, pages)
            del buf
            gc.collect()  # unmapped before the pool shrinks back
    return rows


def table(rows: list[tuple[str, str, float]], size_gib: float) -> str:
    lines = [
        f"{size_gib:g} GiB of host memory to the GPU; 256 MiB pieces; each row one run after a warm-up copy.",
        "",
        "| what | pages | seconds | GB/s |",
        "|---|---|---|---|",
    ]
    for what, pages, seconds in rows:
        lines.append(f"| {what} | {pages} | {seconds:.3f} | {size_gib * GIB / seconds / 1e9:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=16.0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--ring-threads", type=int, nargs="*", default=[1, 2, 4], help="the both-ends rows")
    p.add_argument("--pages", nargs="+", choices=PAGE_KINDS, default=list(PAGE_KINDS))
    p.add_argument("--results", default="")
    p.add_argument("--section", default="gpu-pinning")
    args = p.parse_args(argv)
    rows = measure(args.size_gib, args.threads, args.ring_threads, args.pages)
    text = table(rows, args.size_gib)
    print(text)
    if args.results:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        title = f"## GPU pinning floors: {torch.cuda.get_device_name()} ({when}, bench/pinning.py)"
        write_section(Path(args.results), args.section, f"{title}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
