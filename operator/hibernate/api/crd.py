"""Generate the ModelDeployment CRD from the pydantic types (kubebuilder's `controller-gen`, in Python).

The output must be a *structural* schema that Kubernetes 1.20 accepts (no CEL): every node typed,
no `$ref`, no `title`, nullable options collapsed, and `x-kubernetes-*` markers kept.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec, GpuGroupStatus
from hibernate.api.levels import LEVEL_NAMES
from hibernate.api.v1alpha1 import ModelDeploymentSpec, ModelDeploymentStatus

_DROP = {"title", "examples"}
SLEEP_PATTERN = "^([1-5]|(?i:" + "|".join(n.lower() for n in LEVEL_NAMES[1:]) + "))$"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP and k != "$defs"}


def _structural(node: Any) -> Any:
    """Rewrite pydantic's JSON schema into what the API server calls structural."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _structural(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string"):
        # int-or-string carries no type and no typed branches; its checks sit beside the marker.
        node.pop("type", None)
        node.pop("anyOf", None)
        if node.get("default", 0) is None:
            node.pop("default")
        return node
    branches = node.get("anyOf")
    if branches is not None:
        typed = [b for b in branches if b.get("type") != "null"]
        if len(typed) == 1:  # `X | None`: optional, not nullable; the API server omits nulls
            node.pop("anyOf")
            if node.get("default", 0) is None:
                node.pop("default")
            node = {**typed[0], **node}
    if node.get("type") == "object" and node.get("additionalProperties") is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("default", 0) is None:
        node.pop("default")
    return node


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    result: dict[str, Any] = _structural(_resolve(raw, raw.get("$defs", {})))
    return result


def _spec_schema() -> dict[str, Any]:
    schema = openapi_schema(ModelDeploymentSpec)
    schema["properties"]["gpuGroup"]["properties"]["makeRoomLevel"].update(minimum=1, pattern=SLEEP_PATTERN)
    # Defaults of nested objects would be written into every stored object; keep only leaf defaults.
    for key in ("engine", "checkpoint", "stop", "network"):
        schema["properties"][key].pop("default", None)
    return schema


def _without_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_defaults(n) for n in node]
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    return node


def _status_schema() -> dict[str, Any]:
    # Only the operator writes status, always whole; server-side defaults there would only mislead.
    schema: dict[str, Any] = _without_defaults(openapi_schema(ModelDeploymentStatus))
    schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def _definition(
    name: str,
    kind: str,
    plural: str,
    singular: str,
    short_names: tuple[str, ...],
    categories: list[str],
    columns: list[dict[str, Any]],
    schema: dict[str, Any],
) -> dict[str, Any]:
    """A CustomResourceDefinition of hibernate.dev: one version, served and stored, with the status
    subresource, its printer columns and its schema (the ModelDeployment's and the GpuGroup's)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "hibernate"}},
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "listKind": f"{kind}List",
                "categories": categories,
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    return _definition(
        c.CRD_NAME,
        c.KIND,
        c.PLURAL,
        c.SINGULAR,
        c.SHORT_NAMES,
        ["all", "hibernate"],
        columns=[
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Desired", "type": "string", "jsonPath": ".spec.sleepLevel"},
            # The automatic level in effect (idle ladder, wake on request), beside the spec.
            {"name": "Auto", "type": "string", "jsonPath": ".status.automaticLevel.level"},
            {"name": "Level", "type": "string", "jsonPath": ".status.sleepLevel"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            # In a GpuGroup: whether it holds the group's GPU now (blank outside groups).
            {"name": "GPU", "type": "string", "jsonPath": ".status.gpu"},
            # Whether a wake from Stop restores a snapshot: Ready, NotTaken, Outdated, Disabled.
            {
                "name": "Snapshot",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="SnapshotReady")].reason',
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        schema={
            "type": "object",
            "description": "A model served by an engine that hibernate can put to sleep.",
            "required": ["spec"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                # The name becomes a Service name (a DNS-1035 label) and the value of
                # the model label (63 characters at most): refuse what neither can carry.
                "metadata": {
                    "type": "object",
                    "properties": {
                        "name": {
                            "type": "string",
                            "maxLength": 63,
                            "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                        }
                    },
                },
                "spec": _spec_schema(),
                "status": _status_schema(),
            },
        },
    )


def gpu_group_crd() -> dict[str, Any]:
    spec = openapi_schema(GpuGroupSpec)
    spec["properties"]["placement"].pop("default", None)
    # A level to make room at is a sleep level: refuse Awake (0) at admission too.
    spec["properties"]["makeRoomLevel"].update(minimum=1, pattern=SLEEP_PATTERN)
    status: dict[str, Any] = _without_defaults(openapi_schema(GpuGroupStatus))
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return _definition(
        c.GPU_GROUP_CRD_NAME,
        c.GPU_GROUP_KIND,
        c.GPU_GROUP_PLURAL,
        c.GPU_GROUP_SINGULAR,
        c.GPU_GROUP_SHORT_NAMES,
        ["hibernate"],
        columns=[
            {"name": "Max Awake", "type": "integer", "jsonPath": ".spec.maxAwake"},
            {"name": "Awake", "type": "integer", "jsonPath": ".status.awake"},
            {"name": "Holders", "type": "string", "jsonPath": ".status.holding"},
            {
                "name": "Placeable",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Placeable")].status',
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        schema={
            "type": "object",
            "description": "ModelDeployments that take turns on one GPU.",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": status,
            },
        },
    )


RESOURCES = {c.PLURAL: crd, c.GPU_GROUP_PLURAL: gpu_group_crd}


def crd_yaml(resource: str = c.PLURAL) -> str:
    header = "# Generated from operator/hibernate/api/ by `hibernate crds`. Do not edit.\n"
    if resource == c.PLURAL:  # unchanged, so the ModelDeployment CRD file stays as it was
        header = "# Generated from operator/hibernate/api/v1alpha1.py by `hibernate crds`. Do not edit.\n"
    return header + yaml.safe_dump(RESOURCES[resource](), sort_keys=False, width=100)
