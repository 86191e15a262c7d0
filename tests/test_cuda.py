"""Level 3 (CudaSuspend): hibernate.agent.cuda and the cuda-checkpoint stand-in.

On CPU, a fake driver (per-pid states with the driver's transition rules and injectable failures)
tests the all-or-nothing logic, and a fake libcuda made of ctypes callbacks tests the ctypes
binding. The tests marked gpu run a real PyTorch child (tests/gpu_child.py) on a real GPU; they
need only torch, the standard library and `operator/` on PYTHONPATH:

    PYTHONPATH=operator python -m pytest --noconftest -m gpu -s tests/test_cuda.py
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hibernate.agent import cuda, cuda_checkpoint_cli
from hibernate.agent.cuda import CudaCallError, PodCudaError, ProcessState, resume_all, suspend_all
from hibernate.agent.discovery import cuda_pids

RUNNING, LOCKED, CHECKPOINTED, FAILED = (
    ProcessState.RUNNING,
    ProcessState.LOCKED,
    ProcessState.CHECKPOINTED,
    ProcessState.FAILED,
)
# The driver's own rules: what each step needs and leaves.
_TRANSITIONS = {
    "lock": (RUNNING, LOCKED),
    "checkpoint": (LOCKED, CHECKPOINTED),
    "restore": (CHECKPOINTED, LOCKED),
    "unlock": (LOCKED, RUNNING),
}


class FakeDriver:
    """A CheckpointApi over a dict of states, strict about transitions, with injected failures."""

    def __init__(self, states: dict[int, ProcessState]) -> None:
        self.states = dict(states)
        self.calls: list[tuple[str, int]] = []
        self.failures: dict[tuple[str, int], tuple[str, ProcessState | None]] = {}
        self.lock_timeouts: list[int] = []
        self.interrupt: tuple[str, int] | None = None

    def fail(
        self, step: str, pid: int, name: str = "CUDA_ERROR_UNKNOWN", leave: ProcessState | None = None
    ) -> None:
        """Make `step` of `pid` fail with `name`, leaving the pid in `leave` (default: unchanged)."""
        self.failures[(step, pid)] = (name, leave)

    def _do(self, step: str, pid: int) -> None:
        self.calls.append((step, pid))
        if pid not in self.states:
            raise CudaCallError(f"cuCheckpointProcess{step.title()}", pid, 500, "CUDA_ERROR_NOT_FOUND")
        if self.interrupt == (step, pid):
            raise KeyboardInterrupt
        if (step, pid) in self.failures:
            name, leave = self.failures[(step, pid)]
            if leave is not None:
                self.states[pid] = leave
            raise CudaCallError(f"cuCheckpointProcess{step.title()}", pid, 999, name)
        need, result = _TRANSITIONS[step]
        if self.states[pid] is not need:
            raise CudaCallError(f"cuCheckpointProcess{step.title()}", pid, 401, "CUDA_ERROR_ILLEGAL_STATE")
        self.states[pid] = result

    def get_state(self, pid: int) -> ProcessState:
        if pid not in self.states:
            raise CudaCallError("cuCheckpointProcessGetState", pid, 500, "CUDA_ERROR_NOT_FOUND")
        return self.states[pid]

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        self.lock_timeouts.append(timeout_ms)
        self._do("lock", pid)

    def checkpoint(self, pid: int) -> None:
        self._do("checkpoint", pid)

    def restore(self, pid: int) -> None:
        self._do("restore", pid)

    def unlock(self, pid: int) -> None:
        self._do("unlock", pid)

    def restore_thread_id(self, pid: int) -> int:
        self.get_state(pid)
        return pid + 1


# ---- suspend_all / resume_all --------------------------------------------------------------


def test_suspend_locks_all_then_checkpoints_all() -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING, 3: RUNNING})
    report = suspend_all([1, 2, 3, 2], lock_timeout_s=2.5, api=fake)
    assert fake.calls == [
        ("lock", 1),
        ("lock", 2),
        ("lock", 3),
        ("checkpoint", 1),
        ("checkpoint", 2),
        ("checkpoint", 3),
    ]
    assert fake.lock_timeouts == [2500, 2500, 2500]
    assert fake.states == {1: CHECKPOINTED, 2: CHECKPOINTED, 3: CHECKPOINTED}
    assert report.action == "suspend" and report.changed
    assert [t.pid for t in report.timings] == [1, 2, 3]
    assert all(t.lock_s is not None and t.checkpoint_s is not None for t in report.timings)
    assert all(t.state_before is RUNNING and t.state_after is CHECKPOINTED for t in report.timings)
    assert "pid 1: running -> checkpointed: lock" in report.describe()


def test_lock_failure_of_second_pid_unlocks_the_first() -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING})
    fake.fail("lock", 2, "CUDA_ERROR_TIMEOUT")
    with pytest.raises(PodCudaError) as caught:
        suspend_all([1, 2], api=fake)
    err = caught.value
    assert fake.calls == [("lock", 1), ("lock", 2), ("unlock", 1)]  # nothing was checkpointed
    assert fake.states == {1: RUNNING, 2: RUNNING}
    assert err.rolled_back and err.step == "lock" and err.pid == 2
    assert "CUDA_ERROR_TIMEOUT" in str(err) and "rolled back" in str(err)
    assert isinstance(err.__cause__, CudaCallError)


@pytest.mark.parametrize("parallel", [False, True])
def test_checkpoint_failure_of_second_pid_restores_the_first_and_unlocks_all(parallel: bool) -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING})
    fake.fail("checkpoint", 2, "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(PodCudaError) as caught:
        suspend_all([1, 2], api=fake, parallel=parallel)
    assert fake.states == {1: RUNNING, 2: RUNNING}
    assert caught.value.rolled_back and caught.value.step == "checkpoint"
    rollback = fake.calls[4:]
    # Every restore before any unlock: no process runs while a peer is still checkpointed.
    assert rollback == [("restore", 1), ("unlock", 1), ("unlock", 2)]
    assert caught.value.states == {1: RUNNING, 2: RUNNING}


def test_incomplete_rollback_is_reported() -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING})
    fake.fail("checkpoint", 2, "CUDA_ERROR_OUT_OF_MEMORY")
    fake.fail("restore", 1, "CUDA_ERROR_UNKNOWN", leave=FAILED)
    with pytest.raises(PodCudaError) as caught:
        suspend_all([1, 2], api=fake)
    err = caught.value
    assert not err.rolled_back
    assert "ROLLBACK INCOMPLETE" in str(err) and "restore of pid 1" in str(err)
    assert err.states == {1: FAILED, 2: RUNNING}  # the rollback still unlocked pid 2


def test_suspend_and_resume_are_idempotent() -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING})
    suspend_all([1, 2], api=fake)
    fake.calls.clear()
    again = suspend_all([1, 2], api=fake)
    assert fake.calls == [] and not again.changed
    assert all(t.lock_s is None and t.checkpoint_s is None for t in again.timings)

    report = resume_all([1, 2], api=fake)
    assert fake.calls == [("restore", 1), ("restore", 2), ("unlock", 1), ("unlock", 2)]
    assert fake.states == {1: RUNNING, 2: RUNNING} and report.changed
    assert all(t.restore_s is not None and t.unlock_s is not None for t in report.timings)
    fake.calls.clear()
    assert not resume_all([1, 2], api=fake).changed and fake.calls == []


def test_restart_after_a_crash_reads_the_states() -> None:
    # The agent died mid-suspend: 1 checkpointed, 2 locked, 3 untouched.
    fake = FakeDriver({1: CHECKPOINTED, 2: LOCKED, 3: RUNNING})
    report = suspend_all([1, 2, 3], api=fake)
    assert fake.calls == [("lock", 3), ("checkpoint", 2), ("checkpoint", 3)]
    assert [t.state_before for t in report.timings] == [CHECKPOINTED, LOCKED, RUNNING]

    # The agent died mid-resume: 1 restored but locked, 2 still checkpointed, 3 running.
    fake = FakeDriver({1: LOCKED, 2: CHECKPOINTED, 3: RUNNING})
    resume_all([1, 2, 3], api=fake)
    assert fake.calls == [("restore", 2), ("unlock", 1), ("unlock", 2)]
    assert set(fake.states.values()) == {RUNNING}


def test_a_retried_suspend_after_a_crash_rolls_back_everything_on_failure() -> None:
    fake = FakeDriver({1: CHECKPOINTED, 2: RUNNING})
    fake.fail("lock", 2, "CUDA_ERROR_TIMEOUT")
    with pytest.raises(PodCudaError) as caught:
        suspend_all([1, 2], api=fake)
    assert caught.value.rolled_back and fake.states == {1: RUNNING, 2: RUNNING}


def test_resume_failure_unlocks_nothing_and_a_retry_finishes() -> None:
    fake = FakeDriver({1: CHECKPOINTED, 2: CHECKPOINTED})
    fake.fail("restore", 2, "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(PodCudaError) as caught:
        resume_all([1, 2], api=fake)
    assert caught.value.step == "restore" and caught.value.pid == 2
    assert fake.states == {1: LOCKED, 2: CHECKPOINTED}
    assert ("unlock", 1) not in fake.calls
    assert "pid 1 locked, pid 2 checkpointed" in str(caught.value)

    del fake.failures[("restore", 2)]
    fake.calls.clear()
    resume_all([1, 2], api=fake)
    assert fake.calls == [("restore", 2), ("unlock", 1), ("unlock", 2)]


@pytest.mark.parametrize("operation", [suspend_all, resume_all])
def test_failed_or_busy_processes_are_refused_before_anything_changes(operation: object) -> None:
    fake = FakeDriver({1: RUNNING, 2: FAILED, 3: CHECKPOINTED})
    with pytest.raises(PodCudaError, match="refused, nothing changed: pid 2 failed"):
        operation([1, 2, 3], api=fake)  # type: ignore[operator]
    fake = FakeDriver({1: RUNNING, 2: ProcessState.RESTORING})
    with pytest.raises(PodCudaError, match="pid 2 restoring"):
        operation([1, 2], api=fake)  # type: ignore[operator]
    assert fake.calls == []


def test_unreadable_state_changes_nothing() -> None:
    fake = FakeDriver({1: RUNNING})
    with pytest.raises(PodCudaError, match=r"cannot read the CUDA state of pid 2.*CUDA_ERROR_NOT_FOUND"):
        suspend_all([1, 2], api=fake)
    assert fake.calls == [] and fake.states == {1: RUNNING}


def test_interrupt_still_rolls_back() -> None:
    fake = FakeDriver({1: RUNNING, 2: RUNNING})
    fake.interrupt = ("checkpoint", 2)
    with pytest.raises(KeyboardInterrupt):
        suspend_all([1, 2], api=fake)
    assert fake.states == {1: RUNNING, 2: RUNNING}


def test_empty_pod_and_no_timeout() -> None:
    fake = FakeDriver({1: RUNNING})
    assert suspend_all([], api=fake).timings == ()
    suspend_all([1], lock_timeout_s=0, api=fake)
    assert fake.lock_timeouts == [0]


# ---- loading the driver ----------------------------------------------------------------------


def test_no_driver_library_is_a_clear_error() -> None:
    with pytest.raises(
        cuda.CudaUnavailable, match=r"no NVIDIA driver library: cannot load libcuda-nope\.so\.1"
    ):
        cuda.load_api("libcuda-nope.so.1")


def _libc() -> str:
    return ctypes.util.find_library("c") or "libc.so.6"


def test_driver_without_checkpoint_api_and_no_binary() -> None:
    # libc loads like a driver library would, but has no cuCheckpoint* symbols (driver < 570).
    with pytest.raises(cuda.CudaUnavailable) as caught:
        cuda.load_api(_libc(), cli="cuda-checkpoint-not-installed")
    assert "570" in str(caught.value) and "cuCheckpointProcessLock" in str(caught.value)
    assert "no `cuda-checkpoint-not-installed` binary on PATH" in str(caught.value)


FAKE_BINARY = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
case "$*" in
  *--get-state*) echo checkpointed ;;
  *--get-restore-tid*) echo 4321 ;;
  *"--action lock"*) echo "lock failed: CUDA_ERROR_TIMEOUT" >&2; exit 1 ;;
esac
"""


def test_old_driver_falls_back_to_the_cuda_checkpoint_binary(tmp_path: Path) -> None:
    binary = tmp_path / "fake-cuda-checkpoint"
    binary.write_text(FAKE_BINARY)
    binary.chmod(0o755)
    api = cuda.load_api(_libc(), cli=str(binary))
    assert isinstance(api, cuda.CliApi)
    assert api.get_state(7) is CHECKPOINTED
    assert api.restore_thread_id(7) == 4321
    api.restore(7)
    with pytest.raises(CudaCallError, match="CUDA_ERROR_TIMEOUT") as caught:
        api.lock(7, 3000)
    assert caught.value.pid == 7
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        "--get-state --pid 7",
        "--get-restore-tid --pid 7",
        "--action restore --pid 7",
        "--action lock --pid 7 --timeout 3000",
    ]
    with pytest.raises(cuda.CudaUnavailable):  # the stand-in must never run a binary (itself)
        cuda.load_api(_libc(), cli=str(binary), allow_cli=False)


# ---- the ctypes binding, against a fake libcuda made of callbacks ------------------------------

_NAMES = {909: b"CUDA_ERROR_TIMEOUT", 3: b"CUDA_ERROR_NOT_INITIALIZED", 2: b"CUDA_ERROR_OUT_OF_MEMORY"}
_INT_P = ctypes.POINTER(ctypes.c_int)
_STR_P = ctypes.POINTER(ctypes.c_char_p)


class FakeLibcuda:
    """Attributes named like libcuda's symbols; ctypes marshals real pointers into Python."""

    def __init__(self) -> None:
        self.states = {10: 0}
        self.initialised = False
        self.init_calls = 0
        self.lock_timeouts: list[int] = []
        self.lock_result = 0
        self.cuInit = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint)(self._init)
        self.cuGetErrorName = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _STR_P)(self._name)
        self.cuGetErrorString = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _STR_P)(self._string)
        self.cuCheckpointProcessGetState = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _INT_P)(
            self._get_state
        )
        self.cuCheckpointProcessLock = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(cuda._LockArgs)
        )(self._lock)
        step = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
        self.cuCheckpointProcessCheckpoint = step(lambda pid, args: self._move(pid, 1, 2))
        self.cuCheckpointProcessRestore = step(lambda pid, args: self._move(pid, 2, 1))
        self.cuCheckpointProcessUnlock = step(lambda pid, args: self._move(pid, 1, 0))
        self.cuCheckpointProcessGetRestoreThreadId = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _INT_P)(
            self._tid
        )

    def _init(self, flags: int) -> int:
        self.init_calls += 1
        return 100 if flags else 0  # CUDA_ERROR_NO_DEVICE for anything but 0

    def _name(self, code: int, out: ctypes._Pointer[ctypes.c_char_p]) -> int:
        if code not in _NAMES:
            return 1
        out[0] = _NAMES[code]
        return 0

    def _string(self, code: int, out: ctypes._Pointer[ctypes.c_char_p]) -> int:
        out[0] = b"fake driver says so"
        return 0

    def _get_state(self, pid: int, out: ctypes._Pointer[ctypes.c_int]) -> int:
        if not self.initialised:
            self.initialised = True  # first call: "not initialised", then fine after cuInit
            return 3
        out[0] = self.states[pid]
        return 0

    def _lock(self, pid: int, args: ctypes._Pointer[cuda._LockArgs]) -> int:
        self.lock_timeouts.append(args.contents.timeoutMs)
        assert args.contents.reserved0 == 0 and list(args.contents.reserved1) == [0] * 7
        if self.lock_result:
            return self.lock_result
        return self._move(pid, 0, 1)

    def _move(self, pid: int, need: int, result: int) -> int:
        if self.states.get(pid) != need:
            return 401
        self.states[pid] = result
        return 0

    def _tid(self, pid: int, out: ctypes._Pointer[ctypes.c_int]) -> int:
        out[0] = pid + 5
        return 0


def test_driver_binding_through_ctypes() -> None:
    lib = FakeLibcuda()
    api = cuda.DriverApi(lib, "fake")  # type: ignore[arg-type]
    assert lib.init_calls == 1 and api.init_result == 0
    assert api.get_state(10) is RUNNING  # retried once after NOT_INITIALIZED
    assert lib.init_calls == 2
    report = suspend_all([10], lock_timeout_s=1.5, api=api)
    assert lib.lock_timeouts == [1500] and api.get_state(10) is CHECKPOINTED
    assert api.restore_thread_id(10) == 15
    resume_all([10], api=api)
    assert api.get_state(10) is RUNNING and report.changed

    lib.lock_result = 909
    with pytest.raises(CudaCallError) as caught:
        api.lock(10, 50)
    assert caught.value.name == "CUDA_ERROR_TIMEOUT" and caught.value.code == 909
    assert (
        str(caught.value)
        == "cuCheckpointProcessLock(pid 10) failed: CUDA_ERROR_TIMEOUT (fake driver says so)"
    )
    lib.lock_result = 0
    with pytest.raises(
        CudaCallError, match="CUDA_ERROR_ILLEGAL_STATE"
    ):  # unnamed by the fake: fallback table
        api.unlock(10)


class FakeLibcuda580(FakeLibcuda):
    """FakeLibcuda whose restore reads its arguments as a driver 580 does: GPU pairs, reserved zero."""

    def __init__(self, cuda_version: int = 13000) -> None:
        super().__init__()
        self.cuda_version = cuda_version
        self.restores: list[list[tuple[bytes, bytes]] | None] = []
        self.cuDriverGetVersion = ctypes.CFUNCTYPE(ctypes.c_int, _INT_P)(self._version)
        self.cuCheckpointProcessRestore = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(
            self._restore
        )

    def _version(self, out: ctypes._Pointer[ctypes.c_int]) -> int:
        out[0] = self.cuda_version
        return 0

    def _restore(self, pid: int, address: int | None) -> int:
        if address is None:
            self.restores.append(None)
        else:
            args = ctypes.cast(address, ctypes.POINTER(cuda._RestoreArgs)).contents
            assert bytes(args.reserved) == bytes(44) and args.reserved1 == 0
            self.restores.append(
                [
                    (bytes(args.gpuPairs[i].oldUuid), bytes(args.gpuPairs[i].newUuid))
                    for i in range(args.gpuPairsCount)
                ]
            )
        return self._move(pid, 2, 1)


OLD_GPU = "GPU-8c1e2f3a-1111-2222-3333-444455556666"
NEW_GPU = "GPU-0d9e8f7a-aaaa-bbbb-cccc-ddddeeeeffff"


def test_a_resume_onto_other_gpus_hands_the_driver_its_pairs() -> None:
    lib = FakeLibcuda580()
    api = cuda.DriverApi(lib, "fake")  # type: ignore[arg-type]
    suspend_all([10], api=api)
    resume_all([10], api=api, gpu_pairs=[(OLD_GPU, NEW_GPU)])
    assert lib.restores == [[(cuda.gpu_uuid_bytes(OLD_GPU), cuda.gpu_uuid_bytes(NEW_GPU))]]
    assert api.get_state(10) is RUNNING
    suspend_all([10], api=api)
    resume_all([10], api=api)  # the same GPUs: no arguments, as before
    assert lib.restores[-1] is None


def test_a_driver_older_than_580_is_not_asked_to_remap_and_says_why() -> None:
    lib = FakeLibcuda580(cuda_version=12080)  # driver 570
    api = cuda.DriverApi(lib, "fake")  # type: ignore[arg-type]
    suspend_all([10], api=api)
    with pytest.raises(
        PodCudaError, match=r"needs driver 580 or newer \(CUDA 13.0\); this driver is CUDA 12.8"
    ):
        resume_all([10], api=api, gpu_pairs=[(OLD_GPU, NEW_GPU)])
    assert lib.restores == [] and api.get_state(10) is CHECKPOINTED, "nothing was done"


def test_an_api_that_cannot_remap_is_refused_before_anything_is_done() -> None:
    fake = FakeDriver({1: CHECKPOINTED})  # as the cuda-checkpoint binary: no restore_remapped
    with pytest.raises(PodCudaError, match="cannot restore a process onto other GPUs"):
        resume_all([1], api=fake, gpu_pairs=[(OLD_GPU, NEW_GPU)])
    assert fake.calls == [] and fake.states == {1: CHECKPOINTED}


def test_process_state_codes() -> None:
    assert [ProcessState.from_code(c) for c in range(6)] == list(ProcessState)
    assert ProcessState.from_text("checkpointed\n") is CHECKPOINTED
    with pytest.raises(cuda.CudaError):
        ProcessState.from_code(42)


# ---- the cuda-checkpoint stand-in ---------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], fake: FakeDriver, *argv: str) -> tuple[int, str, str]:
    code = cuda_checkpoint_cli.main(list(argv), api=fake)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_help_mentions_action(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, FakeDriver({}), "-h")
    assert code == 0 and "--action" in out and "--get-restore-tid" in out and "--toggle" in out


def test_cli_queries_and_actions(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDriver({7: RUNNING})
    assert run_cli(capsys, fake, "--get-state", "--pid", "7") == (0, "running\n", "")
    assert run_cli(capsys, fake, "--get-restore-tid", "--pid", "7") == (0, "8\n", "")
    assert run_cli(capsys, fake, "--action", "lock", "--pid", "7", "--timeout", "10000")[0] == 0
    assert fake.lock_timeouts == [10000]
    assert run_cli(capsys, fake, "--action", "checkpoint", "-p", "7")[0] == 0
    assert run_cli(capsys, fake, "--get-state", "--pid", "7")[1] == "checkpointed\n"
    assert run_cli(capsys, fake, "--action", "restore", "--pid", "7")[0] == 0
    assert run_cli(capsys, fake, "--action", "unlock", "--pid", "7")[0] == 0
    assert fake.calls == [("lock", 7), ("checkpoint", 7), ("restore", 7), ("unlock", 7)]


def test_cli_toggle(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDriver({7: RUNNING})
    assert run_cli(capsys, fake, "--toggle", "--pid", "7", "--timeout", "500") == (0, "", "")
    assert fake.states[7] is CHECKPOINTED and fake.lock_timeouts == [500]
    assert run_cli(capsys, fake, "--toggle", "--pid", "7")[0] == 0
    assert fake.states[7] is RUNNING
    fake.states[7] = LOCKED
    code, _, err = run_cli(capsys, fake, "--toggle", "--pid", "7")
    assert code == 1 and "pid 7 is locked" in err


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDriver({7: RUNNING})
    code, out, err = run_cli(capsys, fake, "--action", "checkpoint", "--pid", "7")
    assert (code, out) == (1, "") and "CUDA_ERROR_ILLEGAL_STATE" in err  # checkpoint needs a lock
    assert run_cli(capsys, fake, "--get-state", "--pid", "8")[2].startswith("cuda-checkpoint: ")
    assert run_cli(capsys, fake, "--get-state")[0] == 2  # no pid
    assert run_cli(capsys, fake, "--pid", "7")[0] == 2  # no mode
    assert run_cli(capsys, fake, "--get-state", "--action", "lock", "--pid", "7")[0] == 2
    assert run_cli(capsys, fake, "--action", "freeze", "--pid", "7")[0] == 2
    assert run_cli(capsys, fake, "--get-state", "--pid", "0")[0] == 2
    assert fake.calls == [("checkpoint", 7)]


def test_cli_without_driver(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        ctypes.CDLL(cuda.DRIVER_LIBRARY)
    except OSError:
        pass
    else:
        pytest.skip("this machine has a driver library")
    assert cuda_checkpoint_cli.main(["--get-state", "--pid", "1"]) == 1
    assert "no NVIDIA driver library" in capsys.readouterr().err


# ---- on a real GPU ------------------------------------------------------------------------------

GIB = 2**30
CHILD = Path(__file__).with_name("gpu_child.py")
OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"


def _gpu_skip_reason() -> str | None:
    if not Path("/proc/driver/nvidia").exists():
        return "no NVIDIA driver (/proc/driver/nvidia missing)"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    return None


class GpuChild:
    def __init__(self, gib: float, seed: int) -> None:
        self.gib = gib
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--gib", str(gib), "--seed", str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first.startswith("NOCUDA"):
            self.proc.wait()
            pytest.skip(f"CUDA is not available to torch: {first}")
        assert first.startswith("READY "), f"child said {first!r}"
        self.initial = first.split(" ", 1)[1]

    def checksum(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("checksum\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line.startswith("CHECKSUM "), f"child said {line!r}"
        return line.split(" ", 1)[1]

    def stop(self) -> None:
        # A test that failed half way may leave it checkpointed: bring it back, then end it.
        with contextlib.suppress(cuda.CudaError):
            resume_all([self.pid])
        self.proc.kill()
        self.proc.wait(timeout=60)


@pytest.fixture
def gpu_children() -> Iterator[list[GpuChild]]:
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    children: list[GpuChild] = []
    yield children
    for child in children:
        child.stop()


def gpu_memory_used_mib() -> int | None:
    """memory.used of GPU 0 from nvidia-smi, None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[0])


def compute_apps() -> str:
    if shutil.which("nvidia-smi") is None:
        return "(no nvidia-smi)"
    return subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def settle_memory(expected_below: int, limit_s: float = 10.0) -> int | None:
    """nvidia-smi can lag a moment behind a release: poll until below `expected_below` MiB."""
    deadline = time.monotonic() + limit_s
    used = gpu_memory_used_mib()
    while used is not None and used > expected_below and time.monotonic() < deadline:
        time.sleep(0.2)
        used = gpu_memory_used_mib()
    return used


@pytest.mark.gpu
def test_gpu_suspend_resume_frees_memory_and_keeps_data(gpu_children: list[GpuChild]) -> None:
    gib = float(os.environ.get("HIBERNATE_GPU_TEST_GIB", "4"))
    baseline = gpu_memory_used_mib()
    child = GpuChild(gib, seed=1)
    gpu_children.append(child)
    used_awake = gpu_memory_used_mib()
    assert cuda_pids([child.pid]) == [child.pid]

    api = cuda.load_api()
    print(f"\n[gpu] backend {type(api).__name__}, child pid {child.pid}, {gib:g} GiB")
    assert api.get_state(child.pid) is RUNNING
    assert api.restore_thread_id(child.pid) > 0

    suspended = suspend_all([child.pid], api=api)
    assert api.get_state(child.pid) is CHECKPOINTED
    used_asleep = settle_memory((baseline or 0) + 512) if baseline is not None else None
    rss_asleep = rss_gib(child.pid)
    print(f"[gpu] memory.used MiB: baseline {baseline}, awake {used_awake}, checkpointed {used_asleep}")
    print(
        f"[gpu] compute apps while checkpointed: {compute_apps() or '(none)'}; child RSS {rss_asleep:.2f} GiB"
    )
    print("[gpu] " + suspended.describe().replace("\n", "\n[gpu] "))
    if baseline is not None and used_awake is not None and used_asleep is not None:
        assert used_awake - baseline >= gib * 1024 * 0.9  # the child really held the memory
        assert used_asleep <= baseline + 512  # and holds none of it while checkpointed
    assert not suspend_all([child.pid], api=api).changed  # idempotent

    resumed = resume_all([child.pid], api=api)
    print("[gpu] " + resumed.describe().replace("\n", "\n[gpu] "))
    assert api.get_state(child.pid) is RUNNING
    assert child.checksum() == child.initial
    used_after = gpu_memory_used_mib()
    print(f"[gpu] memory.used after resume {used_after} MiB")
    if used_awake is not None and used_after is not None:
        assert abs(used_after - used_awake) <= 512
    (timing,) = suspended.timings
    (back,) = resumed.timings
    print(
        f"[gpu] RESULT {gib:g} GiB: lock {timing.lock_s:.3f}s checkpoint {timing.checkpoint_s:.3f}s "
        f"restore {back.restore_s:.3f}s unlock {back.unlock_s:.3f}s"
    )


@pytest.mark.gpu
def test_gpu_restore_through_an_identity_gpu_pair_keeps_the_data(gpu_children: list[GpuChild]) -> None:
    """The driver's GPU remap (580 and newer), exercised where one GPU is all there is: every GPU of
    the machine paired with itself. It proves the restore arguments' layout on a real driver; a
    restore onto ANOTHER GPU needs a machine with two."""
    from hibernate.agent import gpumap

    api = cuda.load_api()
    if not isinstance(api, cuda.DriverApi) or (api.cuda_version() or 0) < cuda.REMAP_MIN_CUDA_VERSION:
        pytest.skip("the GPU remap needs the driver API of driver 580 or newer (CUDA 13.0)")
    gpus = [n.gpu.uuid for n in gpumap.node_gpus()]
    assert gpus, "the driver's /proc files name no GPU"
    child = GpuChild(1.0, seed=3)
    gpu_children.append(child)
    before = child.checksum()
    suspend_all([child.pid], api=api)
    report = resume_all([child.pid], api=api, gpu_pairs=[(uuid, uuid) for uuid in gpus])
    print(f"\n[gpu] restored through the identity pair(s) {gpus}: {report.describe()}")
    assert api.get_state(child.pid) is RUNNING
    assert child.checksum() == before == child.initial


@pytest.mark.gpu
def test_gpu_rollback_restores_a_real_process(gpu_children: list[GpuChild]) -> None:
    first, second = GpuChild(1, seed=2), GpuChild(1, seed=3)
    gpu_children += [first, second]
    real = cuda.load_api()

    class CheckpointOfSecondFails:
        """The real driver, except that checkpointing the second child fails."""

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def checkpoint(self, pid: int) -> None:
            if pid == second.pid:
                raise CudaCallError("cuCheckpointProcessCheckpoint", pid, 2, "CUDA_ERROR_OUT_OF_MEMORY")
            real.checkpoint(pid)

    with pytest.raises(PodCudaError) as caught:
        suspend_all([first.pid, second.pid], api=CheckpointOfSecondFails())  # type: ignore[arg-type]
    print("\n[gpu] " + str(caught.value))
    assert caught.value.rolled_back
    assert real.get_state(first.pid) is RUNNING and real.get_state(second.pid) is RUNNING
    (t1, _t2) = caught.value.timings
    assert t1.checkpoint_s is not None and t1.restore_s is not None  # it really went down and up
    assert first.checksum() == first.initial and second.checksum() == second.initial


@pytest.mark.gpu
def test_gpu_cli_stand_in_toggles(gpu_children: list[GpuChild]) -> None:
    child = GpuChild(1, seed=4)
    gpu_children.append(child)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(OPERATOR_DIR), os.environ.get("PYTHONPATH")])),
    }

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "hibernate.agent.cuda_checkpoint_cli", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    pid = str(child.pid)
    assert "--action" in cli("-h")
    assert cli("--get-state", "--pid", pid) == "running\n"
    assert int(cli("--get-restore-tid", "--pid", pid)) > 0
    start = time.monotonic()
    cli("--toggle", "--pid", pid, "--timeout", "10000")
    toggled = time.monotonic() - start
    assert cli("--get-state", "--pid", pid) == "checkpointed\n"
    cli("--action", "restore", "--pid", pid)
    assert cli("--get-state", "--pid", pid) == "locked\n"
    cli("--action", "unlock", "--pid", pid)
    assert cli("--get-state", "--pid", pid) == "running\n"
    assert child.checksum() == child.initial
    print(f"\n[gpu] cuda-checkpoint stand-in: --toggle of 1 GiB took {toggled:.2f}s (with interpreter start)")
