"""What the GPU benches share (bench/wake.py, bench/snapshot_restore.py): the operator's source on
the path, the engine's prompt, small process, GPU and file-system helpers, and a step's budget."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
OPERATOR: Final = ROOT / "operator"
if str(OPERATOR) not in sys.path:
    sys.path.insert(0, str(OPERATOR))

GIB: Final = 2**30
MIB: Final = 2**20
PROMPT: Final = "t17 t4242 hibernate wakes the model t7"
MAX_TOKENS: Final = 8
PR_SET_CHILD_SUBREAPER: Final = 36


# --- small helpers ---------------------------------------------------------------------------------


def http(method: str, url: str, body: object = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reap(pid: int, timeout: float = 10.0) -> None:
    """Collect `pid` if it is our (possibly adopted) child and has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done == pid:
            return
        time.sleep(0.01)


def become_subreaper() -> None:
    """Restored trees (criu restore -d) are reparented to us, so we can reap them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def nvidia_smi(*query: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def card_used_mib() -> int | None:
    rows = nvidia_smi("--query-gpu=memory.used", "-i", "0")
    return int(rows[0][0]) if rows and rows[0][0].isdigit() else None


def process_used_mib(pid: int) -> int | None:
    """The GPU memory nvidia-smi charges to `pid` (0 when it is not listed); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    for row in nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(row) >= 2 and row[0] == str(pid):
            return int(row[1]) if row[1].isdigit() else None
    return 0


def gpu_identity() -> dict[str, str]:
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total", "-i", "0")
    if not rows or len(rows[0]) < 3:
        return {}
    return {"name": rows[0][0], "driver": rows[0][1], "memory_mib": rows[0][2]}


def fs_type(path: Path) -> str:
    path = path.resolve()
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1].replace("\\040", " ")
                if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                    best
                ):
                    best, kind = mount, parts[2]
    return kind


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# --- a step that cannot run, the time left -----------------------------------------------------


class Skip(Exception):
    """A step that cannot run here (no criu, not root, no GPU, the budget)."""


class Budget:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def check(self, estimate: float) -> None:
        if estimate > self.left():
            raise Skip(f"budget: needs ~{estimate:.0f}s, {max(0.0, self.left()):.0f}s left")
