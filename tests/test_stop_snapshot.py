"""Stop with a snapshot, the operator's side (docs/snapshots.md), against a real API server.

No kubelet and no node agent run here: the tests bind the pods to nodes, play the kubelet
(readiness) and play the agent (its reports, and its answer to a snapshot request on the pod).
The operator runs with --tools-image, as the chart runs it: its pods have the init that waits for
a restore, so snapshots are on by default.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hibernate.api import constants as c
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.modeldeployments import (
    apply,
    condition,
    events_for,
    get,
    manifest,
    mark_ready,
    pods,
    report,
    set_level,
)
from tests.pods import bind, ensure_node

TOOLS_IMAGE = "ghcr.io/example/hibernate-tools:test"
# The engine's answer before the snapshot, as the agent reports it with the snapshot (agent/wakecheck.py).
CANARY = {"model": "m", "prompt": "Count on: one, two,", "max_tokens": 8, "text": " three, four"}


@pytest.fixture
def operator_with_tools(
    cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Process]:
    proc = hibernate_process(
        cluster, tmp_path / "operator.log", "operator", "--verbose", "--tools-image", TOOLS_IMAGE
    ).start()
    yield proc
    proc.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:  # the operator's side of a failure (conftest.py)
        print(proc.output()[-8000:])


def model(name: str, replicas: int = 2, **stop: Any) -> dict[str, Any]:
    """A ModelDeployment with `spec.stop` as given: snapshots are on by default (the operator runs with
    the pod init)."""
    # No node matches: the tests bind the pods themselves (running_on_nodes), and the scheduler must
    # not bind one first to a Ready node another test left on this cluster (a CI run found a pod on
    # test_apiserver_restart's node, deleted at that test's end, most likely still in the scheduler's
    # cache after the API server's restart).
    body = manifest(name, replicas=replicas, nodeSelector={"hibernate.dev/test-no-node": "true"})
    if stop:
        body["spec"]["stop"] = stop
    return body


def running_on_nodes(cluster: Cluster, ns: str, name: str, replicas: int) -> list[str]:
    """The model's pods, each bound to a node of its own, ready and reported Awake by 'the agent'."""
    names: list[str] = eventually(
        lambda: (
            sorted(p.metadata.name for p in pods(cluster, ns, name))
            if len(pods(cluster, ns, name)) == replicas
            else None
        ),
        what=f"{replicas} pods",
    )
    for i, pod in enumerate(names):
        # A pod bound to a node that does not exist is deleted as an orphan by the pod garbage
        # collector, once the node's name has been seen missing for 40 s (earlier tests on this
        # session's cluster): the ReplicaSet's new pod then has no node, and the test hangs.
        ensure_node(cluster, f"node-{i}")
        bind(cluster, ns, pod, f"node-{i}")
        mark_ready(cluster, ns, pod)
        report(cluster, ns, pod, 0, c.STATE_AWAKE)
    eventually(lambda: get(cluster, ns, name)["status"].get("phase") == "Awake", what="Awake")
    return names


def kubelet_ends_pods(cluster: Cluster, ns: str, name: str) -> None:
    """Once the Deployment scaled to zero: what the kubelet does for a pod bound to its node (a bound
    pod is deleted gracefully, and only its kubelet confirms it)."""
    eventually(lambda: not pods(cluster, ns, name), what="pods terminating")
    items = cluster.core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_MODEL}={name}").items
    for pod in items:
        cluster.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)


def requests(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """pod name -> the operator's snapshot request on it."""
    found = {}
    for pod in pods(cluster, ns, name):
        raw = (pod.metadata.annotations or {}).get(c.ANN_SNAPSHOT_REQUEST)
        if raw:
            found[pod.metadata.name] = json.loads(raw)
    return found


def answer(cluster: Cluster, ns: str, pod: str, body: dict[str, Any]) -> None:
    """What the agent writes on the pod once its snapshot is taken (or failed)."""
    cluster.core.patch_namespaced_pod(
        pod, ns, {"metadata": {"annotations": {c.ANN_SNAPSHOT: json.dumps(body)}}}
    )


def replicas_of(cluster: Cluster, ns: str, name: str) -> int:
    return int(cluster.apps.read_namespaced_deployment(name, ns).spec.replicas)


def engine_hash(body: dict[str, Any]) -> str:
    return ModelDeploymentSpec.model_validate(body["spec"]).engine_hash()


def node_of(cluster: Cluster, ns: str, pod: str) -> str:
    return str(cluster.core.read_namespaced_pod(pod, ns).spec.node_name)


def test_stop_asks_one_replica_for_a_snapshot_and_scales_to_zero_only_once_it_is_taken(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    body = model("m", timeoutSeconds=60)
    apply(cluster, namespace, body)
    running_on_nodes(cluster, namespace, "m", 2)
    assert condition(get(cluster, namespace, "m"), "SnapshotReady")["reason"] == "NotTaken"

    set_level(cluster, namespace, "m", "Stop")
    asked = eventually(lambda: requests(cluster, namespace, "m"), what="a snapshot request")
    assert len(asked) == 1, f"one replica is asked, not {sorted(asked)}"
    ((pod, request),) = asked.items()
    assert request["specHash"] == engine_hash(body) and request["id"] and request["requested"]

    # The agent has not answered: the replicas stay (the snapshot needs its engine running).
    time.sleep(2.0)
    assert replicas_of(cluster, namespace, "m") == 2 and len(pods(cluster, namespace, "m")) == 2

    node = node_of(cluster, namespace, pod)
    taken = "2026-01-02T03:04:05.000Z"
    answer(
        cluster,
        namespace,
        pod,
        {
            "id": request["id"],
            "node": node,
            "specHash": request["specHash"],
            "bytes": 3 << 30,
            "taken": taken,
            "seconds": 4.25,
            "check": CANARY,
        },
    )
    eventually(lambda: replicas_of(cluster, namespace, "m") == 0, what="scaled to zero after the snapshot")
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"].get("snapshot") and m, what="recorded"
    )
    assert md["status"]["snapshot"] == {
        "node": node,
        "pod": pod,
        "specHash": engine_hash(body),
        "bytes": 3 << 30,
        "taken": taken,
        "seconds": 4.25,
        "check": {"model": "m", "prompt": "Count on: one, two,", "maxTokens": 8, "text": " three, four"},
    }
    ready = eventually(
        lambda: (x := condition(get(cluster, namespace, "m"), "SnapshotReady"))["status"] == "True" and x
    )
    assert ready["reason"] == "Ready" and node in ready["message"] and "3.00 GiB" in ready["message"]
    (event,) = [e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotTaken"]
    assert event.type == "Normal" and pod in event.message and node in event.message
    kubelet_ends_pods(cluster, namespace, "m")
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Stopped", what="Stopped")
    header, row = cluster.kubectl("get", "md", "m", "-n", namespace).stdout.splitlines()[:2]
    assert "SNAPSHOT" in header.split() and "Ready" in row.split()


def test_a_wake_from_stop_marks_the_new_pods_for_restore_on_the_snapshots_node(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    body = model("m", timeoutSeconds=60, restoreWaitSeconds=45)
    apply(cluster, namespace, body)
    running_on_nodes(cluster, namespace, "m", 2)
    set_level(cluster, namespace, "m", "Stop")
    ((pod, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    node = node_of(cluster, namespace, pod)
    answer(
        cluster,
        namespace,
        pod,
        {
            "id": request["id"],
            "node": node,
            "specHash": request["specHash"],
            "bytes": 1 << 20,
            "check": CANARY,
        },
    )
    kubelet_ends_pods(cluster, namespace, "m")
    eventually(lambda: get(cluster, namespace, "m")["status"].get("phase") == "Stopped", what="Stopped")

    set_level(cluster, namespace, "m", "Awake")
    eventually(lambda: len(pods(cluster, namespace, "m")) == 2, what="2 new pods")
    for new in pods(cluster, namespace, "m"):
        assert new.metadata.name != pod
        restore_from = json.loads(new.metadata.annotations[c.ANN_RESTORE_FROM])
        assert (restore_from["node"], restore_from["specHash"]) == (node, engine_hash(body))
        # The canary the restored engine must answer, as the agent wrote it.
        assert {k: restore_from["check"][k] for k in CANARY} == CANARY
        (engine,) = [x for x in new.spec.containers if x.name == c.ENGINE_CONTAINER]
        assert {e.name: e.value for e in engine.env}[c.ENV_RESTORE_WAIT] == "45"
        (preferred,) = new.spec.affinity.node_affinity.preferred_during_scheduling_ignored_during_execution
        (term,) = preferred.preference.match_expressions
        assert (term.key, term.operator, term.values, preferred.weight) == (
            c.HOSTNAME_LABEL,
            "In",
            [node],
            100,
        )
        assert c.ANN_SNAPSHOT_REQUEST not in (new.metadata.annotations or {})

    # Another engine (its args changed): the snapshot is outdated, not used, and the pods start cold.
    changed = model("m", timeoutSeconds=60, restoreWaitSeconds=45)
    changed["spec"]["engine"]["args"] = ["--max-model-len", "2048"]
    apply(cluster, namespace, changed)
    outdated = eventually(
        lambda: (x := condition(get(cluster, namespace, "m"), "SnapshotReady"))["reason"] == "Outdated" and x
    )
    assert outdated["status"] == "False" and "replaces it" in outdated["message"]
    template = eventually(
        lambda: (
            (t := cluster.apps.read_namespaced_deployment("m", namespace).spec.template)
            .spec.containers[0]
            .args[-1]
            == "2048"
            and t
        )
    )
    assert c.ANN_RESTORE_FROM not in (template.metadata.annotations or {})
    assert c.ENV_RESTORE_WAIT not in {e.name for e in template.spec.containers[0].env}


def test_a_snapshot_that_times_out_still_stops_with_a_warning(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    apply(cluster, namespace, model("m", replicas=1, timeoutSeconds=3))
    running_on_nodes(cluster, namespace, "m", 1)
    set_level(cluster, namespace, "m", "Stop")
    eventually(lambda: requests(cluster, namespace, "m"), what="a request")
    started = time.monotonic()
    eventually(lambda: replicas_of(cluster, namespace, "m") == 0, timeout=30, what="scaled to zero anyway")
    assert time.monotonic() - started < 15
    (warning,) = [e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotFailed"]
    assert warning.type == "Warning" and "did not answer within 3 s" in warning.message
    kubelet_ends_pods(cluster, namespace, "m")
    md = eventually(lambda: (m := get(cluster, namespace, "m"))["status"]["phase"] == "Stopped" and m)
    assert "snapshot" not in md["status"]
    assert condition(md, "SnapshotReady")["reason"] == "NotTaken"


def test_a_failed_snapshot_still_stops_with_the_agents_reason(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    apply(cluster, namespace, model("m", replicas=1, timeoutSeconds=60))
    (pod,) = running_on_nodes(cluster, namespace, "m", 1)
    set_level(cluster, namespace, "m", "Stop")
    ((_, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    answer(
        cluster, namespace, pod, {"id": request["id"], "error": "criu dump failed: no space left on device"}
    )
    eventually(lambda: replicas_of(cluster, namespace, "m") == 0, what="scaled to zero anyway")
    (warning,) = [e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotFailed"]
    assert warning.type == "Warning" and "no space left on device" in warning.message
    assert "snapshot" not in get(cluster, namespace, "m")["status"]


def test_snapshot_false_stops_at_once_without_asking(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    apply(cluster, namespace, model("m", replicas=1, snapshot=False))
    running_on_nodes(cluster, namespace, "m", 1)
    off = condition(get(cluster, namespace, "m"), "SnapshotReady")
    assert (off["status"], off["reason"]) == ("False", "Disabled") and "spec.stop.snapshot" in off["message"]
    set_level(cluster, namespace, "m", "Stop")
    eventually(lambda: replicas_of(cluster, namespace, "m") == 0, what="scaled to zero")
    assert not [e for e in events_for(cluster, namespace, "m") if e.reason.startswith("Snapshot")]


def test_without_the_pod_init_snapshots_are_off_and_say_why(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, model("m", replicas=1, snapshot=True))
    conditions = lambda: get(cluster, namespace, "m").get("status", {}).get("conditions", [])  # noqa: E731
    off = eventually(lambda: [x for x in conditions() if x["type"] == "SnapshotReady"])[0]
    assert (off["status"], off["reason"]) == ("False", "Disabled") and "--tools-image" in off["message"]


# -- a Stop cancelled while the agent dumps ---------------------------------------------------------


class ReplicaSampler:
    """Reads the Deployment's replicas over and over in a thread, to say what it ever was."""

    def __init__(self, cluster: Cluster, ns: str, name: str) -> None:
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, ns, name), daemon=True)
        self._thread.start()

    def _run(self, cluster: Cluster, ns: str, name: str) -> None:
        while not self._stop.is_set():
            self.seen.add(replicas_of(cluster, ns, name))
            self._stop.wait(0.1)

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


def restore_from_in_template(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    template = cluster.apps.read_namespaced_deployment(name, ns).spec.template
    raw = (template.metadata.annotations or {}).get(c.ANN_RESTORE_FROM)
    return json.loads(raw) if raw else None


def test_a_stop_cancelled_mid_snapshot_records_it_and_the_pods_restore_it_never_scaling_to_zero(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    """Back to Awake while the agent dumps: the dump is not cut short. The snapshot it took is
    recorded, the pod template names it, and the Deployment replaces the pods (the snapshotted one
    has no engine left) with pods that restore it; the replicas never go to zero."""
    body = model("m", timeoutSeconds=60)
    apply(cluster, namespace, body)
    names = running_on_nodes(cluster, namespace, "m", 2)
    sampler = ReplicaSampler(cluster, namespace, "m")
    set_level(cluster, namespace, "m", "Stop")
    ((pod, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    set_level(cluster, namespace, "m", "Awake")  # a change of mind: the agent is dumping meanwhile
    time.sleep(1.0)
    assert (
        replicas_of(cluster, namespace, "m") == 2
        and restore_from_in_template(cluster, namespace, "m") is None
    )

    taken = "2026-03-04T05:06:07.000Z"
    node = node_of(cluster, namespace, pod)
    answer(
        cluster,
        namespace,
        pod,
        {
            "id": request["id"],
            "node": node,
            "specHash": request["specHash"],
            "bytes": 1 << 20,
            "taken": taken,
        },
    )
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"].get("snapshot") and m, what="recorded"
    )
    assert (md["status"]["snapshot"]["taken"], md["status"]["snapshot"]["pod"]) == (taken, pod)
    source = eventually(
        lambda: restore_from_in_template(cluster, namespace, "m"), what="the template names it"
    )
    assert (source["node"], source["taken"]) == (node, taken)
    # The Deployment replaces its pods (Recreate: the old ones go first), and the new ones restore it.
    kubelet_ends_pods(cluster, namespace, "m")
    new = eventually(lambda: (x := pods(cluster, namespace, "m")) and len(x) == 2 and x, what="2 new pods")
    assert not {p.metadata.name for p in new} & set(names)
    assert all(json.loads(p.metadata.annotations[c.ANN_RESTORE_FROM])["taken"] == taken for p in new)
    (event,) = [e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotTaken"]
    assert "the level left Stop meanwhile" in event.message and "restore it" in event.message
    assert "scaling to zero" not in event.message
    assert sampler.stop() == {2}, "the replicas were never changed"
    assert get(cluster, namespace, "m")["status"]["phase"] != "Stopped"


def test_a_stop_cancelled_mid_snapshot_whose_dump_fails_leaves_the_pods_serving(
    cluster: Cluster, namespace: str, operator_with_tools: Process
) -> None:
    """A dump that fails is rolled back by the agent (the engine woken back, as after a failed
    Checkpoint): nothing is recorded, the template is unchanged, and the same pods serve on."""
    apply(cluster, namespace, model("m", timeoutSeconds=60))
    names = running_on_nodes(cluster, namespace, "m", 2)
    sampler = ReplicaSampler(cluster, namespace, "m")
    set_level(cluster, namespace, "m", "Stop")
    ((pod, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    set_level(cluster, namespace, "m", "Awake")
    answer(
        cluster, namespace, pod, {"id": request["id"], "error": "criu dump failed: no space left on device"}
    )
    warning = eventually(
        lambda: next((e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotFailed"), None),
        what="the warning",
    )
    assert "no space left on device" in warning.message and "the level left Stop meanwhile" in warning.message
    time.sleep(2.0)  # what the operator does next, if anything, it has done by now
    md = get(cluster, namespace, "m")
    assert "snapshot" not in md["status"] and md["status"]["phase"] == "Awake"
    assert restore_from_in_template(cluster, namespace, "m") is None
    assert sorted(p.metadata.name for p in pods(cluster, namespace, "m")) == names
    assert sampler.stop() == {2}


def test_a_snapshot_answered_after_the_wait_of_a_cancelled_stop_is_recorded_across_an_operator_restart(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The answer comes when nobody waits for it any more: the Stop was cancelled, and the operator
    restarted meanwhile. Its engine is in that snapshot: the restarted operator records it (taken by
    the agent from the engine spec the pods run), and the pods restore it; nothing scales to zero."""

    def operator(log: str) -> Process:
        argv = ("operator", "--verbose", "--tools-image", TOOLS_IMAGE)
        return hibernate_process(cluster, tmp_path / log, *argv).start()

    first = operator("operator-1.log")
    try:
        body = model("m", replicas=1, timeoutSeconds=60)
        apply(cluster, namespace, body)
        running_on_nodes(cluster, namespace, "m", 1)
        set_level(cluster, namespace, "m", "Stop")
        ((pod, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    finally:
        first.kill()
    set_level(cluster, namespace, "m", "Awake")
    taken = "2026-05-06T07:08:09.000Z"
    answer(
        cluster,
        namespace,
        pod,
        {
            "id": request["id"],
            "node": node_of(cluster, namespace, pod),
            "specHash": request["specHash"],
            "taken": taken,
        },
    )
    second = operator("operator-2.log")
    try:
        md = eventually(
            lambda: (m := get(cluster, namespace, "m"))["status"].get("snapshot") and m, what="recorded"
        )
        assert md["status"]["snapshot"]["taken"] == taken and md["status"]["snapshot"]["pod"] == pod
        source = eventually(lambda: restore_from_in_template(cluster, namespace, "m"), what="the template")
        assert source["taken"] == taken
        (event,) = [e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotTaken"]
        assert "answered after the Stop's wait" in event.message
        assert replicas_of(cluster, namespace, "m") == 1
        # Seen again (every pod event, the resync): recorded once.
        time.sleep(2.0)
        assert len([e for e in events_for(cluster, namespace, "m") if e.reason == "SnapshotTaken"]) == 1
    finally:
        second.stop()
