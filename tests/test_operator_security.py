"""The operator's two guards, against a real API server: a NetworkPolicy per ModelDeployment, and
no Deployment for a spec whose pod fields would widen the pods' rights.

The operator runs as the chart runs it (tests/test_helm.py checks that the chart's flags produce
these peers), watching only the test's namespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from hibernate.api import constants as c
from hibernate.api import crd, pod_fields, v1alpha1
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import handlers, workload
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.modeldeployments import apply, condition, events_for, get, manifest

RELEASE_NS = "hibernate-system"
AGENT = (
    "app.kubernetes.io/name=hibernate,app.kubernetes.io/instance=hibernate,app.kubernetes.io/component=agent"
)
GATEWAY = AGENT.replace("=agent", "=gateway")
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
SECURED = (
    "--network-policy",
    "--release-namespace",
    RELEASE_NS,
    "--agent-pod-labels",
    AGENT,
    "--gateway-pod-labels",
    GATEWAY,
    "--engine-peer",
    json.dumps(PROMETHEUS),
)


def start_operator(cluster: Cluster, log: Path, namespace: str, *args: str) -> Process:
    return hibernate_process(cluster, log, "operator", "--namespace", namespace, *args).start()


@pytest.fixture
def secured(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Process]:
    proc = start_operator(cluster, tmp_path / "operator.log", namespace, *SECURED)
    yield proc
    proc.stop()


def networking(cluster: Cluster) -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(cluster.api)


def policy(cluster: Cluster, namespace: str, name: str) -> Any:
    return networking(cluster).read_namespaced_network_policy(name, namespace)


def policies(cluster: Cluster, namespace: str) -> list[Any]:
    return list(networking(cluster).list_namespaced_network_policy(namespace).items)


def read_or_none(read: Any) -> Any:
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def labels_of(selector: Any) -> dict[str, str]:
    return dict(selector.match_labels or {})


# ---- NetworkPolicy ---------------------------------------------------------------------------------


def test_each_model_gets_a_policy_that_admits_only_the_agent_the_gateway_and_its_own_peers(
    cluster: Cluster, namespace: str, secured: Process
) -> None:
    clients = {"podSelector": {"matchLabels": {"app": "rag"}}}
    body = manifest("m", port=8123)
    body["spec"]["network"] = {"allowFrom": [clients]}
    apply(cluster, namespace, body)
    np = eventually(lambda: policy(cluster, namespace, "m"), what="the NetworkPolicy")
    md = get(cluster, namespace, "m")
    (owner,) = np.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (c.KIND, "m", md["metadata"]["uid"], True)
    assert labels_of(np.spec.pod_selector) == {c.LABEL_MODEL: "m"}
    assert np.spec.policy_types == ["Ingress"]
    (rule,) = np.spec.ingress
    assert [(p.protocol, p.port) for p in rule.ports] == [("TCP", 8123)]
    peers = [cluster.api.sanitize_for_serialization(p) for p in rule._from]
    release = {"matchLabels": {"kubernetes.io/metadata.name": RELEASE_NS}}
    assert peers == [
        {
            "namespaceSelector": release,
            "podSelector": {"matchLabels": dict(kv.split("=") for kv in AGENT.split(","))},
        },
        {
            "namespaceSelector": release,
            "podSelector": {"matchLabels": dict(kv.split("=") for kv in GATEWAY.split(","))},
        },
        PROMETHEUS,
        clients,
    ]
    # The policy covers the Deployment's pods.
    dep = eventually(lambda: cluster.apps.read_namespaced_deployment("m", namespace), what="deployment")
    assert labels_of(np.spec.pod_selector).items() <= dep.spec.template.metadata.labels.items()

    # A change of port or of peers reaches the policy.
    apply(cluster, namespace, manifest("m", port=9000))

    def updated() -> bool:
        (r,) = policy(cluster, namespace, "m").spec.ingress
        return [p.port for p in r.ports] == [9000] and len(r._from) == 3

    eventually(updated, what="policy follows the spec")


def test_a_deleted_policy_is_made_again_and_goes_with_its_model(
    cluster: Cluster, namespace: str, secured: Process
) -> None:
    apply(cluster, namespace, manifest("m"))
    first = eventually(lambda: policy(cluster, namespace, "m"), what="the NetworkPolicy")
    networking(cluster).delete_namespaced_network_policy("m", namespace, _preload_content=False)
    eventually(
        lambda: (
            (p := read_or_none(lambda: policy(cluster, namespace, "m")))
            and p.metadata.uid != first.metadata.uid
        ),
        what="a new NetworkPolicy",
    )
    cluster.kubectl("delete", "md", "m", "-n", namespace, "--wait=true", "--timeout=30s")
    eventually(
        lambda: not policies(cluster, namespace),
        timeout=30,
        what="garbage collection of the NetworkPolicy",
    )


def test_without_the_flag_the_operator_writes_no_policy(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    proc = start_operator(cluster, tmp_path / "op.log", namespace)
    try:
        apply(cluster, namespace, manifest("m"))
        eventually(lambda: cluster.apps.read_namespaced_deployment("m", namespace), what="deployment")
        assert policies(cluster, namespace) == []
    finally:
        proc.stop()


def test_no_peers_at_all_admits_nobody(cluster: Cluster, namespace: str) -> None:
    """Agent and gateway off and nothing else: `ingress: []` (a rule without `from` admits everyone)."""
    md = {"metadata": {"name": "m", "namespace": namespace, "uid": "0" * 8 + "-0000-0000-0000-" + "0" * 12}}
    body = workload.network_policy(md, ModelDeploymentSpec(model="x"), workload.EngineNetwork())
    assert body["spec"]["ingress"] == []
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body))


def test_the_spec_refuses_a_peer_that_says_nothing_or_too_much(cluster: Cluster, namespace: str) -> None:
    """The CRD's CEL rules (x-kubernetes-validations, 1.25+) refuse at admission what the operator's
    types refuse, with the operator's own message; an API server without CEL (1.20) drops the rules
    and admits the object, and the operator refuses it (a permanent error: an event, no pods)."""
    in_without_values = {"matchExpressions": [{"key": "team", "operator": "In"}]}
    exists_with_values = {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]}
    for peer, error in (
        ({}, v1alpha1.PEER_SAYS_NOTHING),
        ({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}, v1alpha1.PEER_SAYS_TOO_MUCH),
        ({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}, v1alpha1.PEER_SAYS_TOO_MUCH),
        ({"podSelector": in_without_values}, v1alpha1.needs_values_message("In")),
        ({"namespaceSelector": exists_with_values}, v1alpha1.takes_no_values_message("Exists")),
        ({"ipBlock": {"cidr": "a network"}}, "ipBlock.cidr in body should match"),
    ):
        body = manifest("m")
        body["spec"]["network"] = {"allowFrom": [peer]}
        with pytest.raises(ValueError, match=None if "cidr" in error else re.escape(error)):
            ModelDeploymentSpec.model_validate(body["spec"])  # the operator's own types agree
        with pytest.raises(kopf.PermanentError, match="invalid spec"):  # where no CEL refused it
            handlers._spec(body["spec"])
        out = cluster.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(body), check=False
        )
        if cluster.minor < 25 and "cidr" not in error:
            assert out.returncode == 0, (peer, out.stderr)  # no CEL: the rules were dropped
            continue
        assert out.returncode != 0 and error in out.stderr, (peer, out.stderr)
        assert "spec.network.allowFrom" in out.stderr, out.stderr  # names the field


def test_the_crd_rules_compile_with_base_cel_only() -> None:
    """Each rule is an expression of base CEL (no function of a newer Kubernetes CEL library, which
    an older API server refuses the whole CRD for), and its messageExpression gives, for the objects
    the rule refuses, the operator's message."""
    import celpy

    rules = [r for node in _schema_nodes(crd.crd()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 6  # peer: 2; matchExpressions of podSelector and namespaceSelector: 2 each
    env = celpy.Environment()
    for op, values, message in (
        ("In", None, v1alpha1.needs_values_message("In")),
        ("NotIn", [], v1alpha1.needs_values_message("NotIn")),
        ("DoesNotExist", ["x"], v1alpha1.takes_no_values_message("DoesNotExist")),
    ):
        req: dict[str, Any] = {"key": "k", "operator": op, **({} if values is None else {"values": values})}
        with pytest.raises(ValueError, match=message):
            v1alpha1.LabelSelectorRequirement.model_validate(req)
        refused = [r for r in rules if "self.operator" in r["rule"] and not _cel(env, r["rule"], req)]
        assert [str(_cel(env, r["messageExpression"], req)) for r in refused] == [message] * len(refused)
        assert refused


def _cel(env: Any, expression: str, obj: dict[str, Any]) -> Any:
    import celpy

    return env.program(env.compile(expression)).evaluate({"self": celpy.json_to_cel(obj)})


def _schema_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _schema_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _schema_nodes(v)


# ---- pod fields ------------------------------------------------------------------------------------


def with_host_path(name: str) -> dict[str, Any]:
    body = manifest(name)
    body["spec"]["engine"]["volumes"] = [{"name": "host", "hostPath": {"path": "/var/run"}}]
    body["spec"]["engine"]["volumeMounts"] = [{"name": "host", "mountPath": "/host"}]
    return body


def test_a_host_path_is_refused_failed_with_one_warning_then_fixing_the_spec_recovers(
    cluster: Cluster, namespace: str, secured: Process
) -> None:
    apply(cluster, namespace, with_host_path("m"))
    md = eventually(
        lambda: (m := get(cluster, namespace, "m")).get("status", {}).get("phase") == "Failed" and m,
        what="Failed",
    )
    degraded = condition(md, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "ForbiddenPodField",
        pod_fields.HOST_PATH,
    )
    assert condition(md, "Ready")["status"] == "False"
    assert read_or_none(lambda: cluster.apps.read_namespaced_deployment("m", namespace)) is None
    assert read_or_none(lambda: cluster.core.read_namespaced_service("m", namespace)) is None
    # The policy is written all the same: it protects, it grants nothing.
    assert policy(cluster, namespace, "m")

    def warnings() -> list[Any]:
        return [e for e in events_for(cluster, namespace, "m") if e.type == "Warning"]

    (warning,) = eventually(warnings, what="the Warning event")
    assert (warning.reason, warning.message, warning.count or 1) == (
        "ForbiddenPodField",
        pod_fields.HOST_PATH,
        1,
    )

    # Another reconcile (a level change) neither writes the Deployment nor repeats the Warning.
    cluster.custom.patch_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, "m", {"spec": {"sleepLevel": "L1"}}
    )
    eventually(
        lambda: get(cluster, namespace, "m")["status"]["observedGeneration"] == 2, what="generation 2 seen"
    )
    assert read_or_none(lambda: cluster.apps.read_namespaced_deployment("m", namespace)) is None
    assert [(w.reason, w.count or 1) for w in warnings()] == [("ForbiddenPodField", 1)]

    # Fixed: the Deployment comes, the model is no longer Failed.
    apply(cluster, namespace, manifest("m", level="L1"))
    dep = eventually(
        lambda: read_or_none(lambda: cluster.apps.read_namespaced_deployment("m", namespace)),
        what="deployment",
    )
    assert not [v for v in dep.spec.template.spec.volumes or [] if v.host_path]
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"]["phase"] != "Failed" and m, what="recovered"
    )
    assert condition(md, "Degraded")["status"] == "False"


def test_another_service_account_is_refused_with_its_name(
    cluster: Cluster, namespace: str, secured: Process
) -> None:
    body = manifest("m")
    body["spec"]["engine"]["serviceAccountName"] = "builder"
    apply(cluster, namespace, body)
    md = eventually(
        lambda: (m := get(cluster, namespace, "m")).get("status", {}).get("phase") == "Failed" and m
    )
    assert condition(md, "Degraded")["message"] == pod_fields.service_account_message("builder")
    assert read_or_none(lambda: cluster.apps.read_namespaced_deployment("m", namespace)) is None


def test_what_the_chart_allows_reaches_the_deployment(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    proc = start_operator(
        cluster, tmp_path / "op.log", namespace, "--allow-host-path", "--allow-service-account", "builder"
    )
    try:
        body = with_host_path("m")
        body["spec"]["engine"]["serviceAccountName"] = "builder"
        apply(cluster, namespace, body)
        dep = eventually(lambda: cluster.apps.read_namespaced_deployment("m", namespace), what="deployment")
        pod = dep.spec.template.spec
        assert [v.host_path.path for v in pod.volumes if v.host_path] == ["/var/run"]
        assert pod.service_account_name == "builder"
        eventually(lambda: get(cluster, namespace, "m").get("status", {}).get("phase") == "Pending")
    finally:
        proc.stop()


def test_the_schema_prunes_every_other_way_to_privileges(cluster: Cluster, namespace: str) -> None:
    """What the spec cannot carry never reaches a pod: the API server drops it at admission."""
    body = manifest("m")
    engine = body["spec"]["engine"]
    engine.update(
        securityContext={"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
        privileged=True,
        hostNetwork=True,
        hostPID=True,
        hostIPC=True,
        shareProcessNamespace=True,
        containers=[{"name": "x", "image": "busybox", "securityContext": {"privileged": True}}],
        initContainers=[{"name": "x", "image": "busybox"}],
        ports=[{"containerPort": 80, "hostPort": 80}],
    )
    body["spec"]["template"] = {"spec": {"hostNetwork": True}}
    body["spec"]["podSpec"] = {"hostPID": True}
    # Straight to the API (kubectl would refuse these client-side; a raw client does not).
    cluster.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)
    stored = get(cluster, namespace, "m")["spec"]
    assert "template" not in stored and "podSpec" not in stored
    for field in (
        "securityContext",
        "privileged",
        "hostNetwork",
        "hostPID",
        "hostIPC",
        "shareProcessNamespace",
        "containers",
        "initContainers",
        "ports",
    ):
        assert field not in stored["engine"], field
    dep = workload.deployment(
        {"metadata": {"name": "m", "namespace": namespace, "uid": "u"}},
        ModelDeploymentSpec.model_validate(stored),
        1,
        "tools:1",
    )
    pod = dep["spec"]["template"]["spec"]
    assert set(pod) <= {
        "containers",
        "initContainers",
        "volumes",
        "enableServiceLinks",
        "readinessGates",
        "nodeSelector",
        "tolerations",
        "affinity",
        "runtimeClassName",
        "serviceAccountName",
    }
    for ctr in pod["containers"] + pod["initContainers"]:
        assert "securityContext" not in ctr and all("hostPort" not in p for p in ctr.get("ports", []))
