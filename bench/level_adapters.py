"""How the wake bench moves an engine through the levels (`Levels.sleep(level)` / `Levels.wake(level)`):
`AgentLevels` and `PodLevels` through the agent's own `hibernate.agent.levels.Levels`, `DirectLevels`
composing the agent's pieces, `RawLevels` the bare mechanisms (the agent-overhead baseline)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from benchkit import Skip, http
from engine_proc import EngineProc, PodEngineProc
from hibernate.agent import criu, cuda
from hibernate.agent.criu import shrink
from hibernate.agent.criu.nsexec import alive
from hibernate.api import constants as c
from wake_report import say


class Levels(Protocol):
    """One engine's sleep and wake; returns details (seconds of parts, image bytes, ...)."""

    name: str

    async def sleep(self, level: int) -> dict[str, Any]: ...

    async def wake(self, level: int) -> dict[str, Any]: ...

    async def behind(self, level: int) -> dict[str, Any]:
        """What the adapter does behind a sleep it reported (the image shrunk), waited for apart from
        the sleep's time; {} where it does nothing there."""
        ...


@dataclass
class Target:
    """What an adapter acts on: the engine's URL and pid, where level-4 images go."""

    engine: EngineProc
    image_dir: Path
    engine_assisted: bool = True
    tcp_established: bool = True  # as the agent does (connections to the engine survive a dump)
    reload_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.engine.url

    @property
    def pid(self) -> int:
        return self.engine.pid


def engine_client(url: str) -> Any:
    try:
        from hibernate.agent.engine_client import EngineClient
    except ImportError as exc:  # httpx missing
        raise Skip(f"the agent's EngineClient is not importable ({exc})") from exc
    return EngineClient(url, timeout=600.0, retries=1)


def _need_criu() -> criu.Bundle:
    if os.geteuid() != 0:
        raise Skip("CRIU needs root")
    try:
        bundle = criu.locate()
        criu.version(bundle)
    except criu.CriuError as exc:
        raise Skip(str(exc).splitlines()[0]) from exc
    return bundle


def engine_level(level: int) -> int:
    """The engine's own sleep level under each of the agent's: 1 and 2 themselves, 1 under
    CudaSuspend (3), 2 under Checkpoint (4)."""
    return {3: 1, 4: 2}.get(level, level)


def _assisted_sleep(level: int) -> tuple[int, str]:
    """The engine's sleep before CudaSuspend (3) or Checkpoint (4), with the agent's hint."""
    return engine_level(level), c.PREPARE_CUDA_SUSPEND if level == 3 else c.PREPARE_CHECKPOINT


class DirectLevels:
    """The agent's pieces composed here: EngineClient, cuda.suspend_all/resume_all, criu.dump/restore,
    and the image shrunk behind the sleep (criu.shrink), as the agent's Levels do."""

    name = "direct"

    def __init__(self, target: Target) -> None:
        self.t = target
        self.shrinker = shrink.Shrinker()

    async def _engine_sleep(self, level: int, prepare: str | None = None) -> float:
        started = time.monotonic()
        async with engine_client(self.t.url) as client:
            await client.sleep_level(level, prepare=prepare)
        return time.monotonic() - started

    async def _engine_wake(self, level: int) -> float:
        started = time.monotonic()
        async with engine_client(self.t.url) as client:
            if level == 2 and self.t.reload_kwargs:
                await client.wake_up(["weights"])
                await client.collective_rpc("reload_weights", kwargs=self.t.reload_kwargs)
                await client.wake_up(["kv_cache"])
                await client.reset_prefix_cache()
                if await client.is_sleeping():
                    raise RuntimeError("still sleeping after the level-2 wake sequence")
            else:
                await client.wake(level)
        return time.monotonic() - started

    async def sleep(self, level: int) -> dict[str, Any]:
        if level in (1, 2):
            return {"engine_s": await self._engine_sleep(level)}
        details: dict[str, Any] = {}
        if self.t.engine_assisted:
            details["engine_s"] = await self._engine_sleep(*_assisted_sleep(level))
        report = await asyncio.to_thread(cuda.suspend_all, [self.t.pid])  # level 4 too: no CRIU plugin
        details["cuda_s"] = report.seconds
        if level == 4:
            _need_criu()
            result = await asyncio.to_thread(self._dump)
            details["criu_s"] = result.seconds
            details["criu_run_s"] = result.steps["criu"]
            details["criu_gone_s"] = result.steps["gone"]
            details["image_bytes"] = result.metadata.image_bytes
            self.shrinker.start(self.t.image_dir)
        return details

    async def behind(self, level: int) -> dict[str, Any]:
        """The image shrunk behind the sleep (see PodLevels.behind)."""
        return await _shrunk(self.shrinker, self.t.image_dir) if level == 4 else {}

    def _dump(self) -> criu.DumpResult:
        try:
            return criu.dump(
                self.t.image_dir, self.t.pid, tcp_established=self.t.tcp_established, zero_pages_now=False
            )
        except criu.CriuError as exc:
            text = str(exc)
            if (
                self.t.tcp_established
                and alive(self.t.pid)
                and re.search(r"nft|network|iptables|lock", text, re.I)
            ):
                say(
                    f"  note: criu dump with --tcp-established failed ({text.splitlines()[0][:160]}); again without"
                )
                self.t.tcp_established = False
                if self.t.engine_assisted:
                    cuda.suspend_all([self.t.pid])  # a failed dump resumed the tree
                return criu.dump(self.t.image_dir, self.t.pid, tcp_established=False, zero_pages_now=False)
            raise

    async def wake(self, level: int) -> dict[str, Any]:
        if level in (1, 2):
            return {"engine_s": await self._engine_wake(level)}
        details: dict[str, Any] = {}
        if level == 4:
            await asyncio.to_thread(self.shrinker.cancel, self.t.image_dir)
            result = await asyncio.to_thread(
                criu.restore, self.t.image_dir, tcp_established=self.t.tcp_established
            )
            details["criu_s"] = result.seconds
        # criu restores the process CUDA-checkpointed, as it was dumped: the driver restores it here.
        report = await asyncio.to_thread(cuda.resume_all, [self.t.pid])
        details["cuda_s"] = report.seconds
        if self.t.engine_assisted:
            details["engine_s"] = await self._engine_wake(engine_level(level))
        if level == 4:
            await asyncio.to_thread(criu.remove_image, self.t.image_dir)
        return details


async def _shrunk(shrinker: shrink.Shrinker, image: Path) -> dict[str, Any]:
    """Wait for the shrink of `image`: its seconds, and the image's bytes after it where it shrank."""
    ended = await asyncio.to_thread(shrinker.wait, image, 600.0)
    if ended is None:
        return {}
    if ended.compaction is None:
        say(f"  the image kept its zero pages: {ended.reason}")
        return {"shrink_s": ended.seconds}
    return {"shrink_s": ended.seconds, "image_bytes": ended.image_bytes}


class AgentLevels:
    """The agent's own `hibernate.agent.levels.Levels` on a bare engine process (levels 1-3).

    The engine is no pod: a Host whose process lookups answer the engine's pid and whose engine
    client points at its URL stands in for the cgroup discovery. Level 4 needs the engine under
    the pod init in its own pid namespace (criu runs through nsenter there, and the restored tree
    must be reparented to that init): the `pod` rows (PodLevels) measure it; here it raises Skip
    and `--adapter auto` measures level 4 with DirectLevels.
    """

    name = "agent"

    def __init__(self, target: Target) -> None:
        try:
            from hibernate.agent import discovery
            from hibernate.agent import levels as agent_levels
            from hibernate.agent.podref import PodRef
            from hibernate.api.levels import SleepLevel
        except ImportError as exc:
            raise Skip(f"the agent's levels module is not importable ({exc})") from exc
        self.t = target
        self._levels_mod = agent_levels
        self._sleep_level = SleepLevel
        engine = target.engine

        class BenchHost(agent_levels.Host):
            def engine(self, pod: Any) -> Any:
                return engine_client(engine.url)

            def processes(self, pod: Any) -> list[Any]:
                if not alive(engine.pid):
                    return []
                return [
                    discovery.ProcessInfo(
                        pid=engine.pid,
                        ppid=os.getpid(),
                        comm="python3",
                        cmdline=tuple(engine.argv()),
                        pod_uid="bench",
                        container_id=None,
                        nspid=(engine.pid,),
                        cgroup="/",
                    )
                ]

            def cuda_pids(self, pod: Any) -> list[int]:
                return [engine.pid] if alive(engine.pid) else []

        self.host = BenchHost(checkpoint_roots=(target.image_dir.parent,))
        self.levels = agent_levels.Levels(self.host)
        self.pod = PodRef(
            namespace="bench",
            name="engine",
            uid="bench",
            ip="127.0.0.1",
            port=engine.port,
            container="engine",
            container_id=None,
            annotations={},
            checkpoint_dir=str(target.image_dir.parent),
            deleting=False,
        )

    async def sleep(self, level: int) -> dict[str, Any]:
        if level == 4:
            raise Skip("the agent's level 4 needs a pod init in a pod's pid namespace")
        result: dict[str, Any] = await self.levels.sleep(self.pod, self._sleep_level(level))
        return result

    async def wake(self, level: int) -> dict[str, Any]:
        if level == 4:
            raise Skip("the agent's level 4 needs a pod init in a pod's pid namespace")
        result: dict[str, Any] = await self.levels.wake(self.pod, self._sleep_level(level))
        return result

    async def behind(self, level: int) -> dict[str, Any]:
        return {}


class PodLevels:
    """The agent's own `Levels` with a real `PodRef`, on the engine inside a simulated pod (levels 1-4).

    As tests/test_gpu_pod.py: the agent finds the pod's processes by their cgroup, speaks HTTP to
    the engine, checkpoints CUDA through the driver API from this process and, at level 4, runs criu
    from its bundle in the pod's namespaces (the restored engine keeps its pid in the pod).
    """

    name = "pod"

    def __init__(self, target: Target) -> None:
        if not isinstance(target.engine, PodEngineProc):
            raise Skip("the pod adapter needs the engine in a simulated pod")
        from hibernate.api.levels import SleepLevel

        self.engine = target.engine
        self._sleep_level = SleepLevel

    async def sleep(self, level: int) -> dict[str, Any]:
        if level == 4:
            bundle = _need_criu()
            if bundle.nsjoin is None:
                raise Skip(f"{bundle.criu} is not a bundle with hibernate-nsjoin.so (hack/build-criu.sh)")
        levels, ref = self.engine.agent()
        result: dict[str, Any] = await levels.sleep(ref, self._sleep_level(level))
        return result

    async def behind(self, level: int) -> dict[str, Any]:
        """What the agent does behind a sleep it reported, waited for outside the sleep's time: at
        level 4 the image losing its zero pages (criu/shrink.py). Its seconds and the image after it."""
        if level != 4:
            return {}
        levels, ref = self.engine.agent()
        return await _shrunk(levels.shrinker, ref.image_dir(levels.host.checkpoint_roots))

    async def wake(self, level: int) -> dict[str, Any]:
        levels, ref = self.engine.agent()
        if level == 4:
            self.engine.restored = True  # from here on, end it CUDA-checkpointed
        result: dict[str, Any] = await levels.wake(ref, self._sleep_level(level))
        return result


class RawLevels:
    """The bare mechanisms: urllib, the driver's cuCheckpoint* calls, the criu binary. No checks, no retries."""

    name = "raw"

    def __init__(self, target: Target) -> None:
        self.t = target

    def _post(self, path: str, body: object = None) -> None:
        http("POST", f"{self.t.url}{path}", body)

    def _engine_sleep(self, level: int, prepare: str | None = None) -> float:
        started = time.monotonic()
        self._post(f"/sleep?level={level}" + (f"&{c.SLEEP_HINT_PARAM}={prepare}" if prepare else ""))
        return time.monotonic() - started

    def _engine_wake(self, level: int) -> float:
        started = time.monotonic()
        if level == 2:
            self._post("/wake_up?tags=weights")
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": self.t.reload_kwargs})
            self._post("/wake_up?tags=kv_cache")
            self._post("/reset_prefix_cache")
        else:
            self._post("/wake_up")
        return time.monotonic() - started

    def _criu(self, action: str, args: Sequence[str]) -> float:
        bundle = _need_criu()
        started = time.monotonic()
        cmd = [str(bundle.criu), action, "-D", str(self.t.image_dir), "-v4", "--shell-job", *args]
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, start_new_session=True, check=False
        )
        if done.returncode != 0:
            log = self.t.image_dir / f"{action}.log"
            tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
            raise RuntimeError(
                f"criu {action} failed (rc {done.returncode}): {done.stdout}{done.stderr}\n" + "\n".join(tail)
            )
        return time.monotonic() - started

    def _cuda(self, steps: Sequence[str]) -> float:
        api = cuda.default_api()
        started = time.monotonic()
        for step in steps:
            if step == "lock":
                api.lock(self.t.pid, int(cuda.DEFAULT_LOCK_TIMEOUT_S * 1000))
            else:
                getattr(api, step)(self.t.pid)
        return time.monotonic() - started

    async def sleep(self, level: int) -> dict[str, Any]:
        return await asyncio.to_thread(self._sleep, level)

    def _sleep(self, level: int) -> dict[str, Any]:
        if level in (1, 2):
            return {"engine_s": self._engine_sleep(level)}
        details: dict[str, Any] = {}
        if self.t.engine_assisted:
            details["engine_s"] = self._engine_sleep(*_assisted_sleep(level))
        # Level 4 too: criu runs without a CUDA plugin, as in the agent (docs/security.md).
        details["cuda_s"] = self._cuda(["lock", "checkpoint"])
        if level == 4:
            shutil.rmtree(self.t.image_dir, ignore_errors=True)
            self.t.image_dir.mkdir(parents=True)
            args = ["-t", str(self.t.pid), "-o", "dump.log"]
            if self.t.tcp_established:
                args += ["--tcp-established", "--network-lock", "nftables"]
            details["criu_s"] = self._criu("dump", args)
            details["image_bytes"] = sum(p.stat().st_size for p in self.t.image_dir.glob("*.img"))
        return details

    async def wake(self, level: int) -> dict[str, Any]:
        return await asyncio.to_thread(self._wake, level)

    async def behind(self, level: int) -> dict[str, Any]:
        return {}

    def _wake(self, level: int) -> dict[str, Any]:
        if level in (1, 2):
            return {"engine_s": self._engine_wake(level)}
        details: dict[str, Any] = {}
        if level == 4:
            args = ["-d", "-o", "restore.log"]
            if self.t.tcp_established:
                args += ["--tcp-established", "--network-lock", "nftables"]
            details["criu_s"] = self._criu("restore", args)
        details["cuda_s"] = self._cuda(["restore", "unlock"])
        if self.t.engine_assisted:
            details["engine_s"] = self._engine_wake(engine_level(level))
        if level == 4:
            shutil.rmtree(self.t.image_dir, ignore_errors=True)
        return details


ADAPTERS: Final[dict[str, Callable[[Target], Levels]]] = {
    "agent": AgentLevels,
    "direct": DirectLevels,
    "raw": RawLevels,
    "pod": PodLevels,
}
