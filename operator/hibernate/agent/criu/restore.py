"""criu restore: bring a dumped tree back, in place inside its pod (same pids, IP and mounts)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hibernate.agent.criu import images, nsexec
from hibernate.agent.criu.bundle import Bundle, CriuError, locate, version
from hibernate.agent.criu.images import RESTORE_LOG, RESTORE_OK, GpuInfo
from hibernate.agent.podfs import UnsafePath

# A hostile pod could leave an endless file where criu's log goes: read no more than this.
_LOG_LIMIT = 8 << 20


@dataclass(frozen=True)
class RestoreResult:
    pid: int  # the engine's pid as criu saw it (inside the pod for a Pod)
    host_pid: int | None
    seconds: float
    log: Path
    warnings: list[str] = field(default_factory=list)


def restore(
    image: Path,
    pod: nsexec.Pod | None = None,
    *,
    timeout: float = 600.0,
    tcp_established: bool = True,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    extra_args: Sequence[str] = (),
    checkpoint_root: Path | None = None,
) -> RestoreResult:
    """Restores the tree in `image`: into the pod's namespaces when `pod` is given (same pids,
    reparented to the pod's init), on the host otherwise.

    Refuses, with CriuError and before touching anything, an image that is missing, incomplete,
    not root-only as the agent writes it (up to `checkpoint_root`), or taken on another GPU model
    or driver than `gpu` (default: this node's). The pids of the image must be free. On success the
    pod's checkpoint marker is removed; on failure it stays (the engine is still gone, and the init
    must keep the pod alive until the agent retries or gives up).
    """
    started = time.monotonic()
    meta = images.verify_image(image, checkpoint_root)
    images.check_compatible(meta, gpu if gpu is not None else images.detect_gpu(), image)
    bundle = bundle or locate()
    version(bundle)
    # criu would fail with "Can't fork for N: File exists"; say what is going on instead.
    taken = nsexec.host_pid_in_pod(pod.init_pid, meta.engine_pid) if pod is not None else None
    if pod is None and nsexec.alive(meta.engine_pid):
        taken = meta.engine_pid
    if taken is not None:
        raise CriuError(
            f"cannot restore {image}: pid {meta.engine_pid} is in use (host pid {taken}); "
            "is the engine already running?"
        )
    log = image / RESTORE_LOG
    tcp = ["--tcp-established", "--network-lock", "nftables"] if tcp_established else []
    warnings = []
    fd = images.locked_dir(image)
    try:
        rc, out = _restore_once(pod, bundle, fd, timeout, [*extra_args, *tcp], log)
        if tcp_established and (rc != 0 or not images.logged_at_end(log, RESTORE_OK)) and _tcp_trouble(log):
            # A connection its peer had half closed when the engine was dumped (a client that died
            # during the dump) cannot be restored under the network lock: criu's FIN is dropped
            # ("Unable to send a fin packet"). Restore with the TCP connections closed instead;
            # clients reconnect. The failed attempt's processes must be reaped first.
            _wait_pid_free(pod, meta.engine_pid)
            first = _tcp_trouble_line(log)
            rc, out = _restore_once(
                pod, bundle, fd, timeout, [*extra_args, "--tcp-close", "--network-lock", "nftables"], log
            )
            warnings.append(f"restored with its TCP connections closed, after: {first}")
    finally:
        os.close(fd)
    if rc != 0 or not images.logged_at_end(log, RESTORE_OK):
        raise CriuError(f"criu restore from {image} failed (rc {rc}): {out}\n{images.log_tail(log)}")
    host_pid = nsexec.host_pid_in_pod(pod.init_pid, meta.engine_pid) if pod is not None else meta.engine_pid
    if pod is not None:
        pod.remove_marker()
    if host_pid is None or not nsexec.alive(host_pid):
        warnings.append(f"restored pid {meta.engine_pid} is not running after the restore")
    return RestoreResult(meta.engine_pid, host_pid, time.monotonic() - started, log, warnings)


def _restore_once(
    pod: nsexec.Pod | None, bundle: Bundle, fd: int, timeout: float, extra: list[str], log: Path
) -> tuple[int, str]:
    if pod is None:
        launched = nsexec.launch(None, bundle, "restore", fd, ["-d", "-o", RESTORE_LOG, *extra])
        return nsexec.run(launched, fd, timeout, "restore", fault="agent.criu-restore-running")
    # The work dir (criu's cgroup yard is mounted there) must be inside the pod's mount namespace,
    # and criu writes its log there; the log is copied beside the image. Both are reached through
    # the pod's root without following the pod's symlinks out of it (podfs).
    work_log = pod.workdir / RESTORE_LOG
    try:
        with pod.root() as root:
            root.reclaim_dir(pod.workdir)
            root.unlink(work_log)
    except OSError as e:
        raise CriuError(f"cannot prepare criu's work directory {pod.workdir} in the pod: {e}") from e
    # Back into the cgroups the tree was dumped from (criu joined the pod's cgroup namespace too, so
    # the restored tree shares the init's), which must still exist: the container's, kept by its
    # init. `none`: criu neither creates a cgroup nor writes a limit; those are the kubelet's.
    args = ["-d", "-W", str(pod.workdir), "-o", RESTORE_LOG, "--manage-cgroups=none", *extra]
    launched = nsexec.launch(pod, bundle, "restore", fd, args)
    rc, out = nsexec.run(launched, fd, timeout, "restore", fault="agent.criu-restore-running")
    with contextlib.suppress(OSError, UnsafePath), pod.root() as root:
        images.write_private(log, root.read_file(work_log, _LOG_LIMIT))
    return rc, out


_TCP_ERROR = re.compile(r"^.*Error \((?:soccr/|criu/sk-tcp).*$", re.MULTILINE)


def _tcp_trouble_line(log: Path) -> str:
    """The line of a failed restore's log that blames a TCP connection (criu's soccr or sk-tcp), or ''."""
    try:
        found = _TCP_ERROR.search(log.read_text(errors="replace"))
    except OSError:
        return ""
    return found.group(0).strip() if found else ""


def _tcp_trouble(log: Path) -> bool:
    return bool(_tcp_trouble_line(log))


def _wait_pid_free(pod: nsexec.Pod | None, pid_in_pod: int, timeout: float = 5.0) -> None:
    """Until no process of the pod, a zombie included, has `pid_in_pod` (a failed restore's leftovers)."""
    if pod is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        taken = False
        for host in nsexec.descendants(pod.init_pid):
            with contextlib.suppress(OSError, CriuError):
                taken = taken or nsexec.ns_pid(host) == pid_in_pod
        if not taken:
            return
        time.sleep(0.02)
