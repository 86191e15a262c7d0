"""Level 3 (CudaSuspend): the CUDA driver's checkpoint API, per process and per pod.

The agent calls the driver itself (ctypes on libcuda.so.1) from its own root process with the
target's host pid: lock stops new CUDA calls, checkpoint moves the device memory to host RAM and
releases the context, restore and unlock undo both (notes/checkpointing.md, "GPU (a)"). The API
needs driver 570+; an older driver falls back to NVIDIA's `cuda-checkpoint` binary on PATH.

A checkpoint is restored onto the GPUs it was taken on, or (driver 580 / CUDA 13.0 and newer) onto
others of the same chip, given as pairs of GPU UUIDs: a snapshot restored into a pod with other
GPUs (agent/gpumap.py says which pairs).

A pod may run several CUDA processes (vLLM's API server and engine core, one per GPU with tensor
parallelism). `suspend_all` locks every one of them before it checkpoints any, so no process is
checkpointed while a peer still runs and waits on it, and undoes everything on a failure, so a
pod is never left half suspended. Both pod-level operations read each process's state first, so
they can be repeated, e.g. after the agent restarted mid-way: the driver's state is the truth.

Only the standard library is imported: this module also runs where only torch is installed
(the GPU tests) and in the `cuda-checkpoint` stand-in that CRIU's cuda_plugin executes.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Literal, Protocol, runtime_checkable

DRIVER_LIBRARY: Final = "libcuda.so.1"
CLI_NAME: Final = "cuda-checkpoint"
# CRIU's default lock timeout (its --timeout, 10 s): a process inside a long kernel launch or a
# NCCL collective cannot be locked, and waiting forever would hang the agent.
DEFAULT_LOCK_TIMEOUT_S: Final = 10.0

CUDA_SUCCESS: Final = 0
CUDA_ERROR_NOT_INITIALIZED: Final = 3
# Names for when the driver cannot name a code itself (cuGetErrorName failed or no driver).
_FALLBACK_ERROR_NAMES: Final = {
    1: "CUDA_ERROR_INVALID_VALUE",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    909: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}
_CHECKPOINT_SYMBOLS: Final = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetRestoreThreadId",
)


class ProcessState(enum.Enum):
    """CUprocessState; the values are the words `cuda-checkpoint --get-state` prints."""

    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    # Newer drivers report these while another caller's checkpoint or restore is in progress.
    CHECKPOINTING = "checkpointing"
    RESTORING = "restoring"

    @classmethod
    def from_code(cls, code: int) -> ProcessState:
        try:
            return _STATE_BY_CODE[code]
        except KeyError:
            raise CudaError(f"the driver reported an unknown CUprocessState {code}") from None

    @classmethod
    def from_text(cls, text: str) -> ProcessState:
        word = text.strip().split()[0].lower() if text.strip() else ""
        try:
            return cls(word)
        except ValueError:
            raise CudaError(f"unknown CUDA process state {text.strip()!r}") from None


_STATE_BY_CODE: Final = {
    0: ProcessState.RUNNING,
    1: ProcessState.LOCKED,
    2: ProcessState.CHECKPOINTED,
    3: ProcessState.FAILED,
    4: ProcessState.CHECKPOINTING,
    5: ProcessState.RESTORING,
}
# States from which a pod-level operation cannot start: broken, or someone else is at work.
_UNUSABLE: Final = frozenset({ProcessState.FAILED, ProcessState.CHECKPOINTING, ProcessState.RESTORING})


class CudaError(RuntimeError):
    """Any failure of the CUDA checkpoint layer."""


class CudaUnavailable(CudaError):
    """No driver library, or neither the driver API nor the `cuda-checkpoint` binary."""


class _NoCheckpointApi(CudaUnavailable):
    """The driver library loads but has no cuCheckpoint* symbols (driver < 570)."""


class CudaCallError(CudaError):
    """One driver call (or one `cuda-checkpoint` run) failed for one pid."""

    def __init__(self, call: str, pid: int, code: int | None, name: str, detail: str = "") -> None:
        self.call = call
        self.pid = pid
        self.code = code
        self.name = name
        self.detail = detail
        text = f"{call}(pid {pid}) failed: {name}"
        super().__init__(f"{text} ({detail})" if detail else text)


# (UUID of a checkpointed GPU, UUID of the GPU to restore it onto), "GPU-…" as nvidia-smi prints them.
GpuPairs = Sequence[tuple[str, str]]
# cuDriverGetVersion of the first driver whose restore takes GPU pairs: 580, CUDA 13.0.
REMAP_MIN_CUDA_VERSION: Final = 13000


class CheckpointApi(Protocol):
    """Per-process checkpoint calls; DriverApi and CliApi implement it, tests inject fakes."""

    def get_state(self, pid: int) -> ProcessState: ...

    def lock(self, pid: int, timeout_ms: int = 0) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int) -> None: ...

    def unlock(self, pid: int) -> None: ...

    def restore_thread_id(self, pid: int) -> int: ...


@runtime_checkable
class RemappingApi(CheckpointApi, Protocol):
    """A CheckpointApi whose restore can put a process's GPUs onto others (DriverApi; not the CLI)."""

    def restore_remapped(self, pid: int, pairs: GpuPairs) -> None: ...


class _LockArgs(ctypes.Structure):
    # CUcheckpointLockArgs from cuda.h: 64 bytes, reserved fields must be zero.
    _fields_ = (
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    )


class _GpuPair(ctypes.Structure):
    # CUcheckpointGpuPair from cuda.h (CUDA 13.0): two CUuuid, 16 bytes each.
    _fields_ = (
        ("oldUuid", ctypes.c_ubyte * 16),
        ("newUuid", ctypes.c_ubyte * 16),
    )


class _RestoreArgs(ctypes.Structure):
    # CUcheckpointRestoreArgs from cuda.h: 64 bytes on 64-bit Linux. The pairs' pointer at 0 and
    # their count at 8 are the same in every header that has them (CUDA 13.0: 44 reserved bytes and
    # a reserved 64-bit word after them; later headers name a custom-storage pointer at 16, which
    # NULL leaves unused); everything after the count must be zero.
    _fields_ = (
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_ubyte * 44),
        ("reserved1", ctypes.c_uint64),
    )


_GPU_UUID: Final = re.compile(r"^GPU-[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


def gpu_uuid_bytes(text: str) -> bytes:
    """The 16 bytes of a CUuuid from "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (ValueError otherwise)."""
    if not isinstance(text, str) or not _GPU_UUID.match(text):
        raise ValueError(f"not a GPU UUID: {text!r}")
    return bytes.fromhex(text[4:].replace("-", ""))


def restore_args(pairs: GpuPairs) -> tuple[_RestoreArgs, ctypes.Array[_GpuPair]]:
    """The restore arguments that map each checkpointed GPU onto its pair, and the pairs' array,
    which must outlive the call. ValueError for a UUID that is not one."""
    array = (_GpuPair * len(pairs))()
    for slot, (old, new) in zip(array, pairs, strict=True):
        slot.oldUuid[:] = list(gpu_uuid_bytes(old))
        slot.newUuid[:] = list(gpu_uuid_bytes(new))
    args = _RestoreArgs()
    args.gpuPairs = ctypes.cast(array, ctypes.POINTER(_GpuPair))
    args.gpuPairsCount = len(pairs)
    return args, array


class DriverApi:
    """The driver's cuCheckpointProcess* calls through ctypes."""

    def __init__(self, library: ctypes.CDLL, path: str = DRIVER_LIBRARY) -> None:
        self.path = path
        self._lib = library
        missing = [s for s in _CHECKPOINT_SYMBOLS if not hasattr(library, s)]
        if missing:
            raise _NoCheckpointApi(
                f"the NVIDIA driver ({_driver_description(library)}) has no CUDA checkpoint API "
                f"(missing {', '.join(missing)}); it needs driver 570 or newer (CUDA 12.8)"
            )
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self._init_fn = _bind(library, "cuInit", ctypes.c_uint)
        self._error_name_fn = _bind(library, "cuGetErrorName", c_int, ctypes.POINTER(ctypes.c_char_p))
        self._error_string_fn = _bind(library, "cuGetErrorString", c_int, ctypes.POINTER(ctypes.c_char_p))
        self._get_state_fn = _bind(library, "cuCheckpointProcessGetState", c_int, ctypes.POINTER(c_int))
        self._lock_fn = _bind(library, "cuCheckpointProcessLock", c_int, ctypes.POINTER(_LockArgs))
        self._checkpoint_fn = _bind(library, "cuCheckpointProcessCheckpoint", c_int, c_void_p)
        self._restore_fn = _bind(library, "cuCheckpointProcessRestore", c_int, c_void_p)
        self._unlock_fn = _bind(library, "cuCheckpointProcessUnlock", c_int, c_void_p)
        self._tid_fn = _bind(library, "cuCheckpointProcessGetRestoreThreadId", c_int, ctypes.POINTER(c_int))
        self._init_lock = threading.Lock()
        self.init_result = CUDA_SUCCESS
        self._initialize()

    @classmethod
    def open(cls, path: str = DRIVER_LIBRARY) -> DriverApi:
        try:
            library = ctypes.CDLL(path)
        except OSError as exc:
            raise CudaUnavailable(
                f"no NVIDIA driver library: cannot load {path} ({exc}). The agent needs the host's "
                "driver library (privileged pod with the NVIDIA container runtime, or a hostPath mount "
                "of the driver's lib directory)"
            ) from exc
        return cls(library, path)

    def _initialize(self) -> None:
        # cuInit(0) once per process. The checkpoint calls act on other processes, so a cuInit
        # failure (no device visible to the agent, say) is kept for the error messages rather than
        # raised: the calls themselves say whether they can work.
        with self._init_lock:
            self.init_result = int(self._init_fn(0))

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self._error_name_fn(code, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return name.value.decode("ascii", "replace")
        return error_name_fallback(code)

    def _error_text(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self._error_string_fn(code, ctypes.byref(text)) == CUDA_SUCCESS and text.value:
            return text.value.decode("utf-8", "replace")
        return ""

    def _call(self, call: str, pid: int, fn: Callable[[], int]) -> None:
        code = int(fn())
        if code == CUDA_ERROR_NOT_INITIALIZED:
            # A driver that answers "not initialised" (a cuInit that failed or raced): init, retry once.
            self._initialize()
            code = int(fn())
        if code != CUDA_SUCCESS:
            detail = self._error_text(code)
            if self.init_result != CUDA_SUCCESS:
                detail += f"; cuInit(0) returned {self.error_name(self.init_result)}"
            raise CudaCallError(call, pid, code, self.error_name(code), detail.lstrip("; "))

    def get_state(self, pid: int) -> ProcessState:
        state = ctypes.c_int(-1)
        self._call("cuCheckpointProcessGetState", pid, lambda: self._get_state_fn(pid, ctypes.byref(state)))
        return ProcessState.from_code(state.value)

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        args = _LockArgs()
        args.timeoutMs = max(0, int(timeout_ms))
        self._call("cuCheckpointProcessLock", pid, lambda: self._lock_fn(pid, ctypes.byref(args)))

    def checkpoint(self, pid: int) -> None:
        # NULL args: the optional CUcheckpointCheckpointArgs holds only reserved fields.
        self._call("cuCheckpointProcessCheckpoint", pid, lambda: self._checkpoint_fn(pid, None))

    def restore(self, pid: int) -> None:
        # NULL args: restore onto the GPUs it was checkpointed on.
        self._call("cuCheckpointProcessRestore", pid, lambda: self._restore_fn(pid, None))

    def restore_remapped(self, pid: int, pairs: GpuPairs) -> None:
        """Restores onto other GPUs: each checkpointed GPU's UUID paired with the one to restore onto.
        Refused (CudaCallError, nothing done) by a driver older than 580, whose restore cannot."""
        if not pairs:
            self.restore(pid)
            return
        version = self.cuda_version()
        if version is not None and version < REMAP_MIN_CUDA_VERSION:
            raise CudaCallError(
                "cuCheckpointProcessRestore",
                pid,
                None,
                "GPU remap not supported",
                f"restoring onto other GPUs needs driver 580 or newer (CUDA 13.0); this driver is "
                f"CUDA {version // 1000}.{version % 1000 // 10}",
            )
        try:
            args, array = restore_args(pairs)
        except ValueError as e:
            raise CudaCallError("cuCheckpointProcessRestore", pid, None, "bad GPU pair", str(e)) from e
        address = ctypes.addressof(args)
        self._call("cuCheckpointProcessRestore", pid, lambda: self._restore_fn(pid, address))
        del array  # kept alive through the call

    def cuda_version(self) -> int | None:
        """cuDriverGetVersion (12080 for CUDA 12.8, driver 570; 13000 for driver 580); None unknown."""
        fn = getattr(self._lib, "cuDriverGetVersion", None)
        version = ctypes.c_int(0)
        if fn is None or fn(ctypes.byref(version)) != CUDA_SUCCESS:
            return None
        return int(version.value)

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", pid, lambda: self._unlock_fn(pid, None))

    def restore_thread_id(self, pid: int) -> int:
        tid = ctypes.c_int(0)
        self._call("cuCheckpointProcessGetRestoreThreadId", pid, lambda: self._tid_fn(pid, ctypes.byref(tid)))
        return tid.value


class CliApi:
    """NVIDIA's `cuda-checkpoint` binary, for drivers older than the public API (550-565)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _run(self, call: str, pid: int, args: Sequence[str], timeout_s: float | None = None) -> str:
        argv = [self.binary, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CudaCallError(
                call, pid, None, "timeout", f"{' '.join(argv)} ran over {timeout_s} s"
            ) from exc
        except OSError as exc:
            raise CudaCallError(call, pid, None, "exec failed", f"{' '.join(argv)}: {exc}") from exc
        if done.returncode != 0:
            output = (done.stderr.strip() + " " + done.stdout.strip()).strip()
            found = re.search(r"CUDA_ERROR_[A-Z_]+", output)
            name = found.group(0) if found else f"exit status {done.returncode}"
            raise CudaCallError(call, pid, None, name, output)
        return done.stdout

    def get_state(self, pid: int) -> ProcessState:
        return ProcessState.from_text(
            self._run("cuda-checkpoint --get-state", pid, _pid_args("--get-state", pid))
        )

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        args = ["--action", "lock", "--pid", str(pid)]
        if timeout_ms > 0:
            args += ["--timeout", str(int(timeout_ms))]
        # The binary enforces the lock timeout itself; ours only catches a hung binary.
        limit = timeout_ms / 1000 + 60 if timeout_ms > 0 else None
        self._run("cuda-checkpoint --action lock", pid, args, limit)

    def checkpoint(self, pid: int) -> None:
        self._run("cuda-checkpoint --action checkpoint", pid, ["--action", "checkpoint", "--pid", str(pid)])

    def restore(self, pid: int) -> None:
        self._run("cuda-checkpoint --action restore", pid, ["--action", "restore", "--pid", str(pid)])

    def unlock(self, pid: int) -> None:
        self._run("cuda-checkpoint --action unlock", pid, ["--action", "unlock", "--pid", str(pid)])

    def restore_thread_id(self, pid: int) -> int:
        out = self._run("cuda-checkpoint --get-restore-tid", pid, _pid_args("--get-restore-tid", pid))
        found = re.search(r"\d+", out)
        if found is None:
            raise CudaCallError("cuda-checkpoint --get-restore-tid", pid, None, "bad output", out.strip())
        return int(found.group(0))


def _pid_args(flag: str, pid: int) -> list[str]:
    return [flag, "--pid", str(pid)]


def _bind(library: ctypes.CDLL, name: str, *argtypes: type) -> Callable[..., int]:
    fn = getattr(library, name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    call: Callable[..., int] = fn
    return call


def error_name_fallback(code: int) -> str:
    return _FALLBACK_ERROR_NAMES.get(code, f"CUresult {code}")


def _driver_description(library: ctypes.CDLL) -> str:
    """'driver 550.54.14, CUDA 12.4' as far as it can be read; for error messages only."""
    parts = []
    with contextlib.suppress(OSError):
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", fh.read())
        if found:
            parts.append(f"driver {found.group(1)}")
    version = ctypes.c_int(0)
    fn = getattr(library, "cuDriverGetVersion", None)
    if fn is not None and fn(ctypes.byref(version)) == CUDA_SUCCESS:
        parts.append(f"CUDA {version.value // 1000}.{version.value % 1000 // 10}")
    return ", ".join(parts) or "version unknown"


def load_api(library: str = DRIVER_LIBRARY, cli: str = CLI_NAME, *, allow_cli: bool = True) -> CheckpointApi:
    """The driver API, else (driver < 570) the `cuda-checkpoint` binary on PATH, else CudaUnavailable.

    `allow_cli=False` is for the cuda-checkpoint stand-in itself, which must never run itself.
    """
    try:
        return DriverApi.open(library)
    except _NoCheckpointApi as exc:
        binary = shutil.which(cli) if allow_cli else None
        if binary is None:
            hint = f"; no `{cli}` binary on PATH to fall back to" if allow_cli else ""
            raise CudaUnavailable(f"{exc}{hint}") from exc
        return CliApi(binary)


_default_api: CheckpointApi | None = None
_default_lock = threading.Lock()


def default_api() -> CheckpointApi:
    """The process-wide API, loaded on first use (importing this module loads no library)."""
    global _default_api
    with _default_lock:
        if _default_api is None:
            _default_api = load_api()
        return _default_api


# ---- pod level: all or nothing ------------------------------------------------------------


@dataclass
class PidTiming:
    """What happened to one pid; a step that was not needed (already done) stays None."""

    pid: int
    state_before: ProcessState
    state_after: ProcessState | None = None
    lock_s: float | None = None
    checkpoint_s: float | None = None
    restore_s: float | None = None
    unlock_s: float | None = None

    def describe(self) -> str:
        steps = [
            f"{name} {value:.3f}s"
            for name, value in (
                ("lock", self.lock_s),
                ("checkpoint", self.checkpoint_s),
                ("restore", self.restore_s),
                ("unlock", self.unlock_s),
            )
            if value is not None
        ]
        after = self.state_after.value if self.state_after else "?"
        return f"pid {self.pid}: {self.state_before.value} -> {after}: {', '.join(steps) or 'nothing to do'}"


@dataclass(frozen=True)
class PodCudaReport:
    action: Literal["suspend", "resume"]
    timings: tuple[PidTiming, ...]
    seconds: float

    @property
    def changed(self) -> bool:
        return any(t.state_before is not t.state_after for t in self.timings)

    def describe(self) -> str:
        lines = [f"{self.action} of {len(self.timings)} pid(s) in {self.seconds:.3f}s"]
        lines += ["  " + t.describe() for t in self.timings]
        return "\n".join(lines)


class PodCudaError(CudaError):
    """A pod-level suspend or resume failed; `states` is what each pid was left in (None: unknown)."""

    def __init__(
        self,
        action: str,
        message: str,
        *,
        pid: int | None = None,
        step: str | None = None,
        states: dict[int, ProcessState | None] | None = None,
        rollback_errors: Sequence[str] = (),
        timings: Sequence[PidTiming] = (),
    ) -> None:
        self.action = action
        self.pid = pid
        self.step = step
        self.states = dict(states or {})
        self.rollback_errors = list(rollback_errors)
        self.timings = tuple(timings)
        super().__init__(message)

    @property
    def rolled_back(self) -> bool:
        """True when a failed suspend left every pid running again."""
        return not self.rollback_errors and all(s is ProcessState.RUNNING for s in self.states.values())


class _StepFailed(CudaError):
    def __init__(self, pid: int, step: str, cause: CudaError) -> None:
        self.pid = pid
        self.step = step
        self.cause = cause
        super().__init__(str(cause))


_TIMING_FIELD: Final = {
    "lock": "lock_s",
    "checkpoint": "checkpoint_s",
    "restore": "restore_s",
    "unlock": "unlock_s",
}


def _step(api: CheckpointApi, step: str, timeout_ms: int, gpu_pairs: GpuPairs = ()) -> Callable[[int], None]:
    if step == "lock":
        return lambda pid: api.lock(pid, timeout_ms)
    if step == "restore" and gpu_pairs:
        if not isinstance(api, RemappingApi):
            raise CudaError(f"{type(api).__name__} cannot restore a process onto other GPUs")
        return lambda pid: api.restore_remapped(pid, gpu_pairs)
    fn: Callable[[int], None] = getattr(api, step)
    return fn


def _run_step(
    api: CheckpointApi,
    step: str,
    pids: Sequence[int],
    timings: dict[int, PidTiming],
    *,
    parallel: bool,
    timeout_ms: int = 0,
    best_effort: bool = False,
    gpu_pairs: GpuPairs = (),
) -> list[_StepFailed]:
    """Run one step for each pid and time it.

    Strict mode raises _StepFailed for the first failure (sequential: at once; parallel: once
    every call in flight has returned, so the states are settled before a rollback reads them).
    Best-effort mode (rollback) goes on and returns the failures.
    """
    call = _step(api, step, timeout_ms, gpu_pairs)
    field = _TIMING_FIELD[step]

    def one(pid: int) -> _StepFailed | None:
        start = time.monotonic()
        try:
            call(pid)
        except CudaError as exc:
            return _StepFailed(pid, step, exc)
        finally:
            setattr(timings[pid], field, time.monotonic() - start)
        return None

    if parallel and len(pids) > 1:
        with ThreadPoolExecutor(max_workers=len(pids), thread_name_prefix=f"cuda-{step}") as pool:
            results = list(pool.map(one, pids))
    else:
        results = []
        for pid in pids:
            results.append(one(pid))
            if results[-1] is not None and not best_effort:
                break
    failures = [r for r in results if r is not None]
    if failures and not best_effort:
        raise failures[0]
    return failures


def _fault_point(name: str) -> None:
    """hibernate.faults.fault_point, where it exists: the copy of this module that the
    `cuda-checkpoint` stand-in carries into a pod comes without it (stdlib only, see above)."""
    try:
        from hibernate.faults import fault_point
    except ImportError:
        return
    fault_point(name)


def _unique(pids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(int(p) for p in pids))


def _read_states(api: CheckpointApi, pids: Sequence[int], action: str) -> dict[int, PidTiming]:
    timings: dict[int, PidTiming] = {}
    for pid in pids:
        try:
            timings[pid] = PidTiming(pid, api.get_state(pid))
        except CudaError as exc:
            # Nothing has been done yet, so there is nothing to roll back.
            raise PodCudaError(
                action, f"{action}: cannot read the CUDA state of pid {pid}: {exc}", pid=pid
            ) from exc
    unusable = {pid: t.state_before for pid, t in timings.items() if t.state_before in _UNUSABLE}
    if unusable:
        described = ", ".join(f"pid {pid} {state.value}" for pid, state in unusable.items())
        raise PodCudaError(
            action,
            f"{action} refused, nothing changed: {described}",
            pid=next(iter(unusable)),
            states={pid: t.state_before for pid, t in timings.items()},
            timings=tuple(timings.values()),
        )
    return timings


def _states_now(api: CheckpointApi, pids: Sequence[int]) -> dict[int, ProcessState | None]:
    states: dict[int, ProcessState | None] = {}
    for pid in pids:
        try:
            states[pid] = api.get_state(pid)
        except CudaError:
            states[pid] = None
    return states


def _bring_up(
    api: CheckpointApi,
    pids: Sequence[int],
    timings: dict[int, PidTiming],
    *,
    parallel: bool,
    best_effort: bool,
    gpu_pairs: GpuPairs = (),
) -> list[str]:
    """Restore every checkpointed pid, then unlock every locked one (resume, and suspend's rollback).

    All restores come before any unlock, so no process runs while a peer is still checkpointed.
    Best-effort mode returns what failed instead of raising.
    """
    failures: list[_StepFailed] = []
    states: dict[int, ProcessState] = {}
    for pid in pids:
        try:
            states[pid] = api.get_state(pid)
        except CudaError as exc:
            failure = _StepFailed(pid, "get-state", exc)
            if not best_effort:
                raise failure from exc
            failures.append(failure)
    to_restore = [p for p in pids if states.get(p) is ProcessState.CHECKPOINTED]
    failures += _run_step(
        api, "restore", to_restore, timings, parallel=parallel, best_effort=best_effort, gpu_pairs=gpu_pairs
    )
    if not best_effort:  # resume_all, not a rollback
        _fault_point("agent.cuda-after-restore")
    not_restored = {f.pid for f in failures}
    to_unlock = [p for p in pids if p not in not_restored and states.get(p) in _LOCKED_AFTER_RESTORE]
    failures += _run_step(api, "unlock", to_unlock, timings, parallel=parallel, best_effort=best_effort)
    return [f"{f.step} of pid {f.pid}: {f.cause}" for f in failures]


_LOCKED_AFTER_RESTORE: Final = frozenset({ProcessState.CHECKPOINTED, ProcessState.LOCKED})


def suspend_all(
    pids: Iterable[int],
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    *,
    api: CheckpointApi | None = None,
    parallel: bool = False,
) -> PodCudaReport:
    """Lock every pid, then checkpoint every pid; on any failure put every pid back to running.

    Pids already locked or checkpointed (a repeated call, or an agent that crashed mid-way) skip
    the steps already done. `lock_timeout_s` <= 0 waits forever. `parallel` runs each step for all
    pids at once (tensor-parallel pods: one process per GPU, each checkpoint ~10 s for 16 GiB).
    Raises PodCudaError; its `rolled_back` says whether the rollback brought every pid back.
    """
    api = api if api is not None else default_api()
    order = _unique(pids)
    started = time.monotonic()
    timings = _read_states(api, order, "suspend")
    timeout_ms = max(1, round(lock_timeout_s * 1000)) if lock_timeout_s > 0 else 0
    to_lock = [p for p in order if timings[p].state_before is ProcessState.RUNNING]
    to_checkpoint = [p for p in order if timings[p].state_before is not ProcessState.CHECKPOINTED]
    try:
        _run_step(api, "lock", to_lock, timings, parallel=parallel, timeout_ms=timeout_ms)
        _fault_point("agent.cuda-after-lock")
        _run_step(api, "checkpoint", to_checkpoint, timings, parallel=parallel)
    except _StepFailed as failure:
        rollback_errors = _bring_up(api, order, timings, parallel=parallel, best_effort=True)
        states = _states_now(api, order)
        for pid, state in states.items():
            timings[pid].state_after = state
        outcome = (
            "rolled back: every pid is running again"
            if not rollback_errors and all(s is ProcessState.RUNNING for s in states.values())
            else "ROLLBACK INCOMPLETE: " + "; ".join(rollback_errors or [_describe_states(states)])
        )
        raise PodCudaError(
            "suspend",
            f"suspend failed at {failure.step} of pid {failure.pid}: {failure.cause}; {outcome}",
            pid=failure.pid,
            step=failure.step,
            states=states,
            rollback_errors=rollback_errors,
            timings=tuple(timings[p] for p in order),
        ) from failure.cause
    except BaseException:
        # Interrupted (KeyboardInterrupt, a bug): still never leave the pod half suspended.
        _bring_up(api, order, timings, parallel=False, best_effort=True)
        raise
    for timing in timings.values():
        timing.state_after = ProcessState.CHECKPOINTED
    return PodCudaReport("suspend", tuple(timings[p] for p in order), time.monotonic() - started)


def resume_all(
    pids: Iterable[int],
    *,
    api: CheckpointApi | None = None,
    parallel: bool = False,
    gpu_pairs: GpuPairs = (),
) -> PodCudaReport:
    """Restore every checkpointed pid, then unlock every locked one; running pids are left alone.
    `gpu_pairs`: restore onto other GPUs, each checkpointed GPU's UUID paired with its new one (a
    snapshot in a pod given other GPUs); the API must be able to (RemappingApi), else CudaError.

    A failure stops at once and raises PodCudaError with the states left: nothing is unlocked
    while a peer could not be restored, and a repeated call continues where this one stopped
    (the caller retries with backoff, design.md).
    """
    api = api if api is not None else default_api()
    order = _unique(pids)
    started = time.monotonic()
    if gpu_pairs and not isinstance(api, RemappingApi):
        raise PodCudaError("resume", f"{type(api).__name__} cannot restore a process onto other GPUs")
    timings = _read_states(api, order, "resume")
    try:
        _bring_up(api, order, timings, parallel=parallel, best_effort=False, gpu_pairs=gpu_pairs)
    except _StepFailed as failure:
        states = _states_now(api, order)
        for pid, state in states.items():
            timings[pid].state_after = state
        raise PodCudaError(
            "resume",
            f"resume failed at {failure.step} of pid {failure.pid}: {failure.cause}; "
            f"left as {_describe_states(states)}",
            pid=failure.pid,
            step=failure.step,
            states=states,
            timings=tuple(timings[p] for p in order),
        ) from failure.cause
    for timing in timings.values():
        timing.state_after = ProcessState.RUNNING
    return PodCudaReport("resume", tuple(timings[p] for p in order), time.monotonic() - started)


def _describe_states(states: dict[int, ProcessState | None]) -> str:
    return ", ".join(f"pid {pid} {state.value if state else 'unknown'}" for pid, state in states.items())
