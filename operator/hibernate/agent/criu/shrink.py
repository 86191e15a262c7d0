"""Shrink a Checkpoint image after the sleep is reported: its zero pages left out (zeropages.py).

The rewrite reads the whole image and copies what it keeps: 0.6 s of a 1.8 s Checkpoint sleep on
an H100 (bench/RESULTS.md). Nothing needs it before the next wake, so the sleep is reported as soon
as criu's image is complete and verified, and the rewrite runs behind it:

- on a copy of the image made of hard links, in a `.<image>.partial-…` sibling that this module
  holds the flock of (as criu does its own: `wait_for_criu` waits for it, `settle` removes what an
  agent that died left of it). The rewrite never writes into a file it shares with the image: it
  writes new pages files, replaces page maps by rename and writes a new metadata.json;
- criu's image is checked against its metadata first (a damaged image is left as it is, for the
  wake to refuse), and a file the copy still shares with it keeps the size criu recorded in the
  copy's metadata, so a file cut short during the shrink fails the copy's check too;
- the copy, verified, then takes the image's place in one `renameat2(RENAME_EXCHANGE)`, which
  fails where the image is gone (a pod deleted meanwhile: nothing comes back), and the image it
  swapped out is removed;
- it needs disk space for the pages it keeps while criu's image is still there: it starts only
  where twice the image's pages are free, so that as much stays free for other pods' dumps;
- a wake (or a deletion) `cancel`s it first: the rewrite stops within a few MiB and the image is
  the one criu wrote, which restores the same, only slower.

Snapshots (criu/snapshot.py) leave the zero pages out before they are published: another pod may
restore them at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from hibernate.agent.criu import images, zeropages
from hibernate.agent.criu.bundle import CriuError
from hibernate.faults import fault_point

log = logging.getLogger("hibernate.agent.criu.shrink")

_RENAME_EXCHANGE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Shrunk:
    """How a shrink ended: `compaction` where the smaller image took the place of criu's, else
    `reason` (cancelled, too little to leave out, the image gone, an error)."""

    image: Path
    seconds: float
    compaction: zeropages.Compaction | None = None
    image_bytes: int = 0
    reason: str = ""


def shrink(image: Path, stop: threading.Event | None = None) -> Shrunk:
    """Leave the zero pages out of the complete image `image` (see the module's docstring)."""
    started = time.monotonic()

    def ended(reason: str) -> Shrunk:
        return Shrunk(image, round(time.monotonic() - started, 3), reason=reason)

    try:
        pages = sum(p.stat().st_size for p in image.glob("pages-*.img"))
        free = _free_bytes(image.parent)
    except OSError as e:
        return ended(f"cannot read the image: {e}")
    if free < 2 * pages:  # the copy writes up to `pages`; as much stays free for other pods' dumps
        return ended(
            f"too little free disk: {free >> 20} MiB free, the copy may write {pages >> 20} MiB and "
            "leaves as much free for other dumps"
        )
    tmp = image.with_name(f".{image.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(mode=images.DIR_MODE)
    except OSError as e:
        return ended(f"cannot make {tmp.name}: {e.strerror}")
    fd = -1
    try:
        fd = images.locked_dir(tmp, detached=False)  # as criu holds its own (wait_for_criu)
        meta = images.ImageMetadata.load(image)
        if damage := images.size_problems(image, meta):  # the wake refuses it; no copy may hide that
            return ended(f"the image is not as criu wrote it: {'; '.join(damage)}")
        for entry in os.scandir(image):
            if entry.is_file(follow_symlinks=False) and entry.name != images.METADATA:
                os.link(entry.path, tmp / entry.name, follow_symlinks=False)
        done = zeropages.leave_out_zero_pages(tmp, stop=stop)
        if not done.pages_left_out:
            return ended("too few zero pages to leave out")
        shrunk = images.ImageMetadata(
            **{
                **asdict(meta),
                "image_bytes": images.image_bytes(tmp),
                "files": _sizes_as_written(tmp, image, meta),
                "zero_pages_left_out": done.pages_left_out,
            }
        )
        shrunk.write(tmp)
        if problems := images.check_image(tmp) + images.size_problems(tmp, shrunk):
            return ended(f"the shrunk copy is not complete: {'; '.join(problems)}")
        zeropages.raise_if_stopped(stop)
        fault_point("agent.shrink-before-exchange")
        _exchange(tmp, image)
        return Shrunk(
            image,
            round(time.monotonic() - started, 3),
            compaction=done,
            image_bytes=images.image_bytes(image),
        )
    except zeropages.Stopped:
        return ended("cancelled")
    except FileNotFoundError as e:
        return ended(f"the image went away: {e}")
    except (zeropages.ImageFormatError, CriuError, OSError) as e:
        return ended(str(e))
    finally:
        # After the exchange `tmp` names criu's image, before it the unfinished copy: either goes.
        shutil.rmtree(tmp, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


def _sizes_as_written(copy: Path, image: Path, meta: images.ImageMetadata) -> dict[str, int]:
    """The copy's files and their sizes for its metadata: a file it still shares with criu's image
    (a hard link) keeps the size criu's metadata recorded, so that a file cut short during the shrink
    is still found by the size check (`size_problems`), before the exchange and at the wake; only the
    files the rewrite wrote are measured."""
    sizes = images.file_sizes(copy)
    for name in sizes:
        with contextlib.suppress(OSError):
            if name in meta.files and os.path.samestat(
                os.stat(copy / name, follow_symlinks=False), os.stat(image / name, follow_symlinks=False)
            ):
                sizes[name] = meta.files[name]
    return sizes


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _exchange(new: Path, old: Path) -> None:
    """Swap the two directories' names at once; FileNotFoundError where `old` is gone."""
    if _libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(old), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"renameat2 RENAME_EXCHANGE {new.name} {old.name}: {os.strerror(e)}")


class Shrinker:
    """The shrinks running behind this agent's sleeps, one thread each, and how the last ones ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Path, tuple[threading.Thread, threading.Event]] = {}
        self.ended: dict[Path, Shrunk] = {}

    def start(self, image: Path) -> None:
        """Shrink `image` in a thread of its own (a shrink of it still running is cancelled first)."""
        self.cancel(image)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(image, stop), name=f"shrink-{image.parent.name}", daemon=True
        )
        with self._lock:
            self._running[image] = (thread, stop)
            self.ended.pop(image, None)
        thread.start()

    def _run(self, image: Path, stop: threading.Event) -> None:
        try:
            done = shrink(image, stop)
        except BaseException as e:  # a thread's exception would only reach stderr
            done = Shrunk(image, 0.0, reason=f"{type(e).__name__}: {e}")
        if done.compaction is not None:
            log.info(
                "left %d of %d pages out of %s in %.3f s, behind the sleep: %.0f MiB of zero bytes; %d bytes now",
                done.compaction.pages_left_out,
                done.compaction.pages_before,
                image,
                done.seconds,
                done.compaction.bytes_saved / 2**20,
                done.image_bytes,
            )
        elif done.reason not in ("cancelled", "too few zero pages to leave out"):
            log.warning("kept the zero pages of %s: %s", image, done.reason)
        with self._lock:
            self.ended[image] = done
            if self._running.get(image, (None,))[0] is threading.current_thread():
                del self._running[image]

    def cancel(self, image: Path) -> bool:
        """Stop a shrink of `image` and wait for its thread; True if one was running."""
        with self._lock:
            running = self._running.pop(image, None)
        if running is None:
            return False
        thread, stop = running
        stop.set()
        with contextlib.suppress(RuntimeError):  # called from the shrink's own thread
            thread.join()
        return True

    def wait(self, image: Path, timeout: float | None = None) -> Shrunk | None:
        """Wait for a shrink of `image` to end (benches and tests); how it ended, if it did."""
        with self._lock:
            running = self._running.get(image)
        if running is not None:
            running[0].join(timeout)
        with self._lock:
            return self.ended.get(image)
