"""What the benchmarks share when they report: percentiles, the machine they ran on, and their own
section of bench/RESULTS.md (each owns one, between markers, and rewrites only that one, so a rerun
replaces its old numbers instead of piling up after them)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

PREAMBLE = "# Benchmark results\n\nEach section is written by the script it names (bench/README.md).\n\n"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`: the sorted value at index round(q/100 * (n-1)), a
    measured value, never one interpolated between two."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def machine() -> dict[str, str]:
    """uname, CPU model, cores, RAM and Python version of this machine."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip()
    memory = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    return {
        "uname": uname,
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
    }


def write_section(path: Path, marker: str, text: str) -> None:
    """Put `text` between `<!-- {marker} begin -->` and `<!-- {marker} end -->` in `path`, replacing
    what was there, or at the end when the section is new. Written atomically."""
    begin, end = f"<!-- {marker} begin -->", f"<!-- {marker} end -->"
    section = f"{begin}\n{text.strip(chr(10))}\n{end}\n"
    old = path.read_text() if path.exists() else PREAMBLE
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(new)
    os.replace(partial, path)
