"""PID 1 of the engine container: starts the engine, outlives it across a checkpoint, reaps.

    python3 -m hibernate.podinit [--log PATH] [--marker PATH] -- <engine command...>
    python3 /.hibernate/podinit.py -- <engine command...>     (the same file, copied into the pod)

Level 4 (design.md) dumps the engine's process tree with CRIU and ends it, then restores it into
the same pod. The pod must survive that, so its PID 1 cannot be the engine. This init:

- calls setsid, so the engine runs in a session whose leader is inside the pod's pid namespace
  (CRIU's --shell-job cannot restore a session whose leader lies outside it);
- starts the engine as its child with stdin from /dev/null and stdout/stderr appended (O_APPEND)
  to a log file: CRIU restores regular files but not pipes to a process outside the tree;
- copies that log to its own stdout from a thread, so `kubectl logs` keeps working; the thread
  lives in the init, which is never dumped, so it cannot get in CRIU's way;
- reaps every child (it is the pid namespace's reaper; restored trees are reparented to it);
- does not exit when the engine ends while the checkpoint marker exists (the agent writes it
  before a dump and removes it after the restore); otherwise exits with the engine's status;
- forwards SIGTERM/SIGINT/SIGHUP to the engine, and exits at once on them while the engine is
  checkpointed, so deleting a hibernated pod is not held up by the grace period.

With `--restore-wait SECONDS` (or $HIBERNATE_RESTORE_WAIT), in a new pod woken from a snapshot
(Stop with a snapshot, docs/snapshots.md), the init first waits for the node agent to restore the
engine into the pod instead of starting it, and starts it cold when that does not happen:

- it writes RESTORE_WAIT (its deadline) and runs nothing else, no thread either, so the engine's
  pids stay free for the restore;
- the agent claims the restore by renaming RESTORE_WAIT to RESTORE_CLAIMED (atomic: either the
  agent claims it or the init, once the wait has passed, takes it back, never both), restores,
  checks the engine, and writes RESTORE_RESULT: {"restored": <pid>} or {"cold": "<why>"};
- on "restored" the init adopts the engine (restored as its child) and carries on as above; on
  "cold", on an unclaimed wait that ran out, or when a claimed restore gives no result within
  CLAIM_LIMIT_S (a lost agent), it ends whatever a restore left in the pod and starts the engine.

Standard library only, no imports from `hibernate`: the engine image need not have the package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

DEFAULT_LOG = "/.hibernate/engine.log"
DEFAULT_MARKER = "/.hibernate/checkpointed"
# The restore protocol's files (agent/snapshot.py uses the same names), in the init's emptyDir.
RESTORE_WAIT = "restore-wait"
RESTORE_CLAIMED = "restore-claimed"
RESTORE_EXPIRED = "restore-expired"
RESTORE_RESULT = "restore-result"
# How long a claimed restore may take before the init gives up on it: criu's own timeout (600 s)
# and the engine's wake, with room.
CLAIM_LIMIT_S = 900.0
# How often the init looks for the marker's removal while it has no child to wait for.
POLL_S = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _say(msg: str) -> None:
    # The init's own messages go to stderr, interleaved with the copied engine log on stdout.
    print(f"podinit: {msg}", file=sys.stderr, flush=True)


def _exit_code(status: int) -> int:
    """Shell convention: the exit code, or 128 + the signal that ended the process."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _no_stray_fds() -> None:
    """Mark every inherited descriptor above stderr close-on-exec.

    A descriptor the container runtime leaks into the engine (a pipe, a socket to the host) is
    something CRIU cannot dump; the engine gets exactly stdin, stdout and stderr.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _children() -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


class LogFollower(threading.Thread):
    """Copies what the engine appends to its log file onto the init's stdout."""

    def __init__(self, path: str, start_at: int) -> None:
        super().__init__(name="log-follower", daemon=True)
        self.path = path
        self.pos = start_at

    def run(self) -> None:
        out = sys.stdout.buffer
        while True:
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < self.pos:  # truncated or replaced: start over
                        self.pos = 0
                    f.seek(self.pos)
                    chunk = f.read(1 << 20)
            except OSError:
                chunk = b""
            if chunk:
                self.pos += len(chunk)
                with contextlib.suppress(OSError, ValueError):
                    out.write(chunk)
                    out.flush()
            else:
                time.sleep(POLL_S)


class Init:
    def __init__(
        self,
        command: Sequence[str],
        log: str,
        marker: str,
        restore_wait: float = 0.0,
        claim_limit: float = CLAIM_LIMIT_S,
    ) -> None:
        self.command = list(command)
        self.log = log
        self.marker = marker
        self.restore_wait = restore_wait
        self.claim_limit = claim_limit
        self.state_dir = os.path.dirname(marker) or "."
        self.engine_pid = 0
        self.engine_status = 0
        self.terminating = False

    def checkpointed(self) -> bool:
        return os.path.exists(self.marker)

    def start_engine(self) -> None:
        os.makedirs(os.path.dirname(self.log) or ".", exist_ok=True)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        # Defaults for what this init handles or ignores (Python ignores SIGPIPE and SIGXFSZ).
        defaults = {*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ}
        self.engine_pid = os.posix_spawnp(
            self.command[0], self.command, os.environ, file_actions=actions, setsigdef=defaults, setsigmask=()
        )
        _say(f"engine started: pid {self.engine_pid}: {' '.join(self.command)}")

    def engine_running(self) -> bool:
        """Whether the engine runs now: as started, or restored by CRIU and reparented to us."""
        try:
            with open(f"/proc/{self.engine_pid}/stat") as f:
                # field 4 is the parent pid (after the command name, which may hold spaces)
                return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        except (OSError, IndexError, ValueError):
            return False

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.terminating = True
        if self.engine_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.engine_pid, signum)
        else:
            _say(f"signal {signum} while the engine is not running: exiting")
            sys.exit(128 + signum)

    def reap_forever(self) -> int:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No child at all: the engine is checkpointed (wait for the restore), or it is
                # gone for good (a restore failed and the agent removed the marker).
                if self.checkpointed() and not self.terminating:
                    time.sleep(POLL_S)
                    continue
                return _exit_code(self.engine_status)
            if pid != self.engine_pid:
                continue  # an orphan of the engine, or a short-lived process of a failed restore
            self.engine_status = status
            if self.checkpointed() and not self.terminating:
                # A restore brings the engine back with the same pid, reparented to us.
                _say(f"engine pid {pid} ended while checkpointed (status {status}): waiting for restore")
                continue
            _say(f"engine pid {pid} exited: code {_exit_code(status)}")
            return _exit_code(status)

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _result(self) -> dict[str, object] | None:
        try:
            with open(self._path(RESTORE_RESULT)) as f:
                verdict = json.load(f)
        except (OSError, ValueError):
            return None  # not there yet (the agent renames it into place whole)
        return verdict if isinstance(verdict, dict) else {"cold": "an unreadable restore result"}

    def _is_child(self, pid: int) -> bool:
        self.engine_pid = pid
        return pid > 1 and self.engine_running()

    def _end_leftovers(self) -> None:
        """Ends every other process of the pod (what a restore left) and reaps it. As PID 1, kill(-1)
        reaches exactly the pod's pid namespace; anywhere else (a test) only the init's children."""
        targets = [-1] if os.getpid() == 1 else _children()
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.01)
            except ChildProcessError:
                return

    def wait_for_restore(self) -> int:
        """The engine's pid once the agent has restored it into the pod, or 0 for a cold start."""
        # criu reopens the engine's log by its path: it must exist, as in the pod it was dumped from.
        os.close(os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        # What an earlier run of this container left in the pod's emptyDir is not about this wait.
        for stale in (RESTORE_RESULT, RESTORE_CLAIMED, RESTORE_EXPIRED):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(stale))
        deadline = time.time() + self.restore_wait
        with open(self._path(RESTORE_WAIT), "w") as f:
            f.write(f"{deadline:.0f}\n")
        _say(f"waiting up to {self.restore_wait:g} s for the agent to restore the engine from a snapshot")
        claimed_at = 0.0
        while True:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)  # the short-lived processes of a failed restore
            verdict = self._result()
            if verdict is not None:
                pid = verdict.get("restored")
                if isinstance(pid, int) and self._is_child(pid):
                    _say(f"engine restored from a snapshot by the agent: pid {pid}")
                    return pid
                why = verdict.get("cold") or f"the restored engine (pid {pid}) is not running"
                _say(f"no restore ({why}): starting the engine cold")
                break
            now = time.time()
            if not claimed_at and now >= deadline:
                try:
                    os.rename(self._path(RESTORE_WAIT), self._path(RESTORE_EXPIRED))
                    _say(f"no restore within {self.restore_wait:g} s: starting the engine cold")
                    break
                except FileNotFoundError:
                    claimed_at = now  # the agent took it first: its result decides
            if claimed_at and now - claimed_at >= self.claim_limit:
                _say(f"a restore claimed {self.claim_limit:g} s ago gave no result: starting the engine cold")
                break
            if self.terminating:
                sys.exit(128 + signal.SIGTERM)
            time.sleep(POLL_S)
        self._end_leftovers()
        self.engine_pid = 0
        return 0

    def run(self) -> int:
        with contextlib.suppress(PermissionError):
            os.setsid()  # already a session leader under some runtimes: fine
        _no_stray_fds()
        for sig in FORWARDED:
            signal.signal(sig, self.on_signal)
        if self.restore_wait > 0 and self.wait_for_restore():
            start_at = os.stat(self.log).st_size  # the restored engine's earlier lines were shown before
        else:
            start_at = os.stat(self.log).st_size if os.path.exists(self.log) else 0
            self.start_engine()
        LogFollower(self.log, start_at).start()
        return self.reap_forever()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="podinit", description="PID 1 of a hibernate engine container")
    p.add_argument("--log", default=os.environ.get("HIBERNATE_ENGINE_LOG", DEFAULT_LOG))
    p.add_argument("--marker", default=os.environ.get("HIBERNATE_CHECKPOINT_MARKER", DEFAULT_MARKER))
    p.add_argument(
        "--restore-wait",
        type=float,
        default=float(os.environ.get("HIBERNATE_RESTORE_WAIT") or 0),
        help="seconds to wait for the agent to restore the engine from a snapshot (0: start it)",
    )
    p.add_argument(
        "--restore-claim-limit",
        type=float,
        default=CLAIM_LIMIT_S,
        help="seconds a restore the agent has claimed may take before the engine is started cold",
    )
    p.add_argument("command", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    if ns.command and ns.command[0] == "--":
        ns.command = ns.command[1:]
    if not ns.command:
        p.error("no engine command given (podinit [options] -- <command...>)")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.pop("HIBERNATE_RESTORE_WAIT", None)  # the init's, not the engine's
    return Init(ns.command, ns.log, ns.marker, ns.restore_wait, ns.restore_claim_limit).run()


if __name__ == "__main__":
    sys.exit(main())
