"""What a Checkpoint image of the reference engine is made of (issue 17: 1.5 GiB against a goal of
1 GiB): the engine's memory, mapping by mapping, at the moment CRIU would dump it.

The engine goes to level 2 with the agent's `checkpoint` hint (staging freed, heap trimmed) and the
driver checkpoints its CUDA context, as the agent does before a dump; then its /proc/PID/smaps is
read. CRIU writes a private mapping's pages that are anonymous (copied-on-write file pages too) and a
shared anonymous mapping's pages; it skips clean file pages, read again from the file. So the
`Anonymous` bytes, plus shared memory, are what an image holds, and this script says whose they are.
It prints the same once more before the CUDA checkpoint: the difference is what the driver moved from
the GPU into the process.

    python3 bench/image_anatomy.py [--size-gib 2] [--device cuda:0] [--top 15] [--results R --section S]

It needs torch and a GPU with the driver's checkpoint API; it starts its own engine and stops it.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import re
import struct
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import GIB, MIB, gpu_identity, http, process_used_mib
from engine_proc import EngineProc, EngineSpec
from hibernate.agent import cuda
from reporting import write_section

HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
PAGE = 4096
PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1


@dataclass
class Mapping:
    name: str
    perms: str
    start: int
    end: int
    size: int = 0
    rss: int = 0
    anonymous: int = 0
    shared: int = 0  # pages of a shared mapping (CRIU dumps those of shared anonymous memory)
    huge: int = 0  # AnonHugePages
    zero: int = 0  # present anonymous pages that hold only zero bytes (count_zero_pages)

    @property
    def dumped(self) -> int:
        """What CRIU writes of it: anonymous pages, and a shared mapping's pages unless a file's."""
        shared_anon = self.shared if self.perms[3] == "s" and not self.name.startswith("/") else 0
        return self.anonymous + shared_anon


def read_smaps(pid: int) -> list[Mapping]:
    mappings: list[Mapping] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        header = HEADER.match(line)
        if header:
            start, end, perms, name = header.groups()
            mappings.append(Mapping(name.strip() or "[anon]", perms, int(start, 16), int(end, 16)))
            continue
        key, _, value = line.partition(":")
        if not mappings or not value.strip().endswith("kB"):
            continue
        kib = int(value.split()[0]) * 1024
        current = mappings[-1]
        if key == "Size":
            current.size = kib
        elif key == "Rss":
            current.rss = kib
        elif key == "Anonymous":
            current.anonymous = kib
        elif key in ("Shared_Clean", "Shared_Dirty"):
            current.shared += kib
        elif key == "AnonHugePages":
            current.huge = kib
    return mappings


def zero_page_pfn() -> int:
    """The frame of the kernel's shared zero page: what a read of untouched anonymous memory maps
    (CRIU skips pages mapped to it; they are not `Anonymous` in smaps either)."""
    probe = mmap.mmap(-1, PAGE)
    probe[0]  # a read fault maps the zero page
    address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE * 8)
        (entry,) = struct.unpack("<Q", pagemap.read(8))
    probe.close()
    return entry & PFN_MASK


def count_zero_pages(pid: int, mappings: list[Mapping]) -> None:
    """Fill each dumped mapping's `zero`: its present pages, other than the shared zero page, whose
    4 KiB are all zero bytes. CRIU writes those like any other; an image could leave them out."""
    zero_pfn = zero_page_pfn()
    empty = bytes(PAGE)
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/mem", "rb") as mem:
        for m in mappings:
            if not m.dumped:
                continue
            for base in range(m.start, m.end, 1024 * PAGE):
                pages = min(1024, (m.end - base) // PAGE)
                pagemap.seek(base // PAGE * 8)
                entries = struct.unpack(f"<{pages}Q", pagemap.read(pages * 8))
                try:
                    mem.seek(base)
                    data = mem.read(pages * PAGE)
                except OSError:
                    continue
                for i, entry in enumerate(entries):
                    if (
                        entry & PRESENT
                        and entry & PFN_MASK != zero_pfn
                        and data[i * PAGE : (i + 1) * PAGE] == empty
                    ):
                        m.zero += PAGE


def by_owner(mappings: list[Mapping]) -> dict[str, tuple[int, int]]:
    """Dumped bytes, and zero pages among them, per file (its basename) or kind of anonymous memory."""
    owners: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for m in mappings:
        name = Path(m.name).name if m.name.startswith("/") else m.name
        dumped, zero = owners[name]
        owners[name] = (dumped + m.dumped, zero + m.zero)
    return dict(owners)


def table(title: str, mappings: list[Mapping], top: int) -> str:
    total = sum(m.dumped for m in mappings)
    lines = [
        f"**{title}**: {total / GIB:.2f} GiB to dump in {len(mappings)} mappings "
        f"(of them {sum(m.huge for m in mappings) / GIB:.2f} GiB in transparent huge pages, "
        f"{sum(m.zero for m in mappings) / GIB:.2f} GiB in pages of zero bytes)",
        "",
        "| whose | MiB to dump | of it zero pages MiB |",
        "|---|---|---|",
    ]
    owners = sorted(by_owner(mappings).items(), key=lambda kv: -kv[1][0])
    for name, (nbytes, zero) in owners[:top]:
        lines.append(f"| {name} | {nbytes / MIB:.1f} | {zero / MIB:.1f} |")
    rest = [sum(n[i] for _, n in owners[top:]) for i in (0, 1)]
    lines.append(f"| the other {max(0, len(owners) - top)} | {rest[0] / MIB:.1f} | {rest[1] / MIB:.1f} |")
    biggest = sorted((m for m in mappings if m.name == "[anon]"), key=lambda m: -m.dumped)[:top]
    lines += [
        "",
        "The largest anonymous mappings:",
        "",
        "| size MiB | to dump MiB | zero pages MiB | huge MiB | perms |",
        "|---|---|---|---|---|",
    ]
    for m in biggest:
        lines.append(
            f"| {m.size / MIB:.1f} | {m.dumped / MIB:.1f} | {m.zero / MIB:.1f} | {m.huge / MIB:.1f} | {m.perms} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--engine-arg", action="append", default=[], help="one more argument for the engine")
    p.add_argument("--results", default="")
    p.add_argument("--section", default="image-anatomy")
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="image-anatomy-"))
    spec = EngineSpec(
        size_gib=args.size_gib,
        kv_gib=min(4.0, args.size_gib / 4),
        device=args.device,
        weights_dir=None,
        readers=8,
        pinned_prealloc=False,
        release_staging=False,
        log=logs / "engine.log",
        extra=tuple(args.engine_arg),
    )
    engine = EngineProc(spec)
    try:
        engine.start(timeout=300)
        engine.complete(1)
        awake_mib = process_used_mib(engine.pid)
        http("POST", f"{engine.url}/sleep?level=2&hibernate=checkpoint")  # trims before it answers
        asleep_mib = process_used_mib(engine.pid)
        before = read_smaps(engine.pid)
        cuda.suspend_all([engine.pid])
        try:
            after = read_smaps(engine.pid)
            count_zero_pages(engine.pid, after)
        finally:
            cuda.resume_all([engine.pid])
    finally:
        engine.stop()
    shrunk = [line.split(": ", 1)[-1] for line in engine.log_tail(200).splitlines() if "stack limit" in line]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n\n".join(
        [
            f"The reference engine with {args.size_gib:g} GiB of weights at level 2 with the `checkpoint` hint "
            f"(engine arguments: {' '.join(args.engine_arg) or 'none'}); nvidia-smi charged it {awake_mib} MiB "
            f"awake, {asleep_mib} MiB asleep. {' '.join(shrunk) or 'The engine did not shrink its context.'}",
            table("after the CUDA checkpoint, what CRIU dumps", after, args.top),
            table("before it, the engine's own", before, args.top),
        ]
    )
    print(text)
    if args.results:
        card = gpu_identity().get("name", "no GPU")
        title = f"## Checkpoint image anatomy: {card} ({when}, bench/image_anatomy.py)"
        write_section(Path(args.results), args.section, f"{title}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
