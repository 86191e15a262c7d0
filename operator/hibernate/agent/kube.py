# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; this module is the typed boundary around it)
"""The agent's only writes to the API: its pod annotations and Events. Blocking; run in a thread."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from hibernate.api import constants as c
from hibernate.kubeclient import api_client

log = logging.getLogger(__name__)


client = api_client


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(client())


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def report(namespace: str, name: str, annotations: dict[str, str]) -> bool:
    """Merge the agent's annotations into the pod; False if the pod is gone."""
    try:
        core().patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def state_annotations(state: str, observed: int, operation: dict[str, Any] | None = None) -> dict[str, str]:
    out = {c.ANN_STATE: state, c.ANN_OBSERVED_LEVEL: str(observed)}
    if operation is not None:
        out[c.ANN_LAST_OPERATION] = json.dumps(operation, sort_keys=True)
    return out


def event(pod: dict[str, Any], node: str, kind: str, reason: str, message: str) -> None:
    """An Event on the pod for humans (`kubectl describe pod`). Never fails the operation."""
    meta = pod["metadata"]
    stamp = now_iso()
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": "hibernate-agent", "host": node},
        "reportingComponent": "hibernate.dev/agent",
        "reportingInstance": node,
        "firstTimestamp": stamp[:19] + "Z",
        "lastTimestamp": stamp[:19] + "Z",
        "count": 1,
    }
    try:
        core().create_namespaced_event(meta["namespace"], kubernetes.client.CoreV1Event.model_validate(body))
    except ApiException as e:
        log.warning(
            "could not post event %s on pod %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason
        )
