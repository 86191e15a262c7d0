"""The reference engine as the benches run it: a process of its own (`EngineProc`), or inside a
simulated pod moved by the agent's own code (`PodEngineProc`, as tests/test_gpu_pod.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchkit import OPERATOR, PROMPT, ROOT, Skip, free_port, http, reap
from hibernate.agent import cuda
from hibernate.agent.criu.nsexec import alive
from wake_report import say


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
