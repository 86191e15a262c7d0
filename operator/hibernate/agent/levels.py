"""The mechanics of levels 1-4 on one pod: HTTP to the engine, the CUDA driver, CRIU.

Each `sleep`/`wake` either completes or raises `LevelError` after undoing what it did, so a pod is
never left half suspended. Blocking work (driver calls, criu) runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hibernate.agent import criu, cuda, discovery, gpumap, layout, shm
from hibernate.agent import snapshot as pod_snapshot
from hibernate.agent.criu import shrink as criu_shrink
from hibernate.agent.criu import snapshot as criu_snapshot
from hibernate.agent.engine_client import EngineClient, EngineError
from hibernate.agent.podref import PodRef
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.faults import fault_point

log = logging.getLogger(__name__)


def _nvidia_holders(procs: Sequence[discovery.ProcessInfo], proc_root: str) -> list[int]:
    return discovery.cuda_pids([p.pid for p in procs], proc_root)


# The level the engine itself sleeps at under each level (levels 3 and 4 are engine-assisted).
_ENGINE_LEVEL = {
    SleepLevel.L1: SleepLevel.L1,
    SleepLevel.CUDA_SUSPEND: SleepLevel.L1,
    SleepLevel.L2: SleepLevel.L2,
    SleepLevel.CHECKPOINT: SleepLevel.L2,
}


def _alive(pid: int, proc_root: str) -> bool:
    try:
        state = Path(f"{proc_root}/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class LevelError(RuntimeError):
    """A level change failed; `rolled_back` says whether the pod is back where it started.

    A failure that left the pod half suspended (some CUDA processes checkpointed or locked, others
    running: a rollback that failed in turn) says so with `level`, the deepest level any process is
    at (CudaSuspend), and `processes`, where each one is ("pid 4242 (python3)": "checkpointed")."""

    def __init__(
        self,
        message: str,
        *,
        rolled_back: bool,
        level: SleepLevel | None = None,
        processes: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.level = level
        self.processes = processes

    @property
    def partial(self) -> bool:
        return not self.rolled_back and self.level is not None


def _comm(pid: int, proc_root: str) -> str:
    try:
        return Path(f"{proc_root}/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "gone"


def _left_suspended(e: cuda.CudaError, proc_root: str) -> dict[str, str] | None:
    """Where each process is after a pod-level CUDA failure that did not put every one back running;
    None when none is left suspended (nothing was done, or the rollback worked)."""
    if not isinstance(e, cuda.PodCudaError):
        return None
    stuck = (cuda.ProcessState.LOCKED, cuda.ProcessState.CHECKPOINTED, None)
    if not e.rollback_errors and not any(state in stuck for state in e.states.values()):
        return None
    return {
        f"pid {pid} ({_comm(pid, proc_root)})": state.value if state is not None else "unknown"
        for pid, state in e.states.items()
    }


def _naming(processes: dict[str, str]) -> str:
    return "; processes left: " + ", ".join(f"{name} {state}" for name, state in processes.items())


@dataclass
class Host:
    """This node's side of the mechanics, with the knobs a DaemonSet sets."""

    proc_root: str = "/proc"
    checkpoint_roots: tuple[Path, ...] = (Path(c.DEFAULT_CHECKPOINT_DIR),)
    cuda_api: Callable[[], cuda.CheckpointApi] = cuda.default_api
    # Which of a pod's processes are CUDA processes (those holding /dev/nvidia*); replaced only by
    # the test double of hibernate.agent.fakecuda.
    find_cuda_pids: Callable[[Sequence[discovery.ProcessInfo], str], list[int]] = _nvidia_holders
    lock_timeout_s: float = 10.0
    engine_timeout_s: float = 300.0  # a big model can take minutes to offload or reload
    engine_retries: int = 3
    criu_timeout_s: float = 600.0
    # A volume that every node's agent mounts here (a ReadWriteMany PVC): snapshots go there, so a
    # pod on any node can restore one (docs/snapshots.md); None: on the node's disk.
    snapshot_dir: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def engine(self, pod: PodRef) -> EngineClient:
        # Its sleeps let the requests in flight finish first, up to the pod's drain deadline.
        return EngineClient(
            pod.engine_url,
            timeout=self.engine_timeout_s,
            retries=self.engine_retries,
            drain_seconds=pod.drain_seconds,
        )

    def processes(self, pod: PodRef) -> list[discovery.ProcessInfo]:
        if pod.container_id:
            return discovery.container_processes(pod.uid, pod.container_id, self.proc_root)
        return discovery.pod_processes(pod.uid, self.proc_root)

    def cgroup_layout(self, pod: PodRef, proc: discovery.ProcessInfo) -> layout.Layout:
        """The cgroup layout of the pod's container, logged; LayoutError for one the agent cannot place."""
        found = layout.detect(proc, pod.container_id, self.proc_root)
        log.info("%s/%s: cgroup layout: %s", pod.namespace, pod.name, found.describe())
        return found

    def cuda_pids(self, pod: PodRef) -> list[int]:
        return self.cuda_pids_of(self.processes(pod))

    def cuda_pids_of(self, procs: Sequence[discovery.ProcessInfo]) -> list[int]:
        """The CUDA processes among `procs`: those holding /dev/nvidia*, then those the driver holds
        locked or checkpointed.

        A checkpointed process has let go of every GPU handle (which is what lets criu dump it
        without a CUDA plugin), so the file scan no longer finds it; only the driver knows it. The
        wake from CudaSuspend, the CUDA restore after a criu restore and the probe need it found.
        """
        found = self.find_cuda_pids(procs, self.proc_root)
        rest = [p.pid for p in procs if p.pid not in found]
        if not rest:
            return found
        try:
            api = self.cuda_api()
        except cuda.CudaError:  # no driver on this node: nothing can be suspended either
            return found
        suspended = []
        for pid in rest:
            try:
                state = api.get_state(pid)
            except cuda.CudaError:  # not a CUDA process (or gone)
                continue
            if state in (cuda.ProcessState.LOCKED, cuda.ProcessState.CHECKPOINTED):
                suspended.append(pid)
        return [*found, *suspended]


async def _sleeping(engine: EngineClient) -> bool | None:
    """Whether the engine sleeps, in one request; None where it has no sleep API (vLLM without dev
    mode, another engine: no /is_sleeping), which the plain paths serve."""
    try:
        return await engine.is_sleeping()
    except EngineError as e:
        if e.status == 404:
            return None
        raise


async def _has_sleep_api(engine: EngineClient) -> bool:
    return await _sleeping(engine) is not None


class Levels:
    def __init__(self, host: Host) -> None:
        self.host = host
        # Found by `probe` after a crash: the level the engine sleeps at under a CUDA suspension
        # (2 when the suspension is what is left of a level-4 restore), for the next wake from 3.
        self.engine_level_under_cuda: dict[tuple[str, str], SleepLevel] = {}
        # A snapshot's GPUs mapped onto a new pod's (gpu_plan), from its restore to its CUDA wake.
        self.gpu_pairs: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        # Checkpoint images losing their zero pages behind the sleep (criu/shrink.py).
        self.shrinker = criu_shrink.Shrinker()

    # -- levels 1-2: the engine's own sleep API -------------------------------------------------

    async def sleep(self, pod: PodRef, level: SleepLevel) -> dict[str, Any]:
        """Move an awake pod to `level` (1-4). Returns details for last-operation."""
        started = time.monotonic()
        if level in (SleepLevel.L1, SleepLevel.L2):
            async with self.host.engine(pod) as engine:
                try:
                    await engine.sleep_level(int(level))
                except EngineError as e:
                    await self._wake_engine_back(engine, int(level), e)
            return {"path": "engine"}
        if level == SleepLevel.CUDA_SUSPEND:
            return await self._cuda_suspend(pod, started)
        if level == SleepLevel.CHECKPOINT:
            return await self._checkpoint(pod)
        raise LevelError(f"the agent does not perform level {level.label}", rolled_back=True)

    async def wake(self, pod: PodRef, level: SleepLevel) -> dict[str, Any]:
        """Bring a pod that is at `level` back to Awake; LevelError with the engine's, the driver's or
        criu's reason when it cannot (the caller retries with backoff)."""
        try:
            return await self._wake(pod, level)
        except (EngineError, cuda.CudaError, criu.CriuError, LookupError, OSError) as e:
            left = _left_suspended(e, self.host.proc_root) if isinstance(e, cuda.CudaError) else None
            raise LevelError(str(e), rolled_back=False, processes=left) from e

    async def _wake(self, pod: PodRef, level: SleepLevel) -> dict[str, Any]:
        if level in (SleepLevel.L1, SleepLevel.L2):
            async with self.host.engine(pod) as engine:
                await engine.wake(int(level))
            return {"path": "engine"}
        if level == SleepLevel.CUDA_SUSPEND:
            pids = await asyncio.to_thread(self.host.cuda_pids, pod)
            report = await asyncio.to_thread(cuda.resume_all, pids, api=self.host.cuda_api())
            fault_point("agent.after-cuda-resume")
            under = self.engine_level_under_cuda.get(pod.key, SleepLevel.L1)
            async with self.host.engine(pod) as engine:
                if await _sleeping(engine):
                    await engine.wake(int(under))
            self.engine_level_under_cuda.pop(pod.key, None)
            return {"path": "cuda", "cuda_seconds": round(report.seconds, 3)}
        if level == SleepLevel.CHECKPOINT:
            return await self._restore(pod)
        return {}

    async def _wake_engine_back(self, engine: EngineClient, level: int, cause: Exception) -> None:
        try:
            if await engine.is_sleeping():
                await engine.wake(level)
        except EngineError as e:
            raise LevelError(f"{cause}; waking the engine back failed too: {e}", rolled_back=False) from cause
        raise LevelError(str(cause), rolled_back=True) from cause

    # -- level 3: the CUDA driver's checkpoint API ----------------------------------------------

    async def _cuda_suspend(self, pod: PodRef, started: float) -> dict[str, Any]:
        pids = await asyncio.to_thread(self.host.cuda_pids, pod)
        if not pids:
            raise LevelError(
                f"pod {pod.namespace}/{pod.name} has no CUDA process (none holds /dev/nvidia*): "
                "CudaSuspend needs a GPU engine",
                rolled_back=True,
            )
        try:
            api = self.host.cuda_api()
        except cuda.CudaError as e:
            raise LevelError(str(e), rolled_back=True) from e
        async with self.host.engine(pod) as engine:
            # Engine-assisted: weights to pinned host memory and KV cache dropped first, so the
            # driver checkpoints only the context (design.md: 1.1 s instead of 11.5 s for 16 GiB).
            assisted = await _has_sleep_api(engine)
            if assisted:
                try:
                    await engine.sleep_level(1, prepare=c.PREPARE_CUDA_SUSPEND)
                except EngineError as e:
                    await self._wake_engine_back(engine, 1, e)
            fault_point("agent.after-engine-sleep")
            try:
                report = await asyncio.to_thread(cuda.suspend_all, pids, self.host.lock_timeout_s, api=api)
            except cuda.CudaError as e:  # suspend_all has put every process back, or says it could not
                left = _left_suspended(e, self.host.proc_root)
                if left is not None:  # half suspended: the engine stays asleep for the restore
                    raise LevelError(
                        f"{e}{_naming(left)}",
                        rolled_back=False,
                        level=SleepLevel.CUDA_SUSPEND,
                        processes=left,
                    ) from e
                if assisted:
                    await self._wake_engine_back(engine, 1, e)
                raise LevelError(str(e), rolled_back=True) from e
        fault_point("agent.after-cuda-suspend")
        return {
            "path": "engine+cuda" if assisted else "cuda",
            "processes": len(pids),
            "cuda_seconds": round(report.seconds, 3),
            "engine_seconds": round(time.monotonic() - started - report.seconds, 3),
        }

    # -- level 4: CRIU ---------------------------------------------------------------------------

    def _engine_root(self, pod: PodRef) -> discovery.EngineRoot:
        procs = self.host.processes(pod)
        if not procs:
            raise LookupError(
                f"pod {pod.namespace}/{pod.name}: "
                + layout.explain_missing(pod.uid, pod.container_id, self.host.proc_root)
            )
        root = discovery.engine_root(procs)
        if root.init_is_engine:
            raise LookupError(
                "the engine is PID 1 of its container, so it cannot be restored in place: "
                "Checkpoint needs the hibernate pod init (run the operator with --tools-image)"
            )
        return root

    async def snapshot(self, pod: PodRef, model: str, spec_hash: str) -> dict[str, Any]:
        """Stop with a snapshot (docs/snapshots.md): level 4's steps (engine at level 2 with the
        checkpoint hint, CUDA suspended, CRIU dump), into the ModelDeployment's snapshot directory
        with `spec_hash`, TCP connections closed. The engine ends once the dump is verified; a failure
        rolls back as a failed Checkpoint does (LevelError)."""
        try:
            image = self.snapshot_image(pod, model)
        except (PermissionError, ValueError) as e:
            raise LevelError(str(e), rolled_back=True) from e
        details = await self._checkpoint(pod, snapshot=(image, spec_hash))
        return {**details, "shared": self.host.snapshot_dir is not None}

    def snapshot_image(self, pod: PodRef, model: str, shared: bool | None = None) -> Path:
        """`<checkpoint dir>/.snapshots/<namespace>/<model>` of the pod's checkpoint directory, which
        must lie in the agent's allowed roots (PermissionError otherwise); on the shared volume
        (`shared`, default: where the agent has one) `<snapshot dir>/.snapshots/<namespace>/<model>`."""
        if shared is None:
            shared = self.host.snapshot_dir is not None
        if shared:
            if self.host.snapshot_dir is None:
                raise PermissionError(
                    "the snapshot is on the shared volume, which the agent of this node does not mount "
                    "(its --snapshot-dir, the chart's agent.snapshots.sharedClaim)"
                )
            return criu_snapshot.snapshot_dir(self.host.snapshot_dir, pod.namespace, model)
        pod.checkpoint_root(self.host.checkpoint_roots)
        return criu_snapshot.snapshot_dir(Path(pod.checkpoint_dir).resolve(), pod.namespace, model)

    def snapshot_root(self, pod: PodRef, image: Path) -> Path:
        """The root down from which the snapshot `image` is root-only: the shared volume, or the pod's
        checkpoint root."""
        if self.host.snapshot_dir is not None and self.host.snapshot_dir in image.parents:
            return self.host.snapshot_dir
        return pod.checkpoint_root(self.host.checkpoint_roots)

    def restore_snapshot(
        self,
        pod: PodRef,
        model: str,
        spec_hash: str,
        check: Callable[[criu.RestoreResult], None] = lambda _: None,
        shared: bool = False,
        *,
        take_over: bool = False,
    ) -> pod_snapshot.Outcome:
        """A new pod whose init waits for a restore: restores the model's snapshot (on the shared
        volume where `shared`) into it, runs `check` on the restored engine and tells the init
        (agent/snapshot.py). Never raises for the snapshot's sake: a cold start, with the reason,
        otherwise. Blocking: run it in a thread.

        `take_over`: the restore that an earlier agent claimed and died in (Handshake.orphaned); what
        it left in the pod is ended first (agent/snapshot.py, take_over)."""
        started = time.monotonic()
        try:
            procs = self.host.processes(pod)
            if not procs:
                raise LookupError(layout.explain_missing(pod.uid, pod.container_id, self.host.proc_root))
            target = criu.Pod(discovery.engine_root(procs).init.pid)
        except (LookupError, PermissionError, ValueError) as e:
            return pod_snapshot.Outcome(False, time.monotonic() - started, f"cannot restore: {e}")
        try:
            image = self.snapshot_image(pod, model, shared)
            ckpt_root = self.snapshot_root(pod, image)
            self.gpu_pairs[pod.key] = self.gpu_plan(image, target.init_pid)  # for wake_restored
        except (PermissionError, ValueError, gpumap.RemapRefused) as e:
            reason = f"cannot restore: {e}"
            with contextlib.suppress(OSError):
                if take_over or pod_snapshot.claim(target):
                    pod_snapshot.tell(target, {"cold": reason})  # the init starts cold now
            return pod_snapshot.Outcome(False, time.monotonic() - started, reason, taken_over=take_over)
        restore = pod_snapshot.take_over if take_over else pod_snapshot.wake_from_snapshot
        return restore(
            image,
            target,
            spec_hash=spec_hash,
            check=check,
            timeout=self.host.criu_timeout_s,
            checkpoint_root=ckpt_root,
        )

    def waiting_for_restore(self, pod: PodRef) -> bool | None:
        """Whether the pod's init waits for a restore; None while its container has no process yet."""
        state = self.restore_handshake(pod)
        return None if state is None else state.waiting

    def restore_handshake(self, pod: PodRef) -> pod_snapshot.Handshake | None:
        """Where the restore protocol with the pod's init stands; None while its container has no
        process yet."""
        procs = self.host.processes(pod)
        if not procs:
            return None
        return pod_snapshot.handshake(criu.Pod(discovery.engine_root(procs).init.pid))

    def gpu_plan(self, image: Path, init_pid: int) -> tuple[tuple[str, str], ...]:
        """The GPU pairs that restore the snapshot `image` into the pod of `init_pid` (gpumap.plan:
        RemapRefused where it cannot be); () where it needs none, or the image cannot be read (its
        restore says why)."""
        try:
            meta = criu.ImageMetadata.load(image)
        except criu.CriuError:
            return ()
        dumped = [g for g in map(gpumap.Gpu.from_json, meta.gpus) if g is not None]
        if not dumped:
            return ()
        proc = Path(self.host.proc_root)
        return gpumap.plan(dumped, gpumap.pod_gpus(init_pid, proc), criu.detect_gpu(proc).driver)

    async def wake_restored(self, pod: PodRef) -> None:
        """The engine restored from a snapshot comes back as it was dumped: CUDA checkpointed and the
        engine asleep at level 2. Its CUDA state is restored (onto the pod's GPUs, where they are not
        the snapshot's: gpu_plan), then the engine woken (weights reloaded)."""
        pairs = self.gpu_pairs.pop(pod.key, ())
        pids = await asyncio.to_thread(self.host.cuda_pids, pod)
        if pids:
            await asyncio.to_thread(
                functools.partial(cuda.resume_all, pids, api=self.host.cuda_api(), gpu_pairs=pairs)
            )
        async with self.host.engine(pod) as engine:
            if await _sleeping(engine):
                await engine.wake(2)

    async def stop_shrinking(self, pod: PodRef) -> bool:
        """Cancel the shrink behind the pod's last Checkpoint sleep (criu/shrink.py) before anything
        else reads or removes its image; True if one was running."""
        try:
            image = pod.image_dir(self.host.checkpoint_roots)
        except PermissionError:
            return False
        return await asyncio.to_thread(self.shrinker.cancel, image)

    async def _checkpoint(self, pod: PodRef, snapshot: tuple[Path, str] | None = None) -> dict[str, Any]:
        try:
            await asyncio.to_thread(criu.version)  # a clear error before anything changes
            image = pod.image_dir(self.host.checkpoint_roots) if snapshot is None else snapshot[0]
            ckpt_root = pod.checkpoint_root(self.host.checkpoint_roots)
            if snapshot is not None:
                ckpt_root = self.snapshot_root(pod, image)
            root = await asyncio.to_thread(self._engine_root, pod)
            engine_pid = root.root.ns_pid
            cgroup = await asyncio.to_thread(self.host.cgroup_layout, pod, root.root)
        except (LookupError, PermissionError, criu.CriuError) as e:
            raise LevelError(str(e), rolled_back=True) from e
        async with self.host.engine(pod) as engine:
            # Engine-assisted: weights discarded first, so the image holds no weights.
            assisted = await _has_sleep_api(engine)
            if assisted:
                try:
                    await engine.sleep_level(2, prepare=c.PREPARE_CHECKPOINT)
                except EngineError as e:
                    await self._wake_engine_back(engine, 2, e)
            fault_point("agent.after-engine-sleep")
            pids = await asyncio.to_thread(self.host.cuda_pids, pod)
            suspended = False
            try:
                if pids:
                    await asyncio.to_thread(
                        cuda.suspend_all, pids, self.host.lock_timeout_s, api=self.host.cuda_api()
                    )
                    suspended = True
                fault_point("agent.after-cuda-suspend")
                if snapshot is None:
                    result = await asyncio.to_thread(
                        criu.dump,
                        image,
                        engine_pid,
                        criu.Pod(root.init.pid),
                        timeout=self.host.criu_timeout_s,
                        checkpoint_root=ckpt_root,
                        zero_pages_now=False,
                    )
                else:
                    result = await asyncio.to_thread(
                        functools.partial(
                            criu_snapshot.take,
                            image,
                            engine_pid,
                            criu.Pod(root.init.pid),
                            spec_hash=snapshot[1],
                            timeout=self.host.criu_timeout_s,
                            checkpoint_root=ckpt_root,
                        )
                    )
            except (cuda.CudaError, criu.CriuError, OSError) as e:
                # criu leaves the tree running when a dump fails: undo the CUDA and engine steps.
                try:
                    if suspended:
                        await asyncio.to_thread(cuda.resume_all, pids, api=self.host.cuda_api())
                except cuda.CudaError as again:
                    left = _left_suspended(again, self.host.proc_root)
                    if left is None:
                        raise LevelError(f"{e}; rolling back failed: {again}", rolled_back=False) from e
                    e, suspended_error = again, f"{e}; rolling back failed: {again}"
                else:
                    left = _left_suspended(e, self.host.proc_root) if isinstance(e, cuda.CudaError) else None
                    suspended_error = str(e)
                if left is not None:
                    # Half suspended (suspend_all's own rollback, or the resume, failed): the engine
                    # sleeps at 2 under it, which the restore's engine wake must know.
                    self.engine_level_under_cuda[pod.key] = SleepLevel.L2
                    raise LevelError(
                        f"{suspended_error}{_naming(left)}",
                        rolled_back=False,
                        level=SleepLevel.CUDA_SUSPEND,
                        processes=left,
                    ) from e
                if assisted:  # raises: rolled back, or (the engine stays asleep) not
                    await self._wake_engine_back(engine, 2, e)
                raise LevelError(str(e), rolled_back=True) from e
        fault_point("agent.after-dump")
        # The engine has ended: what it left in the pod's /dev/shm would hold host RAM (agent/shm.py).
        leftovers = await asyncio.to_thread(
            shm.after_dump, pod.uid, root.init.pid, image, self.host.proc_root
        )
        if snapshot is None:
            self.shrinker.start(image)  # the zero pages go behind the sleep; a wake cancels it
        return {
            "path": "engine+criu" if assisted else "criu",
            "image": str(image),
            "image_bytes": result.metadata.image_bytes,
            "criu_seconds": round(result.seconds, 3),
            # criu's own run and the wait for the tree's end, apart (the rest: checks around them)
            "criu_run_seconds": round(result.steps["criu"], 3),
            "criu_gone_seconds": round(result.steps["gone"], 3),
            "cgroup": cgroup.report(),
            **leftovers,
        }

    async def _restore(self, pod: PodRef) -> dict[str, Any]:
        try:
            image = pod.image_dir(self.host.checkpoint_roots)
            ckpt_root = pod.checkpoint_root(self.host.checkpoint_roots)
            procs = await asyncio.to_thread(self.host.processes, pod)
            if not procs:
                raise LookupError(layout.explain_missing(pod.uid, pod.container_id, self.host.proc_root))
            init = discovery.engine_root(procs).init
            # Refused before criu runs where the container's cgroups cannot be placed.
            await asyncio.to_thread(self.host.cgroup_layout, pod, init)
        except (LookupError, PermissionError, ValueError) as e:
            raise LevelError(f"cannot restore: {e}", rolled_back=True) from e
        if await self.stop_shrinking(pod):
            log.info(
                "%s/%s: woken before its image lost its zero pages: restoring it as criu wrote it", *pod.key
            )
        try:
            result = await asyncio.to_thread(
                criu.restore,
                image,
                criu.Pod(init.pid),
                timeout=self.host.criu_timeout_s,
                checkpoint_root=ckpt_root,
            )
        except criu.CriuError as e:
            raise LevelError(str(e), rolled_back=True) from e
        fault_point("agent.after-restore")
        procs = await asyncio.to_thread(self.host.processes, pod)
        cgroup = await asyncio.to_thread(
            layout.restored,
            f"{pod.namespace}/{pod.name}",
            procs,
            result.host_pid,
            pod.container_id,
            self.host.proc_root,
        )
        # criu runs without its cuda plugin (it would exec a cuda-checkpoint inside the pod): the
        # engine comes back CUDA-checkpointed, as it was dumped, and the agent restores it here.
        pids = await asyncio.to_thread(self.host.cuda_pids, pod)
        if pids:
            await asyncio.to_thread(cuda.resume_all, pids, api=self.host.cuda_api())
        fault_point("agent.after-cuda-resume")
        async with self.host.engine(pod) as engine:
            if await _sleeping(engine):
                await engine.wake(2)
        await asyncio.to_thread(criu.remove_image, image)
        details: dict[str, Any] = {"path": "criu", "criu_seconds": round(result.seconds, 3), **cgroup}
        if result.warnings:
            log.warning("%s/%s: restored with warnings: %s", *pod.key, "; ".join(result.warnings))
            details["warnings"] = [w[:300] for w in result.warnings]
        return details

    # -- the truth, after a restart --------------------------------------------------------------

    async def probe(
        self, pod: PodRef, claimed: SleepLevel | None, hint: SleepLevel | None = None
    ) -> SleepLevel:
        """The level the pod is really at, read from its processes and engine, not from annotations.

        An engine's /is_sleeping does not tell L1 from L2. `hint` (the level of the operation the
        annotations say was under way), else `claimed` (the last observed level written), breaks
        the tie: L1 under L1 and CudaSuspend, L2 under L2 and Checkpoint. Without either, a sleeping
        engine counts as L2, whose wake reloads the weights: right for both, where an L1 wake of an
        L2 engine would serve garbage.

        A criu that an earlier agent left running is waited for first; what it leaves is settled
        (criu.settle): a dump it finished is adopted, half images are removed.
        """
        try:
            image = pod.image_dir(self.host.checkpoint_roots)
        except PermissionError:
            image = None
        settle = image if image is not None and image.parent.exists() else None
        if settle is not None:
            waited = await asyncio.to_thread(criu.wait_for_criu, settle, self.host.criu_timeout_s)
            if waited:
                log.info("%s/%s: waited for a criu left by an earlier agent", *pod.key)
        procs = await asyncio.to_thread(self.host.processes, pod)
        root: discovery.EngineRoot | None = None
        if procs:
            with contextlib.suppress(LookupError, ValueError):
                root = discovery.engine_root(procs)
        # A zombie is not a running engine: a failed restore's processes wait a moment to be reaped,
        # and taking one for the restored engine would remove the image and the checkpoint marker.
        engine_running = root is not None and (
            root.init_is_engine or any(_alive(p.pid, self.host.proc_root) for p in root.roots)
        )
        if settle is not None:
            for done in await asyncio.to_thread(criu.settle, settle, engine_running):
                log.info("%s/%s: %s", *pod.key, done)
        known = self.engine_level_under_cuda.pop(pod.key, None)  # from an earlier probe, if any
        basis = hint if hint is not None else claimed
        under = _ENGINE_LEVEL.get(basis, SleepLevel.L2) if basis is not None else SleepLevel.L2
        under = known or under
        if procs:
            if image is not None and image.exists():
                if not engine_running and not criu.check_image(image):
                    return SleepLevel.CHECKPOINT
                if engine_running:  # restored earlier, but the agent died before cleaning up
                    await asyncio.to_thread(criu.remove_image, image)
            if engine_running and root is not None and not root.init_is_engine:
                # The checkpoint marker keeps the pod init alive while its engine is gone; with the
                # engine running it is a leftover of a dump or restore an agent did not finish.
                with contextlib.suppress(OSError):
                    criu.Pod(root.init.pid).remove_marker()
            pids = await asyncio.to_thread(self.host.cuda_pids_of, procs)
            if pids:
                try:
                    api = self.host.cuda_api()
                    states = {await asyncio.to_thread(api.get_state, pid) for pid in pids}
                except cuda.CudaError:
                    states = set()
                if cuda.ProcessState.CHECKPOINTED in states:
                    self.engine_level_under_cuda[pod.key] = under
                    return SleepLevel.CUDA_SUSPEND
                if cuda.ProcessState.LOCKED in states:  # died between lock and checkpoint: undo
                    await asyncio.to_thread(cuda.resume_all, pids, api=api)
        async with self.host.engine(pod) as engine:
            try:
                if not await _sleeping(engine):
                    return SleepLevel.AWAKE
            except EngineError:
                return claimed if claimed is not None else SleepLevel.AWAKE
        return under
