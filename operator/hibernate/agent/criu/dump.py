"""criu dump: checkpoint an engine's process tree into a verified, root-only image; the tree ends.

What criu does on failure (measured on kernel 6.18, criu 4.2.1, and tested in tests/test_criu.py):
a dump that fails (disk full, an undumpable resource) resumes the tree where it was, and it keeps
serving; only a dump that succeeds kills it (we never pass --leave-running: resuming a CUDA
process costs seconds, and the TCP state it would keep running diverges from the image).

Network lock: with --tcp-established criu 4.2 (whose netns it does not dump) drops only the
dumped connections' 4-tuples, in an nftables table `inet CRIU-<run id>` of the pod's netns. The
table stays from a good dump until the restore removes it; the listening port stays usable, so
a container restarted cold after an abandoned image is reachable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hibernate.agent import gpumap
from hibernate.agent.criu import images, nsexec, zeropages
from hibernate.agent.criu.bundle import Bundle, CriuError, locate, version
from hibernate.agent.criu.images import DUMP_LOG, GpuInfo, ImageMetadata
from hibernate.faults import fault_point

log = logging.getLogger(__name__)

FULL_BELOW = 1 << 20  # bytes free after a failed dump that say the disk filled


@dataclass(frozen=True)
class DumpResult:
    image: Path
    metadata: ImageMetadata
    seconds: float
    log: Path
    # Where the seconds went: "prepare" (up to criu's start), "criu" (its run), "verify" (the image
    # checked, sealed, its metadata written, renamed into place), "gone" (the tree's end awaited).
    steps: dict[str, float] = field(default_factory=dict)


def dump(
    image: Path,
    pid: int,
    pod: nsexec.Pod | None = None,
    *,
    timeout: float = 600.0,
    tcp_established: bool = True,
    tcp_close: bool = False,
    spec_hash: str | None = None,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    extra_args: Sequence[str] = (),
    checkpoint_root: Path | None = None,
    zero_pages_now: bool = True,
) -> DumpResult:
    """Checkpoints the process tree rooted at `pid` into `image`; the tree ends.

    `pid` is as criu sees it: the engine's pid inside the pod's pid namespace when `pod` is
    given (criu then runs in all of its namespaces), a host pid otherwise. Returns only after
    the image is verified complete (criu exited 0, its log ends with success, the core, pstree,
    mm and pagemap images are there and nonempty), made root-only, and metadata.json is written;
    only then is the image renamed to `image`, replacing an older one. On any failure the
    partial image is removed and CriuError carries the log's errors; when criu itself failed
    (disk full, timeout) the tree keeps running and the pod's marker is removed. Should criu
    report success for an image that then fails verification, the tree has already ended: the
    error says so. The directories from `checkpoint_root` (default: the image's parent) down are
    made root-only (0700).

    Once criu is done, the image's pages of zero bytes are left out (zeropages.py: most of what a
    CUDA checkpoint adds); should that fail, the image stays as criu wrote it, which restores the same.
    zero_pages_now=False leaves them for the caller to take out later (shrink.py: a Checkpoint sleep
    is reported first), as criu wrote them.

    tcp_established: connections to the engine (probes, the gateway) are dumped and restored
    instead of failing the dump; the network is locked with nftables, which criu links in, so
    the container needs no iptables. tcp_close instead: connections are neither dumped nor locked,
    and a restore brings them back closed (a snapshot restored into a pod with another address).
    spec_hash: recorded in the metadata, for a snapshot (snapshot.restore_into checks it).
    """
    started = time.monotonic()
    bundle = bundle or locate()
    criu_version = version(bundle)
    gpu = gpu if gpu is not None else images.detect_gpu()
    host_pid = pid
    if pod is not None:
        bundle.require_nsjoin()
        found = nsexec.host_pid_in_pod(pod.init_pid, pid)
        if found is None:
            raise CriuError(f"no process with pid {pid} in the pod of init {pod.init_pid}")
        host_pid = found
    elif not nsexec.alive(pid):
        raise CriuError(f"no process with pid {pid}")
    tree = [host_pid, *nsexec.descendants(host_pid)]
    pids = task_pids(tree) if pod is not None else []
    gpus = [g.to_json() for g in gpumap.pod_gpus(pod.init_pid)] if pod is not None else []

    images.make_private_dirs(image.parent, checkpoint_root or image.parent)
    tmp = image.with_name(f".{image.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(mode=images.DIR_MODE)
    # Written first, so that a dump criu finishes after its agent died can be completed (`settle`).
    meta = ImageMetadata(
        gpu_model=gpu.model,
        driver_version=gpu.driver,
        criu_version=str(criu_version),
        kernel_release=os.uname().release,
        engine_pid=pid,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        image_bytes=0,
        pids=pids,
        spec_hash=spec_hash,
        gpus=gpus,
    )
    marked = False
    try:
        meta.write(tmp)
        if pod is not None and pod.marker is not None:
            # Before criu ends the engine, so the init does not take the container down with it.
            pod.write_marker(f"{image.name}\n")
            marked = True
        fd = images.locked_dir(tmp)
        try:
            args = ["-t", str(pid), "-o", DUMP_LOG]
            if tcp_close:
                args += ["--tcp-close"]
            elif tcp_established:
                args += ["--tcp-established", "--network-lock", "nftables"]
            launched = nsexec.launch(pod, bundle, "dump", fd, [*args, *extra_args])
            criu_started = time.monotonic()
            rc, out = nsexec.run(launched, fd, timeout, "dump", fault="agent.criu-dump-running")
            criu_ended = time.monotonic()
        finally:
            os.close(fd)
        if rc == 0:
            fault_point("agent.criu-after-dump")
        if rc != 0:
            tail = images.log_tail(tmp / DUMP_LOG)
            raise CriuError(
                f"criu dump of pid {pid} failed (rc {rc}){_cause(out + tail, image.parent)}{_fate(host_pid)}: "
                f"{out}\n{tail}"
            )
        problems = images.check_image(tmp)
        if problems:
            raise CriuError(
                f"criu dump of pid {pid} left an incomplete image{_fate(host_pid)}: {'; '.join(problems)}"
            )
        left_out = _leave_out_zero_pages(tmp) if zero_pages_now else 0
        images.seal(tmp)
        meta = ImageMetadata(
            **{
                **asdict(meta),
                "image_bytes": images.image_bytes(tmp),
                "files": images.file_sizes(tmp),
                "zero_pages_left_out": left_out,
            }
        )
        meta.write(tmp)
        images.replace_dir(tmp, image)
        verified = time.monotonic()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if marked and pod is not None and nsexec.alive(host_pid):
            with contextlib.suppress(OSError):
                pod.remove_marker()  # the engine still runs: back to normal
        raise
    _wait_gone(tree, reaped=pod is not None)
    ended = time.monotonic()
    steps = {
        "prepare": criu_started - started,
        "criu": criu_ended - criu_started,
        "verify": verified - criu_ended,
        "gone": ended - verified,
    }
    log.info(
        "dumped pid %d in %.3f s: %s",
        pid,
        ended - started,
        ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()),
    )
    return DumpResult(image, meta, ended - started, image / DUMP_LOG, steps)


def _leave_out_zero_pages(image: Path) -> int:
    """Pages of zero bytes left out of `image`; 0 where that failed (the image is then as criu wrote it)."""
    try:
        done = zeropages.leave_out_zero_pages(image)
    except (zeropages.ImageFormatError, OSError) as e:
        log.warning("kept the zero pages of %s: %s", image.name, e)
        return 0
    log.info(
        "left %d of %d pages out of %s: %.0f MiB of zero bytes",
        done.pages_left_out,
        done.pages_before,
        image.name,
        done.bytes_saved / 2**20,
    )
    return done.pages_left_out


def task_pids(host_pids: Sequence[int]) -> list[int]:
    """Every task (threads too) of the given host processes, by its pid in its pid namespace, sorted."""
    found: set[int] = set()
    for pid in host_pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("NSpid:"):
                            found.add(int(line.split()[-1]))
    return sorted(found)


def _wait_gone(host_pids: Sequence[int], reaped: bool, timeout: float = 5.0) -> None:
    """Waits until criu's kill has taken the dumped tree down.

    In a pod, until the init has reaped every process: a pid of the image that is still a
    zombie (or a session or group id held by one) makes the next restore fail with
    "Can't fork for N: File exists". On the host, the reaper is the caller's business.
    """
    deadline = time.monotonic() + timeout
    for pid in host_pids:
        while time.monotonic() < deadline and (
            Path(f"/proc/{pid}").exists() if reaped else nsexec.alive(pid)
        ):
            time.sleep(0.005)


def _cause(text: str, directory: Path) -> str:
    """The reason of a failed dump, first in the message (criu's log follows), where it is a known one.

    A full disk is known by criu's words, or by the space left where the image was being written (the
    partial image is still there): its log is on the same disk, and its last lines, the error among
    them, may not have fit."""
    free = ""
    full = False
    with contextlib.suppress(OSError):
        st = os.statvfs(directory)
        # f_bfree: what root may still write (criu runs as root), reserved blocks included.
        full = st.f_bfree * st.f_frsize < FULL_BELOW
        free = f", {st.f_bfree * st.f_frsize // 2**20} MiB free of {st.f_blocks * st.f_frsize // 2**20} MiB"
    if full or "No space left on device" in text or "Disk quota exceeded" in text:
        return f": No space left on device for the image under {directory}{free}"
    return ""


def _fate(host_pid: int) -> str:
    """What became of the engine after a failed dump, for the error message."""
    if nsexec.alive(host_pid):
        return "; the engine keeps running"
    return "; the engine has ended and no image was kept (remove the checkpoint marker for a cold start)"
