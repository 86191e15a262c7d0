#!/usr/bin/env python3
"""Sleep/wake bench: levels 1-4 on the reference engine, through the agent's code and bare.

    PYTHONPATH=operator python3 bench/wake.py                       # GPU: 2, 16, 64 GiB
    PYTHONPATH=operator python3 bench/wake.py --quick               # GPU: 2 GiB, levels 1-3
    PYTHONPATH=operator python3 bench/wake.py --device cpu          # CPU smoke test, levels 1-2

For each weights size it starts `hibernate.engine.reference` (weights as safetensors shards on
local disk, `--pinned-prealloc`) and measures, per level, sleep seconds, wake seconds, the time
from the start of the wake to the first correct token (a 1-token completion compared with the
awake answer; then a full answer is compared too), GPU memory while asleep (nvidia-smi: the card,
and the engine's own process), host memory while asleep (the engine's RSS and its pinned bytes)
and the image size at level 4. In the same run:

- `raw` rows: the bare mechanisms (urllib to the engine, the driver's cuCheckpoint* calls through
  cuda.DriverApi on the engine pid, the criu binary run directly) for the agent-overhead ratio;
- `plain` rows: the paths for engines without the sleep API, on a second engine started without
  pinned buffers: a driver checkpoint of everything (level 3) and the same followed by CRIU
  (level 4), against the engine-assisted ones;
- level 2 with 1 reader against 8 (parallel `preadv` loading), and optionally with a cold page
  cache (`--cold`, drops the caches: root);
- level 4 with the image on tmpfs (/dev/shm) against local disk;
- `pod` rows (`--pod-sizes`, default 16 GiB on a GPU): the same engine inside a simulated pod
  (hibernate.localnode.simpod, given the GPU's /dev/nvidia* as the NVIDIA container toolkit would),
  moved through levels 1-4 by the agent's own `Levels` with a real `PodRef` of that pod, as
  tests/test_gpu_pod.py does; compared with the raw rows ("pod vs raw").

Transitions go through a small interface, `Levels.sleep(level)` / `Levels.wake(level)`:
`AgentLevels` drives the agent's own `hibernate.agent.levels.Levels` on the bare engine process
(levels 1-3; its level 4 needs a pod init in a pod's pid namespace), `PodLevels` the same `Levels`
with a real `PodRef` on the engine in a simulated pod (levels 1-4), `DirectLevels` composes the
agent's pieces (EngineClient, cuda.suspend_all/resume_all, criu.dump/restore) and `RawLevels` the
bare mechanisms. `--adapter auto` (default) takes the agent's code where it can.

The bench is four modules: this one (the steps, `Bench`, and the command line), level_adapters.py
(the four `Levels`), engine_proc.py (the engine as a process, or in a simulated pod) and benchkit.py
(small helpers, `Skip`, `Budget`; shared with bench/snapshot_restore.py).

Results: a table on stdout (flushed as it goes) and a section of `--results` (bench/RESULTS.md),
rewritten after every step, so a run cut short by a timeout still leaves its numbers; `--json`
writes every row. `--deadline` (epoch seconds) or `--budget-s` skips steps that would not fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchkit import (
    GIB,
    MAX_TOKENS,
    ROOT,
    Budget,
    Skip,
    become_subreaper,
    card_used_mib,
    dir_bytes,
    drop_caches,
    free_port,
    fs_type,
    gpu_identity,
    process_used_mib,
    reap,
    rss_bytes,
)
from engine_proc import EngineProc, EngineSpec, PodEngineProc
from hibernate.agent import criu, cuda
from level_adapters import ADAPTERS, Levels, Target, engine_client, engine_level
from wake_report import REPEATED_PATHS, Report, Row, median_row, say


class Bench:
    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.budget = Budget(args.deadline)
        self.cpu = args.device == "cpu"
        self.work = Path(args.work_dir)
        self.reference: str | None = None

    # --- estimates (seconds), from shared/notes/checkpointing.md with margins ---

    def estimate(self, what: str, g: float, kv: float) -> float:
        if self.cpu:
            return 5.0
        return {
            "start": 25 + 0.3 * g,  # torch, CUDA, load (or generate + write) the weights
            "prealloc": 0.65 * g,  # pinning the level-1 host copy: ~10 s for 16 GiB
            "pod": 10.0,  # a simulated pod around the engine: namespaces, overlay root, binds
            "1": 3 + 0.08 * g,
            "2": 3 + 0.15 * g,
            "3": 5 + 0.25 * g,
            "4": 8 + 0.4 * g,
            "plain3": 5 + 1.1 * (g + kv),
            "plain4": 8 + 2.8 * (g + kv),
            "readers-1": 3 + 0.3 * g,
            "cold": 5 + 0.8 * g,
        }[what]

    def levels_for(self, size: float) -> list[int]:
        levels: list[int] = list(self.args.levels)
        if size >= self.args.big_from:
            levels = [lv for lv in levels if lv in self.args.big_levels]
        return levels

    async def run(self) -> None:
        for size in self.args.sizes:
            try:
                await self.run_size(size)
            finally:
                self.report.write()
                self.report.print_table(size)

    def kv_for(self, size: float) -> float:
        kv: float = self.args.kv_gib
        ident = gpu_identity()
        if not self.cpu and ident.get("memory_mib", "").isdigit():
            total = int(ident["memory_mib"]) / 1024
            kv = min(kv, max(0.25, total - size - 6))
        return kv

    def weights_dir(self, size: float) -> Path | None:
        if size >= self.args.generate_from:
            return None
        directory = self.work / "weights" / f"{size:g}g"
        need = size * GIB * 1.05 + 2 * GIB
        have = dir_bytes(directory)
        self.work.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.work).free + have < need:
            return None
        return directory

    def spec(self, size: float, kv: float, directory: Path | None, assisted: bool, tag: str) -> EngineSpec:
        return EngineSpec(
            size_gib=size,
            kv_gib=kv,
            device=self.args.device,
            weights_dir=directory,
            readers=self.args.readers,
            pinned_prealloc=assisted and not self.cpu and tag != "cold",
            release_staging=not assisted,
            log=Path(self.args.log_dir) / f"engine-{size:g}g-{tag}.log",
            extra=tuple(self.args.engine_arg or ()),
        )

    async def run_size(self, size: float) -> None:
        levels = self.levels_for(size)
        kv = self.kv_for(size)
        directory = self.weights_dir(size)
        if directory is None:
            self.report.note(
                size,
                "weights generated in place (no file: too big for the disk or --generate-from); levels 2 and 4 skipped",
            )
            levels = [lv for lv in levels if lv not in (2, 4)]
        else:
            self.report.note(
                size,
                f"weights dir {directory} ({fs_type(directory.parent if not directory.exists() else directory)}), KV {kv:g} GiB",
            )
        say(
            f"\n=== {size:g} GiB: levels {levels}, KV {kv:g} GiB, {self.budget.left():.0f}s of budget left ==="
        )

        # Engine A: the engine with the sleep API used as designed (pinned buffers preallocated).
        engine = await self.start_engine(size, kv, directory, assisted=True, tag="assisted")
        if engine is None:
            return
        try:
            # Levels 1 and 3 use the pinned slabs preallocated at start; level 2 frees them (it keeps
            # nothing), so they go first, and level 4 (which sleeps at level 2 first) last.
            order: list[int] = [lv for lv in (1, 3, 2, 4) if lv in levels]
            for level in order:
                if level != 4:
                    # An untimed-in-comparisons first cycle: the first sleep/wake of a level pays
                    # one-off costs (lazy CUDA paths, staging buffers) that would be charged to
                    # whichever path ran first, making the agent-vs-raw overhead meaningless.
                    await self.step(engine, size, kv, level, "warmup", "raw", str(level))
                await self.side_by_side(
                    engine, size, kv, level, [("agent", self.adapter_name(level)), ("raw", "raw")], str(level)
                )
                if level == 2:
                    await self.step(
                        engine, size, kv, 2, "readers-1", "raw", "readers-1", reload={"readers": 1}
                    )
                if level == 4 and not self.cpu:
                    await self.step(
                        engine,
                        size,
                        kv,
                        4,
                        "tmpfs",
                        self.adapter_name(4),
                        "4",
                        image_root=Path(self.args.tmpfs_dir),
                    )
        finally:
            engine.stop()

        # The pod engine: the same model inside a simulated pod, moved by the agent's Levels + PodRef.
        if size in self.args.pod_sizes:
            await self.run_pod(size, kv, directory, levels)
        elif not self.cpu:
            chosen = " ".join(f"{g:g}" for g in self.args.pod_sizes) or "none"
            self.report.note(
                size,
                f"no pod rows at this size (--pod-sizes {chosen}; gpu_run.sh runs them at 16 GiB only, "
                "to stay within the device's 10-minute limit)",
            )

        # Engine B: the same model, no pinned buffers, treated as an engine without the sleep API.
        plain_levels = (
            [lv for lv in levels if lv in (3, 4)] if size <= self.args.plain_max_gib and not self.cpu else []
        )
        if plain_levels:
            try:
                self.budget.check(
                    self.estimate("start", size, kv)
                    + min(self.estimate(f"plain{lv}", size, kv) for lv in plain_levels)
                )
            except Skip as skip:
                for lv in plain_levels:
                    self.report.add(Row(size, "plain", "direct", lv, skipped=str(skip)))
                plain_levels = []
        if plain_levels:
            engine = await self.start_engine(size, kv, directory, assisted=False, tag="plain")
            if engine is not None:
                try:
                    for level in plain_levels:
                        await self.step(
                            engine, size, kv, level, "plain", "direct", f"plain{level}", assisted=False
                        )
                finally:
                    engine.stop()

        if self.args.cold and 2 in levels and not self.cpu:
            try:
                self.budget.check(self.estimate("start", size, kv) + self.estimate("cold", size, kv))
            except Skip as skip:
                self.report.add(Row(size, "cold", "raw", 2, skipped=str(skip)))
                return
            engine = await self.start_engine(size, kv, directory, assisted=True, tag="cold")
            if engine is not None:
                try:
                    await self.step(engine, size, kv, 2, "cold", "raw", "cold", cold=True)
                finally:
                    engine.stop()

    async def run_pod(self, size: float, kv: float, directory: Path | None, levels: list[int]) -> None:
        """Pod rows: the engine in a SimPod given the GPU's device nodes, the agent's own `Levels` with
        a real `PodRef` doing every step (tests/test_gpu_pod.py's walk), in the order of engine A
        (1, 3, 2, 4), each level but 4 after an unreported warm-up cycle of its own, as there."""
        order: list[int] = [lv for lv in (1, 3, 2, 4) if lv in levels]
        engine = await self.start_engine(size, kv, directory, assisted=True, tag="pod", pod=True)
        if engine is None:
            for level in order:
                self.report.add(
                    Row(
                        size,
                        "pod",
                        "pod",
                        level,
                        skipped="the engine in its pod did not start (see the notes)",
                    )
                )
            return
        try:
            for level in order:
                if level != 4:
                    await self.step(engine, size, kv, level, "pod-warmup", "pod", str(level))
                await self.step(engine, size, kv, level, "pod", "pod", str(level))
        finally:
            engine.stop()

    def adapter_name(self, level: int) -> str:
        if self.args.adapter == "auto":
            return "direct" if level == 4 else "agent"
        return str(self.args.adapter)

    async def start_engine(
        self, size: float, kv: float, directory: Path | None, assisted: bool, tag: str, pod: bool = False
    ) -> EngineProc | None:
        spec = self.spec(size, kv, directory, assisted, tag)
        engine = PodEngineProc(spec, self.work / "pod-checkpoints") if pod else EngineProc(spec)
        try:
            start = self.estimate("start", size, kv)
            if spec.pinned_prealloc:
                start += self.estimate("prealloc", size, kv)
            if pod:
                start += self.estimate("pod", size, kv)
            self.budget.check(start)
            say(
                f"  starting engine ({tag}{' in a simulated pod' if pod else ''}): {' '.join(engine.argv()[1:])}"
            )
            seconds = await asyncio.to_thread(engine.start, 300 + 4 * size)
            timings = engine.timings()
            where = f"pid {engine.pid}"
            if isinstance(engine, PodEngineProc) and engine.sim is not None:
                where += f" on the host, {engine.sim.engine_ns_pid()} in its pod"
            self.report.note(
                size,
                f"engine {tag} ({where}) ready in {seconds:.1f}s; its steps: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
            )
            answer = engine.complete(MAX_TOKENS)
            if tag == "assisted" or self.reference is None:
                self.reference = answer
            elif answer != self.reference:
                self.report.note(
                    size, f"engine {tag} answers {answer!r}, engine assisted answered {self.reference!r}"
                )
                self.reference = answer
        except Skip as skip:
            self.report.note(size, f"engine {tag} not started: {skip}")
            return None
        except Exception as exc:
            engine.stop()
            self.report.note(size, f"engine {tag} failed to start: {exc}")
            return None
        return engine

    async def step(
        self,
        engine: EngineProc,
        size: float,
        kv: float,
        level: int,
        path: str,
        adapter: str,
        estimate: str,
        **options: Any,
    ) -> None:
        """One reported row (see `side_by_side`)."""
        await self.side_by_side(engine, size, kv, level, [(path, adapter)], estimate, **options)

    async def side_by_side(
        self,
        engine: EngineProc,
        size: float,
        kv: float,
        level: int,
        paths: Sequence[tuple[str, str]],
        estimate: str,
        **options: Any,
    ) -> None:
        """One reported row per path: `--cycles` cycles for the paths the goals compare (their
        median), one for the others; the first cycle of a path that fails or is skipped ends its
        repetition, the other paths go on.

        Rows compared with each other (the agent beside raw) take their cycles in turn (agent, raw,
        agent, raw, ...): what drifts over a run reaches both alike. The driver's checkpoint and
        criu's dump each vary by up to 0.1-0.2 s from one minute to the next on one card, and three
        agent cycles followed by three raw ones turned that drift into an agent overhead of +11 %
        in one call and -6 % in the next."""
        wanted = {path: max(1, self.args.cycles) if path in REPEATED_PATHS else 1 for path, _ in paths}
        rows: dict[str, list[Row]] = {path: [] for path, _ in paths}
        for cycle in range(max(wanted.values())):
            for path, adapter in paths:
                done = rows[path]
                if cycle >= wanted[path] or (done and (done[-1].error or done[-1].skipped)):
                    continue
                done.append(await self.one_cycle(engine, size, kv, level, path, adapter, estimate, **options))
        for done in rows.values():
            self.report.add(median_row(done) if len(done) > 1 else done[0])

    async def one_cycle(
        self,
        engine: EngineProc,
        size: float,
        kv: float,
        level: int,
        path: str,
        adapter: str,
        estimate: str,
        *,
        assisted: bool = True,
        image_root: Path | None = None,
        reload: dict[str, Any] | None = None,
        cold: bool = False,
    ) -> Row:
        row = Row(size, path, adapter, level)
        image_root = image_root or self.work / "images"
        image_dir = image_root / f"{size:g}g-{path}-{level}"
        target = Target(engine, image_dir, engine_assisted=assisted, reload_kwargs=dict(reload or {}))
        try:
            self.budget.check(self.estimate(estimate, size, kv))
            if level in (3, 4) and self.cpu:
                raise Skip("levels 3 and 4 need a GPU")
            impl = ADAPTERS[adapter](target)
            if self.args.adapter == "agent" and path == "agent" and level == 4:
                raise Skip("the agent's level 4 needs a pod init (see bench/README.md)")
            await self.cycle(engine, impl, level, row, image_dir, cold)
        except Skip as skip:
            row.skipped = str(skip)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            say(f"  {path} level {level} failed: {row.error}\n{engine.log_tail(10)}")
            await self.recover(engine, level, image_dir)
        finally:
            if level == 4:
                shutil.rmtree(image_dir, ignore_errors=True)
        return row

    async def cycle(
        self, engine: EngineProc, impl: Levels, level: int, row: Row, image_dir: Path, cold: bool
    ) -> None:
        if cold and os.geteuid() != 0:
            raise Skip("dropping the page cache needs root")
        reference = self.reference or engine.complete(MAX_TOKENS)
        first_ref = reference.split()[0]
        if level == 4:
            shutil.rmtree(image_dir, ignore_errors=True)
            image_dir.parent.mkdir(parents=True, exist_ok=True)
            row.image_fs = fs_type(image_dir.parent)
            # The last image's writes and removal flushed first, for every adapter alike: a node's
            # sleeps are minutes apart, and back to back the kernel's writeback of the last image
            # (the shrunk copy behind the sleep, most of all) would run into this dump.
            os.sync()
        row.card_awake_mib = card_used_mib()
        before = engine.timings()

        started = time.monotonic()
        details = await impl.sleep(level) or {}
        row.sleep_s = time.monotonic() - started
        row.details.update(
            {k: v for k, v in details.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
        if level == 4:
            reap(engine.pid)  # criu ended the engine; its pid must be free for the restore
            row.image_bytes = int(details.get("image_bytes") or criu_image_bytes(image_dir))
        # The work an adapter does behind a sleep it reported (PodLevels: the image shrunk), timed
        # apart; the wake below is that of an engine that slept at least this long.
        after = await impl.behind(level)
        if "image_bytes" in after:  # the image column and its detail: the image after the shrink
            row.details["image_bytes_criu"] = row.image_bytes
            row.image_bytes = int(after["image_bytes"])
        row.details.update(after)
        # What the sleeping engine holds.
        row.card_asleep_mib = card_used_mib()
        row.engine_asleep_mib = (
            process_used_mib(engine.pid) if engine.alive() else (0 if not self.cpu else None)
        )
        row.rss_asleep_bytes = rss_bytes(engine.pid) if engine.alive() else 0
        if level in (1, 2):
            memory = engine.memory(query_cuda=True)
            row.reserved_asleep_bytes = memory.get("gpu_reserved_bytes")
            row.pinned_asleep_bytes = memory.get("pinned_bytes")
        elif level == 3:
            memory = engine.memory(query_cuda=False)  # its CUDA calls would block until the resume
            row.pinned_asleep_bytes = memory.get("pinned_bytes")
        else:
            row.pinned_asleep_bytes = 0
        if cold and not drop_caches():
            raise RuntimeError("cannot drop the page cache")
        await asyncio.sleep(self.args.pause)

        started = time.monotonic()
        details = await impl.wake(level) or {}
        row.wake_s = time.monotonic() - started
        first = engine.complete(1)
        row.first_token_s = time.monotonic() - started
        full = engine.complete(MAX_TOKENS)
        row.correct = first.strip() == first_ref and full == reference
        for k, v in details.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                row.details[f"wake_{k}"] = v
        after = engine.timings()
        if level in (2, 4) and after.get("reload") != before.get("reload"):
            row.details["reload_s"] = after["reload"]
            row.details["readers"] = after.get("reload_readers", self.args.readers)
        if level in (1, 3) and after.get("restore") != before.get("restore"):
            row.details["copy_back_s"] = after["restore"]
        # The engine's own sleep, as it timed it (an engine restored at level 4 still holds it): what
        # of `engine_s` is the engine's, and what the HTTP calls and checks around it.
        own = f"sleep_{engine_level(level)}"
        if after.get(own) != before.get(own):
            row.details["engine_own_sleep_s"] = after[own]
        if not row.correct:
            row.error = f"wrong answer after wake: {full!r} instead of {reference!r}"
            await self.recover(engine, 2, image_dir)

    async def recover(self, engine: EngineProc, level: int, image_dir: Path) -> None:
        """Put the engine back to awake and correct after a failed step, or restart it."""
        try:
            if not engine.alive() and level == 4 and criu.check_image(image_dir) == []:
                reap(engine.pid)
                await asyncio.to_thread(criu.restore, image_dir)
            if engine.alive():
                with contextlib.suppress(cuda.CudaError):
                    await asyncio.to_thread(cuda.resume_all, [engine.pid])
                async with engine_client(engine.url) as client:
                    if await client.is_sleeping():
                        await client.wake(2 if level in (2, 4) else 1)
                    await client.wake_up(["weights"])
                    await client.collective_rpc("reload_weights")
                if self.reference is None or engine.complete(MAX_TOKENS) == self.reference:
                    return
        except Exception as exc:
            say(f"  recovery failed: {exc}")
        say("  restarting the engine")
        engine.stop()
        engine.port = free_port()
        engine.url = f"http://127.0.0.1:{engine.port}"
        try:
            await asyncio.to_thread(engine.start, 300 + 4 * engine.spec.size_gib)
        except Exception as exc:
            say(f"  restart failed: {exc}")


def criu_image_bytes(image: Path) -> int:
    return sum(p.stat().st_size for p in image.glob("*.img")) if image.exists() else 0


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="cuda:0 or cpu (CPU: tiny sizes, levels 1-2)")
    p.add_argument(
        "--sizes", type=float, nargs="+", default=None, help="weights GiB (default 2 16 64; CPU 0.02)"
    )
    p.add_argument(
        "--levels", type=int, nargs="+", default=None, help="levels to run (default 1 2 3 4; CPU 1 2)"
    )
    p.add_argument("--quick", action="store_true", help="2 GiB, levels 1-3")
    p.add_argument("--big-from", type=float, default=48.0, help="sizes from here run only --big-levels")
    p.add_argument("--big-levels", type=int, nargs="+", default=[1, 3])
    p.add_argument(
        "--generate-from", type=float, default=48.0, help="sizes from here: weights not written to disk"
    )
    p.add_argument(
        "--plain-max-gib", type=float, default=16.0, help="plain (no sleep API) paths up to this size"
    )
    p.add_argument(
        "--kv-gib", type=float, default=None, help="KV cache (default 4; CPU 0.004); reduced to fit the GPU"
    )
    p.add_argument(
        "--pod-sizes",
        type=float,
        nargs="*",
        default=None,
        help="sizes that also get pod rows: the engine in a simulated pod, the agent's Levels + PodRef "
        "(root; default 16; none on CPU, where they check the plumbing at levels 1-2; `--pod-sizes` alone: none)",
    )
    p.add_argument("--readers", type=int, default=8)
    p.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="sleep/wake cycles per row for the agent, raw, pod and tmpfs paths, reported as their median",
    )
    p.add_argument("--adapter", choices=("auto", "agent", "direct"), default="auto")
    p.add_argument(
        "--cold", action="store_true", help="also a level-2 wake with the page cache dropped (root)"
    )
    p.add_argument("--pause", type=float, default=0.5, help="seconds asleep between sleep and wake")
    p.add_argument(
        "--work-dir", default="/var/tmp/hibernate-bench", help="weights and disk images (local disk)"
    )
    p.add_argument("--tmpfs-dir", default="/dev/shm/hibernate-bench", help="images on tmpfs")
    p.add_argument("--log-dir", default=None, help="engine logs (default <work-dir>/logs)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--json", default=None, help="also write every row as JSON here")
    p.add_argument(
        "--deadline", type=float, default=None, help="epoch seconds: skip steps that would end later"
    )
    p.add_argument("--budget-s", type=float, default=None, help="seconds from now (sets --deadline)")
    p.add_argument("--engine-arg", action="append", help="extra argument for the engine (repeatable)")
    p.add_argument("--section", default=None, help="RESULTS.md section to write (default gpu or cpu)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.quick:
        args.sizes = args.sizes or [2.0]
        args.levels = args.levels or [1, 2, 3]
    args.sizes = args.sizes or ([0.02] if cpu else [2.0, 16.0, 64.0])
    args.levels = args.levels or ([1, 2] if cpu else [1, 2, 3, 4])
    args.kv_gib = args.kv_gib if args.kv_gib is not None else (0.004 if cpu else 4.0)
    if args.pod_sizes is None:
        args.pod_sizes = [] if cpu else [16.0]
    args.log_dir = args.log_dir or str(Path(args.work_dir) / "logs")
    if args.budget_s is not None:
        args.deadline = time.time() + args.budget_s
    return args


def header(args: argparse.Namespace, argv: Sequence[str]) -> tuple[str, list[str]]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.device == "cpu":
        title = f"## CPU smoke run ({platform.node()}, {os.cpu_count()} cores, {now})"
        section = "cpu"
    else:
        ident = gpu_identity()
        title = (
            f"## GPU: {ident.get('name', '?')}, driver {ident.get('driver', '?')}, "
            f"{ident.get('memory_mib', '?')} MiB ({now})"
        )
        section = "gpu"
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    work = Path(args.work_dir)
    lines = [
        title,
        "",
        f"- host {platform.node()}, kernel {platform.release()}, Python {platform.python_version()}, torch {torch_version or '?'}",
        f"- command: `bench/wake.py {' '.join(argv)}`",
        f"- adapter {args.adapter} (`agent`: hibernate.agent.levels for levels 1-3, `direct` for 4); "
        f"{args.readers} readers; disk images under {work} ({fs_type(work.parent if not work.exists() else work)}), "
        f"tmpfs images under {args.tmpfs_dir}",
        "- sleep s / wake s: the adapter's calls; first correct token s: from the start of the wake to a 1-token "
        "completion equal to the awake answer (the full answer is compared too)",
        "- raw: bare urllib + cuCheckpoint* + criu binary; plain: a second engine (no pinned buffers) slept "
        "without its API (driver checkpoint of everything / the same, then CRIU)",
        "- pod: the same engine inside a simulated pod (hibernate.localnode.simpod, the GPU's /dev/nvidia* "
        "bound in, its own pid/mount/ipc/uts namespaces and cgroup, host network), moved by the agent's own "
        "Levels with a real PodRef (processes by cgroup, criu in the pod's namespaces); "
        + (
            f"at {', '.join(f'{g:g}' for g in args.pod_sizes)} GiB (--pod-sizes)"
            if args.pod_sizes
            else "not run (--pod-sizes)"
        ),
        "",
    ]
    return section, lines


async def amain(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    become_subreaper()
    section, head = header(args, argv)
    section = args.section or section
    report = Report(Path(args.results), Path(args.json) if args.json else None, section, head)
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
    failures = [r for rs in report.sizes.values() for r in rs if r.error]
    say(f"results: {args.results}" + (f"; {len(failures)} step(s) failed" if failures else ""))
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
