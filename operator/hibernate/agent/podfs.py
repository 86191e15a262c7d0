"""Paths inside a pod's root filesystem, resolved inside it, for the agent's reads and writes.

The agent is root on the node and reaches a pod's files through `/proc/<init>/root`. A plain
`open("/proc/<init>/root/.hibernate/checkpointed", "w")` follows a symlink the pod planted there
(`/.hibernate/checkpointed -> /etc/shadow`) out of the pod and onto the host. Every path here is
resolved with openat2(2) and RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS from a descriptor of the pod's
root: an absolute symlink or `..` stays inside the pod, and /proc magic links (`/proc/self/root`)
are refused. Where the kernel has no openat2 (before 5.6), the walk opens one component at a time
with O_NOFOLLOW and refuses any symlink at all.

Files are opened non-blocking and must be regular files: a FIFO planted at a log's path would
otherwise hang the agent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import PurePosixPath

# openat2(2); the same number on x86_64 and the generic table (aarch64).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class UnsafePath(OSError):
    """A path in a pod that cannot be used safely: a symlink where none may be, or not a regular file."""


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    mode = mode if flags & os.O_CREAT else 0  # openat2 refuses a mode without O_CREAT
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _walk(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """Fallback without openat2: one component at a time, no symlink anywhere."""
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    if any(p == ".." for p in parts):
        raise UnsafePath(errno.EXDEV, "'..' in a pod path", path)
    cur = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(e.errno, "a symlink or a non-directory on the way", path) from e
                raise
            os.close(cur)
            cur = nxt
        last = parts[-1] if parts else "."
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        os.close(cur)


def _take_back(dir_fd: int, name: str, keep: Callable[[int], bool]) -> bool:
    """Whether `name` is there as the kind `keep` accepts; anything else planted there (a symlink, a
    FIFO, a device, an empty directory) is removed, so the agent's own file or directory can take
    the name back instead of being written through it."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if keep(st.st_mode):
        return True
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return False


class PodRoot:
    """A descriptor of a pod's root (`/proc/<init>/root`), and the operations the agent needs there."""

    def __init__(self, root: str) -> None:
        self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.path = root

    @classmethod
    def of_process(cls, pid: int, proc_root: str = "/proc") -> PodRoot:
        # The magic link is the kernel's word for the pod's root; everything below it is the pod's.
        return cls(f"{proc_root}/{pid}/root")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PodRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, path: PurePosixPath | str, flags: int, mode: int = 0o600) -> int:
        """An fd of `path` resolved inside the pod's root; UnsafePath where that cannot be done safely."""
        try:
            return _openat2(self.fd, str(path), flags, mode)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                return _walk(self.fd, str(path), flags, mode)
            if e.errno == errno.EXDEV or e.errno == errno.ELOOP:
                raise UnsafePath(e.errno, f"{e.strerror} (resolving inside the pod's root)", str(path)) from e
            raise

    @contextmanager
    def parent(self, path: PurePosixPath) -> Iterator[int]:
        """The directory that holds `path`, as an fd, for *at() calls on its last component."""
        fd = self.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def makedirs(self, path: PurePosixPath, mode: int = 0o700) -> None:
        """mkdir -p inside the pod; every component must be a real directory."""
        parts = [p for p in path.parts if p != "/"]
        for i in range(1, len(parts) + 1):
            sub = PurePosixPath("/", *parts[:i])
            with self.parent(sub) as d, suppress(FileExistsError):
                os.mkdir(parts[i - 1], mode, dir_fd=d)
            try:
                fd = self.open(sub, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            except (NotADirectoryError, UnsafePath) as e:
                raise UnsafePath(
                    errno.ENOTDIR, "a symlink or a file where a directory belongs", str(sub)
                ) from e
            os.close(fd)

    def reclaim_dir(self, path: PurePosixPath, mode: int = 0o700) -> None:
        """Makes `path` a real directory of the agent's: a symlink or file planted there is removed."""
        self.makedirs(path.parent)
        with self.parent(path) as d:
            if not _take_back(d, path.name, keep=stat.S_ISDIR):
                os.mkdir(path.name, mode, dir_fd=d)

    def write_file(self, path: PurePosixPath, data: bytes, mode: int = 0o600) -> None:
        """Creates or replaces the regular file `path` (never writes through a symlink or into a FIFO)."""
        self.makedirs(path.parent)
        with self.parent(path) as d:
            _take_back(d, path.name, keep=stat.S_ISREG)
            fd = os.open(
                path.name,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                mode,
                dir_fd=d,
            )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath(errno.EINVAL, "not a regular file", str(path))
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)

    def read_file(self, path: PurePosixPath, limit: int = 1 << 20) -> bytes:
        """The first `limit` bytes of the regular file `path`."""
        fd = self.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath(errno.EINVAL, "not a regular file", str(path))
            chunks, left = [], limit
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def unlink(self, path: PurePosixPath) -> bool:
        """Removes the file (or symlink) `path` itself; False when it was not there."""
        try:
            with self.parent(path) as d:
                os.unlink(path.name, dir_fd=d)
        except FileNotFoundError:
            return False
        return True

    def exists(self, path: PurePosixPath) -> bool:
        try:
            with self.parent(path) as d:
                os.stat(path.name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True
