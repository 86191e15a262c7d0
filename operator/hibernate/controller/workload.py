"""The objects a ModelDeployment owns, as pure functions of its spec (no API calls here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hibernate.api import constants as c
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller.gpu_placement import GroupPlacement, place
from hibernate.controller.snapshots import pod_template_restore

VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
TOOLS_VOLUME = "hibernate-tools"
TOOLS_DIR = "/.hibernate"  # where the init container puts the pod init and the CRIU bundle
PORT_NAME = "http"


def selector_labels(name: str) -> dict[str, str]:
    return {c.LABEL_MODEL: name}


def owner_reference(md: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": md["metadata"]["name"],
        "uid": md["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def engine_command(spec: ModelDeploymentSpec, tools_image: str) -> tuple[list[str], list[str]]:
    """Command and args: vLLM's server with the flags sleep mode needs, wrapped by our init for level 4."""
    command = list(spec.engine.command or VLLM_COMMAND)
    args = ["--model", spec.model, "--port", str(spec.engine.port), "--enable-sleep-mode", *spec.engine.args]
    if tools_image:
        # The init is PID 1 of the container and outlives the engine, so CRIU can restore in place.
        command = ["python3", f"{TOOLS_DIR}/podinit.py", "--log", f"{TOOLS_DIR}/engine.log", "--", *command]
    return command, args


def pod_template(
    name: str,
    spec: ModelDeploymentSpec,
    tools_image: str,
    group: GroupPlacement | None = None,
    restore: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The engine pods' template. `restore`: the recorded snapshot (status.snapshot) that new pods
    restore (hibernate.controller.snapshots); only while one is usable, so that a model without one
    keeps the template it always had."""
    engine = spec.engine
    command, args = engine_command(spec, tools_image)
    env = [{"name": "VLLM_SERVER_DEV_MODE", "value": "1"}]
    env += [e.to_api() for e in engine.env if e.name != "VLLM_SERVER_DEV_MODE"]
    container: dict[str, Any] = {
        "name": c.ENGINE_CONTAINER,
        "image": engine.image,
        "command": command,
        "args": args,
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": engine.port, "protocol": "TCP"}],
        # Quantities are strings in the API ("1", "16Gi"); server-side apply refuses bare integers.
        "resources": {
            k: {r: str(q) for r, q in v.items()} for k, v in engine.resources.to_api().items() if v
        },
        # /health answers 200 while asleep: the probe says only that the engine process serves HTTP.
        # Whether the replica may receive requests is the readiness gate's (below): the agent's
        # hibernate.dev/awake condition. No liveness probe on purpose: a checkpointed engine answers
        # nothing and must not be killed for it.
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": max(1, engine.startup_seconds // 5),
        },
        "volumeMounts": list(engine.volume_mounts),
    }
    if engine.image_pull_policy:
        container["imagePullPolicy"] = engine.image_pull_policy
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": list(engine.volumes),
        "enableServiceLinks": False,
        # Ready only while the agent says the pod is Awake: a sleeping replica leaves the Service's
        # ready endpoints (the kubelet ANDs this condition with the containers' readiness).
        "readinessGates": [{"conditionType": c.CONDITION_AWAKE}],
    }
    if tools_image:
        container["volumeMounts"].append({"name": TOOLS_VOLUME, "mountPath": TOOLS_DIR})
        pod_spec["volumes"].append({"name": TOOLS_VOLUME, "emptyDir": {}})
        pod_spec["initContainers"] = [
            {
                "name": "hibernate-tools",
                "image": tools_image,
                "command": ["hibernate-install-tools", TOOLS_DIR],
                "volumeMounts": [{"name": TOOLS_VOLUME, "mountPath": TOOLS_DIR}],
            }
        ]
    for key, value in (
        ("nodeSelector", engine.node_selector),
        ("tolerations", engine.tolerations),
        ("affinity", engine.affinity),
        ("runtimeClassName", engine.runtime_class_name),
        ("serviceAccountName", engine.service_account_name),
    ):
        if value:
            pod_spec[key] = value
    labels = {**engine.pod_labels, **selector_labels(name), c.LABEL_MANAGED: "true"}
    annotations = {**engine.pod_annotations, c.ANN_CHECKPOINT_DIR: spec.checkpoint.directory}
    if not spec.verify_wake:  # only then: the default template stays as it was (no rollout on upgrade)
        annotations[c.ANN_VERIFY_WAKE] = "false"
    template = {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}
    if restore is not None and tools_image:
        pod_template_restore(template, restore, spec.stop.restore_wait_seconds)
    if group is not None:
        place(template, group)
    return template


def deployment(
    md: dict[str, Any],
    spec: ModelDeploymentSpec,
    replicas: int,
    tools_image: str,
    group: GroupPlacement | None = None,
    restore: dict[str, Any] | None = None,
) -> dict[str, Any]:
    name = md["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": md["metadata"]["namespace"],
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # A GPU node rarely has room for a surge pod; replace in place.
            "strategy": {"type": "Recreate"},
            "template": pod_template(name, spec, tools_image, group, restore),
        },
    }


def service(md: dict[str, Any], spec: ModelDeploymentSpec) -> dict[str, Any]:
    name = md["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": md["metadata"]["namespace"],
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "selector": selector_labels(name),
            "ports": [
                {"name": PORT_NAME, "port": spec.engine.port, "targetPort": PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


@dataclass(frozen=True)
class EngineNetwork:
    """Who may reach every engine (the agent and the gateway, as NetworkPolicyPeers), besides the peers
    each ModelDeployment adds in `spec.network.allowFrom`."""

    peers: tuple[dict[str, Any], ...] = ()


def network_policy(md: dict[str, Any], spec: ModelDeploymentSpec, net: EngineNetwork) -> dict[str, Any]:
    """Only `net.peers` and the spec's own peers reach the engine port; nothing reaches another port.

    The sleep endpoints (/sleep, /wake_up, /collective_rpc) share the serving port and are
    unauthenticated (vLLM dev mode): a policy cannot open a port for some paths only."""
    name = md["metadata"]["name"]
    peers = [*net.peers, *(p.to_api() for p in spec.network.allow_from)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": md["metadata"]["namespace"],
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            # No peers: nobody (a rule without `from` would let everyone in).
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": spec.engine.port}]}]
            if peers
            else [],
        },
    }
