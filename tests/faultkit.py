"""Helpers for the fault, restart and bad-input tests (test_faults.py, test_apiserver_restart.py,
test_bad_input.py): the node agent with the fake CUDA driver, engine pods that are simulated pods
(real namespaces and a pod cgroup, real CRIU), the truth about a pod read from its processes, files
and engine rather than from its annotations, an API server restart, and a misbehaving engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.agent import criu, fakecuda
from hibernate.agent.criu.images import make_private_dirs, write_private
from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod
from tests.cluster import Cluster, Process, assets_dir, eventually, hibernate_process
from tests.engine_fixtures import PROMPT, complete, free_port
from tests.pods import annotations, create_engine_pod, ensure_node, reached, start_pod

NODE = "fault-test-node"
ENGINE_WEIGHTS_MIB = 64
ENGINE_KV_MIB = 16
# Host memory of zero bytes the engine keeps, as a driver checkpoint leaves a CUDA context's device
# memory: enough of the image (about 40 %) for the agent to leave its zero pages out, so every dump
# here also rewrites its page map (hibernate/agent/criu/zeropages.py).
ENGINE_ZERO_HOST_MIB = 16


def need_root_and_criu() -> criu.Bundle:
    """Simulated pods need root and util-linux; level 4 needs the CRIU bundle (hack/build-criu.sh)."""
    if os.geteuid() != 0:
        pytest.skip("simulated pods need root")
    for tool in ("unshare", "nsenter"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            pytest.skip(f"{tool} (util-linux) is missing")
    try:
        bundle = criu.locate()
        criu.version(bundle)
    except criu.CriuError as e:
        pytest.skip(f"no CRIU 4.2 bundle (hack/build-criu.sh): {e}")
    return bundle


# -- the agent --------------------------------------------------------------------------------------


@dataclass
class AgentRunner:
    """Starts `hibernate agent` for NODE as a subprocess, with the fake CUDA driver, as often as needed."""

    cluster: Cluster
    workdir: Path
    checkpoints: Path
    fake_cuda: Path
    engine_timeout: float = 10.0
    node: str = NODE
    started: list[Process] = field(default_factory=list)

    def start(self, faults: str = "", *extra: str) -> Process:
        ensure_node(self.cluster, self.node)
        proc = hibernate_process(
            self.cluster,
            self.workdir / f"agent-{len(self.started)}.log",
            "agent",
            "--node-name",
            self.node,
            "--metrics-port",
            "0",
            "--checkpoint-root",
            str(self.checkpoints),
            "--engine-timeout",
            str(self.engine_timeout),
            *extra,
        )
        proc.env[fakecuda.ENV] = str(self.fake_cuda)
        if faults:
            proc.env["HIBERNATE_FAULTS"] = faults
        self.started.append(proc)
        return proc.start()

    def died_at(self, proc: Process, point: str, timeout: float = 60) -> None:
        """Wait for an armed agent to SIGKILL itself at `point`."""
        assert proc.popen is not None
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                f"fault point {point} did not fire within {timeout} s:\n{proc.output()[-3000:]}"
            ) from None
        assert proc.popen.returncode == -signal.SIGKILL, proc.output()[-3000:]
        assert f"fault point {point} armed: SIGKILL" in proc.output()

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.output()[-4000:]}" for p in self.started)


# -- an engine pod: a Pod object bound to NODE and a simulated pod running the fake engine ---------


@dataclass
class EnginePod:
    cluster: Cluster
    namespace: str
    name: str
    sim: SimPod
    port: int
    checkpoints: Path
    fake_cuda: Path
    baseline: str = ""
    command: list[str] = field(default_factory=list)  # the engine container's command (restarts)
    restarts: int = 0
    replaced: list[SimPod] = field(default_factory=list)  # the containers the kubelet started again

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def image(self) -> Path:
        return self.checkpoints / self.namespace / self.name / c.ENGINE_CONTAINER

    def annotate(self, level: object) -> None:
        self.cluster.core.patch_namespaced_pod(
            self.name, self.namespace, {"metadata": {"annotations": {c.ANN_SLEEP_LEVEL: str(level)}}}
        )

    def annotations(self) -> dict[str, str]:
        return annotations(self.cluster, self.namespace, self.name)

    def complete(self, prompt: str = PROMPT) -> str:
        return complete(self.url, prompt)

    def memory(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/debug/memory", timeout=10).json()
        return data

    def engine_state(self) -> str | None:
        """The engine process's scheduler state (`S`, `R`, `T` when stopped), None when it is gone."""
        return process_state(self.sim.engine_host_pid())

    def cuda_states(self) -> dict[str, str]:
        """The fake driver's state of every process of this pod's engine that it has seen."""
        pid = self.sim.engine_host_pid()
        if pid is None:
            return {}
        api = fakecuda.FakeCheckpointApi(self.fake_cuda)
        return {api.key(pid): api.get_state(pid).value}

    def leftovers(self) -> list[str]:
        """Temporary or swapped-out image directories beside the image: there must never be any."""
        parent = self.image.parent
        if not parent.exists():
            return []
        return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))

    def shrunk(self) -> criu.ImageMetadata:
        """The level-4 image once the agent's shrink behind the sleep is done (criu/shrink.py): its
        zero pages left out, no copy beside it. Wait for it before changing the image: the copy takes
        the image's place with the metadata it read first."""

        def done() -> criu.ImageMetadata | None:
            meta = criu.ImageMetadata.load(self.image)
            return meta if meta.zero_pages_left_out > 0 and not self.leftovers() else None

        result: criu.ImageMetadata = eventually(done, what=f"the zero pages left out of {self.image}")
        return result

    def marker(self) -> bool:
        return (self.sim.root / ".hibernate" / "checkpointed").exists()

    def restart_container(self, timeout: float = 60) -> None:
        """What the kubelet does once the engine container's PID 1 (the pod init) exits: the same pod
        (uid, IP, port), a new container (id, cgroup) running the same command from the start, and
        containerStatuses saying so (new containerID, restartCount + 1)."""
        watch_until(lambda: not self.sim.init_alive(), timeout)
        self.sim.close()
        cid = uuid.uuid4().hex * 2
        self.sim = SimPod.start(
            self.command,
            uid=self.sim.uid,
            container_id=cid,
            host_network=True,
            port=self.port,
            ready_path="/health",
        )
        self.replaced.append(self.sim)
        self.restarts += 1
        status = {
            "name": c.ENGINE_CONTAINER,
            "containerID": f"docker://{cid}",
            "ready": True,
            "restartCount": self.restarts,
            "image": "local/fake-engine",
            "imageID": "",
            "state": {"running": {}},
        }
        self.cluster.core.patch_namespaced_pod_status(
            self.name, self.namespace, {"status": {"containerStatuses": [status]}}
        )


@contextlib.contextmanager
def engine_pod(
    cluster: Cluster,
    namespace: str,
    checkpoints: Path,
    fake_cuda: Path,
    level: str | None = "Awake",
    *engine_args: str,
    prelude: str = "",
) -> Iterator[EnginePod]:
    """`prelude`: shell commands the engine process runs first, then it execs the engine (so it keeps
    what the prelude opened: `exec 7</dev/shm/x`)."""
    port = free_port()
    service_account_ready(cluster, namespace)
    created = create_engine_pod(cluster, namespace, NODE, port, level=level, checkpoint_dir=str(checkpoints))
    cid = uuid.uuid4().hex * 2
    cmd = [sys.executable, "-m", "hibernate.engine.fake", "--model", "fake-model", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--weights-mib", str(ENGINE_WEIGHTS_MIB), "--kv-mib", str(ENGINE_KV_MIB)]
    cmd += ["--zero-host-mib", str(ENGINE_ZERO_HOST_MIB), "--enable-sleep-mode", *engine_args]
    if prelude:
        cmd = ["sh", "-c", f'{prelude}; exec "$@"', "sh", *cmd]
    with SimPod.start(
        cmd, uid=created["uid"], container_id=cid, host_network=True, port=port, ready_path="/health"
    ) as sim:
        pod = EnginePod(cluster, namespace, created["name"], sim, port, checkpoints, fake_cuda, command=cmd)
        pod.baseline = pod.complete()
        start_pod(cluster, namespace, pod.name, container_id=cid)
        try:
            yield pod
        except BaseException:
            print(f"--- simulated pod {pod.name} ---\n{sim.log()[-3000:]}")
            raise
        finally:
            # An engine left stopped (SIGSTOP by the fake driver) would outlive nothing: the pod's
            # pid namespace ends with its init.
            with contextlib.suppress(Exception):
                cluster.core.delete_namespaced_pod(pod.name, namespace, grace_period_seconds=0)
            for again in pod.replaced:
                again.close()


def agent_image(
    root: Path, namespace: str, pod: str, container: str = c.ENGINE_CONTAINER, under: str = ""
) -> Path:
    """A directory laid out and sealed as the agent writes an image (0700 directories from `root` down,
    0600 files, metadata.json), for the image sweep to find: no process was dumped into it."""
    image = criu.image_dir(root / under if under else root, namespace, pod, container)
    make_private_dirs(image, root)
    write_private(image / criu.METADATA, b'{"format": 1}')
    write_private(image / "pages-1.img", b"\0" * 4096)
    return image


def removed_while_checked(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    """Another node's sweep, or the worker's own thread, gets there first: `image` is removed right
    before criu.check_private reads its owner and modes (listed, then gone)."""
    real = criu.check_private

    def removed_first(path: Path, root: Path | None = None) -> list[str]:
        if path == image:
            shutil.rmtree(image)
        return real(path, root)

    monkeypatch.setattr(criu, "check_private", removed_first)


def service_account_ready(cluster: Cluster, namespace: str) -> None:
    """Pods are refused until the namespace's default ServiceAccount exists (a new namespace) and,
    before Kubernetes 1.24, has its token Secret (1.24+ mounts a projected token and makes none)."""
    legacy = cluster.minor < 24

    def ready() -> Any:
        account = cluster.core.read_namespaced_service_account("default", namespace)
        return account.secrets if legacy else account

    eventually(ready, what="the default ServiceAccount" + ("'s token" if legacy else ""))


def reported(pod: EnginePod, level: int, state: str, timeout: float = 60) -> dict[str, Any]:
    """Wait until the annotations say `state` at `level`; returns last-operation."""
    return reached(pod.cluster, pod.namespace, pod.name, level, state, timeout)


def process_state(pid: int | None) -> str | None:
    """A process's scheduler state (`S`, `R`, `T` when stopped), None when it is gone."""
    if pid is None:
        return None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def assert_truth(pod: EnginePod, level: int) -> None:
    """The pod is really at `level`, its annotations say so, and no image is half there or lost.

    Read from the processes, the files and the engine: 0-2 from the engine's own /debug/memory,
    3 from the fake driver's state and a stopped engine, 4 from a complete image with no engine.
    At level 4 a copy of the image may lie beside it while the agent leaves its zero pages out
    (criu/shrink.py): that copy must go within `eventually`'s time, where a half image stays.
    """
    ann = pod.annotations()
    state = "Awake" if level == 0 else "Asleep"
    assert (ann.get(c.ANN_STATE), ann.get(c.ANN_OBSERVED_LEVEL)) == (state, str(level)), ann
    op = json.loads(ann.get(c.ANN_LAST_OPERATION, "{}"))
    assert not op or "seconds" in op, f"last-operation still says an operation is under way: {op}"
    if level == 4:  # the copy that leaves the zero pages out goes once that shrink behind the sleep ends
        eventually(lambda: not pod.leftovers(), what=f"no half image left beside {pod.image}")
    assert pod.leftovers() == [], f"half images left beside {pod.image}: {pod.leftovers()}"
    assert pod.sim.init_alive(), "the pod (its init) must survive every level"
    if level == 4:
        assert pod.engine_state() is None, "level 4: the engine's processes have ended"
        assert criu.check_image(pod.image) == [], criu.check_image(pod.image)
        criu.verify_image(pod.image)  # metadata.json complete
        assert pod.marker(), "the checkpoint marker keeps the pod init waiting for the restore"
        return
    assert not pod.image.exists(), f"an image remains at level {level}: {pod.image}"
    assert not pod.marker(), "a stale checkpoint marker"
    if level == 3:
        assert set(pod.cuda_states().values()) == {"checkpointed"}, pod.cuda_states()
        assert pod.engine_state() == "T", "a CUDA-suspended engine runs no CUDA call (the fake stops it)"
        return
    assert set(pod.cuda_states().values()) <= {"running"}, pod.cuda_states()
    assert pod.engine_state() not in (None, "T", "Z"), pod.engine_state()
    memory = pod.memory()
    assert (memory["sleep_level"] or 0) == level, memory
    if level == 0:
        assert memory["weights_loaded"], memory
        assert pod.complete() == pod.baseline, "awake and serving the same answers"


# -- the API server, stopped and started again --------------------------------------------------------


@dataclass
class ApiServer:
    """The session's kube-apiserver (second line of <cluster dir>/pids), restartable with its own flags."""

    cluster: Cluster
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids_file(self) -> Path:
        return self.cluster.dir / "pids"

    def pid(self) -> int:
        return int(self.pids_file.read_text().split()[1])

    def stop(self) -> None:
        """SIGKILL, like a crash of the control-plane node; remembers the command line and environment."""
        pid = self.pid()
        self.argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        self.env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
        assert "kube-apiserver" in self.argv[0], self.argv
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        assert not _alive(pid), "kube-apiserver did not die"

    def start(self, timeout: float = 60) -> float:
        """Start it again with the same flags; returns the monotonic time it answered /readyz.

        Should another process bind its port in the moment it is free (it lies below the ephemeral
        range, tests/ports.py, so no outgoing connection takes it), the new server fails "address
        already in use"; the start is tried again.
        """
        kubectl = [str(assets_dir() / "kubectl"), "--kubeconfig", self.cluster.kubeconfig]
        deadline = time.monotonic() + timeout
        logs = self.cluster.dir / "logs" / "kube-apiserver.log"
        while True:
            mark = logs.stat().st_size if logs.exists() else 0
            proc = self._spawn(logs)
            while time.monotonic() < deadline and proc.poll() is None:
                out = subprocess.run([*kubectl, "get", "--raw", "/readyz"], capture_output=True, text=True)
                if out.stdout.strip() == "ok":
                    return time.monotonic()
                time.sleep(0.1)
            if proc.poll() is None:
                raise AssertionError(f"kube-apiserver not ready {timeout} s after its restart")
            with open(logs, "rb") as f:
                f.seek(mark)
                said = f.read().decode(errors="replace")
            if "address already in use" not in said or time.monotonic() > deadline:
                raise AssertionError(f"kube-apiserver exited after its restart:\n{said[-2000:]}")
            time.sleep(0.5)

    def _spawn(self, logs: Path) -> subprocess.Popen[bytes]:
        log = open(logs, "ab")  # noqa: SIM115 - the server owns it
        proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, start_new_session=True
        )
        log.close()
        self.processes.append(proc)
        lines = self.pids_file.read_text().split()
        lines[1] = str(proc.pid)
        self.pids_file.write_text("\n".join(lines) + "\n")
        return proc


def controllers_caught_up(cluster: Cluster, timeout: float = 120) -> float:
    """Waits until the controller-manager acts on new objects again after the API server's restarts;
    returns how long that took. Its informers come back on their own backoff, up to half a minute
    after the server does: until then a new namespace gets no default ServiceAccount and a new
    Deployment no pods, and the next test on this session's cluster (its namespace fixture waits
    20 s for the ServiceAccount) would fail for what this test did. A namespace with a Deployment,
    made now, gets both; then it goes."""
    start = time.monotonic()
    name = f"t-probe-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    try:
        eventually(
            lambda: cluster.core.read_namespaced_service_account("default", name),
            timeout=timeout,
            what="the controller-manager's default ServiceAccount in a new namespace",
        )
        labels = {"app": "probe"}
        deployment = {
            "metadata": {"name": "probe"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "local/none:probe"}]},
                },
            },
        }
        cluster.apps.create_namespaced_deployment(name, deployment)
        eventually(
            lambda: cluster.core.list_namespaced_pod(name, label_selector="app=probe").items,
            timeout=max(timeout - (time.monotonic() - start), 1.0),
            what="a pod of a new Deployment",
        )
    finally:
        cluster.core.delete_namespace(name)
    return time.monotonic() - start


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- an engine that misbehaves --------------------------------------------------------------------------


class BadEngine:
    """A raw-socket HTTP server on loopback that answers every request in one bad way.

    modes: `garbage` (200 with a body that is not JSON), `wrong-json` (200 with JSON of the wrong
    shape), `not-http` (bytes that are not an HTTP response), `hang` (reads the request, never
    answers), `hang-body` (headers, then nothing), `trickle` (a body a byte at a time, slower than
    any deadline), `close` (closes without answering), `close-mid-body` (half the promised body,
    then closes), `huge` (200 with a 4 MiB body that is not JSON), `error` (HTTP 500).
    """

    MODES = (
        "garbage",
        "wrong-json",
        "not-http",
        "hang",
        "hang-body",
        "trickle",
        "close",
        "close-mid-body",
        "huge",
        "error",
    )

    def __init__(self, mode: str) -> None:
        assert mode in self.MODES, mode
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, name=f"bad-engine-{mode}", daemon=True)

    def __enter__(self) -> BadEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
            self._respond(conn)

    def _respond(self, conn: socket.socket) -> None:
        def head(status: str, length: int, ctype: str = "application/json") -> bytes:
            return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n".encode()

        mode = self.mode
        if mode == "garbage":
            body = b"<html>\x00\xff not json at all {{{"
            conn.sendall(head("200 OK", len(body), "text/html") + body)
        elif mode == "wrong-json":
            body = json.dumps({"is_sleeping": "perhaps", "results": 7, "success": "yes"}).encode()
            conn.sendall(head("200 OK", len(body)) + body)
        elif mode == "not-http":
            conn.sendall(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
        elif mode == "hang":
            self.stopping.wait(120)
        elif mode == "hang-body":
            conn.sendall(head("200 OK", 100))
            self.stopping.wait(120)
        elif mode == "trickle":
            conn.sendall(head("200 OK", 10_000))
            for _ in range(10_000):
                if self.stopping.wait(0.5):
                    return
                conn.sendall(b" ")
        elif mode == "close":
            conn.close()
            return
        elif mode == "close-mid-body":
            conn.sendall(head("200 OK", 1000) + b'{"is_sleeping": fal')
            conn.close()
            return
        elif mode == "huge":
            body = b"x" * (4 << 20)
            conn.sendall(head("200 OK", len(body), "text/plain") + body)
        elif mode == "error":
            body = b'{"error": "internal"}'
            conn.sendall(head("500 Internal Server Error", len(body)) + body)
        with contextlib.suppress(OSError):
            conn.close()


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def watch_until(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll fast until `check()`; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s")


# -- a stand-in for the node agent on unscheduled pods (operator tests) ---------------------------------


class MirrorAgent:
    """Plays the kubelet and the node agent for the operator's pods: every pod is Ready and reports
    the level it is asked for at once (`state`, `observed-sleep-level`), polled every 50 ms."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mirror-agent", daemon=True)

    def __enter__(self) -> MirrorAgent:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)

    def _run(self) -> None:
        from hibernate.api.levels import InvalidSleepLevel, SleepLevel

        core = self.cluster.core
        while not self.stopping.wait(0.05):
            with contextlib.suppress(Exception):
                for pod in core.list_namespaced_pod(self.namespace, label_selector=c.LABEL_MANAGED).items:
                    meta = pod.metadata
                    if meta.deletion_timestamp is not None:
                        continue
                    ready = any(x.type == "Ready" and x.status == "True" for x in pod.status.conditions or [])
                    if not ready:
                        core.patch_namespaced_pod_status(
                            meta.name,
                            self.namespace,
                            {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                        )
                    ann = meta.annotations or {}
                    raw = ann.get(c.ANN_SLEEP_LEVEL)
                    if raw is None:
                        continue
                    try:
                        level = int(SleepLevel.parse(raw))
                    except InvalidSleepLevel:
                        continue
                    state = "Awake" if level == 0 else "Asleep"
                    if (ann.get(c.ANN_STATE), ann.get(c.ANN_OBSERVED_LEVEL)) != (state, str(level)):
                        op = {
                            "action": "sleep" if level else "wake",
                            "level": level,
                            "seconds": 0.0,
                            "error": None,
                        }
                        core.patch_namespaced_pod(
                            meta.name,
                            self.namespace,
                            {
                                "metadata": {
                                    "annotations": {
                                        c.ANN_STATE: state,
                                        c.ANN_OBSERVED_LEVEL: str(level),
                                        c.ANN_LAST_OPERATION: json.dumps(op),
                                    }
                                }
                            },
                        )
