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

Results: a table on stdout (flushed as it goes) and a section of `--results` (bench/RESULTS.md),
rewritten after every step, so a run cut short by a timeout still leaves its numbers; `--json`
writes every row. `--deadline` (epoch seconds) or `--budget-s` skips steps that would not fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

ROOT: Final = Path(__file__).resolve().parent.parent
OPERATOR: Final = ROOT / "operator"
if str(OPERATOR) not in sys.path:
    sys.path.insert(0, str(OPERATOR))

from hibernate.agent import criu, cuda  # noqa: E402
from hibernate.api import constants as c  # noqa: E402
from wake_report import REPEATED_PATHS, Report, Row, median_row, say  # noqa: E402

GIB: Final = 2**30
MIB: Final = 2**20
PROMPT: Final = "t17 t4242 hibernate wakes the model t7"
MAX_TOKENS: Final = 8
PR_SET_CHILD_SUBREAPER: Final = 36


# --- small helpers ---------------------------------------------------------------------------------


def http(method: str, url: str, body: object = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def reap(pid: int, timeout: float = 10.0) -> None:
    """Collect `pid` if it is our (possibly adopted) child and has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done == pid:
            return
        time.sleep(0.01)


def become_subreaper() -> None:
    """Restored trees (criu restore -d) are reparented to us, so we can reap them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def nvidia_smi(*query: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def card_used_mib() -> int | None:
    rows = nvidia_smi("--query-gpu=memory.used", "-i", "0")
    return int(rows[0][0]) if rows and rows[0][0].isdigit() else None


def process_used_mib(pid: int) -> int | None:
    """The GPU memory nvidia-smi charges to `pid` (0 when it is not listed); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    for row in nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(row) >= 2 and row[0] == str(pid):
            return int(row[1]) if row[1].isdigit() else None
    return 0


def gpu_identity() -> dict[str, str]:
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total", "-i", "0")
    if not rows or len(rows[0]) < 3:
        return {}
    return {"name": rows[0][0], "driver": rows[0][1], "memory_mib": rows[0][2]}


def fs_type(path: Path) -> str:
    path = path.resolve()
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1].replace("\\040", " ")
                if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                    best
                ):
                    best, kind = mount, parts[2]
    return kind


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# --- the engine process ------------------------------------------------------------------------


@dataclass
class EngineSpec:
    size_gib: float
    kv_gib: float
    device: str
    weights_dir: Path | None
    readers: int
    pinned_prealloc: bool
    release_staging: bool
    log: Path
    extra: tuple[str, ...] = ()


class EngineProc:
    """The reference engine as a session leader with stdin /dev/null and an O_APPEND log (CRIU-ready)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        s = self.spec
        argv = [
            sys.executable,
            "-m",
            "hibernate.engine.reference",
            "--model",
            f"bench-{s.size_gib:g}g",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--weights-gib",
            f"{s.size_gib:g}",
            "--kv-gib",
            f"{s.kv_gib:g}",
            "--weights-dir",
            str(s.weights_dir) if s.weights_dir else "none",
            "--device",
            s.device,
            "--readers",
            str(s.readers),
            "--enable-sleep-mode",
        ]
        if s.pinned_prealloc:
            argv.append("--pinned-prealloc")
        if s.release_staging:
            argv.append("--release-staging")
        return argv + list(s.extra)

    def start(self, timeout: float) -> float:
        started = time.monotonic()
        self.spec.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(OPERATOR), env.get("PYTHONPATH")]))
        log_fd = os.open(self.spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                env=env,
                cwd=str(ROOT),
            )
        finally:
            os.close(log_fd)
        self.pid = self.proc.pid
        with open(self.spec.log.parent / "engine.pids", "a") as pids:  # for bench/gpu_run.sh's clean-up
            pids.write(f"{self.pid}\n")
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not alive(self.pid):
                reap(self.pid, 1)
                raise RuntimeError(f"the engine exited during start-up:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                http("GET", f"{self.url}/health", timeout=2)
                return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"the engine did not answer /health within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.spec.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.pid > 0 and alive(self.pid)

    def stop(self) -> None:
        if self.pid <= 0:
            return
        if alive(self.pid):
            with contextlib.suppress(cuda.CudaError, OSError):
                cuda.resume_all([self.pid])  # a checkpointed process would not handle SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        reap(self.pid, 10)
        if self.proc is not None:
            self.proc.returncode = self.proc.returncode if self.proc.returncode is not None else -9
        self.pid = 0

    # --- the engine's own API, bare ------------------------------------------------------------

    def complete(self, max_tokens: int) -> str:
        body = http("POST", f"{self.url}/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens})
        text: str = body["choices"][0]["text"]
        return text

    def memory(self, query_cuda: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = http("GET", f"{self.url}/debug/memory?cuda={int(query_cuda)}", timeout=30)
        return result

    def timings(self) -> dict[str, float]:
        result: dict[str, float] = http("GET", f"{self.url}/debug/timings", timeout=30)
        return result

    def checksum(self) -> str:
        body = http("POST", f"{self.url}/collective_rpc", {"method": "checksum"})
        return str(body["results"][0])


POD_ENGINE_TIMEOUT_S: Final = 180.0  # the agent's limits in the pod rows (tests/test_gpu_pod.py's)
POD_CRIU_TIMEOUT_S: Final = 180.0


class PodEngineProc(EngineProc):
    """The reference engine inside a simulated pod, moved by the agent's own code (as tests/test_gpu_pod.py).

    `hibernate.localnode.simpod.SimPod` (its own pid, mount, ipc and uts namespaces, the pod cgroup,
    the pod init as PID 1; the host's network, so the engine is at 127.0.0.1) given the GPU's device
    nodes as the NVIDIA container toolkit would, the weights directory as a volume. `pid` is the
    engine's host pid (a new one after a Checkpoint wake; the last one while criu has ended it);
    `agent()` gives the agent's `Levels` with a real `PodRef` of this pod.
    """

    def __init__(self, spec: EngineSpec, checkpoint_root: Path) -> None:
        self.sim: Any = None  # hibernate.localnode.simpod.SimPod
        self._last_pid = 0
        self.checkpoint_root = checkpoint_root
        self.restored = False  # criu restored it: end it CUDA-checkpointed (gpupod.end_pod)
        self._agent: tuple[Any, Any] | None = None
        super().__init__(spec)

    @property
    def pid(self) -> int:
        if self.sim is not None:
            current = self.sim.engine_host_pid()
            if current is not None:
                self._last_pid = current
        return self._last_pid

    @pid.setter
    def pid(self, value: int) -> None:
        self._last_pid = value

    def alive(self) -> bool:
        return self.sim is not None and self.sim.engine_host_pid() is not None

    def start(self, timeout: float) -> float:
        from hibernate.localnode.gpupod import pod_volumes
        from hibernate.localnode.simpod import nvidia_devices

        if os.geteuid() != 0:
            raise Skip("a simulated pod needs root (namespaces, cgroups)")
        if shutil.which("unshare") is None:
            raise Skip("unshare is missing")
        devices = nvidia_devices() if self.spec.device != "cpu" else []
        if self.spec.device != "cpu" and not devices:
            raise Skip("no /dev/nvidia* device nodes to give the pod")
        with contextlib.suppress(cuda.CudaError, OSError):
            cuda.default_api()  # the driver library loaded here, so pod_volumes binds its mount
        started = time.monotonic()
        explicit = []
        if self.spec.weights_dir is not None:
            self.spec.weights_dir.mkdir(parents=True, exist_ok=True)
            explicit.append(self.spec.weights_dir)
        volumes = pod_volumes(explicit)
        self.spec.log.parent.mkdir(parents=True, exist_ok=True)
        say(f"  pod: devices {' '.join(devices)}; volumes {' '.join(volumes)}")
        env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(OPERATOR), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.restored = False
        self._agent = None
        try:
            self.sim = self._start_sim(
                port=self.port,
                ready_path="/health",
                timeout=timeout,
                host_network=True,
                env=env,
                devices=devices,
                volumes=volumes,
            )
        except (RuntimeError, TimeoutError) as exc:  # the message carries the whole pod log
            with contextlib.suppress(OSError), open(self.spec.log, "a") as log:
                log.write(str(exc))
            raise RuntimeError(f"the engine did not start in its pod: {str(exc)[-1500:]}") from None
        self._last_pid = self.sim.engine_host_pid() or 0
        with open(self.spec.log.parent / "pod.pids", "a") as pids:  # for bench/gpu_run.sh's clean-up
            pids.write(f"{self.sim.init_pid}\n")
        return time.monotonic() - started

    def _start_sim(self, **options: Any) -> Any:
        """The pod itself; bench/snapshot_restore.py starts one whose init waits for a restore."""
        from hibernate.localnode.simpod import SimPod

        return SimPod.start(self.argv(), **options)

    def agent(self) -> tuple[Any, Any]:
        """The agent's `Levels` (its Host as the DaemonSet runs it, with a checkpoint root of the
        bench's and shorter limits) and a `PodRef` of this pod."""
        if self._agent is None:
            from hibernate.agent.levels import Host
            from hibernate.agent.levels import Levels as AgentLevelsImpl
            from hibernate.agent.podref import PodRef

            assert self.sim is not None, "the pod is not started"
            self.checkpoint_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.checkpoint_root, 0o700)  # root-only, as the agent keeps its images
            root = self.checkpoint_root.resolve()
            ref = PodRef(
                namespace="bench",
                name=f"pod-{self.spec.size_gib:g}g",
                uid=self.sim.uid,
                ip="127.0.0.1",
                port=self.port,
                container="engine",
                container_id=self.sim.container_id,
                annotations={},
                checkpoint_dir=str(root),
                deleting=False,
            )
            host = Host(
                checkpoint_roots=(root,),
                engine_timeout_s=POD_ENGINE_TIMEOUT_S,
                criu_timeout_s=POD_CRIU_TIMEOUT_S,
            )
            self._agent = (AgentLevelsImpl(host), ref)
        return self._agent

    def log_tail(self, lines: int = 25) -> str:
        if self.sim is None:
            return super().log_tail(lines)
        return "\n".join(self.sim.log().splitlines()[-lines:])

    def stop(self) -> None:
        from hibernate.localnode.gpupod import end_pod

        if self.sim is None:
            return
        # The pod's log (the engine's, through podinit) stays, with the other engines' logs.
        with contextlib.suppress(OSError), open(self.spec.log, "a") as log:
            log.write(self.sim.log())
        end_pod(self.sim, self.url, self.restored)
        self.sim = None
        self._agent = None
        self._last_pid = 0
        shutil.rmtree(self.checkpoint_root, ignore_errors=True)


# --- the adapters ------------------------------------------------------------------------------


class Levels(Protocol):
    """One engine's sleep and wake; returns details (seconds of parts, image bytes, ...)."""

    name: str

    async def sleep(self, level: int) -> dict[str, Any]: ...

    async def wake(self, level: int) -> dict[str, Any]: ...


class Skip(Exception):
    """A step that cannot run here (no criu, not root, no GPU, the budget)."""


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


def _engine_client(url: str) -> Any:
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


def _assisted_sleep(level: int) -> tuple[int, str]:
    """The engine's sleep before CudaSuspend (3) or Checkpoint (4), with the agent's hint."""
    return (1, c.PREPARE_CUDA_SUSPEND) if level == 3 else (2, c.PREPARE_CHECKPOINT)


class DirectLevels:
    """The agent's pieces composed here: EngineClient, cuda.suspend_all/resume_all, criu.dump/restore."""

    name = "direct"

    def __init__(self, target: Target) -> None:
        self.t = target

    async def _engine_sleep(self, level: int, prepare: str | None = None) -> float:
        started = time.monotonic()
        async with _engine_client(self.t.url) as client:
            await client.sleep_level(level, prepare=prepare)
        return time.monotonic() - started

    async def _engine_wake(self, level: int) -> float:
        started = time.monotonic()
        async with _engine_client(self.t.url) as client:
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
            details["image_bytes"] = result.metadata.image_bytes
        return details

    def _dump(self) -> criu.DumpResult:
        try:
            return criu.dump(self.t.image_dir, self.t.pid, tcp_established=self.t.tcp_established)
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
                return criu.dump(self.t.image_dir, self.t.pid, tcp_established=False)
            raise

    async def wake(self, level: int) -> dict[str, Any]:
        if level in (1, 2):
            return {"engine_s": await self._engine_wake(level)}
        details: dict[str, Any] = {}
        if level == 4:
            result = await asyncio.to_thread(
                criu.restore, self.t.image_dir, tcp_established=self.t.tcp_established
            )
            details["criu_s"] = result.seconds
        # criu restores the process CUDA-checkpointed, as it was dumped: the driver restores it here.
        report = await asyncio.to_thread(cuda.resume_all, [self.t.pid])
        details["cuda_s"] = report.seconds
        if self.t.engine_assisted:
            details["engine_s"] = await self._engine_wake(1 if level == 3 else 2)
        if level == 4:
            await asyncio.to_thread(criu.remove_image, self.t.image_dir)
        return details


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
                return _engine_client(engine.url)

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
            details["engine_s"] = self._engine_wake(1 if level == 3 else 2)
        if level == 4:
            shutil.rmtree(self.t.image_dir, ignore_errors=True)
        return details


ADAPTERS: Final[dict[str, Callable[[Target], Levels]]] = {
    "agent": AgentLevels,
    "direct": DirectLevels,
    "raw": RawLevels,
    "pod": PodLevels,
}


# --- the bench -------------------------------------------------------------------------------------


class Budget:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def check(self, estimate: float) -> None:
        if estimate > self.left():
            raise Skip(f"budget: needs ~{estimate:.0f}s, {max(0.0, self.left()):.0f}s left")


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
                await self.step(engine, size, kv, level, "agent", self.adapter_name(level), str(level))
                await self.step(engine, size, kv, level, "raw", "raw", str(level))
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
        """One reported row: `--cycles` cycles for the paths the goals compare (their median), one
        for the others; the first cycle that fails or is skipped ends the repetition."""
        cycles = self.args.cycles if path in REPEATED_PATHS else 1
        rows: list[Row] = []
        for _ in range(max(1, cycles)):
            row = await self.one_cycle(engine, size, kv, level, path, adapter, estimate, **options)
            rows.append(row)
            if row.error or row.skipped:
                break
        self.report.add(median_row(rows) if len(rows) > 1 else rows[0])

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
                async with _engine_client(engine.url) as client:
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
