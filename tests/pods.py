"""Pods bound to a node no kubelet runs: the tests play the kubelet (pod IP, container status) and
the agent acts on them for real, over HTTP and on real processes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hibernate.api import constants as c
from tests.cluster import Cluster, eventually


def ensure_node(cluster: Cluster, name: str) -> None:
    """A Node object, so the pod garbage collector does not delete pods bound to it as orphans."""
    nodes = {n.metadata.name for n in cluster.core.list_node().items}
    if name not in nodes:
        cluster.core.create_node({"metadata": {"name": name, "labels": {"hibernate.dev/test": "true"}}})


def create_engine_pod(
    cluster: Cluster,
    namespace: str,
    node: str,
    port: int,
    *,
    name: str | None = None,
    level: str | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, Any]:
    name = name or f"engine-{uuid.uuid4().hex[:6]}"
    annotations = {}
    if level is not None:
        annotations[c.ANN_SLEEP_LEVEL] = level
    if checkpoint_dir is not None:
        annotations[c.ANN_CHECKPOINT_DIR] = checkpoint_dir
    body = {
        "metadata": {
            "name": name,
            "labels": {c.LABEL_MANAGED: "true", c.LABEL_MODEL: "m"},
            "annotations": annotations,
        },
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
    pod = cluster.core.create_namespaced_pod(namespace, body)
    return {"name": name, "uid": pod.metadata.uid}


def start_pod(cluster: Cluster, namespace: str, name: str, container_id: str | None = None) -> None:
    """What the kubelet reports once the engine container runs: the pod IP (the loopback engine) and
    the container's id (so the agent finds its processes by cgroup)."""
    status: dict[str, Any] = {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1"}
    if container_id:
        status["containerStatuses"] = [
            {
                "name": c.ENGINE_CONTAINER,
                "containerID": f"docker://{container_id}",
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
