"""The agent's readiness gate and its refusal of Stop on one pod, against a real API server and the
fake engine (the agent as users run it, a subprocess; the test plays the kubelet).

- A gated engine pod (`readinessGates: hibernate.dev/awake`, as the operator makes them) gets the
  condition True once the agent knows it is Awake, False before a sleep starts; the sleep waits until
  the kubelet has taken the pod out of Ready (so out of its Service's ready endpoints).
- A pod annotated Stop (or 5) is left where it is, reported Failed with the reason, and gets one
  Warning however many times the agent looks at it again, a restart of the agent included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.api import constants as c
from tests.cluster import Cluster, Process, eventually
from tests.engine_fixtures import FakeEngine, start_fake_engine
from tests.pods import annotate, create_engine_pod, ensure_node, pod_events, reached, start_pod
from tests.test_agent import NODE, start_agent


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[Process]:
    ensure_node(cluster, NODE)
    proc = start_agent(cluster, tmp_path, "--engine-timeout", "5")
    yield proc
    proc.stop()
    print(proc.output()[-4000:])


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with start_fake_engine(weights_mib=16, kv_mib=4) as e:
        yield e


def conditions(cluster: Cluster, namespace: str, pod: str) -> dict[str, str]:
    status = cluster.core.read_namespaced_pod_status(pod, namespace).status
    return {x.type: x.status for x in status.conditions or []}


def sleeping(engine: FakeEngine) -> bool:
    return bool(httpx.get(f"{engine.url}/is_sleeping", timeout=5).json()["is_sleeping"])


class Kubelet(threading.Thread):
    """The kubelet's part of a readiness gate: Ready follows hibernate.dev/awake, `delay` seconds late.
    Records whether the engine was asleep at the moment it took the pod out of Ready."""

    def __init__(self, cluster: Cluster, namespace: str, pod: str, engine: FakeEngine, delay: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.pod, self.engine, self.delay = (
            cluster,
            namespace,
            pod,
            engine,
            delay,
        )
        self.stopping = threading.Event()
        self.unready_while_asleep: list[bool] = []  # one entry per Ready → False, at that moment
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            try:
                now = conditions(self.cluster, self.namespace, self.pod)
                gate = now.get(c.CONDITION_AWAKE)
                if gate is None or now.get("Ready") == gate:
                    continue
                time.sleep(self.delay)  # a slow kubelet: the agent must wait for it, not for a clock
                if gate == "False":
                    self.unready_while_asleep.append(sleeping(self.engine))
                body: dict[str, Any] = {"status": {"conditions": [{"type": "Ready", "status": gate}]}}
                self.cluster.core.patch_namespaced_pod_status(self.pod, self.namespace, body)
            except Exception as e:  # the test reads them
                self.errors.append(repr(e))


def test_the_awake_condition_is_true_only_while_awake_and_goes_false_before_the_sleep(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    port = int(engine.url.rsplit(":", 1)[1])
    name = create_engine_pod(cluster, namespace, NODE, port, level="Awake", gated=True)["name"]
    kubelet = Kubelet(cluster, namespace, name, engine, delay=1.5)
    kubelet.start()
    try:
        start_pod(cluster, namespace, name)
        reached(cluster, namespace, name, 0, "Awake")
        eventually(
            lambda: conditions(cluster, namespace, name).get("Ready") == "True",
            what="Ready once the agent says Awake",
        )
        assert conditions(cluster, namespace, name)[c.CONDITION_AWAKE] == "True"

        annotate(cluster, namespace, name, "L1")
        reached(cluster, namespace, name, 1, "Asleep", timeout=30)
        now = conditions(cluster, namespace, name)
        assert (now[c.CONDITION_AWAKE], now["Ready"]) == ("False", "False")
        # The kubelet took 1.5 s to take the pod out of Ready; the engine was still awake then.
        assert kubelet.unready_while_asleep == [False], kubelet.unready_while_asleep

        annotate(cluster, namespace, name, "Awake")
        reached(cluster, namespace, name, 0, "Awake")
        eventually(lambda: conditions(cluster, namespace, name).get("Ready") == "True", what="Ready again")
        assert not sleeping(engine)
        assert not kubelet.errors, kubelet.errors
    finally:
        kubelet.stopping.set()
        kubelet.join(5)


def test_a_pod_first_seen_asleep_is_not_ready(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    httpx.post(f"{engine.url}/sleep?level=1", timeout=10).raise_for_status()
    port = int(engine.url.rsplit(":", 1)[1])
    name = create_engine_pod(cluster, namespace, NODE, port, level="L1", gated=True)["name"]
    start_pod(cluster, namespace, name)
    reached(cluster, namespace, name, 1, "Asleep")
    eventually(
        lambda: conditions(cluster, namespace, name).get(c.CONDITION_AWAKE) == "False",
        what="the condition False",
    )


def test_stop_on_one_pod_is_refused_once_and_changes_nothing(
    cluster: Cluster, namespace: str, tmp_path: Path, agent: Process, engine: FakeEngine
) -> None:
    port = int(engine.url.rsplit(":", 1)[1])
    name = create_engine_pod(cluster, namespace, NODE, port, level="Awake", gated=True)["name"]
    start_pod(cluster, namespace, name)
    reached(cluster, namespace, name, 0, "Awake")

    def stop_warnings() -> list[Any]:
        return [e for e in pod_events(cluster, namespace, name) if e.reason == c.REASON_STOP_ON_POD]

    annotate(cluster, namespace, name, "Stop")
    op = reached(cluster, namespace, name, 0, "Failed")
    assert op["error"] == c.STOP_ON_POD and op["action"] == "none"
    [warning] = eventually(stop_warnings, what="the StopOnPod Warning")
    assert warning.type == "Warning" and warning.message.startswith("Stop applies to a whole ModelDeployment")
    assert not sleeping(engine), "the engine is left as it was"
    assert conditions(cluster, namespace, name)[c.CONDITION_AWAKE] == "True", "it still serves"

    # Looked at again, and again: the same wish as a number, other pod events, a restarted agent.
    annotate(cluster, namespace, name, 5)
    cluster.core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": {"touched": "1"}}})
    time.sleep(2)
    agent.stop()
    again = start_agent(cluster, tmp_path)
    try:
        cluster.core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": {"touched": "2"}}})
        time.sleep(3)
        assert len(stop_warnings()) == 1 and (stop_warnings()[0].count or 1) == 1
        assert not sleeping(engine)

        annotate(cluster, namespace, name, "L1")  # a level the agent can do
        reached(cluster, namespace, name, 1, "Asleep")
    finally:
        again.stop()


def test_a_pod_whose_engine_went_into_a_snapshot_stays_out_of_its_service(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    """A Stop's snapshot ends the engine of its replica. Should the Stop be cancelled meanwhile
    (docs/snapshots.md), the pod lives on without an engine until the Deployment replaces it: its
    gate stays False, though its state annotation still says Awake (the agent's answer on the pod is
    what counts, also for an agent that did not take it itself)."""
    port = int(engine.url.rsplit(":", 1)[1])
    name = create_engine_pod(cluster, namespace, NODE, port, level="Awake", gated=True)["name"]
    start_pod(cluster, namespace, name)
    reached(cluster, namespace, name, 0, "Awake")
    eventually(
        lambda: conditions(cluster, namespace, name).get(c.CONDITION_AWAKE) == "True", what="gate True"
    )

    request = {"id": "r1", "specHash": "abc", "requested": "2026-01-01T00:00:00Z"}
    taken = {"id": "r1", "node": NODE, "specHash": "abc", "bytes": 1, "taken": "2026-01-01T00:00:01.000Z"}
    cluster.core.patch_namespaced_pod(
        name,
        namespace,
        {
            "metadata": {
                "annotations": {
                    c.ANN_SNAPSHOT_REQUEST: json.dumps(request),
                    c.ANN_SNAPSHOT: json.dumps(taken),
                }
            }
        },
    )
    eventually(
        lambda: conditions(cluster, namespace, name).get(c.CONDITION_AWAKE) == "False",
        what="the gate False: nothing serves there",
    )
    status = cluster.core.read_namespaced_pod_status(name, namespace).status
    (gate,) = [x for x in status.conditions if x.type == c.CONDITION_AWAKE]
    assert gate.reason == "Snapshotted"
    time.sleep(2)  # looked at again: it stays so
    assert conditions(cluster, namespace, name)[c.CONDITION_AWAKE] == "False"
