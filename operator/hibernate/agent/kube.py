# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; this module is the typed boundary around it)
"""The agent's only writes to the API (its pod annotations, its one pod condition and Events) and its
reads of a pod's owners.

Blocking; run in a thread."""

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


def read_owner(
    kind: str, namespace: str, name: str, api: kubernetes.client.ApiClient | None = None
) -> dict[str, Any] | None:
    """A pod's owner as the API server has it now (a GET, not a cache): ReplicaSet, Deployment or
    ModelDeployment; None when there is no such object."""
    api = api or client()
    # Any: the generated signatures do not know the legacy `_preload_content` (raw JSON, no models)
    apps: Any = kubernetes.client.AppsV1Api(api)
    custom: Any = kubernetes.client.CustomObjectsApi(api)
    try:
        if kind == "ReplicaSet":
            response = apps.read_namespaced_replica_set(name, namespace, _preload_content=False)
        elif kind == "Deployment":
            response = apps.read_namespaced_deployment(name, namespace, _preload_content=False)
        elif kind == c.KIND:
            obj: dict[str, Any] = custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, name
            )
            return obj
        else:
            raise ValueError(f"not an owner the agent reads: {kind}")
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    data: dict[str, Any] = json.loads(response.data)
    return data


def remove_annotation(namespace: str, name: str, key: str) -> bool:
    """Remove one annotation from the pod (a merge patch with null); False if the pod is gone."""
    try:
        core().patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {key: None}}})
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def read_pod(namespace: str, name: str) -> dict[str, Any] | None:
    """The pod as the API server has it now (a GET, as plain JSON); None when there is no such pod."""
    api: Any = core()  # the generated signatures do not know the legacy `_preload_content`
    try:
        response = api.read_namespaced_pod(name, namespace, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    data: dict[str, Any] = json.loads(response.data)
    return data


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


def awake_condition(awake: bool, reason: str, message: str) -> dict[str, str]:
    """The pod condition behind the engine pods' readiness gate (`hibernate.dev/awake`)."""
    return {
        "type": c.CONDITION_AWAKE,
        "status": "True" if awake else "False",
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": now_iso()[:19] + "Z",
    }


def set_condition(namespace: str, name: str, condition: dict[str, str]) -> bool:
    """Set one condition of the pod through the pods/status subresource; False if the pod is gone.

    A strategic merge patch (conditions merge by `type`): the kubelet's own conditions stay as they are,
    and the kubelet keeps this one (it owns only the conditions it writes)."""
    body = {"status": {"conditions": [condition]}}
    try:
        core().patch_namespaced_pod_status(name, namespace, body)
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


def event(
    pod: dict[str, Any], node: str, kind: str, reason: str, message: str, *, once: bool = False
) -> None:
    """An Event on the pod for humans (`kubectl describe pod`). Never fails the operation.

    `once`: the Event is named after the pod's UID and the reason, so that it is posted once per pod
    for as long as the API server keeps it, whichever agent process posts it (a second is refused)."""
    meta = pod["metadata"]
    stamp = now_iso()
    naming = (
        {"name": f"{meta['name'][:180]}.{meta.get('uid', '')}.{reason.lower()[:30]}"}
        if once
        else {"generateName": f"{meta['name']}."}
    )
    body = {
        "metadata": {**naming, "namespace": meta["namespace"]},
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
        if once and e.status == 409:
            return  # posted before, by this agent or an earlier one
        log.warning(
            "could not post event %s on pod %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason
        )


def warn_once(pod: dict[str, Any], node: str, reason: str, message: str) -> None:
    event(pod, node, "Warning", reason, message, once=True)
