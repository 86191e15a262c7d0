# mypy: disallow-untyped-calls=False
"""A stand-in kubelet for one node on this machine (the demo and CI have no container runtime).

It registers a Node, keeps it Ready, and runs the engine container of every pod the scheduler binds
there as real processes: in a simulated pod (its own pid, mount, ipc and uts namespaces and a
cgroup named like a real pod's, with the pod init as PID 1) when it runs as root, else as a plain
process. It reports what a kubelet reports (pod IP, container id, Ready) and confirms deletions.
Like a kubelet, it folds a pod's readiness gates into Ready: a gated pod is Ready only while every
gate's condition is True, and Ready follows when the agent changes one (hibernate.dev/awake).
Engines share the host's network on loopback, so each pod needs its own engine port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def can_simulate_pods() -> bool:
    """Namespaces and cgroups need root and util-linux's unshare."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@dataclass
class RunningPod:
    uid: str
    container_id: str
    sim: SimPod | None = None
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    started: bool = False  # the container runs and was reported so (its readiness counts from then)
    ready: bool | None = None  # the Ready status last reported

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class LocalKubelet:
    api: kubernetes.client.ApiClient
    node: str = "local-node"
    simulate: bool = field(default_factory=can_simulate_pods)
    running: dict[tuple[str, str], RunningPod] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    def start(self) -> LocalKubelet:
        self._register()
        for target in (self._heartbeat, self._watch):
            t = threading.Thread(target=target, name=f"kubelet-{target.__name__}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for pod in list(self.running.values()):
            pod.stop()
        self.running.clear()

    # -- the node --------------------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        resources = {"cpu": "16", "memory": "64Gi", "pods": "110"}
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "hibernate local node",
            "lastHeartbeatTime": _now(),
            "lastTransitionTime": _now(),
        }
        return {"status": {"capacity": resources, "allocatable": resources, "conditions": [ready]}}

    def _register(self) -> None:
        with contextlib.suppress(ApiException):
            body = {"metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node}}}
            self.core.create_node(kubernetes.client.V1Node.model_validate(body))
        self.core.patch_node_status(self.node, self._node_status())

    def _heartbeat(self) -> None:
        while not self.stopping.wait(10):
            with contextlib.suppress(Exception):
                self.core.patch_node_status(self.node, self._node_status())

    # -- pods ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                for event in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node}",
                    timeout_seconds=60,
                    deserialize=False,
                ):
                    if self.stopping.is_set():
                        return
                    self._on_event(event["type"], event["object"])
            except Exception as e:
                log.warning("local kubelet watch interrupted: %s", e)
                self.stopping.wait(1)

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        running = self.running.get(key)
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if running is not None:
                self.running.pop(key, None)
                threading.Thread(target=self._terminate, args=(key, running), daemon=True).start()
            elif kind != "DELETED":
                self._confirm_deletion(key)
            return
        if running is None or running.uid != meta["uid"]:
            cid = uuid.uuid4().hex * 2
            self.running[key] = RunningPod(uid=meta["uid"], container_id=cid)
            threading.Thread(target=self._run_pod, args=(pod, self.running[key]), daemon=True).start()
        elif running.started and self._ready(pod) != running.ready:
            self._report_ready(pod, running)  # a readiness gate's condition changed

    @staticmethod
    def _ready(pod: dict[str, Any]) -> bool:
        """The container runs (and answered); Ready also needs every readiness gate's condition True."""
        status = pod.get("status") or {}
        conditions = {x.get("type"): x.get("status") for x in status.get("conditions") or []}
        gates = [g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []]
        return all(conditions.get(g) == "True" for g in gates)

    def _report_ready(self, pod: dict[str, Any], running: RunningPod) -> None:
        meta = pod["metadata"]
        ready = self._ready(pod)
        status = "True" if ready else "False"
        conditions = [{"type": "Ready", "status": status, "lastTransitionTime": _now()}]
        if not ready:
            conditions[0].update(reason="ReadinessGatesNotReady", message="readiness gates not True")
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": {"conditions": conditions}}
            )
            running.ready = ready

    def _terminate(self, key: tuple[str, str], running: RunningPod) -> None:
        running.stop()
        self._confirm_deletion(key)

    def _confirm_deletion(self, key: tuple[str, str]) -> None:
        """What the kubelet does once a pod's containers are gone: delete the object for good."""
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(key[1], key[0], grace_period_seconds=0)

    def _run_pod(self, pod: dict[str, Any], running: RunningPod) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = next(x for x in spec["containers"] if x["name"] == c.ENGINE_CONTAINER)
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        ports = container.get("ports") or [{"containerPort": 8000}]
        port = int(ports[0]["containerPort"])
        env = {e["name"]: e.get("value", "") for e in container.get("env") or [] if "value" in e}
        try:
            if self.simulate:
                # The pod init is PID 1 here whatever the command says: drop an operator-added wrapper.
                if "--" in command and command[1:2] and command[1].endswith("podinit.py"):
                    command = command[command.index("--") + 1 :]
                running.sim = SimPod.start(
                    command,
                    uid=meta["uid"],
                    container_id=running.container_id,
                    host_network=True,
                    port=port,
                    ready_path="/health",
                    timeout=120,
                    env=env,
                )
            else:
                running.workdir = Path(tempfile.mkdtemp(prefix="localnode-"))
                log_file = open(running.workdir / "engine.log", "ab")  # noqa: SIM115 - owned by the process
                running.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                    start_new_session=True,
                )
                self._wait_http(port)
        except Exception as e:
            log.error("pod %s/%s failed to start: %s", meta["namespace"], meta["name"], e)
            return
        self._report_running(pod, running, port)

    @staticmethod
    def _wait_http(port: int, timeout: float = 120) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"no answer on port {port} after {timeout} s")

    def _report_running(self, pod: dict[str, Any], running: RunningPod, port: int) -> None:
        meta = pod["metadata"]
        stamp = _now()
        ready = self._ready(pod)
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": stamp}
            for t in ("Initialized", "ContainersReady", "PodScheduled")
        ]
        conditions.append(
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": stamp}
        )
        status = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "startTime": stamp,
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": c.ENGINE_CONTAINER,
                    "containerID": f"docker://{running.container_id}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "image": pod["spec"]["containers"][0].get("image", ""),
                    "imageID": "",
                    "state": {"running": {"startedAt": stamp}},
                }
            ],
        }
        running.started = True  # from here on, a change of a gate's condition changes Ready
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
            running.ready = ready
        log.info("pod %s/%s running on %s (port %d)", meta["namespace"], meta["name"], self.node, port)
