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

An agent that dies mid-restore (SIGKILL, a node agent upgrade) leaves a claim without a verdict, and
perhaps a criu still running or an engine it restored. The claim names the agent process that made
it (its pid and start time), so the agent that comes next knows the claim is orphaned (`Handshake`)
and takes it over (`take_over`): it ends every process of the pod but its init, then restores again,
and tells the init as any restore does. The init never waits past its claim limit either way.
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
from typing import Any

from hibernate import podinit
from hibernate.agent import criu
from hibernate.agent.criu import nsexec, snapshot
from hibernate.agent.criu.restore import RestoreResult
from hibernate.faults import fault_point

STATE_DIR = PurePosixPath(podinit.DEFAULT_MARKER).parent  # the emptyDir at /.hibernate
WAIT = STATE_DIR / podinit.RESTORE_WAIT
CLAIMED = STATE_DIR / podinit.RESTORE_CLAIMED
RESULT = STATE_DIR / podinit.RESTORE_RESULT
# The verdict is read by the init, which may run as any user: readable, never writable, by it.
_RESULT_MODE = 0o644
# How long a take-over waits for what an earlier restore left in the pod to be gone (and reaped).
LEFTOVERS_S = 10.0


@dataclass(frozen=True)
class Outcome:
    """How a snapshot wake ended: restored (the engine's pid in the pod), or cold and why."""

    restored: bool
    seconds: float
    reason: str = ""
    pid: int | None = None
    restore: RestoreResult | None = None
    taken_over: bool = False  # the restore of an agent that died mid-way, done again


@dataclass(frozen=True)
class Claimer:
    """The agent process that claimed a restore: its pid (as the agent's /proc shows it) and its
    start time in clock ticks since boot (a pid used again is another process)."""

    pid: int
    started: int

    @classmethod
    def me(cls) -> Claimer:
        return cls(os.getpid(), _start_ticks(os.getpid()) or 0)

    @classmethod
    def parse(cls, text: str) -> Claimer | None:
        try:
            data = json.loads(text)
            return cls(int(data["agent"]), int(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool:
        """Whether that process still runs (same pid, same start time)."""
        return self.started > 0 and _start_ticks(self.pid) == self.started

    def text(self) -> str:
        return json.dumps({"agent": self.pid, "started": self.started})


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Handshake:
    """Where the restore protocol of a new pod stands, from its files."""

    waiting: bool  # the init waits and nobody has claimed it
    claimed: bool  # an agent claimed it
    claimer: Claimer | None  # who, where it said so (an older agent did not)
    verdict: dict[str, Any] | None  # what the init was told, if it was

    @property
    def orphaned(self) -> bool:
        """Claimed, no verdict, and the claiming agent is gone: nobody will tell the init."""
        return (
            self.claimed and self.verdict is None and not (self.claimer is not None and self.claimer.alive())
        )


def waiting(pod: criu.Pod) -> bool:
    """Whether the pod's init waits for a restore that nobody has claimed yet."""
    with pod.root() as root:
        return root.exists(WAIT)


def handshake(pod: criu.Pod) -> Handshake:
    """The pod's restore files, read through its root."""
    with pod.root() as root:
        wait, claimed = root.exists(WAIT), root.exists(CLAIMED)
        claimer = verdict = None
        if claimed:
            with contextlib.suppress(OSError):
                claimer = Claimer.parse(root.read_file(CLAIMED, 4096).decode(errors="replace"))
        if root.exists(RESULT):
            with contextlib.suppress(OSError, ValueError):
                told = json.loads(root.read_file(RESULT, 1 << 16))
                verdict = told if isinstance(told, dict) else None
    return Handshake(wait, claimed, claimer, verdict)


def claim(pod: criu.Pod) -> bool:
    """Takes the pod's waiting restore (renames its wait file) and signs the claim with this agent
    process; False where there is none to take: the init was started without one, its wait ran out,
    or another agent took it."""
    with pod.root() as root:
        with root.parent(WAIT) as d:
            try:
                os.rename(WAIT.name, CLAIMED.name, src_dir_fd=d, dst_dir_fd=d)
            except FileNotFoundError:
                return False
        _sign(root)
    return True


def _sign(root: Any) -> None:
    """Writes this agent process into the claim, for the agent after it should it die mid-restore."""
    root.write_file(CLAIMED, Claimer.me().text().encode() + b"\n", mode=_RESULT_MODE)


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
    fault_point("agent.snapshot-after-claim")
    return _restore_and_tell(
        image,
        pod,
        started,
        spec_hash=spec_hash,
        check=check,
        timeout=timeout,
        gpu=gpu,
        bundle=bundle,
        checkpoint_root=checkpoint_root,
    )


def take_over(
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
    """The restore into `pod` that an agent claimed and died in (Handshake.orphaned): ends every
    process of the pod but its init (a criu still running, an engine it restored, unchecked), then
    restores again, checks and tells the init, as wake_from_snapshot does. Where the leftovers do not
    go, or the claim is no longer orphaned, the init is told to start cold (or left alone)."""
    started = time.monotonic()
    try:
        state = handshake(pod)
        if not state.orphaned:
            return Outcome(False, time.monotonic() - started, "the restore is no longer an orphaned claim")
        with pod.root() as root:
            _sign(root)
    except OSError as e:
        return Outcome(False, time.monotonic() - started, f"cannot reach the pod's init: {e}")
    left = end_leftovers(pod.init_pid)
    if left:
        reason = f"an earlier agent died restoring into this pod, and what it left (pids {left}) does not end"
        _tell_or_leave(pod, {"cold": reason})
        return Outcome(False, time.monotonic() - started, reason, taken_over=True)
    outcome = _restore_and_tell(
        image,
        pod,
        started,
        spec_hash=spec_hash,
        check=check,
        timeout=timeout,
        gpu=gpu,
        bundle=bundle,
        checkpoint_root=checkpoint_root,
    )
    return Outcome(outcome.restored, outcome.seconds, outcome.reason, outcome.pid, outcome.restore, True)


def pod_processes(init_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process (host pid) in the pid namespace of the pod's init, but the init: the engine and
    its children, and a criu that restores into the pod (whose parent is outside it). Only where the
    init is PID 1 of a pid namespace of its own; elsewhere only the init's descendants."""
    try:
        ns = os.readlink(proc / str(init_pid) / "ns" / "pid")
        own = ns != os.readlink(proc / "self" / "ns" / "pid") and nsexec.ns_pid(init_pid) == 1
    except (OSError, criu.CriuError):
        return []
    if not own:
        return sorted(pid for pid in nsexec.descendants(init_pid) if nsexec.alive(pid))
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == init_pid:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "pid") == ns and nsexec.alive(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def end_leftovers(init_pid: int, limit: float = LEFTOVERS_S) -> list[int]:
    """SIGKILLs every process of the pod but its init and waits until they are gone and the init has
    reaped its children (the engine's pids are then free again). Returns what is still there."""
    deadline = time.monotonic() + limit
    while True:
        left = pod_processes(init_pid)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unreaped = nsexec.children(init_pid)
        if not left and not unreaped:
            return []
        if time.monotonic() >= deadline:
            return left or unreaped
        time.sleep(0.05)


def _restore_and_tell(
    image: Path,
    pod: criu.Pod,
    started: float,
    *,
    spec_hash: str,
    check: Callable[[RestoreResult], None],
    timeout: float,
    gpu: criu.GpuInfo | None,
    bundle: criu.Bundle | None,
    checkpoint_root: Path | None,
) -> Outcome:
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
    fault_point("agent.snapshot-before-tell")
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
