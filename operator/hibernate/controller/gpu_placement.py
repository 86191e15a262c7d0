"""Where a GpuGroup's members run: on one node and one GPU (docs/gpu-sharing.md, "Placement").

Pure functions of the group and the member's spec: whether the member can be placed (and why not),
and what its pod template gets. Two ways, as the cluster allows:

- TimeSlicing: the NVIDIA device plugin advertises a GPU several times (`nvidia.com/gpu.shared` with
  `renameByDefault`); each member asks for one of them, on a node with one GPU (the group's
  nodeSelector), and pod affinity keeps the members on the same node;
- DRA: one ResourceClaim for the group (resource.k8s.io/v1, Kubernetes 1.34+) that every member's
  pod references: the scheduler puts every pod that shares a claim where its one GPU is;
- SameNode: only the pod affinity (the GPU given another way; fake engines on a CPU node).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec, parse_bytes
from hibernate.api.v1alpha1 import ModelDeploymentSpec

GPU_RESOURCE = "nvidia.com/gpu"
CLAIM_NAME = "gpu"  # the pod's name for the shared claim
HOSTNAME = "kubernetes.io/hostname"
DRA_API = "resource.k8s.io/v1"


@dataclass(frozen=True)
class GroupPlacement:
    """A GpuGroup, as the pod templates of its members need it."""

    name: str
    spec: GpuGroupSpec


def claim_name(group: str) -> str:
    return f"{group}-gpu"


def problems(
    placement: GroupPlacement | None, group_name: str, spec: ModelDeploymentSpec, dra_served: bool
) -> list[str]:
    """Why the member cannot be placed with its group; empty when it can."""
    if placement is None:
        return [f"GpuGroup {group_name} does not exist in this namespace"]
    group = placement.spec
    out = []
    if spec.replicas > 1:
        out.append(f"a GpuGroup member runs one replica on the group's GPU; spec.replicas is {spec.replicas}")
    gpus = _gpus_asked(spec)
    if gpus > 1:
        out.append(f"the engine asks for {gpus} GPUs; a GpuGroup shares one")
    if group.placement.mode == "DRA" and not dra_served:
        out.append(
            f"GpuGroup {group_name} places by DRA, but this cluster does not serve {DRA_API} "
            "(Kubernetes 1.34 or newer with a DRA driver); use placement.mode TimeSlicing"
        )
    for key, value in group.placement.node_selector.items():
        mine = spec.engine.node_selector.get(key)
        if mine is not None and mine != value:
            out.append(f"engine.nodeSelector {key}={mine} contradicts the group's {key}={value}")
    if group.gpu_memory is not None and spec.gpu_group is not None and spec.gpu_group.gpu_memory is not None:
        mine_bytes, budget = parse_bytes(spec.gpu_group.gpu_memory), parse_bytes(group.gpu_memory)
        if mine_bytes > budget:
            out.append(
                f"gpuMemory {spec.gpu_group.gpu_memory} is more than the group's whole budget "
                f"{group.gpu_memory}: it could never be awake"
            )
    return out


def _gpus_asked(spec: ModelDeploymentSpec) -> int:
    resources = spec.engine.resources
    raw = resources.limits.get(GPU_RESOURCE, resources.requests.get(GPU_RESOURCE, 0))
    try:
        return int(str(raw))
    except ValueError:
        return 1


def place(template: dict[str, Any], placement: GroupPlacement) -> None:
    """Give a member's pod template its group: label, pod affinity, node labels, and the shared GPU
    (the time-sliced resource, or the group's claim) instead of a whole one."""
    group = placement.spec.placement
    template["metadata"]["labels"][c.LABEL_GPU_GROUP] = placement.name
    pod = template["spec"]
    affinity = pod["affinity"] = copy.deepcopy(pod.get("affinity") or {})  # the spec's own stays as it is
    pod_affinity = affinity.setdefault("podAffinity", {})
    required = pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", [])
    # The first member matches its own term: the scheduler places it anywhere that fits, the rest follow.
    required.append(
        {"labelSelector": {"matchLabels": {c.LABEL_GPU_GROUP: placement.name}}, "topologyKey": HOSTNAME}
    )
    if group.node_selector:
        pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **group.node_selector}
    if group.mode == "SameNode":
        return  # the engine's own resources, as they are
    container = next(x for x in pod["containers"] if x["name"] == c.ENGINE_CONTAINER)
    resources = container.setdefault("resources", {})
    for kind in ("limits", "requests"):
        if kind in resources:
            resources[kind].pop(GPU_RESOURCE, None)
            if not resources[kind]:
                del resources[kind]
    if group.mode == "TimeSlicing":
        resources.setdefault("limits", {})[group.resource_name] = "1"
    else:
        resources["claims"] = [{"name": CLAIM_NAME}]
        pod["resourceClaims"] = [{"name": CLAIM_NAME, "resourceClaimName": claim_name(placement.name)}]


def resource_claim(group: dict[str, Any], spec: GpuGroupSpec) -> dict[str, Any]:
    """The group's one GPU, for DRA placement: owned by the GpuGroup, shared by every member's pod."""
    meta = group["metadata"]
    return {
        "apiVersion": DRA_API,
        "kind": "ResourceClaim",
        "metadata": {
            "name": claim_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {c.LABEL_GPU_GROUP: meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": c.API_VERSION,
                    "kind": c.GPU_GROUP_KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "devices": {
                "requests": [
                    {"name": CLAIM_NAME, "exactly": {"deviceClassName": spec.placement.device_class_name}}
                ]
            }
        },
    }
