"""The API server restarted mid-transition: everything converges within 30 s of its return
(counted from the moment its process starts again, before it answers).

The whole loop runs for real: the operator and the node agent as subprocesses, a stand-in kubelet
(hibernate.localnode) that runs the fake vLLM engine in a simulated pod on its node, real CRIU for
level 4 and the fake CUDA driver (a test double, CI has no GPU) for level 3. The session's
kube-apiserver is SIGKILLed while a level change is under way and started again with the same
flags a few seconds later; the test then measures how long the ModelDeployment's status, the pod's
annotations and the engine take to agree with the spec again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.api import constants as c
from hibernate.localnode.kubelet import LocalKubelet
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import complete
from tests.faultkit import (
    ApiServer,
    controllers_caught_up,
    free_port,
    need_root_and_criu,
    process_state,
    service_account_ready,
    watch_until,
)
from tests.modeldeployments import apply, events_for, get, pods, set_level
from tests.test_stop_snapshot import (  # noqa: F401 (operator_with_tools is a fixture)
    CANARY,
    answer,
    model,
    node_of,
    operator_with_tools,
    replicas_of,
    requests,
    running_on_nodes,
)

NODE = "restart-test-node"
CONVERGE_S = 30.0
DOWN_S = 2.0


def _manifest(port: int, checkpoints: Path) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "m"},
        "spec": {
            "model": "fake-model",
            "replicas": 1,
            "sleepLevel": "Awake",
            "engine": {
                "image": "local/hibernate:dev",
                "command": [sys.executable, "-m", "hibernate.engine.fake"],
                "args": ["--host", "127.0.0.1", "--weights-mib", "64", "--kv-mib", "16"],
                "port": port,
                "nodeSelector": {"kubernetes.io/hostname": NODE},
            },
            "checkpoint": {"directory": str(checkpoints)},
        },
    }


@pytest.fixture
def loop(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    need_root_and_criu()
    service_account_ready(cluster, namespace)
    checkpoints = tmp_path / "checkpoints"
    kubelet = LocalKubelet(cluster.api, node=NODE).start()
    procs: list[Process] = []
    try:
        operator = hibernate_process(cluster, tmp_path / "operator.log", "operator", "--namespace", namespace)
        agent = hibernate_process(
            cluster,
            tmp_path / "agent.log",
            "agent",
            "--node-name",
            NODE,
            "--metrics-port",
            "0",
            "--checkpoint-root",
            str(checkpoints),
            "--engine-timeout",
            "10",
        )
        agent.env["HIBERNATE_FAKE_CUDA"] = str(tmp_path / "fake-cuda")
        procs += [operator.start(), agent.start()]
        yield {"checkpoints": checkpoints, "procs": procs, "kubelet": kubelet}
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            print(f"--- {p.log.name} ---\n{p.output()[-3000:]}")
        for running in kubelet.running.values():
            if running.sim is not None:
                print(f"--- simulated pod {running.uid} ---\n{running.sim.log()[-3000:]}")
        kubelet.stop()
        cluster.core.delete_node(NODE)
        # The cluster goes on to the next test as this one found it (faultkit.controllers_caught_up).
        print(
            f"the controller-manager acts on new objects again after {controllers_caught_up(cluster):.1f} s"
        )


def _pod(cluster: Cluster, namespace: str) -> Any:
    (pod,) = pods(cluster, namespace, "m")
    return pod


def _settled(cluster: Cluster, namespace: str, level: str) -> bool:
    md = get(cluster, namespace, "m")
    status = md.get("status") or {}
    phase = "Awake" if level == "Awake" else "Asleep"
    assert status.get("observedGeneration") == md["metadata"]["generation"], status
    assert (status.get("phase"), status.get("sleepLevel")) == (phase, level), status
    ann = _pod(cluster, namespace).metadata.annotations or {}
    number = {"Awake": 0, "L1": 1, "L2": 2, "CudaSuspend": 3, "Checkpoint": 4}[level]
    assert (ann.get(c.ANN_STATE), ann.get(c.ANN_OBSERVED_LEVEL)) == (phase, str(number)), ann
    return True


def _awake(port: int) -> bool:
    memory = httpx.get(f"http://127.0.0.1:{port}/debug/memory", timeout=1).json()
    return memory["sleep_level"] is None and bool(memory["weights_loaded"])


@pytest.mark.criu
def test_the_api_server_restarted_mid_transition_converges_within_30_s_of_its_return(
    cluster: Cluster, namespace: str, loop: dict[str, Any]
) -> None:
    port = free_port()
    apply(cluster, namespace, _manifest(port, loop["checkpoints"]))
    eventually(lambda: _settled(cluster, namespace, "Awake"), timeout=60, what="Awake after a cold start")
    baseline = complete(f"http://127.0.0.1:{port}")
    api = ApiServer(cluster)
    took: dict[str, float] = {}

    # Each change, and the moment the API server goes down: "spec" right after the spec change (the
    # operator may not have written the pod yet); "engine" once the engine itself shows the agent at
    # work (read from the process, not through the API), so the agent's report cannot get through.
    kubelet: LocalKubelet = loop["kubelet"]

    def engine_at_work(level: str) -> bool:
        (running,) = kubelet.running.values()
        assert running.sim is not None
        state = process_state(running.sim.engine_host_pid())
        if level == "Checkpoint":  # the fake CUDA driver has stopped the engine: CRIU is next
            return state in ("T", None)
        return state not in (None, "T") and _awake(port)  # restored and woken, not yet reported

    for level, when in (("Checkpoint", "engine"), ("Awake", "engine"), ("CudaSuspend", "spec")):
        set_level(cluster, namespace, "m", level)
        if when == "engine":
            watch_until(lambda level=level: engine_at_work(level), timeout=30, interval=0.002)
        api.stop()
        time.sleep(DOWN_S)
        back = time.monotonic()  # counted from its start, before it answers: the stricter bound
        ready = api.start()
        print(f"{level}: kube-apiserver ready {ready - back:.1f} s after its start")
        try:
            eventually(lambda level=level: _settled(cluster, namespace, level), timeout=CONVERGE_S + 5)
        except AssertionError:
            for p in loop["procs"]:
                print(f"--- {p.log.name} ---\n{p.output()[-3000:]}")
            raise
        took[f"{level} (down at {when})"] = time.monotonic() - back
        assert took[f"{level} (down at {when})"] < CONVERGE_S, took
    set_level(cluster, namespace, "m", "Awake")
    eventually(lambda: _settled(cluster, namespace, "Awake"), timeout=CONVERGE_S)
    assert complete(f"http://127.0.0.1:{port}") == baseline, "serving the same answers after the wakes"
    print("converged after the API server's restart (s):", {k: round(v, 2) for k, v in took.items()})


def test_a_stop_waiting_for_its_snapshot_waits_on_through_an_api_server_restart(
    cluster: Cluster,
    namespace: str,
    operator_with_tools: Process,  # noqa: F811
) -> None:
    """The operator's wait for a snapshot reads the pod every half second: reads that fail while the
    API server is away do not end the wait (no 'No snapshot', no cold wake); the agent's answer,
    written once the server is back, is recorded and the Stop goes on."""
    apply(cluster, namespace, model("m", replicas=1, timeoutSeconds=120))
    (pod,) = running_on_nodes(cluster, namespace, "m", 1)
    set_level(cluster, namespace, "m", "Stop")
    request = eventually(lambda: requests(cluster, namespace, "m").get(pod), what="a snapshot request")
    api = ApiServer(cluster)
    api.stop()
    try:
        time.sleep(DOWN_S)  # four polls fail
    finally:
        api.start()
    try:
        answered = time.monotonic()
        taken = "2026-01-02T03:04:05.000Z"
        node = node_of(cluster, namespace, pod)
        snapshot = {"id": request["id"], "node": node, "specHash": request["specHash"], "bytes": 1 << 30}
        answer(cluster, namespace, pod, {**snapshot, "taken": taken, "seconds": 2.5, "check": CANARY})
        eventually(
            lambda: replicas_of(cluster, namespace, "m") == 0, what="scaled to zero after the snapshot"
        )
        recorded = eventually(lambda: get(cluster, namespace, "m")["status"].get("snapshot"), what="recorded")
        # Well within the operator's 30 s resync, which would find the answer on the pod anyway.
        assert time.monotonic() - answered < 15
        assert (recorded["node"], recorded["taken"]) == (node, taken)
        warnings = [e.message for e in events_for(cluster, namespace, "m") if e.type == "Warning"]
        assert not [w for w in warnings if "No snapshot" in w], warnings
        said = operator_with_tools.output()
        assert f"pod {pod} could not be read" in said and "the wait goes on" in said
        assert "the snapshot before Stop failed" not in said
    finally:
        print(
            f"the controller-manager acts on new objects again after {controllers_caught_up(cluster):.1f} s"
        )
