"""Checkpoint images on the node's disk: layout, metadata, verification, and what a dead agent left.

Images live at `<checkpoint dir>/<namespace>/<pod>/<container>/`, with `metadata.json` beside the
CRIU files. A dump writes into a hidden sibling and renames it into place only once the image is
verified, so the final path never holds a partial image.

Images hold process memory (prompts, tokens, environment variables): every directory the agent
makes on the way is 0700 and every file 0600, owned by root, the checkpoint root included. A
restore refuses an image whose owner or mode is not what the agent writes (`check_private`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hibernate.agent.criu.bundle import CriuError

METADATA = "metadata.json"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
# criu's last info line of a dump or restore that worked (logged at -v3 and above).
DUMP_OK = "Dumping finished successfully"
RESTORE_OK = "Restore finished successfully"
DIR_MODE = 0o700
FILE_MODE = 0o600
_SYS_OPEN_TREE = 428  # the same on x86_64 and the generic table (aarch64)
_AT_FDCWD = -100
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


# What a refused restore tells a person to do: a cold start of the engine in its pod (agent/coldstart.py,
# the annotation api.constants.ANN_DISCARD_CHECKPOINT); spelled out, so that the docs can quote it.
COLD_START_ADVICE = (
    "annotate the pod hibernate.dev/discard-checkpoint=true to discard the image and start the engine cold"
)


class ImageRefused(CriuError):
    """A restore refused for good: the image was taken on another GPU model or driver, or is not one
    this agent wrote. Trying again cannot help; a cold start can (COLD_START_ADVICE)."""


# -- GPU identity and metadata --------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """What a checkpoint image is bound to: the GPU model and the NVIDIA driver version."""

    model: str | None
    driver: str | None


def detect_gpu(proc: Path = Path("/proc")) -> GpuInfo:
    """The node's NVIDIA GPU model(s) and driver version from the driver's /proc files; None without."""
    driver = None
    with contextlib.suppress(OSError):
        text = (proc / "driver" / "nvidia" / "version").read_text()
        if m := re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text):
            driver = m[1]
    models: set[str] = set()
    with contextlib.suppress(OSError):
        for info in (proc / "driver" / "nvidia" / "gpus").glob("*/information"):
            if m := re.search(r"^Model:\s*(.+?)\s*$", info.read_text(), re.MULTILINE):
                models.add(m[1])
    return GpuInfo(" + ".join(sorted(models)) or None, driver)


@dataclass(frozen=True)
class ImageMetadata:
    """metadata.json, written beside every image."""

    gpu_model: str | None
    driver_version: str | None
    criu_version: str
    kernel_release: str
    engine_pid: int  # the root task's pid as criu saw it: inside the pod's pid namespace
    created: str  # RFC 3339, UTC
    image_bytes: int
    format: int = 1
    # Every file of the image and its size, written once the dump is verified: a restore checks
    # them first, because criu's restorer does not stop at the early end of a cut pages image (it
    # reads nothing, again and again, until the agent's criu timeout; seen on an H200).
    files: dict[str, int] = field(default_factory=dict)
    # Every task of the tree, threads included, by its pid in the pod's pid namespace: a snapshot
    # restored into another pod needs each of them free there (criu gives every task its old pid).
    pids: list[int] = field(default_factory=list)
    # What the engine ran (the operator's hash of its image, args and model), for a snapshot: it is
    # restored only into a pod of the same spec. None for an in-place image.
    spec_hash: str | None = None
    # The GPUs of the pod when it was dumped ({"uuid", "model"}, by PCI bus; agent/gpumap.py): a
    # snapshot restored into a pod given other GPUs has its CUDA state mapped onto them.
    gpus: list[dict[str, Any]] = field(default_factory=list)
    # Pages of zero bytes left out of the image after the dump (zeropages.py); they restore as zero.
    zero_pages_left_out: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, image: Path) -> None:
        write_private(image / METADATA, self.to_json().encode())

    @classmethod
    def load(cls, image: Path) -> ImageMetadata:
        try:
            raw = json.loads((image / METADATA).read_text())
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (OSError, ValueError, TypeError) as e:
            raise CriuError(f"checkpoint image {image} is incomplete: unreadable {METADATA}: {e}") from e


# -- layout and permissions -------------------------------------------------------------------------


def image_dir(checkpoint_dir: Path | str, namespace: str, pod: str, container: str) -> Path:
    """`<checkpoint dir>/<namespace>/<pod>/<container>/`; refuses names that would escape it."""
    for part in (namespace, pod, container):
        if not part or part in (".", "..") or "/" in part or part.startswith("."):
            raise ValueError(f"invalid path component for a checkpoint image: {part!r}")
    return Path(checkpoint_dir) / namespace / pod / container


def make_private_dirs(path: Path, root: Path) -> None:
    """mkdir -p `path` below `root` (which is made too), each directory root-only (0700)."""
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)  # above the root: the node's business
    for d in [root, *reversed([p for p in path.parents if root in p.parents]), path]:
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise CriuError(f"{d} is not a directory (a symlink?): refusing to keep checkpoint images there")
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.chmod(d, DIR_MODE)


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)


def seal(image: Path) -> None:
    """Makes a freshly dumped image root-only: the directory 0700, every file in it 0600."""
    os.chmod(image, DIR_MODE)
    for entry in os.scandir(image):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, FILE_MODE)


def check_private(image: Path, root: Path | None = None) -> list[str]:
    """What makes `image` not one the agent wrote: an owner other than root, a mode wider than
    0700/0600, a symlink or a special file, in the image or in its directories up to `root`."""
    uid = os.geteuid()
    problems = []
    dirs = [image, *([p for p in image.parents if p == root or root in p.parents] if root else [])]
    for d in dirs:
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{d} is not a directory")
        elif st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
            problems.append(f"{d} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}")
    for entry in os.scandir(image):
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{entry.name} is not a regular file")
        elif st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
            problems.append(
                f"{entry.name} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}"
            )
    return problems


# -- verification ---------------------------------------------------------------------------------


def image_bytes(image: Path) -> int:
    return sum(p.stat().st_size for p in image.glob("*.img"))


def file_sizes(image: Path) -> dict[str, int]:
    """The size of every file criu wrote in `image` (not the metadata, not a later restore's log)."""
    return {
        e.name: e.stat(follow_symlinks=False).st_size
        for e in os.scandir(image)
        if e.is_file(follow_symlinks=False) and e.name not in (METADATA, RESTORE_LOG)
    }


def size_problems(image: Path, meta: ImageMetadata) -> list[str]:
    """Files of the image that are missing or whose size changed since the dump."""
    now = file_sizes(image)
    return [
        f"{name} has {now[name]} bytes, {size} when it was written" if name in now else f"{name} is missing"
        for name, size in sorted(meta.files.items())
        if now.get(name) != size
    ]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    keep = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in keep if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    # criu's first real error says more than its last lines; the RLIMIT one is always there.
    picked = [*errors[:5], "...", *keep[-lines:]] if errors else keep[-lines:]
    return "\n".join(picked)


def logged_at_end(log: Path, marker: str) -> bool:
    """Whether `marker` is among the log's last lines (a restore logs a few more after it)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2048))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return marker in tail


def check_image(image: Path) -> list[str]:
    """What is wrong with a CRIU image directory, as a list of problems (empty when complete)."""
    problems = []
    if not image.is_dir():
        return [f"{image} does not exist"]
    if not logged_at_end(image / DUMP_LOG, DUMP_OK):
        problems.append(f"{DUMP_LOG} does not end with {DUMP_OK!r}")
    for pattern in ("inventory.img", "pstree.img", "core-*.img", "pagemap-*.img", "mm-*.img"):
        found = list(image.glob(pattern))
        if not found:
            problems.append(f"no {pattern}")
        problems += [f"{p.name} is empty" for p in found if p.stat().st_size == 0]
    return problems


def verify_image(image: Path, root: Path | None = None) -> ImageMetadata:
    """The image's metadata, or CriuError naming what makes it unusable or untrusted."""
    problems = check_image(image)
    if problems:
        raise CriuError(f"checkpoint image {image} is incomplete: {'; '.join(problems)}")
    if foreign := check_private(image, root):
        raise ImageRefused(
            f"checkpoint image {image} is not one this agent wrote (root-only, 0700 directories and 0600 "
            f"files): {'; '.join(foreign[:5])}; refusing to restore it ({COLD_START_ADVICE})"
        )
    meta = ImageMetadata.load(image)
    if damaged := size_problems(image, meta):
        raise ImageRefused(
            f"checkpoint image {image} is damaged: {'; '.join(damaged[:5])}; refusing to restore it "
            f"({COLD_START_ADVICE})"
        )
    return meta


def check_compatible(meta: ImageMetadata, node: GpuInfo, image: Path | str = "") -> None:
    """Refuses an image taken on another GPU model or driver: CUDA state does not carry over.

    An image of a process that had no GPU (both fields None) restores anywhere.
    """
    took = GpuInfo(meta.gpu_model, meta.driver_version)
    if took.model is None and took.driver is None:
        return
    if took != node:
        raise ImageRefused(
            f"checkpoint image {image} was taken on GPU {took.model!r} with driver {took.driver!r}, "
            f"but this node has GPU {node.model!r} with driver {node.driver!r}: a CUDA checkpoint is "
            "only valid on the same GPU model and driver; refusing to restore (annotate the pod "
            "hibernate.dev/discard-checkpoint=true to discard the image and start the engine cold)"
        )


def remove_image(image: Path) -> None:
    shutil.rmtree(image, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Moves `new` to `final`; an existing `final` is swapped out first, then deleted."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# -- locks, and after an agent died mid-way -------------------------------------------------------


def open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def detached_dir(path: Path) -> int:
    """An fd of `path` at the root of a detached copy of its mount (open_tree(2), OPEN_TREE_CLONE).

    criu runs inside a pod's root and is handed host directories as `/proc/self/fd/N`. Through a
    plain fd, a path the pod planted (`/proc/self/fd/N/../../etc`) would walk up the host's tree;
    `..` at the root of a detached mount stays where it is.
    """
    tree = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    if tree < 0:
        e = ctypes.get_errno()
        raise CriuError(f"open_tree {path}: {os.strerror(e)}")
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tree)
    finally:
        os.close(tree)


def locked_dir(path: Path, *, detached: bool = True) -> int:
    """An fd of `path` holding an exclusive flock: detached, for criu to inherit (nsexec.run), or a
    plain one where no criu is given it (shrink.py's copy, locked as criu's own directories are)."""
    fd = detached_dir(path) if detached else open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CriuError(f"{path} is in use by another criu (an earlier agent's dump or restore)") from None
    except OSError as e:
        if e.errno not in CANNOT_LOCK_DIRS:
            os.close(fd)
            raise CriuError(f"cannot lock {path}: {e.strerror}") from e
        # A file system that cannot lock a directory exclusively (NFS emulates flock with byte-range
        # locks, which need a file open for writing): the directory is new and named for this dump
        # alone, and a snapshot there has a lock file of its own (snaplock).
    return fd


# What flock(2) of a directory says where the file system cannot do it (NFS: EBADF).
CANNOT_LOCK_DIRS = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


def partials(image: Path) -> list[Path]:
    return sorted(image.parent.glob(f".{image.name}.partial-*"))


def _swapped_out(image: Path) -> list[Path]:
    return sorted(image.parent.glob(f".{image.name}.old-*"))


def wait_for_criu(image: Path, timeout: float = 600.0) -> bool:
    """Waits until no criu works on `image` or its temporary directories; True if it had to wait.

    An agent that dies during a dump or restore leaves criu running (its own session, output to a
    file); criu holds the directory's flock until it exits. Only then does the directory say what
    happened. Raises CriuError after `timeout` (a criu that hangs holds the engine frozen).
    """
    waited = False
    deadline = time.monotonic() + timeout
    for path in [*partials(image), image]:
        try:
            fd = open_dir(path)
        except OSError:
            continue
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CriuError(
                            f"a criu left by an earlier agent still works on {path} after {timeout:.0f} s"
                        ) from None
                    waited = True
                    time.sleep(0.05)
        finally:
            os.close(fd)  # releases the lock
    return waited


def settle(image: Path, engine_running: bool) -> list[str]:
    """After an agent died mid-dump: leave `image` complete or absent, and no temporary directory.

    Call after `wait_for_criu`. A dump that criu finished after its agent died (a complete image
    in the temporary directory, the engine gone) is the only copy of the engine: it is completed
    (metadata, permissions) and renamed into place. Any other temporary directory is removed, and
    so is a swapped-out older image once `image` is there. Returns what it did, for the log.
    """
    done: list[str] = []
    for tmp in partials(image):
        if not engine_running and not image.exists() and not check_image(tmp):
            try:
                meta = ImageMetadata.load(tmp)
            except CriuError:
                meta = None
            if meta is not None:
                seal(tmp)
                ImageMetadata(
                    **{**asdict(meta), "image_bytes": image_bytes(tmp), "files": file_sizes(tmp)}
                ).write(tmp)
                tmp.rename(image)
                done.append(f"adopted the complete image that criu finished in {tmp.name}")
                continue
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the unfinished image {tmp.name}")
    for old in _swapped_out(image):
        if not image.exists() and not engine_running and not check_image(old):
            old.rename(image)
            done.append(f"put back the image {old.name} that a replacement left swapped out")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the replaced image {old.name}")
    return done
