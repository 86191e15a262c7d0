"""The agent acts only on pods that a ModelDeployment owns (issue 14, design.md "the agent is root on
the node, so a pod is hostile input").

The label `hibernate.dev/managed=true` is not enough: the chain Pod -> ReplicaSet -> Deployment ->
ModelDeployment must hold through live objects, each controller ownerReference checked by UID. Any
other labelled pod gets one Warning event (`NotOwnedByModelDeployment`, naming the broken link) and is
left alone: no annotation written, no level performed, however often a level is asked for and
whatever the agent lists again.

Against the real API server and its controllers (no operator runs here: the chains are made by
tests/pods.py, as the operator and the controllers would make them).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from hibernate.agent import kube
from hibernate.agent.ownership import REASON, Ownership
from hibernate.agent.podref import PodRef
from hibernate.agent.worker import Agent, Reporter
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import FakeEngine, free_port, start_fake_engine
from tests.pods import (
    TEMPLATE_HASH,
    annotate,
    annotations,
    create_chain,
    create_deployment,
    create_engine_pod,
    create_model,
    create_replicaset,
    ensure_node,
    pod_events,
    reached,
    start_pod,
)

NODE = "ownership-test-node"
HOLD = "hibernate.dev/test-hold"  # keeps an object the garbage collector deletes, for the test to read


def raw_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """The pod as the agent's watch delivers it: plain JSON."""
    api: Any = cluster.core
    response = api.read_namespaced_pod(name, namespace, _preload_content=False)
    pod: dict[str, Any] = json.loads(response.data)
    return pod


def release(cluster: Cluster, namespace: str, kind: str, name: str) -> None:
    """Drop the test's finalizer, so that the object (and the namespace) can go."""
    patch = {"metadata": {"finalizers": None}}
    read = getattr(cluster.apps, f"patch_namespaced_{kind}")
    try:
        read(name, namespace, patch)
    except Exception as e:  # already gone
        if getattr(e, "status", None) != 404:
            raise


def warnings(cluster: Cluster, namespace: str, pod: str) -> list[Any]:
    return [e for e in pod_events(cluster, namespace, pod) if e.reason == REASON]


# -- the chain the tests make ---------------------------------------------------------------------


def test_the_test_chain_is_stable_under_the_real_controllers(cluster: Cluster, namespace: str) -> None:
    """tests/pods.py's chain is left alone by the deployment and replicaset controllers: no pod, no
    ReplicaSet made or deleted, no ownerReference released. Otherwise the other agent tests would
    test the controllers, not the agent."""
    ensure_node(cluster, NODE)
    created = create_engine_pod(cluster, namespace, NODE, 8000, level="Awake")
    name = created["name"]

    def synced() -> bool:
        rs = cluster.apps.read_namespaced_replica_set(f"{name}-{TEMPLATE_HASH}", namespace)
        dep = cluster.apps.read_namespaced_deployment(name, namespace)
        assert rs.status.observed_generation == rs.metadata.generation, rs.status
        assert rs.status.replicas == 1 and rs.status.fully_labeled_replicas == 1, rs.status
        assert dep.status.observed_generation == dep.metadata.generation, dep.status
        return True

    eventually(synced, what="the controllers have seen the Deployment and the ReplicaSet")
    time.sleep(2)  # and a little longer: anything they would do, they would have done
    pods = cluster.core.list_namespaced_pod(namespace).items
    assert [p.metadata.name for p in pods] == [name]
    (pod,) = pods
    assert pod.metadata.uid == created["uid"]
    (pod_owner,) = pod.metadata.owner_references
    replicasets = cluster.apps.list_namespaced_replica_set(namespace).items
    assert [(rs.metadata.name, rs.metadata.uid) for rs in replicasets] == [(pod_owner.name, pod_owner.uid)]
    (rs_owner,) = replicasets[0].metadata.owner_references
    (deployment,) = cluster.apps.list_namespaced_deployment(namespace).items
    assert (deployment.metadata.name, deployment.metadata.uid) == (rs_owner.name, rs_owner.uid)
    (dep_owner,) = deployment.metadata.owner_references
    md = cluster.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    assert (dep_owner.kind, dep_owner.name, dep_owner.uid) == (c.KIND, name, md["metadata"]["uid"])
    assert all(r.controller for r in (pod_owner, rs_owner, dep_owner))


def test_the_agent_names_a_deployment_as_the_operator_does() -> None:
    """The check that a Deployment carries its ModelDeployment's name follows the operator's naming."""
    from hibernate.api.v1alpha1 import ModelDeploymentSpec
    from hibernate.controller.workload import deployment

    md = {"metadata": {"name": "llama", "namespace": "ns", "uid": "u"}, "spec": {"model": "m"}}
    made = deployment(md, ModelDeploymentSpec.model_validate(md["spec"]), 1, "")
    assert made["metadata"]["name"] == "llama"
    (ref,) = made["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (c.KIND, "llama", "u", True)


# -- the verdicts, link by link ---------------------------------------------------------------------


def test_each_broken_link_is_named_and_the_owners_are_read_once(cluster: Cluster, namespace: str) -> None:
    reads: list[tuple[str, str]] = []

    def lookup(kind: str, ns: str, name: str) -> dict[str, Any] | None:
        reads.append((kind, name))
        return kube.read_owner(kind, ns, name, api=cluster.api)

    check = Ownership(lookup)
    ensure_node(cluster, NODE)
    good = create_engine_pod(cluster, namespace, NODE, 8000)["name"]
    pod = raw_pod(cluster, namespace, good)
    assert check.verify(pod).owned
    assert sorted(reads) == sorted(
        [("ReplicaSet", f"{good}-{TEMPLATE_HASH}"), ("Deployment", good), (c.KIND, good)]
    )
    assert check.cached(pod) == check.verify(pod) and check.verify(pod).owned
    # A second pod of the same ReplicaSet (a forged one would look like this): no read at all.
    twin = json.loads(json.dumps(pod))
    twin["metadata"].update(name="twin", uid=str(uuid.uuid4()))
    assert check.verify(twin).owned and len(reads) == 3

    def forged(**change: Any) -> dict[str, Any]:
        out = json.loads(json.dumps(pod))
        out["metadata"]["uid"] = str(uuid.uuid4())
        out["metadata"]["ownerReferences"][0].update(change)
        return out

    wrong_uid = check.verify(forged(uid=str(uuid.uuid4())))
    assert not wrong_uid.owned and not wrong_uid.retry
    assert "but the live ReplicaSet" in wrong_uid.reason and "has uid" in wrong_uid.reason
    missing = check.verify(forged(name="nope-5b7d9c8f64"))
    assert not missing.owned and missing.retry and "does not exist" in missing.reason
    wrong_kind = check.verify(forged(kind="StatefulSet"))
    assert not wrong_kind.owned and "not by a ReplicaSet" in wrong_kind.reason
    not_controller = forged()
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    assert "has no controller ownerReference" in check.verify(not_controller).reason
    relabelled = forged()
    relabelled["metadata"]["labels"][c.LABEL_MODEL] = "other"
    assert "do not match the selector" in check.verify(relabelled).reason

    # A Deployment that names a ModelDeployment but is not the one the operator makes for it.
    model = create_model(cluster, namespace, "named")
    other = create_deployment(cluster, namespace, "impostor", "impostor", model)
    rs = create_replicaset(cluster, namespace, "impostor", other)
    pod2 = create_engine_pod(cluster, namespace, NODE, 8000, name="impostor-pod", owner=rs, model="impostor")
    verdict = check.verify(raw_pod(cluster, namespace, pod2["name"]))
    assert not verdict.owned and "names a ModelDeployment's Deployment after it" in verdict.reason


# -- the agent, in its process: one Warning, nothing else, whatever happens next ------------------


@pytest.fixture
def engines() -> Iterator[tuple[FakeEngine, FakeEngine]]:
    with (
        start_fake_engine(weights_mib=16, kv_mib=4) as owned,
        start_fake_engine(weights_mib=16, kv_mib=4) as other,
    ):
        yield owned, other


def start_agent(cluster: Cluster, tmp_path: Path) -> Process:
    return hibernate_process(
        cluster,
        tmp_path / f"agent-{time.monotonic_ns()}.log",
        "agent",
        "--node-name",
        NODE,
        "--metrics-port",
        str(free_port()),
        "--engine-timeout",
        "5",
    ).start()


def broken_chains(cluster: Cluster, namespace: str, port: int) -> dict[str, str]:
    """One pod per way of not being a ModelDeployment's, each asking for L1: {pod: the broken link}."""
    out = {}
    bare = create_engine_pod(cluster, namespace, NODE, port, name="bare", level="L1", bare=True)
    out[bare["name"]] = "Pod bare has no controller ownerReference"

    rs = create_replicaset(cluster, namespace, "lone-rs", owner=None)
    create_engine_pod(cluster, namespace, NODE, port, name="lone-rs", level="L1", owner=rs)
    out["lone-rs"] = f"ReplicaSet {rs['name']} has no controller ownerReference (expected a Deployment)"

    dep = create_deployment(cluster, namespace, "lone-dep", "lone-dep", owner=None)
    rs = create_replicaset(cluster, namespace, "lone-dep", dep)
    create_engine_pod(cluster, namespace, NODE, port, name="lone-dep", level="L1", owner=rs)
    out["lone-dep"] = "Deployment lone-dep has no controller ownerReference (expected a ModelDeployment)"

    # The right names, a wrong UID: the ModelDeployment `forged` exists, the Deployment names it with
    # another UID. The garbage collector deletes such a Deployment; a finalizer keeps it (deleting but
    # readable, its ReplicaSet and pod untouched) for the agent to read.
    model = create_model(cluster, namespace, "forged")
    dep = create_deployment(
        cluster, namespace, "forged", "forged", {**model, "uid": str(uuid.uuid4())}, finalizers=(HOLD,)
    )
    rs = create_replicaset(cluster, namespace, "forged", dep)
    create_engine_pod(cluster, namespace, NODE, port, name="forged", level="L1", owner=rs)
    out["forged"] = f"but the live ModelDeployment forged has uid {model['uid']}"
    return out


def test_only_a_model_deployments_pods_are_served_the_others_get_one_warning(
    cluster: Cluster, namespace: str, tmp_path: Path, engines: tuple[FakeEngine, FakeEngine]
) -> None:
    owned_engine, other_engine = engines
    ensure_node(cluster, NODE)
    other_port = int(other_engine.url.rsplit(":", 1)[1])
    held = httpx.get(f"{other_engine.url}/debug/memory", timeout=5).json()["device_bytes"]
    agent = start_agent(cluster, tmp_path)
    try:
        served = create_engine_pod(
            cluster, namespace, NODE, int(owned_engine.url.rsplit(":", 1)[1]), level="L1"
        )["name"]
        broken = broken_chains(cluster, namespace, other_port)
        for name in (served, *broken):
            start_pod(cluster, namespace, name)

        reached(cluster, namespace, served, 1, "Asleep")

        def one_warning_each() -> bool:
            for name, link in broken.items():
                (event,) = warnings(cluster, namespace, name)
                assert event.type == "Warning" and link in event.message, (name, event.message)
                assert (
                    event.involved_object.uid
                    == cluster.core.read_namespaced_pod(name, namespace).metadata.uid
                )
            return True

        eventually(one_warning_each, timeout=30, what="one NotOwnedByModelDeployment warning per pod")

        # A level asked again, and a resync: a new agent process lists every pod again.
        for name in broken:
            annotate(cluster, namespace, name, "L2")
        annotate(cluster, namespace, served, "Awake")
        reached(cluster, namespace, served, 0, "Awake")
        agent.stop()
        agent = start_agent(cluster, tmp_path)
        annotate(cluster, namespace, served, "L2")
        reached(cluster, namespace, served, 2, "Asleep")  # the new agent has listed and served
        time.sleep(2)  # and has had time to get to the others

        one_warning_each()
        for name in broken:
            ann = annotations(cluster, namespace, name)
            assert not {c.ANN_STATE, c.ANN_OBSERVED_LEVEL, c.ANN_LAST_OPERATION} & ann.keys(), (name, ann)
            reasons = {e.reason for e in pod_events(cluster, namespace, name)}
            assert reasons == {REASON}, (name, reasons)
        memory = httpx.get(f"{other_engine.url}/debug/memory", timeout=5).json()
        assert memory["sleep_level"] is None and memory["device_bytes"] == held, "their engine untouched"
        assert "is left alone" in agent.output()
    finally:
        agent.stop()
        print(agent.output()[-4000:])
        release(cluster, namespace, "deployment", "forged")


# -- the same agent, in this process: a resync costs no API call and changes nothing --------------


class Levels:
    """Levels whose engine moves at once, recording what the agent asked of it (not the API)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.host = SimpleNamespace(checkpoint_roots=())
        self.level: dict[str, SleepLevel] = {}

    async def probe(
        self, ref: PodRef, claimed: SleepLevel | None, hint: SleepLevel | None = None
    ) -> SleepLevel:
        self.calls.append((ref.name, "probe"))
        return self.level.get(ref.name, SleepLevel.AWAKE)

    async def sleep(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        self.calls.append((ref.name, f"sleep {level.label}"))
        self.level[ref.name] = level
        return {}

    async def wake(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        self.calls.append((ref.name, f"wake {level.label}"))
        self.level[ref.name] = SleepLevel.AWAKE
        return {}


def test_a_resync_reads_no_owner_again_and_warns_no_more(cluster: Cluster, namespace: str) -> None:
    ensure_node(cluster, NODE)
    good = create_engine_pod(cluster, namespace, NODE, 8000, level="L1")["name"]
    bare = create_engine_pod(cluster, namespace, NODE, 8000, level="L1", bare=True)["name"]
    rs = create_chain(cluster, namespace, "second")  # its pod named after it, as create_engine_pod would
    other = create_engine_pod(cluster, namespace, NODE, 8000, name="second", level="L1", owner=rs)["name"]
    for name in (good, bare, other):
        start_pod(cluster, namespace, name)

    reads: list[str] = []
    writes: list[tuple[str, dict[str, str]]] = []
    warned: list[tuple[str, str, str]] = []

    def lookup(kind: str, ns: str, name: str) -> dict[str, Any] | None:
        reads.append(f"{kind}/{name}")
        return kube.read_owner(kind, ns, name, api=cluster.api)

    def annotate_pod(ns: str, name: str, ann: dict[str, str]) -> bool:
        writes.append((name, ann))
        return True

    def warn(pod: dict[str, Any], node: str, reason: str, message: str) -> None:
        warned.append((pod["metadata"]["name"], reason, message))

    levels = Levels()
    reporter = Reporter(node=NODE, annotate=annotate_pod, post_event=lambda *_: None, post_warning_once=warn)
    agent = Agent(levels=levels, reporter=reporter, ownership=Ownership(lookup))  # type: ignore[arg-type]

    async def settle() -> None:
        for _ in range(200):
            await asyncio.sleep(0.02)
            busy = [t for t in (*agent.owner_checks.values(), *agent.workers.values()) if not t.done()]
            if not busy:
                return
        raise AssertionError("the agent did not settle")

    async def run() -> None:
        for name in (good, bare, other):
            agent.observe("ADDED", raw_pod(cluster, namespace, name))
        await settle()
        first_reads = len(reads)
        assert first_reads == 6, reads  # two chains of three owners, each read once
        assert [w[:2] for w in warned] == [(bare, REASON)]
        assert {n for n, _ in levels.calls} == {good, other} and bare not in {n for n, _ in writes}

        # The resync: every pod again, with a new level asked of each.
        for name in (good, bare, other):
            annotate(cluster, namespace, name, "L2")
            agent.observe("ADDED", raw_pod(cluster, namespace, name))
        await settle()
        assert len(reads) == first_reads, "no owner read again"
        assert len(warned) == 1, "no second warning"
        assert bare not in {n for n, _ in levels.calls} and bare not in {n for n, _ in writes}
        assert levels.level == {good: SleepLevel.L2, other: SleepLevel.L2}
        assert set(agent.pods) == {(namespace, good), (namespace, other)}

        # Deleted: forgotten; its images (it has none of this agent's) are not touched.
        agent.observe("DELETED", raw_pod(cluster, namespace, bare))
        assert (namespace, bare) not in agent.unowned

    asyncio.run(run())
