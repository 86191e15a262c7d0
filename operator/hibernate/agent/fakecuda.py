"""TEST DOUBLE: a file-backed stand-in for the CUDA driver's checkpoint API, for machines without a GPU.

    HIBERNATE_FAKE_CUDA=/tmp/fake-cuda hibernate agent ...

Level 3 (CudaSuspend) needs the NVIDIA driver (`cuCheckpointProcess*`, driver 570+), which CI
machines do not have. With `HIBERNATE_FAKE_CUDA` set to a state directory, the agent replaces both
of its GPU-specific parts, and nothing else:

- the driver (`cuda.CheckpointApi`): the per-process state (`running`, `locked`, `checkpointed`)
  lives in a file per process under the state directory, and the transitions follow the driver's
  rules (lock needs running, checkpoint needs locked, restore needs checkpointed, unlock needs
  locked; anything else fails with CUDA_ERROR_ILLEGAL_STATE). A lock stops the process (SIGSTOP)
  and an unlock continues it (SIGCONT), so a pod left locked or checkpointed really stops serving,
  as a CUDA engine whose calls block would;
- the discovery of CUDA processes (normally: those holding /dev/nvidia*): every process of the
  pod's engine (the pod init excluded) counts as a CUDA process.

A process is named by its pod cgroup and its pid inside the pod's pid namespace, not by its host
pid, because CRIU restores the engine in its pod with the same pid inside but a new host pid: the
"CUDA state" of a checkpointed engine survives a level-4 cycle, as it would in the real process. A
snapshot is restored into ANOTHER pod (another cgroup) with the memory it had, its layout included:
a process with no state of its own takes the checkpointed state that a dead process of the same pid,
environment and address of its environment (randomized for every new process, kept by a restore)
left, so its CUDA state follows it there too.

A restore onto other GPUs (`restore_remapped`, the driver's GPU pairs) is done as a plain restore
and the pairs are kept in the process's state file (`gpu_pairs`), where tests read them.

Tests inject driver failures with files in the state directory: `fail-<step>` (step: get_state,
lock, checkpoint, restore, unlock) makes that call fail for every process.

This never runs in production: the real driver stays the default, and the GPU tests (marked `gpu`)
cover it. The agent logs a warning at start when the double is in use, and refuses to start with it
on a node that has an NVIDIA GPU (`/dev/nvidiactl` exists): there the double would report pods
CudaSuspend while they hold their GPU (`refusal`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from hibernate.agent import cuda, discovery

ENV: Final = "HIBERNATE_FAKE_CUDA"
# The NVIDIA driver's control device, present on every node with an NVIDIA GPU (the privileged agent
# sees the host's /dev). A module constant, not a setting: what can set HIBERNATE_FAKE_CUDA (the
# chart's extraEnv) must not also be able to move it. Tests patch it in the agent's process.
NVIDIA_CONTROL_DEVICE = "/dev/nvidiactl"
_ILLEGAL_STATE: Final = 401
_NOT_FOUND: Final = 500
_INJECTED: Final = 999


def _stat_state(pid: int, proc_root: str = "/proc") -> str | None:
    try:
        return Path(f"{proc_root}/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class FakeCheckpointApi:
    """cuda.CheckpointApi over files in `state_dir` (see the module docstring)."""

    def __init__(self, state_dir: Path, proc_root: str = "/proc") -> None:
        self.state_dir = Path(state_dir)
        self.proc_root = proc_root
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- naming and storage ------------------------------------------------------------------------

    def key(self, pid: int) -> str:
        """`<digest of the process's cgroup>-<pid in its pid namespace>`: stable across a CRIU restore."""
        try:
            cgroup = Path(f"{self.proc_root}/{pid}/cgroup").read_text()
            status = Path(f"{self.proc_root}/{pid}/status").read_text()
        except OSError:
            raise cuda.CudaCallError("fake cuCheckpoint", pid, _NOT_FOUND, "CUDA_ERROR_NOT_FOUND") from None
        nspid = discovery.parse_nspid(status) or (pid,)
        digest = hashlib.sha256(cgroup.encode()).hexdigest()[:16]
        return f"{digest}-{nspid[-1]}"

    def _path(self, pid: int) -> Path:
        return self.state_dir / f"{self.key(pid)}.json"

    def _environ(self, pid: int) -> str:
        """Who the process is, as a restore keeps it: its environment and where it lies in memory."""
        try:
            environ = Path(f"{self.proc_root}/{pid}/environ").read_bytes()
            env_start = Path(f"{self.proc_root}/{pid}/stat").read_text().rsplit(")", 1)[1].split()[47]
        except (OSError, IndexError):
            return ""
        return f"{env_start}-{hashlib.sha256(environ).hexdigest()[:16]}"

    def _adopt(self, pid: int) -> bool:
        """A process restored from a snapshot into another pod takes the checkpointed state that its
        namesake (same pid in its pod, same environment) left in the pod it was dumped from."""
        nspid, environ = self.key(pid).rsplit("-", 1)[1], self._environ(pid)
        for path in sorted(self.state_dir.glob(f"*-{nspid}.json")):
            with contextlib.suppress(OSError, ValueError):
                raw = json.loads(path.read_text())
                alive = _stat_state(int(raw.get("host_pid", 0)), self.proc_root) not in (None, "Z", "X")
                if (
                    raw.get("state") == "checkpointed"
                    and raw.get("environ") == environ
                    and environ
                    and not alive
                ):
                    path.rename(self._path(pid))
                    return True
        return False

    def _read(self, pid: int) -> cuda.ProcessState:
        try:
            raw = json.loads(self._path(pid).read_text())
        except FileNotFoundError:
            if self._adopt(pid):
                return self._read(pid)
            return cuda.ProcessState.RUNNING
        except ValueError:
            raise cuda.CudaCallError(
                "fake cuCheckpoint", pid, _INJECTED, "CUDA_ERROR_UNKNOWN", "unreadable state"
            ) from None
        return cuda.ProcessState(raw["state"])

    def _write(self, pid: int, state: cuda.ProcessState, **extra: object) -> None:
        path = self._path(pid)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        record = {"state": state.value, "host_pid": pid, "environ": self._environ(pid), **extra}
        tmp.write_text(json.dumps(record))
        tmp.rename(path)

    def record(self, pid: int) -> dict[str, object]:
        """The state file of `pid`, as a test reads it ({} when it has none)."""
        try:
            raw: dict[str, object] = json.loads(self._path(pid).read_text())
        except FileNotFoundError:
            return {}
        return raw

    def _check(self, call: str, pid: int, step: str) -> None:
        if (self.state_dir / f"fail-{step}").exists():
            raise cuda.CudaCallError(call, pid, _INJECTED, "CUDA_ERROR_UNKNOWN", "injected by the test")
        if _stat_state(pid, self.proc_root) in (None, "Z", "X"):
            raise cuda.CudaCallError(call, pid, _NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "no such process")

    def _move(
        self,
        call: str,
        pid: int,
        step: str,
        need: cuda.ProcessState,
        to: cuda.ProcessState,
        **extra: object,
    ) -> None:
        self._check(call, pid, step)
        now = self._read(pid)
        if now is not need:
            raise cuda.CudaCallError(
                call, pid, _ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", f"process is {now.value}"
            )
        self._write(pid, to, **extra)

    # -- cuda.CheckpointApi ------------------------------------------------------------------------

    def get_state(self, pid: int) -> cuda.ProcessState:
        self._check("cuCheckpointProcessGetState", pid, "get_state")
        return self._read(pid)

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        del timeout_ms
        self._move(
            "cuCheckpointProcessLock", pid, "lock", cuda.ProcessState.RUNNING, cuda.ProcessState.LOCKED
        )
        os.kill(pid, signal.SIGSTOP)

    def checkpoint(self, pid: int) -> None:
        self._move(
            "cuCheckpointProcessCheckpoint",
            pid,
            "checkpoint",
            cuda.ProcessState.LOCKED,
            cuda.ProcessState.CHECKPOINTED,
        )

    def restore(self, pid: int) -> None:
        self._move(
            "cuCheckpointProcessRestore",
            pid,
            "restore",
            cuda.ProcessState.CHECKPOINTED,
            cuda.ProcessState.LOCKED,
        )

    def restore_remapped(self, pid: int, pairs: cuda.GpuPairs) -> None:
        """A restore onto other GPUs: checked as the driver's arguments are built, then a restore that
        keeps the pairs in the state file."""
        try:
            cuda.restore_args(pairs)
        except ValueError as e:
            raise cuda.CudaCallError(
                "cuCheckpointProcessRestore", pid, 1, "CUDA_ERROR_INVALID_VALUE", str(e)
            ) from e
        self._move(
            "cuCheckpointProcessRestore",
            pid,
            "restore",
            cuda.ProcessState.CHECKPOINTED,
            cuda.ProcessState.LOCKED,
            gpu_pairs=[list(pair) for pair in pairs],
        )

    def unlock(self, pid: int) -> None:
        record = self.record(pid)
        pairs = {"gpu_pairs": record["gpu_pairs"]} if "gpu_pairs" in record else {}
        self._move(
            "cuCheckpointProcessUnlock",
            pid,
            "unlock",
            cuda.ProcessState.LOCKED,
            cuda.ProcessState.RUNNING,
            **pairs,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def restore_thread_id(self, pid: int) -> int:
        self._check("cuCheckpointProcessGetRestoreThreadId", pid, "get_state")
        return pid


def refusal() -> str | None:
    """Why the double must not stand in for the driver on this node, or None where it may."""
    if os.path.lexists(NVIDIA_CONTROL_DEVICE):
        return (
            f"{ENV} is set, but this node has an NVIDIA GPU ({NVIDIA_CONTROL_DEVICE} exists): the CUDA "
            "test double would report pods CudaSuspend while they hold their GPU. Refusing to start; "
            f"remove {ENV} from the agent's environment (the chart's agent.extraEnv)."
        )
    return None


def engine_pids(procs: Sequence[discovery.ProcessInfo], proc_root: str) -> list[int]:
    """The fake's CUDA processes: every process of the pod's engine, its init excluded."""
    del proc_root
    if not procs:
        return []
    try:
        root = discovery.engine_root(procs)
    except (LookupError, ValueError):
        return []
    return [p.pid for p in root.processes]
