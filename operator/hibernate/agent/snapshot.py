"""Waking a new pod from a snapshot: the agent's side of the restore protocol with the pod's init.

A pod woken from a snapshot (docs/snapshots.md) starts with its init (hibernate.podinit) waiting
for a restore instead of starting the engine. The agent claims that wait, restores the snapshot
into the pod (criu.snapshot.restore_into), checks the engine (the caller's `check`: its wake and
the canary), and tells the init the verdict in a file of the pod's emptyDir: restored, with the
engine's pid, or cold, with the reason. A wake never fails because of the snapshot: whatever goes
wrong ends in a cold start by the init, and the reason comes back for the pod's event.

The files are the init's (podinit.RESTORE_*), reached through the pod's root without following its
symlinks (podfs). A hostile pod can only claim its own wait first or write a verdict of its own,
and so at worst deny itself the restore: the snapshot, the pids and the restore are the agent's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hibernate import podinit
from hibernate.agent import criu
from hibernate.agent.criu import nsexec, snapshot
from hibernate.agent.criu.restore import RestoreResult

STATE_DIR = PurePosixPath(podinit.DEFAULT_MARKER).parent  # the emptyDir at /.hibernate
WAIT = STATE_DIR / podinit.RESTORE_WAIT
CLAIMED = STATE_DIR / podinit.RESTORE_CLAIMED
RESULT = STATE_DIR / podinit.RESTORE_RESULT
# The verdict is read by the init, which may run as any user: readable, never writable, by it.
_RESULT_MODE = 0o644


@dataclass(frozen=True)
class Outcome:
    """How a snapshot wake ended: restored (the engine's pid in the pod), or cold and why."""

    restored: bool
    seconds: float
    reason: str = ""
    pid: int | None = None
    restore: RestoreResult | None = None


def waiting(pod: criu.Pod) -> bool:
    """Whether the pod's init waits for a restore that nobody has claimed yet."""
    with pod.root() as root:
        return root.exists(WAIT)


def claim(pod: criu.Pod) -> bool:
    """Takes the pod's waiting restore (renames its wait file); False where there is none to take:
    the init was started without one, its wait ran out, or another agent took it."""
    with pod.root() as root, root.parent(WAIT) as d:
        try:
            os.rename(WAIT.name, CLAIMED.name, src_dir_fd=d, dst_dir_fd=d)
        except FileNotFoundError:
            return False
    return True


def tell(pod: criu.Pod, verdict: dict[str, object]) -> None:
    """Writes the verdict for the init, whole (a hidden file renamed into place)."""
    partial = RESULT.with_name(f".{RESULT.name}.partial")
    with pod.root() as root:
        root.write_file(partial, json.dumps(verdict).encode() + b"\n", mode=_RESULT_MODE)
        with root.parent(RESULT) as d:
            os.rename(partial.name, RESULT.name, src_dir_fd=d, dst_dir_fd=d)


def wake_from_snapshot(
    image: Path,
    pod: criu.Pod,
    *,
    spec_hash: str,
    check: Callable[[RestoreResult], None] = lambda _: None,
    timeout: float = 600.0,
    gpu: criu.GpuInfo | None = None,
    bundle: criu.Bundle | None = None,
    checkpoint_root: Path | None = None,
) -> Outcome:
    """Restores the snapshot `image` into the new pod `pod`, whose init waits for it, then runs
    `check` on the restored engine (it raises when the engine is not right); tells the init.

    Never raises for the snapshot's sake: a refused image, a failed restore or a failed check
    is an Outcome that is not restored, with the reason, and the init starts the engine cold (it
    ends what the restore left first). Where the init no longer waits, nothing is done.
    """
    started = time.monotonic()
    try:
        if not claim(pod):
            return Outcome(False, time.monotonic() - started, "the pod's init was not waiting for a restore")
    except OSError as e:
        return Outcome(False, time.monotonic() - started, f"cannot reach the pod's init: {e}")
    result = None
    try:
        result = snapshot.restore_into(
            image,
            pod,
            spec_hash=spec_hash,
            timeout=timeout,
            gpu=gpu,
            bundle=bundle,
            checkpoint_root=checkpoint_root,
        )
        check(result)
    except Exception as e:  # every failure of the snapshot path is a cold start, never a failed wake
        reason = _first_line(e)
        if result is not None and result.host_pid is not None:
            _end_tree(result.host_pid)  # no engine that failed its check answers, even for a moment
        _tell_or_leave(pod, {"cold": reason})
        return Outcome(False, time.monotonic() - started, reason)
    if err := _tell_or_leave(pod, {"restored": result.pid}):
        return Outcome(False, time.monotonic() - started, f"cannot tell the pod's init: {err}")
    return Outcome(True, time.monotonic() - started, pid=result.pid, restore=result)


def _end_tree(host_pid: int) -> None:
    """Kills a restored engine and its children (the pod's init reaps them)."""
    for pid in [host_pid, *nsexec.descendants(host_pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tell_or_leave(pod: criu.Pod, verdict: dict[str, object]) -> str:
    """Tells the init; where that fails (the pod is going away) it gives up by itself, after its
    claim limit. Returns the error, or ''."""
    try:
        tell(pod, verdict)
    except OSError as e:
        return os.strerror(e.errno) if e.errno in (errno.ENOENT, errno.ESRCH) else str(e)
    return ""


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
