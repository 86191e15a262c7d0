"""Pods bound to a node no kubelet runs: the tests play the kubelet (pod IP, container status) and
the agent acts on them for real, over HTTP and on real processes.

The agent acts only on pods that a ModelDeployment owns (agent/ownership.py), so each engine pod
hangs from a real chain of owners, as the operator and the controllers would make it:
ModelDeployment -> Deployment -> ReplicaSet -> Pod, every ownerReference with the owner's real UID.
The operator does not run in these tests, and the control plane's controllers must leave the chain
alone: the Deployment is paused with the ReplicaSet's replica count (no rollout, no scaling), the
ReplicaSet wants one replica and selects only its pod (no pod made or deleted while it lives). A
replacement for a deleted pod comes from an inert template: not managed, and no node can take it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import kubernetes

from hibernate.api import constants as c
from tests.cluster import Cluster, eventually


def ensure_node(cluster: Cluster, name: str) -> None:
    """A Node object, so the pod garbage collector does not delete pods bound to it as orphans."""
    nodes = {n.metadata.name for n in cluster.core.list_node().items}
    if name not in nodes:
        cluster.core.create_node({"metadata": {"name": name, "labels": {"hibernate.dev/test": "true"}}})


def bind(cluster: Cluster, namespace: str, pod: str, node: str) -> None:
    """What the scheduler does: the pod's Binding to `node`. A 409 that finds the pod on that node
    already is the same binding made twice (the request reached the API server, its answer did not),
    so the pod is bound as asked; a pod on another node fails with both names."""
    binding = {"metadata": {"name": pod}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
    try:
        cluster.core.create_namespaced_pod_binding(pod, namespace, binding, _preload_content=False)
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            raise
        on = cluster.core.read_namespaced_pod(pod, namespace).spec.node_name
        assert on == node, f"pod {pod} is bound to {on!r}, not to {node!r}: {e.body}"


Ref = dict[str, str]  # an object as an ownerReference names it: apiVersion, kind, name, uid
TEMPLATE_HASH = "5b7d9c8f64"  # the ReplicaSet's pod-template-hash (any stable value)


def owner_reference(owner: Ref) -> dict[str, Any]:
    return {**owner, "controller": True, "blockOwnerDeletion": True}


def _ref(api_version: str, kind: str, meta: Any) -> Ref:
    name, uid = (meta["name"], meta["uid"]) if isinstance(meta, dict) else (meta.name, meta.uid)
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}


def inert_template(model: str, with_hash: bool) -> dict[str, Any]:
    """A pod template that yields nothing the tests or the agent would see: not managed, and bound to
    no node (a node selector that no node matches)."""
    labels = {c.LABEL_MODEL: model, **({"pod-template-hash": TEMPLATE_HASH} if with_hash else {})}
    return {
        "metadata": {"labels": labels},
        "spec": {
            "nodeSelector": {"hibernate.dev/test-no-node": "true"},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": c.ENGINE_CONTAINER, "image": "local/fake-engine"}],
        },
    }


def create_model(cluster: Cluster, namespace: str, name: str) -> Ref:
    """A ModelDeployment object (the operator is not running: nothing reconciles it)."""
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": {"model": "m"}}
    md = cluster.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)
    return _ref(c.API_VERSION, c.KIND, md["metadata"])


def create_deployment(
    cluster: Cluster,
    namespace: str,
    name: str,
    model: str,
    owner: Ref | None,
    finalizers: tuple[str, ...] = (),
) -> Ref:
    """A paused Deployment of one replica selecting `hibernate.dev/model=<model>`, owned by `owner`."""
    meta: dict[str, Any] = {"name": name, "labels": {c.LABEL_MODEL: model}}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    if finalizers:
        meta["finalizers"] = list(finalizers)
    body = {
        "metadata": meta,
        "spec": {
            "paused": True,
            "replicas": 1,
            "selector": {"matchLabels": {c.LABEL_MODEL: model}},
            "template": inert_template(model, with_hash=False),
        },
    }
    return _ref("apps/v1", "Deployment", cluster.apps.create_namespaced_deployment(namespace, body).metadata)


def create_replicaset(
    cluster: Cluster, namespace: str, model: str, owner: Ref | None, finalizers: tuple[str, ...] = ()
) -> Ref:
    """A ReplicaSet of one replica that selects only the pod of `model` (made next), owned by `owner`."""
    labels = {c.LABEL_MODEL: model, "pod-template-hash": TEMPLATE_HASH}
    meta: dict[str, Any] = {"name": f"{model}-{TEMPLATE_HASH}", "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    if finalizers:
        meta["finalizers"] = list(finalizers)
    body = {
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": inert_template(model, with_hash=True),
        },
    }
    return _ref("apps/v1", "ReplicaSet", cluster.apps.create_namespaced_replica_set(namespace, body).metadata)


def create_chain(cluster: Cluster, namespace: str, name: str) -> Ref:
    """ModelDeployment `name` -> Deployment `name` (the operator's naming) -> ReplicaSet; returns the
    ReplicaSet, for the pod's ownerReference."""
    model = create_model(cluster, namespace, name)
    deployment = create_deployment(cluster, namespace, name, name, model)
    return create_replicaset(cluster, namespace, name, deployment)


def create_engine_pod(
    cluster: Cluster,
    namespace: str,
    node: str,
    port: int,
    *,
    name: str | None = None,
    level: str | None = None,
    checkpoint_dir: str | None = None,
    owner: Ref | None = None,
    bare: bool = False,
    model: str | None = None,
    gated: bool = False,
    drain_seconds: float | None = None,
) -> dict[str, Any]:
    """A managed engine pod bound to `node`, owned by a ModelDeployment's chain made for it
    (create_chain, the model named after the pod); `owner`: the ReplicaSet (or anything) to name as
    its controller instead; `bare`: no owner at all. `model`: its hibernate.dev/model label (what the
    owners' selectors match; default: the pod's name). `gated`: the readiness gate the operator puts
    on engine pods (hibernate.dev/awake), so Ready needs the agent's condition too. `drain_seconds`:
    the pod's drain deadline (what the operator writes from spec.drainSeconds; absent, the agent's
    default of 30 s)."""
    name = name or f"engine-{uuid.uuid4().hex[:6]}"
    model = model or name
    if owner is None and not bare:
        owner = create_chain(cluster, namespace, name)
    annotations = {}
    if level is not None:
        annotations[c.ANN_SLEEP_LEVEL] = level
    if checkpoint_dir is not None:
        annotations[c.ANN_CHECKPOINT_DIR] = checkpoint_dir
    if drain_seconds is not None:
        annotations[c.ANN_DRAIN_SECONDS] = f"{drain_seconds:g}"
    meta: dict[str, Any] = {
        "name": name,
        "labels": {c.LABEL_MANAGED: "true", c.LABEL_MODEL: model, "pod-template-hash": TEMPLATE_HASH},
        "annotations": annotations,
    }
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    body = {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": c.ENGINE_CONTAINER,
                    "image": "local/fake-engine",
                    "ports": [{"name": "http", "containerPort": port}],
                }
            ],
        },
    }
    if gated:
        body["spec"]["readinessGates"] = [{"conditionType": c.CONDITION_AWAKE}]
    pod = cluster.core.create_namespaced_pod(namespace, body)
    return {"name": name, "uid": pod.metadata.uid}


def start_pod(
    cluster: Cluster, namespace: str, name: str, container_id: str | None = None, scheme: str = "docker"
) -> None:
    """What the kubelet reports once the engine container runs: the pod IP (the loopback engine) and
    the container's id (so the agent finds its processes by cgroup), `scheme://<id>` as the runtime
    reports it (docker, containerd, cri-o)."""
    status: dict[str, Any] = {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1"}
    if container_id:
        status["containerStatuses"] = [
            {
                "name": c.ENGINE_CONTAINER,
                "containerID": f"{scheme}://{container_id}",
                "ready": True,
                "restartCount": 0,
                "image": "local/fake-engine",
                "imageID": "",
                "state": {"running": {}},
            }
        ]
    cluster.core.patch_namespaced_pod_status(name, namespace, {"status": status})


def annotate(cluster: Cluster, namespace: str, name: str, level: object) -> None:
    cluster.core.patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": {c.ANN_SLEEP_LEVEL: str(level)}}}
    )


def annotations(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    return dict(cluster.core.read_namespaced_pod(name, namespace).metadata.annotations or {})


def reached(
    cluster: Cluster, namespace: str, name: str, level: int, state: str, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the agent reports `level` in `state`; returns its last-operation."""

    def check() -> dict[str, Any] | None:
        ann = annotations(cluster, namespace, name)
        if ann.get(c.ANN_STATE) == state and ann.get(c.ANN_OBSERVED_LEVEL) == str(level):
            op: dict[str, Any] = json.loads(ann.get(c.ANN_LAST_OPERATION, "{}"))
            return op or {"none": True}
        return None

    result: dict[str, Any] = eventually(check, timeout=timeout, what=f"{namespace}/{name} {state} at {level}")
    return result


def pod_events(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    items = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in items if e.involved_object.kind == "Pod"]


# -- snapshots: the operator's side of the exchange, as annotations (docs/agent.md) -----------------


def ask_snapshot(
    cluster: Cluster, namespace: str, name: str, request_id: str, spec_hash: str, timeout: float = 60
) -> dict[str, Any]:
    """Ask the agent for a snapshot of pod `name`'s engine, as the operator does before a Stop, and
    wait for its answer, which must not be an error."""
    request = {"id": request_id, "specHash": spec_hash, "requested": "2026-01-01T00:00:00.000Z"}
    cluster.core.patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": {c.ANN_SNAPSHOT_REQUEST: json.dumps(request)}}}
    )
    raw = eventually(
        lambda: annotations(cluster, namespace, name).get(c.ANN_SNAPSHOT), timeout, what="answer"
    )
    answer: dict[str, Any] = json.loads(raw)
    assert "error" not in answer, answer
    return answer


def restore_from(cluster: Cluster, namespace: str, name: str, source: dict[str, Any]) -> None:
    """Mark pod `name` as a new pod of a wake from Stop, as the operator's template does."""
    cluster.core.patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": {c.ANN_RESTORE_FROM: json.dumps(source)}}}
    )


def restore_verdict(cluster: Cluster, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """The agent's report of pod `name`'s restore: restored, or started cold and why."""
    raw = eventually(
        lambda: annotations(cluster, namespace, name).get(c.ANN_RESTORE), timeout, what="restore"
    )
    verdict: dict[str, Any] = json.loads(raw)
    return verdict
