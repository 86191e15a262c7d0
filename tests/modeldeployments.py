"""Helpers that read like the user's and the agent's actions against the real API server."""

from __future__ import annotations

import json
from typing import Any

from hibernate.api import constants as c
from tests.cluster import Cluster


def manifest(name: str, level: object = "Awake", replicas: int = 1, **engine: Any) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": "facebook/opt-125m",
            "replicas": replicas,
            "sleepLevel": level,
            "engine": {"image": "vllm/vllm-openai:v0.33.0", "port": 8000, **engine},
        },
    }


def apply(cluster: Cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, name
    )
    return obj


def set_level(cluster: Cluster, namespace: str, name: str, level: object) -> None:
    cluster.custom.patch_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"spec": {"sleepLevel": level}}
    )


def pods(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    items = cluster.core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_MODEL}={name}").items
    return [p for p in items if p.metadata.deletion_timestamp is None]


def mark_ready(cluster: Cluster, namespace: str, pod: str) -> None:
    """What the kubelet does when the readiness probe passes (no kubelet runs in these tests); the
    pod's IP is the loopback, where the test engines listen."""
    cluster.core.patch_namespaced_pod_status(
        pod,
        namespace,
        {"status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}},
    )


def report(
    cluster: Cluster, namespace: str, pod: str, level: int, state: str, error: str | None = None
) -> None:
    """Write what the node agent writes after a transition."""
    op = {"level": level, "action": "sleep" if level else "wake", "seconds": 0.1, "error": error}
    cluster.core.patch_namespaced_pod(
        pod,
        namespace,
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


def condition(md: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(x for x in md.get("status", {}).get("conditions", []) if x["type"] == ctype)


def events_for(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    items = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in items if e.involved_object.kind == c.KIND]
