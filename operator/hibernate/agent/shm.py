"""`/dev/shm` leftovers of a checkpointed engine (design.md, "Limits worth knowing": cleaned).

A pod's `/dev/shm` is a tmpfs: every byte in it is host RAM, whether or not a process still uses it.
An engine leaves files there (NCCL's and PyTorch's shared-memory segments, those of worker processes
that ended); once CRIU has dumped the engine and its processes have ended, those files would hold host
RAM for as long as the pod sleeps at Checkpoint, the level that promises to hold none, and they
survive a cold restart of the engine container (the pod's /dev/shm outlives its containers).

What is removed, and only that: a regular file directly in the pod's `/dev/shm` that

- no live process of the pod holds, open or mapped (every container's processes are looked at, so
  a sidecar's segment stays), and
- the checkpoint image does not name (criu records the path of every file its processes had open
  or mapped, and the restore opens it again: such a file is the engine's, kept for the restore).

After a successful dump the image is the one just written; for a cold start (agent/coldstart.py) there
is no image any more, and nothing of the old engine runs. Directories, symlinks and special files
are left alone, as is a `/dev/shm` that is the node's own (a hostPath). Paths are resolved inside the
pod (agent/podfs.py): `/dev/shm` itself must be a real directory of the pod's, and each file is
unlinked by name from a descriptor of it, never through a path the pod could redirect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hibernate.agent import discovery
from hibernate.agent.podfs import PodRoot, UnsafePath

log = logging.getLogger(__name__)

SHM = PurePosixPath("/dev/shm")
FILES_IMAGE = "files.img"  # criu's table of the regular files its processes had open or mapped


@dataclass
class Cleaned:
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # held by a process, or named by the image

    def details(self) -> dict[str, Any]:
        """For last-operation: what went, and how much host memory it held."""
        return {"shm_removed": len(self.removed), "shm_bytes": self.bytes} if self.removed else {}


def held(pids: Iterable[int], proc_root: str = "/proc") -> set[tuple[int, int]]:
    """(device, inode) of every file the processes hold open or mapped.

    The kernel's links under /proc/<pid>/fd and /proc/<pid>/map_files are followed by stat, which
    names the open file itself: no path inside the pod is resolved."""
    found: set[tuple[int, int]] = set()
    for pid in pids:
        for kind in ("fd", "map_files"):
            try:
                entries = list(os.scandir(f"{proc_root}/{pid}/{kind}"))
            except OSError:  # ended, or not readable: it holds nothing we can see
                continue
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = os.stat(entry.path)
                    found.add((st.st_dev, st.st_ino))
    return found


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def named_by_image(image: Path, names: Iterable[str]) -> set[str] | None:
    """Those of `names` (files of /dev/shm) whose path the image records; None when it cannot tell.

    criu keeps each file's path as a length-prefixed protobuf string in files.img: the exact path with
    its length before it, so that `/dev/shm/a` does not match inside `/dev/shm/ab`."""
    try:
        data = (image / FILES_IMAGE).read_bytes()
    except OSError:
        return None
    out = set()
    for name in names:
        path = str(SHM / name).encode(errors="surrogateescape")
        if _varint(len(path)) + path in data:
            out.add(name)
    return out


def clean(
    init_pid: int,
    holders: Iterable[int],
    image: Path | None,
    proc_root: str = "/proc",
) -> Cleaned:
    """Removes the leftovers from the /dev/shm of the pod whose container init is `init_pid` (host pid).

    `holders`: the pod's live processes (every container's); `image`: the checkpoint that will be
    restored, whose files stay (None: no image, nothing to keep for a restore). Raises OSError (or
    podfs.UnsafePath) when the pod's /dev/shm cannot be reached safely; then nothing is removed."""
    result = Cleaned()
    with PodRoot.of_process(init_pid, proc_root) as root:
        fd = root.open(SHM, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        here = os.fstat(fd)
        with contextlib.suppress(OSError):
            node = os.stat(f"{proc_root}/1/root{SHM}")
            if (node.st_dev, node.st_ino) == (here.st_dev, here.st_ino):
                log.warning("pod of init %d: its /dev/shm is the node's own; left alone", init_pid)
                return result
        files: dict[str, os.stat_result] = {}
        for entry in os.scandir(fd):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    files[entry.name] = st
        if not files:
            return result
        busy = held(holders, proc_root)
        keep: set[str] = set()
        if image is not None:
            named = named_by_image(image, files)
            if named is None:
                log.warning(
                    "pod of init %d: %s has no readable %s; /dev/shm left alone", init_pid, image, FILES_IMAGE
                )
                return result
            keep = named
        for name, st in sorted(files.items()):
            if name in keep or (st.st_dev, st.st_ino) in busy:
                result.kept.append(name)
                continue
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            result.removed.append(name)
            result.bytes += st.st_blocks * 512
    finally:
        os.close(fd)
    if result.removed:
        log.info(
            "pod of init %d: removed %d leftover file(s) from /dev/shm (%d bytes of host memory): %s",
            init_pid,
            len(result.removed),
            result.bytes,
            ", ".join(result.removed[:10]),
        )
    return result


def clean_quietly(
    init_pid: int, holders: Iterable[int], image: Path | None, proc_root: str = "/proc"
) -> dict[str, Any]:
    """`clean`, for a step that must not fail because of it: details for last-operation, or the reason
    nothing was done."""
    try:
        return clean(init_pid, holders, image, proc_root).details()
    except (OSError, UnsafePath) as e:
        log.warning("pod of init %d: /dev/shm not cleaned: %s", init_pid, e)
        return {"shm_error": str(e)[:200]}


def after_dump(pod_uid: str, init_pid: int, image: Path, proc_root: str = "/proc") -> dict[str, Any]:
    """Once a dump has ended the engine: its leftovers go, the files its image names stay."""
    holders = [p.pid for p in discovery.pod_processes(pod_uid, proc_root)]
    return clean_quietly(init_pid, holders, image, proc_root)
