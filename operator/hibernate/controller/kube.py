# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; this module is the typed boundary around it)
"""The few Kubernetes API calls the operator makes, over the official client (blocking: call from
plain `def` kopf handlers, which kopf runs in threads)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from hibernate.api import constants as c
from hibernate.kubeclient import api_client

FIELD_MANAGER = "hibernate-operator"


client = api_client


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(client())


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(client())


_APPLY_PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
    "Service": "/api/v1/namespaces/{namespace}/services/{name}",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{name}",
    "ResourceClaim": "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}",
}


def apply_body(obj: dict[str, Any]) -> str:
    """`obj` as an apply-patch+yaml body: JSON (which is YAML) in ASCII, every other character escaped
    the YAML way. The client's own encoding escapes a character beyond the BMP (an emoji in the
    engine's args) as a JSON surrogate pair, which the API server's YAML decoder refuses."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _NOT_ASCII.sub(_yaml_escape, text)


_NOT_ASCII = re.compile(r"[^\x00-\x7e]")


def _yaml_escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def server_side_apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Create or update `obj` by server-side apply: idempotent, and a no-op apply writes nothing.

    The body is sent already encoded (see `apply_body`); the generated `patch_*` methods would
    encode it again their way."""
    kind, meta = obj["kind"], obj["metadata"]
    if kind not in _APPLY_PATHS:
        raise ValueError(f"no apply for kind {kind}")
    api = client()
    request = api.param_serialize(
        method="PATCH",
        resource_path=_APPLY_PATHS[kind],
        path_params={"namespace": meta["namespace"], "name": meta["name"]},
        query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=apply_body(obj),
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request)
    response.read()
    data: Any = api.response_deserialize(response, {"200": "object", "201": "object"}).data
    return cast(dict[str, Any], data)


def _read_or_none(read: Callable[[], Any]) -> dict[str, Any] | None:
    try:
        result = read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    out: dict[str, Any] = client().sanitize_for_serialization(result)
    return out


def read_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    return _read_or_none(lambda: apps().read_namespaced_deployment(name, namespace))


def read_model_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    """A ModelDeployment as a plain dict, or None when it is gone."""
    return _read_or_none(
        lambda: custom().get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    )


def list_pods(namespace: str, model: str) -> list[dict[str, Any]]:
    result = core().list_namespaced_pod(namespace, label_selector=f"{c.LABEL_MODEL}={model}")
    items: list[dict[str, Any]] = client().sanitize_for_serialization(result).get("items", [])
    return items


class Conflict(Exception):
    """The object changed since it was read; re-read and decide again."""


def annotate_pod(
    namespace: str, name: str, annotations: dict[str, str | None], resource_version: str | None = None
) -> None:
    """Merge annotations into a pod. With `resource_version`, only if nobody wrote it since (409 → Conflict)."""
    meta: dict[str, Any] = {"annotations": annotations}
    if resource_version:
        meta["resourceVersion"] = resource_version
    try:
        core().patch_namespaced_pod(name, namespace, {"metadata": meta})
    except ApiException as e:
        if e.status == 409:
            raise Conflict(f"pod {namespace}/{name} changed") from e
        if e.status != 404:  # a pod that is gone needs no level
            raise


def read_pod(namespace: str, name: str) -> dict[str, Any] | None:
    return _read_or_none(lambda: core().read_namespaced_pod(name, namespace))


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    custom().patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"status": status}
    )


# What a call to the API server raises when the server answers an error, or when it cannot be reached
# at all (restarting, the connection refused or reset, a timeout).
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)


def brief(e: BaseException) -> str:
    """An API error in one line: its status and reason, not the response's headers and body."""
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def post_event(md: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """An Event on a ModelDeployment, from outside a kopf handler (kopf.event needs the handler's
    context). Never fails the caller: an Event is for humans."""
    meta = md["metadata"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": "hibernate.dev/operator",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        core().create_namespaced_event(meta["namespace"], kubernetes.client.CoreV1Event.model_validate(body))
    except API_ERRORS as e:
        logging.getLogger(__name__).warning(
            "could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], brief(e)
        )


def read_gpu_group(namespace: str, name: str) -> dict[str, Any] | None:
    """A GpuGroup as a plain dict, or None when there is none."""
    return _read_or_none(
        lambda: custom().get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.GPU_GROUP_PLURAL, name)
    )


def patch_gpu_group_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    custom().patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, namespace, c.GPU_GROUP_PLURAL, name, {"status": status}
    )


_served: dict[str, tuple[float, bool]] = {}
SERVED_TTL = 60.0  # a cluster upgraded to serve an API is noticed within this many seconds


def serves(group_version: str) -> bool:
    """Whether the API server serves `group/version` (e.g. resource.k8s.io/v1), asked at most once a minute."""
    cached = _served.get(group_version)
    now = time.monotonic()
    if cached is not None and now - cached[0] < SERVED_TTL:
        return cached[1]
    try:
        response = client().call_api(
            *client().param_serialize(
                method="GET", resource_path=f"/apis/{group_version}", auth_settings=["BearerToken"]
            )
        )
        response.read()
        status = response.status
    except ApiException as e:
        status = e.status
    if status not in (200, 404):
        raise ApiException(status=status, reason=f"discovery of {group_version}")
    found: bool = status == 200
    _served[group_version] = (now, found)
    return found
