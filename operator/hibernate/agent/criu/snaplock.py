"""One lock per ModelDeployment's snapshot, which the agents of several nodes respect.

A snapshot on a shared volume (the agents' `--snapshot-dir`, docs/snapshots.md) is read and written
by the agent of every node. Its lock is a regular file beside it, `.<model>.lock`, held with
flock(2): one writer (a take, the sweep) or any number of readers (restores), and nobody ever
waits: a busy lock is an answer (SnapshotBusy), a Stop then has no new snapshot and a new pod
starts cold, both with the reason. A lock file rather than the directory itself, because NFS
clients emulate flock with byte-range locks, and an exclusive one needs a file opened for writing
(a directory cannot be).

The sweep removes a lock file with its snapshot while it holds it; whoever opened the old file
before then finds, once locked, that the path names another file (or none) and opens it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from hibernate.agent.criu.bundle import CriuError
from hibernate.agent.criu.images import FILE_MODE

_ATTEMPTS = 8


class SnapshotBusy(CriuError):
    """Another agent (maybe on another node) holds the snapshot's lock in a way that excludes us."""


def lock_path(image: Path) -> Path:
    """`.<model>.lock` beside the snapshot `image`."""
    return image.with_name(f".{image.name}.lock")


def acquire(image: Path, exclusive: bool) -> int:
    """The fd of the snapshot's lock file, locked (exclusive: to write or remove the snapshot;
    shared: to read it); SnapshotBusy at once where a conflicting lock is held."""
    path = lock_path(image)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                what = "taken or removed" if not exclusive else "used"
                raise SnapshotBusy(
                    f"the snapshot {image} is being {what} by another agent right now (its lock "
                    f"{path.name} is held)"
                ) from None
            raise CriuError(f"cannot lock the snapshot {image} ({path}): {e.strerror}") from e
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed (with its snapshot) while we waited for it: take the new one
    raise SnapshotBusy(f"the lock of the snapshot {image} keeps being replaced")


@contextlib.contextmanager
def held(image: Path, exclusive: bool) -> Iterator[int]:
    """acquire() for the length of a with-block."""
    fd = acquire(image, exclusive)
    try:
        yield fd
    finally:
        os.close(fd)


def remove(image: Path) -> None:
    """Unlinks the lock file; call while holding it exclusively, once the snapshot is gone."""
    with contextlib.suppress(FileNotFoundError):
        lock_path(image).unlink()
