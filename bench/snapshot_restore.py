#!/usr/bin/env python3
"""Stop with a snapshot, measured (issue 19): the reference engine restored into a NEW pod, to its
first correct token, beside its cold start and beside level 4 in place.

    PYTHONPATH=operator python3 bench/snapshot_restore.py                     # GPU: 16 GiB, 3 cycles
    PYTHONPATH=operator python3 bench/snapshot_restore.py --device cpu --results /tmp/RESULTS.md
                                                                              # CPU plumbing, 0.02 GiB

Root, and a CRIU bundle with hibernate-nsjoin.so (hack/build-criu.sh). Each cycle, in simulated pods
(hibernate.localnode.simpod: own pid, mount, ipc and uts namespaces and cgroup, host network, the GPU's
/dev/nvidia* bound in; bench/engine_proc.py's PodEngineProc), every step through the agent's own code:

1. cold: pod A starts the engine (no pinned host copy: a cold start does not prepare level 1); from
   the pod's start to a 1-token completion equal to the awake answer's first token;
2. inplace: the agent's `Levels` puts pod A to level 4 and wakes it in place, then the wake check
   (the canary, `WakeCheck.compare`, as the agent does after every Checkpoint wake); wake → first
   correct token;
3. snapshot: the canary's answer (`WakeCheck.answer`), then `Levels.snapshot` (engine to level 2,
   CUDA suspended where there is CUDA, `criu.snapshot.take`): seconds and image bytes; pod A goes;
4. restore: pod B starts with its init waiting for a restore (`podinit --restore-wait`), the
   agent's `Levels.restore_snapshot` claims it, restores the image into pod B (new namespaces, a new
   pid namespace, its container's cgroups) and runs the worker's check: `Levels.wake_restored` (CUDA
   restore, engine wake with its weight reload) and the canary, then tells the init; from pod B's
   start to the first correct token. Pod B goes (CUDA-suspended first where criu restored it).

On a CPU the engine runs on torch's CPU device and the CUDA steps are skipped exactly as the agent
skips them (no process holds /dev/nvidia*, no driver). Each step's row is the median of --cycles.
Results: a section of --results (default bench/RESULTS.md) rewritten after every cycle, and --json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from benchkit import MAX_TOKENS, ROOT, Budget, Skip, drop_caches, free_port, fs_type, gpu_identity
from engine_proc import POD_ENGINE_TIMEOUT_S, EngineProc, EngineSpec, PodEngineProc
from hibernate import podinit
from hibernate.agent import criu, cuda
from snapshot_report import Report, Sample, say

MODEL: Final = "snapshot-bench"  # the ModelDeployment the snapshot belongs to (its directory)
# The engine's oneDNN kept below AMX. On a CPU with AMX (the dev VM's Xeon), a torch CPU engine that
# ran bf16 matmuls with AMX dies of SIGILL (exit 132) at its first matmul after a CRIU restore, in place
# or into a new pod (the per-process AMX permission, arch_prctl, is not part of what criu gives back, as
# far as we can tell); capped, every step passes. A GPU engine computes on the GPU, but its host code
# might touch oneDNN too, so the cap is set there as well: it costs nothing there.
ENGINE_ENV: Final = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


class CudaTimer:
    """The driver API, with the wall time from the first to the last call of a suspend (lock,
    checkpoint) and of a resume (restore, unlock): the CUDA parts of the agent's steps."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        self.spans.clear()

    def seconds(self, kind: str) -> float | None:
        span = self.spans.get(kind)
        return None if span is None else span[1] - span[0]

    def api(self) -> cuda.CheckpointApi:
        """For `Host.cuda_api`: raises CudaError where there is no driver, as cuda.default_api does, so
        the agent skips its CUDA steps on a CPU for the same reason it does on a node without a GPU."""
        inner = cuda.default_api()
        return (
            _TimedRemappingApi(inner, self) if hasattr(inner, "restore_remapped") else _TimedApi(inner, self)
        )

    def record(self, kind: str, started: float) -> None:
        now = time.monotonic()
        first = self.spans.get(kind, (started, now))[0]
        self.spans[kind] = (min(first, started), now)


class _TimedApi:
    def __init__(self, api: cuda.CheckpointApi, timer: CudaTimer) -> None:
        self._api = api
        self._timer = timer

    def get_state(self, pid: int) -> cuda.ProcessState:
        return self._api.get_state(pid)

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        started = time.monotonic()
        self._api.lock(pid, timeout_ms)
        self._timer.record("suspend", started)

    def checkpoint(self, pid: int) -> None:
        started = time.monotonic()
        self._api.checkpoint(pid)
        self._timer.record("suspend", started)

    def restore(self, pid: int) -> None:
        started = time.monotonic()
        self._api.restore(pid)
        self._timer.record("resume", started)

    def unlock(self, pid: int) -> None:
        started = time.monotonic()
        self._api.unlock(pid)
        self._timer.record("resume", started)

    def restore_thread_id(self, pid: int) -> int:
        return self._api.restore_thread_id(pid)


class _TimedRemappingApi(_TimedApi):
    """The same, for a driver API whose restore can put the process's GPUs onto others (the agent asks
    for that only where the new pod has other GPUs than the snapshot's; never in this bench's pods,
    which all get the same device nodes)."""

    def restore_remapped(self, pid: int, pairs: Sequence[tuple[str, str]]) -> None:
        started = time.monotonic()
        self._api.restore_remapped(pid, pairs)  # type: ignore[attr-defined]
        self._timer.record("resume", started)


class WaitingSimPod:
    """Builds the SimPod of a new pod woken from a snapshot: its init waits for the agent's restore
    and starts nothing, so the pod is ready once the wait is written (tests/test_snapshot.py's
    WaitingPod, here for the bench)."""

    @staticmethod
    def start(command: Sequence[str], **options: Any) -> Any:
        from hibernate.localnode.simpod import SimPod

        class Waiting(SimPod):
            def _wait_ready(self, ready_path: str | None, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                while time.monotonic() < deadline:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"pod exited with {self.proc.returncode}:\n{self.log()}")
                    with contextlib.suppress(OSError, ValueError):
                        kids = [int(k) for k in children.read_text().split()]
                        self.init_pid = self.init_pid or (kids[0] if kids else 0)
                    if self.init_pid and (self.emptydir / podinit.RESTORE_WAIT).exists():
                        return
                    time.sleep(0.01)
                raise TimeoutError(f"the pod's init did not wait for a restore:\n{self.log()}")

        return Waiting.start(command, **options)


class SnapshotPod(PodEngineProc):
    """The engine in a simulated pod (PodEngineProc), whose checkpoint root outlives it: the
    snapshot there is the next pod's. `restore_wait`: a new pod whose init waits that long for the
    agent's restore instead of starting the engine."""

    def __init__(self, spec: EngineSpec, checkpoint_root: Path, restore_wait: float = 0.0) -> None:
        super().__init__(spec, checkpoint_root)
        self.restore_wait = restore_wait
        self.timer = CudaTimer()

    def _start_sim(self, **options: Any) -> Any:
        options["env"] = {**options.get("env", {}), **ENGINE_ENV}
        if not self.restore_wait:
            return super()._start_sim(**options)
        options["env"] = {**options.get("env", {}), "HIBERNATE_RESTORE_WAIT": f"{self.restore_wait:g}"}
        options["ready_path"] = None
        return WaitingSimPod.start(self.argv(), **options)

    def agent(self) -> tuple[Any, Any]:
        levels, ref = super().agent()
        levels.host.cuda_api = self.timer.api
        return levels, ref

    def stop(self) -> None:
        from hibernate.localnode.gpupod import end_pod

        if self.sim is None:
            return
        with contextlib.suppress(OSError), open(self.spec.log, "a") as log:
            log.write(self.sim.log())
        end_pod(self.sim, self.url, self.restored)  # a restored CUDA engine is suspended before it ends
        self.sim = None
        self._agent = None
        self._last_pid = 0


def agent_wake_check() -> Any:
    """The agent's own wake check (hibernate.agent.wakecheck.WakeCheck), of which the bench uses
    `answer` and `compare`: they speak to the engine alone. Its module also imports the agent's
    Kubernetes client, for the annotations it writes around a sleep, which the bench never writes; the
    GPU machine's Python has no `kubernetes` (nor pydantic, kopf), so there a stand-in takes the
    client's place, whose two functions refuse to run."""
    try:
        import hibernate.agent.kube
    except ImportError:
        import hibernate.agent

        def refuse(*_: object) -> bool:
            raise RuntimeError("the snapshot bench writes no pod annotations")

        stand_in = types.ModuleType("hibernate.agent.kube")
        stand_in.report = stand_in.remove_annotation = refuse  # type: ignore[attr-defined]
        sys.modules[stand_in.__name__] = stand_in
        hibernate.agent.kube = stand_in
    from hibernate.agent.wakecheck import WakeCheck

    return WakeCheck()


def spec_hash(argv: Sequence[str]) -> str:
    """The operator hashes the engine's image, command, args, port and model; here its argv stands in."""
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]


def timing_delta(before: dict[str, float], after: dict[str, float], key: str) -> float | None:
    """The engine's own timing of `key` when it changed since `before` (the step ran), else None."""
    value = after.get(key)
    return value if value is not None and value != before.get(key) else None


def _put(values: dict[str, float], key: str, value: float | None) -> None:
    if value is not None:
        values[key] = round(value, 4)


class Bench:
    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.cpu = args.device == "cpu"
        self.work = Path(args.work_dir)
        self.root = self.work / "snapshot-checkpoints"  # the agent's checkpoint root (pods' and snapshot)
        self.budget = Budget(args.deadline)
        self.reference: str | None = None
        self.wake_check = agent_wake_check()

    # --- plan ------------------------------------------------------------------------------------

    def estimate(self) -> float:
        """Seconds one cycle may take (shared/notes/checkpointing.md and the pod rows, with margins)."""
        if self.cpu:
            return 60.0
        g = float(self.args.size)
        start = 25 + 0.3 * g  # torch, CUDA, load the weights (no pinned host copy)
        return 2 * (10 + start) + 2 * (8 + 0.4 * g) + (5 + 0.2 * g)

    def weights_dir(self) -> Path:
        return self.work / "weights" / f"{self.args.size:g}g"

    def spec(self, tag: str) -> EngineSpec:
        return EngineSpec(
            size_gib=self.args.size,
            kv_gib=self.args.kv_gib,
            device=self.args.device,
            weights_dir=self.weights_dir(),
            readers=self.args.readers,
            pinned_prealloc=False,
            release_staging=False,
            log=Path(self.args.log_dir) / f"engine-{self.args.size:g}g-{tag}.log",
            extra=tuple(self.args.engine_arg or ()),
        )

    def check_ready(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("snapshot_restore.py needs root (namespaces, cgroups, CRIU)")
        bundle = criu.locate()
        criu.version(bundle)
        if bundle.nsjoin is None:
            raise SystemExit(f"{bundle.criu} is not a bundle with hibernate-nsjoin.so (hack/build-criu.sh)")
        self.report.note(f"criu {bundle.criu}")

    async def run(self) -> None:
        self.check_ready()
        port = free_port()  # one port for every pod: it is in the engine's args, so in its spec hash
        cycles, cycle = self.args.cycles, 0
        while cycle < cycles:
            cycle += 1
            try:
                self.budget.check(self.estimate())
            except Skip as skip:
                self.report.note(f"cycle {cycle} and later not run: {skip}")
                break
            left = self.budget.left()
            say(f"\n=== cycle {cycle} of {cycles}" + (f": {left:.0f}s of budget left" if left < 1e9 else ""))
            try:
                await self.cycle(cycle, port)
            finally:
                if (
                    any(s.step == "cold" and s.skipped for s in self.report.samples)
                    and cycles == self.args.cycles
                ):
                    cycles += 1  # the cold start that wrote the weights is made up for by one more cycle
                self.report.write()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- one cycle -----------------------------------------------------------------------------------

    async def cycle(self, cycle: int, port: int) -> None:
        if cycle == 1:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        pod_a = SnapshotPod(self.spec(f"a{cycle}"), self.root)
        pod_a.port, pod_a.url = port, f"http://127.0.0.1:{port}"
        argv = pod_a.argv()
        sample = self.report.add(Sample("cold", cycle))
        try:
            await self.cold(pod_a, sample)
            if sample.error or sample.correct is False:  # a skipped one (it wrote the weights) goes on
                return
            if not self.args.no_inplace:
                sample = self.report.add(Sample("inplace", cycle))
                await self.inplace(pod_a, sample)
                if not pod_a.alive():
                    return
            sample = self.report.add(Sample("snapshot", cycle))
            before = pod_a.timings()
            reference = await self.snapshot(pod_a, argv, sample)
            if not sample.ok:
                return
        except Exception as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
            say(f"  {sample.step} failed: {sample.error}\n{pod_a.log_tail(15)}")
            return
        finally:
            pod_a.stop()

        if self.args.drop_caches and not drop_caches():
            self.report.note("could not drop the page cache before the restore")
        pod_b = SnapshotPod(self.spec(f"b{cycle}"), self.root, restore_wait=self.args.restore_wait)
        pod_b.port, pod_b.url = port, pod_a.url
        sample = self.report.add(Sample("restore", cycle))
        try:
            await self.restore(pod_b, argv, reference, before, sample)
        except Exception as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
            say(f"  restore failed: {sample.error}\n{pod_b.log_tail(15)}")
        finally:
            pod_b.stop()
            shutil.rmtree(self.root / ".snapshots", ignore_errors=True)

    def first_token_ok(self, engine: EngineProc) -> bool:
        """A 1-token completion equal to the first token of the awake answer."""
        assert self.reference is not None
        return engine.complete(1).strip() == self.reference.split()[0]

    def full_answer_ok(self, engine: EngineProc, sample: Sample) -> None:
        full = engine.complete(MAX_TOKENS)
        sample.correct = sample.correct is not False and full == self.reference
        if full != self.reference:
            sample.error = f"wrong answer: {full!r} instead of {self.reference!r}"

    async def cold(self, pod: SnapshotPod, sample: Sample) -> None:
        if self.args.drop_caches and not drop_caches():
            self.report.note("could not drop the page cache before the cold start")
        started = time.monotonic()
        ready = await asyncio.to_thread(pod.start, 300 + 4 * self.args.size)
        first = pod.complete(1)
        done = time.monotonic()
        if self.reference is None:  # asked after the first token, so as not to count it
            self.reference = pod.complete(MAX_TOKENS)
            self.report.note(f"the awake answer: {self.reference!r}")
        sample.correct = first.strip() == self.reference.split()[0]
        timings = pod.timings()
        if "save" in timings:  # this start wrote the weights files: not a cold start to compare
            sample.skipped = f"this start wrote the weights ({timings['save']:.2f} s): not counted"
            self.report.note(f"cycle {sample.cycle}'s cold start wrote the weights files: not counted")
            return
        _put(sample.values, "first_token_s", done - started)
        _put(sample.values, "pod_ready_s", ready)
        _put(sample.values, "load_s", timings.get("load"))
        _put(sample.values, "first_answer_s", done - started - ready)
        self.full_answer_ok(pod, sample)

    async def inplace(self, pod: SnapshotPod, sample: Sample) -> None:
        from hibernate.agent.levels import LevelError
        from hibernate.api.levels import SleepLevel

        levels, ref = pod.agent()
        check = await self.wake_check.answer(ref)  # the agent records it before a Checkpoint sleep
        before = pod.timings()
        pod.timer.reset()
        started = time.monotonic()
        slept = await levels.sleep(ref, SleepLevel.CHECKPOINT)
        _put(sample.values, "sleep_s", time.monotonic() - started)
        _put(sample.values, "criu_dump_s", slept.get("criu_seconds"))
        _put(sample.values, "image_bytes", slept.get("image_bytes"))
        await asyncio.sleep(self.args.pause)
        pod.restored = True  # from here on, end it CUDA-suspended
        pod.timer.reset()
        started = time.monotonic()
        woke = await levels.wake(ref, SleepLevel.CHECKPOINT)
        _put(sample.values, "wake_s", time.monotonic() - started)
        _put(sample.values, "criu_restore_s", woke.get("criu_seconds"))
        _put(sample.values, "cuda_restore_s", pod.timer.seconds("resume"))
        if check is not None:
            asked = time.monotonic()
            problem = await self.wake_check.compare(ref, check)
            _put(sample.values, "canary_s", time.monotonic() - asked)
            if problem is not None:
                raise LevelError(problem, rolled_back=False)
        sample.correct = self.first_token_ok(pod)
        _put(sample.values, "first_token_s", time.monotonic() - started)
        _put(sample.values, "reload_s", timing_delta(before, pod.timings(), "reload"))
        self.full_answer_ok(pod, sample)

    async def snapshot(self, pod: SnapshotPod, argv: list[str], sample: Sample) -> Any:
        """Pod A's snapshot, as the agent takes one when a Stop asks (worker._take_snapshot); returns
        the canary's answer that goes with it."""
        levels, ref = pod.agent()
        reference = await self.wake_check.answer(ref)
        if reference is None:
            raise RuntimeError("the engine gave no answer for the wake check")
        pod.timer.reset()
        started = time.monotonic()
        details = await levels.snapshot(ref, MODEL, spec_hash(argv))
        total = time.monotonic() - started
        _put(sample.values, "seconds", total)
        _put(sample.values, "criu_dump_s", details.get("criu_seconds"))
        _put(sample.values, "cuda_suspend_s", pod.timer.seconds("suspend"))
        _put(sample.values, "image_bytes", details.get("image_bytes"))
        # The rest: the engine's sleep to level 2, finding the pod's processes, its /dev/shm.
        parts = [details.get("criu_seconds"), pod.timer.seconds("suspend")]
        _put(sample.values, "engine_sleep_s", total - sum(float(x) for x in parts if x is not None))
        if pod.alive():
            raise RuntimeError("the engine still runs after its snapshot was taken")
        sample.correct = True  # checked when it is restored
        return reference

    async def restore(
        self, pod: SnapshotPod, argv: list[str], reference: Any, before: dict[str, float], sample: Sample
    ) -> None:
        """Pod B, a new pod of the model: the agent restores the snapshot into it, as its worker does
        (worker._restore_from_snapshot: `restore_snapshot` in a thread, whose check wakes the restored
        engine and asks it the canary on the agent's event loop)."""
        from hibernate.agent.levels import LevelError

        started = time.monotonic()
        await asyncio.to_thread(pod.start, 60)
        _put(sample.values, "pod_s", time.monotonic() - started)
        levels, ref = pod.agent()
        if not await asyncio.to_thread(levels.waiting_for_restore, ref):
            raise RuntimeError("the new pod's init does not wait for a restore")
        loop = asyncio.get_running_loop()
        values = sample.values

        async def wake_and_compare() -> None:
            pod.timer.reset()
            woke = time.monotonic()
            await levels.wake_restored(ref)
            cuda_s = pod.timer.seconds("resume")
            _put(values, "cuda_restore_s", cuda_s)
            _put(values, "engine_wake_s", time.monotonic() - woke - (cuda_s or 0.0))
            asked = time.monotonic()
            problem = await self.wake_check.compare(ref, reference)
            _put(values, "canary_s", time.monotonic() - asked)
            if problem is not None:
                raise LevelError(problem, rolled_back=False)

        def check(_: object) -> None:
            asyncio.run_coroutine_threadsafe(wake_and_compare(), loop).result(POD_ENGINE_TIMEOUT_S + 60)

        claimed = time.monotonic()
        outcome = await asyncio.to_thread(levels.restore_snapshot, ref, MODEL, spec_hash(argv), check)
        _put(values, "agent_s", outcome.seconds)
        if not outcome.restored:
            raise RuntimeError(f"not restored, the init starts the engine cold: {outcome.reason}")
        pod.restored = True
        if outcome.restore is not None:
            _put(values, "criu_restore_s", outcome.restore.seconds)
        sample.correct = self.first_token_ok(pod)
        now = time.monotonic()
        _put(values, "first_token_s", now - started)
        _put(values, "claim_to_token_s", now - claimed)
        _put(values, "reload_s", timing_delta(before, pod.timings(), "reload"))
        self.full_answer_ok(pod, sample)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="cuda:0 or cpu (CPU: the plumbing, 0.02 GiB)")
    p.add_argument("--size", type=float, default=None, help="weights GiB (default 16; CPU 0.02)")
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache (default 4; CPU 0.004)")
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--cycles", type=int, default=3, help="cycles; each step's row is their median")
    p.add_argument("--no-inplace", action="store_true", help="skip level 4 in place")
    p.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before each cold start and restore"
    )
    p.add_argument("--restore-wait", type=float, default=120.0, help="seconds the new pod's init waits")
    p.add_argument("--pause", type=float, default=0.5, help="seconds at level 4 in place")
    p.add_argument("--work-dir", default="/var/tmp/hibernate-bench", help="weights and images (local disk)")
    p.add_argument("--log-dir", default=None, help="engine logs (default <work-dir>/logs)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--json", default=None, help="also write every sample as JSON here")
    p.add_argument("--section", default=None, help="RESULTS.md section (default snapshot-bench:gpu or :cpu)")
    p.add_argument(
        "--deadline", type=float, default=None, help="epoch seconds: no cycle that would end later"
    )
    p.add_argument("--budget-s", type=float, default=None, help="seconds from now (sets --deadline)")
    p.add_argument("--engine-arg", action="append", help="extra argument for the engine (repeatable)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size if args.size is not None else (0.02 if cpu else 16.0)
    args.kv_gib = args.kv_gib if args.kv_gib is not None else (0.004 if cpu else 4.0)
    args.log_dir = args.log_dir or str(Path(args.work_dir) / "logs")
    args.section = args.section or f"snapshot-bench:{'cpu' if cpu else 'gpu'}"
    if args.budget_s is not None:
        args.deadline = time.time() + args.budget_s
    return args


def header(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.device == "cpu":
        title = (
            f"## Snapshot restore into a new pod, CPU plumbing only (torch CPU, {args.size:g} GiB; "
            f"{platform.node()}, {os.cpu_count()} cores, {now}): not GPU numbers"
        )
    else:
        ident = gpu_identity()
        title = (
            f"## Snapshot restore into a new pod: {ident.get('name', '?')}, driver {ident.get('driver', '?')}, "
            f"{args.size:g} GiB reference engine ({now})"
        )
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    weights = Path(args.work_dir) / "weights"
    return [
        title,
        "",
        f"- host {platform.node()}, kernel {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch_version or '?'}",
        f"- command: `bench/snapshot_restore.py {' '.join(argv)}`",
        f"- the reference engine, {args.size:g} GiB of weights (KV {args.kv_gib:g} GiB, {args.readers} readers, "
        f"no pinned host copy), weights under {weights} ({fs_type(weights if weights.exists() else weights.parent)}"
        f"{', the page cache dropped before each cold start and restore' if args.drop_caches else ', in the page cache'}); "
        "each pod a simulated one (hibernate.localnode.simpod: own pid, mount, ipc, uts namespaces and cgroup, "
        "host network), every step the agent's own code (Levels with a real PodRef, WakeCheck); the engine's "
        + ", ".join(f"{k}={v}" for k, v in ENGINE_ENV.items())
        + " (below AMX: see the bench's source)",
        f"- each row: the median of {args.cycles} cycles (cold → Checkpoint in place → snapshot in pod A; "
        "restore into pod B); the wake check asks 8 greedy tokens",
        "",
    ]


async def amain(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    head = header(args, argv)
    report = Report(Path(args.results), Path(args.json) if args.json else None, args.section, head, args.size)
    say("\n".join(head))
    bench = Bench(args, report)
    try:
        await bench.run()
        report.status = "complete"
    except BaseException:
        report.status = "stopped by an error (see the log)"
        raise
    finally:
        report.write()
        say("\n".join(report.render().splitlines()[len(head) :]))
    bad = [s for s in report.samples if s.error]
    say(f"results: {args.results}" + (f"; {len(bad)} step(s) failed" if bad else ""))
    return 1 if bad or not report.samples else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
