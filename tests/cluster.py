"""A real Kubernetes control plane for tests (etcd, kube-apiserver, controller-manager, scheduler).

Started once per test session on loopback by hack/start-control-plane.sh from binaries that
hack/install-k8s-test-assets.sh builds and caches in $KUBE_TEST_ASSETS (Kubernetes 1.34 by default,
KUBE_TEST_VERSION=1.20 for the oldest supported one). No mocked API anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
HACK = ROOT / "hack"
CRD_FILE = ROOT / "crds" / "modeldeployments.hibernate.dev.yaml"
GPU_GROUP_CRD_FILE = ROOT / "crds" / "gpugroups.hibernate.dev.yaml"


# The Kubernetes minor the tests run on: 1.34 by default (a supported release, the newest one the
# chart is tested against), 1.20 (the oldest the chart claims, its kubeVersion) with
# KUBE_TEST_VERSION=1.20. hack/install-k8s-test-assets.sh builds either.
DEFAULT_KUBE_TEST_VERSION = "1.34"


def kube_test_version() -> str:
    return os.environ.get("KUBE_TEST_VERSION") or DEFAULT_KUBE_TEST_VERSION


def assets_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("KUBE_TEST_ASSETS") or cache / "k8s-test-assets" / kube_test_version())


@dataclass
class Cluster:
    dir: Path
    kubeconfig: str
    api: kubernetes.client.ApiClient

    @property
    def minor(self) -> int:
        """The API server's minor version (34 for 1.34): what it enforces differs (CEL, policies)."""
        info = kubernetes.client.VersionApi(self.api).get_code()
        return int(str(info.minor).rstrip("+"))

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def apps(self) -> kubernetes.client.AppsV1Api:
        return kubernetes.client.AppsV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # A cache of the cluster's own: ~/.kube/cache is shared by every session on the machine.
        cache = ["--cache-dir", str(self.dir / "kubectl-cache")]
        cmd = [str(assets_dir() / "kubectl"), "--kubeconfig", self.kubeconfig, *cache, *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1"}


def start_cluster(workdir: Path, scheduler: bool = True) -> Cluster:
    """etcd, kube-apiserver and kube-controller-manager, and the scheduler unless `scheduler` is
    False (pods are then made but never scheduled: benches whose stand-in plays the kubelet).
    KUBE_TEST_ASSETS_PREBUILT=1: the binaries in $KUBE_TEST_ASSETS are taken as they are, nothing
    is built (a machine that carries only those it needs: bench/gpu_switch_run.sh).

    A start that fails is tried once more, in a new directory with new ports (beside another test
    session's control plane a start can meet what the other one does); the first failure's output
    is then given as a warning, and both where the retry fails too."""
    if not os.environ.get("KUBE_TEST_ASSETS_PREBUILT"):
        # Two sessions at once (pytest-xdist workers) must not build the same assets side by side.
        lock = assets_dir().with_name(assets_dir().name + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            subprocess.run([str(HACK / "install-k8s-test-assets.sh")], check=True)
    flags = ["--controllers"] if scheduler else ["--controllers", "--no-scheduler"]
    failures: list[str] = []
    for directory in (workdir, workdir / "retry"):
        out = subprocess.run(
            [str(HACK / "start-control-plane.sh"), *flags, str(directory)], capture_output=True, text=True
        )
        if out.returncode == 0:
            break
        failures.append(
            f"hack/start-control-plane.sh {' '.join(flags)} {directory} exited with {out.returncode}:\n"
            f"{out.stderr[-6000:]}"
        )
    else:
        raise RuntimeError("the control plane did not start, twice:\n" + "\n".join(failures))
    if failures:
        message = f"the control plane started on a second try; the first failed:\n{failures[0]}"
        print(message, file=sys.stderr)
        warnings.warn(message, stacklevel=2)
    workdir = directory
    kubeconfig = out.stdout.strip().splitlines()[-1]
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    return Cluster(dir=workdir, kubeconfig=kubeconfig, api=kubernetes.client.ApiClient(config))


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run([str(HACK / "start-control-plane.sh"), "stop", str(cluster.dir)], check=False)


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/modeldeployments.hibernate.dev", "--timeout=30s"
    )


def install_gpu_group_crd(cluster: Cluster) -> None:
    """The GpuGroup CRD (docs/gpu-sharing.md), for the tests that need it (idempotent)."""
    cluster.kubectl("apply", "-f", str(GPU_GROUP_CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/gpugroups.hibernate.dev", "--timeout=30s")


def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value (returned) or raises no AssertionError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (AssertionError, ApiException, KeyError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check.__name__}: {last!r}")


def new_namespace(cluster: Cluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    # Pods in a namespace need its default ServiceAccount (made by the controller-manager).
    try:
        eventually(lambda: cluster.core.read_namespaced_service_account("default", name), what="default SA")
    except AssertionError as e:
        log = cluster.dir / "logs" / "kube-controller-manager.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else ["(no log)"]
        raise AssertionError(f"{e}\n--- {log} (last lines) ---\n" + "\n".join(tail)) from None
    return name


@dataclass
class Process:
    """A component (operator, agent, gateway) run as a real subprocess, as users run it."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Process:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like an OOM kill or a node crash."""
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def hibernate_process(cluster: Cluster, log: Path, *args: str) -> Process:
    return Process([sys.executable, "-m", "hibernate", *args], cluster.env(), log)


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    """The process started for the block, stopped after it."""
    process.start()
    try:
        yield process
    finally:
        process.stop()
