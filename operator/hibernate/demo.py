# mypy: disallow-untyped-calls=False
"""`hibernate demo`: the whole product on this machine, one sleep/wake cycle per level that can run here.

A real kube-apiserver, etcd, controller-manager and scheduler (hack/start-control-plane.sh), the
operator and the node agent as real processes, a stand-in kubelet that runs the fake vLLM engine in
a simulated pod, and a ModelDeployment walked through the levels with `kubectl get md` at each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.localnode.kubelet import LocalKubelet, can_simulate_pods

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack"
NODE = "demo-node"
NAME = "demo"
PROMPT = "Sleeping models free their GPUs because"


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def assets() -> Path:
    # the same default as hack/install-k8s-test-assets.sh: Kubernetes 1.34 (KUBE_TEST_VERSION picks another)
    version = os.environ.get("KUBE_TEST_VERSION") or "1.34"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("KUBE_TEST_ASSETS") or cache / "k8s-test-assets" / version)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = ""
        self.port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.kubelet: LocalKubelet | None = None
        self.api: kubernetes.client.ApiClient | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        cmd = [str(assets() / "kubectl"), "--kubeconfig", self.kubeconfig, *args]
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1"}
        self.processes.append(
            subprocess.Popen([sys.executable, "-m", "hibernate", *args], stdout=log, stderr=log, env=env)
        )

    def md(self) -> dict[str, Any]:
        obj: Any = self.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, "default", c.PLURAL, NAME)
        return dict(obj)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 180) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if check():
                    return time.monotonic() - started
            except Exception:  # the API or the engine may be briefly away; keep polling
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached after {timeout:.0f} s; logs in {self.workdir}")

    def phase_is(self, *phases: str, level: str | None = None) -> Callable[[], bool]:
        def check() -> bool:
            status = self.md().get("status") or {}
            return status.get("phase") in phases and (level is None or status.get("sleepLevel") == level)

        return check

    def complete(self) -> str:
        r = httpx.post(
            f"http://127.0.0.1:{self.port}/v1/completions",
            json={"model": "facebook/opt-125m", "prompt": PROMPT, "max_tokens": 8},
            timeout=60,
        )
        r.raise_for_status()
        text: str = r.json()["choices"][0]["text"]
        return text

    def engine_memory(self) -> str:
        try:
            mem = httpx.get(f"http://127.0.0.1:{self.port}/debug/memory", timeout=2).json()
        except httpx.HTTPError:
            return "engine process not running (checkpointed or stopped)"
        return f"engine holds {mem['device_bytes'] / 2**20:.0f} MiB of 'GPU' memory, {mem['host_bytes'] / 2**20:.0f} MiB on the host"

    # -- the story -------------------------------------------------------------------------------

    def up(self) -> None:
        say("== 1. a real control plane (etcd, kube-apiserver, controller-manager, scheduler) ==")
        subprocess.run([str(HACK / "install-k8s-test-assets.sh")], check=True)
        out = subprocess.run(
            [str(HACK / "start-control-plane.sh"), "--controllers", str(self.workdir / "k8s")],
            check=True,
            capture_output=True,
            text=True,
        )
        self.kubeconfig = out.stdout.strip().splitlines()[-1]
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.kubeconfig, client_configuration=config)
        self.api = kubernetes.client.ApiClient(config)
        self.kubectl("apply", "-f", str(ROOT / "crds" / "modeldeployments.hibernate.dev.yaml"))
        self.kubectl("wait", "--for=condition=Established", f"crd/{c.CRD_NAME}", "--timeout=30s")
        say(f"   kubeconfig: {self.kubeconfig}")

        say("== 2. the operator, the node agent, and a local node that runs pods as namespaced processes ==")
        self.kubelet = LocalKubelet(self.api, node=NODE).start()
        self.spawn("operator", "operator")
        self.spawn(
            "agent",
            "agent",
            "--node-name",
            NODE,
            "--metrics-port",
            str(free_port()),
            "--checkpoint-root",
            str(self.workdir / "checkpoints"),
        )

    def apply_model(self) -> None:
        say("== 3. kubectl apply a ModelDeployment served by the fake vLLM engine ==")
        manifest = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "metadata": {"name": NAME},
            "spec": {
                "model": "facebook/opt-125m",
                "replicas": 1,
                "sleepLevel": "Awake",
                "engine": {
                    "image": "local/hibernate:dev",
                    "command": [sys.executable, "-m", "hibernate.engine.fake"],
                    "args": ["--host", "127.0.0.1", "--weights-mib", "256", "--kv-mib", "64"],
                    "port": self.port,
                },
                "checkpoint": {"directory": str(self.workdir / "checkpoints")},
            },
        }
        self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
        seconds = self.wait_for("Awake", self.phase_is("Awake"))
        say(f"   Awake after {seconds:.1f} s (a cold start of the engine)")
        say(self.kubectl("get", "md"))

    def cycle(self, level: SleepLevel, baseline: str) -> dict[str, Any]:
        say(f"== kubectl patch md {NAME} sleepLevel={level.label} ==")
        self.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, "default", c.PLURAL, NAME, {"spec": {"sleepLevel": level.label}}
        )
        target = "Stopped" if level == SleepLevel.STOP else "Asleep"
        slept = self.wait_for(target, self.phase_is(target, level=level.label))
        say(self.kubectl("get", "md"))
        say(f"   {self.engine_memory()}")
        say(f"== kubectl patch md {NAME} sleepLevel=Awake ==")
        self.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, "default", c.PLURAL, NAME, {"spec": {"sleepLevel": "Awake"}}
        )
        woke = self.wait_for("Awake", self.phase_is("Awake", level="Awake"))
        answer = self.complete()
        say(self.kubectl("get", "md"))
        same = answer == baseline
        say(f"   answer after waking: {answer!r} ({'same as before' if same else 'DIFFERENT'})")
        return {"level": level.label, "sleep": slept, "wake": woke, "same": same}

    def down(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.kubeconfig:
            subprocess.run(
                [str(HACK / "start-control-plane.sh"), "stop", str(self.workdir / "k8s")], check=False
            )


@contextmanager
def demo_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hibernate-demo-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def levels_here() -> tuple[list[SleepLevel], list[str]]:
    levels, skipped = [SleepLevel.L1, SleepLevel.L2], []
    skipped.append(
        "CudaSuspend: needs an NVIDIA GPU and driver >= 570 (measured on an H100: bench/RESULTS.md)"
    )
    if can_simulate_pods():
        from hibernate.agent import criu

        try:
            criu.version()
            levels.append(SleepLevel.CHECKPOINT)
        except criu.CriuError as e:
            skipped.append(f"Checkpoint: {e} (hack/build-criu.sh builds it)")
    else:
        skipped.append("Checkpoint: needs root to run pods in their own namespaces")
    levels.append(SleepLevel.STOP)
    return levels, skipped


def run(args: argparse.Namespace) -> int:
    if not HACK.is_dir():
        print("hibernate demo runs from a checkout of the repository (it needs hack/)", file=sys.stderr)
        return 2
    levels, skipped = levels_here()
    with demo_dir(args.keep) as workdir:
        demo = Demo(workdir)
        try:
            demo.up()
            demo.apply_model()
            baseline = demo.complete()
            say(f"   answer: {baseline!r}")
            results = [demo.cycle(level, baseline) for level in levels]
        finally:
            if not args.keep:
                demo.down()
            else:
                say(f"left running: KUBECONFIG={demo.kubeconfig}; logs in {workdir}")
    say("== summary (seconds from kubectl patch to the phase in `kubectl get md`) ==")
    say(f"{'level':<12} {'sleep s':>8} {'wake s':>8}  same answer")
    for r in results:
        say(f"{r['level']:<12} {r['sleep']:>8.2f} {r['wake']:>8.2f}  {'yes' if r['same'] else 'NO'}")
    for line in skipped:
        say(f"skipped {line}")
    return 0 if all(r["same"] for r in results) else 1
