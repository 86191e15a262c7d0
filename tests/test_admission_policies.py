"""The chart's ValidatingAdmissionPolicies enforced by a real API server (Kubernetes 1.30+; the tests
run 1.34 by default): what RBAC cannot narrow, they do.

- the agent's pod writes: annotations under hibernate.dev/ and its one condition (hibernate.dev/awake);
  the agent's own write functions (hibernate.agent.kube) go through, anything else is refused;
- the gateway's ModelDeployment writes: its activity mark and automatic level, never the spec;
- the gateway's GpuGroup writes: the lease annotation (hibernate.gateway.gpu_switch), nothing else;
- the pod fields of spec.engine that widen a pod's rights: refused at admission with the operator's
  own messages (the table of tests/test_pod_fields.py).

The chart is rendered as `helm install` renders it on such a cluster, and its ServiceAccounts, RBAC and
policies are applied; requests "as the agent" and "as the gateway" impersonate their ServiceAccounts.
tests/test_pod_fields.py and tests/test_helm.py run the same CEL through cel-python for every case.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from hibernate.agent import kube as agent_kube
from hibernate.api import constants as c
from hibernate.api.gpu_group import Lease, LeaseEntry, read_lease
from hibernate.api.pod_fields import PodFieldPolicy
from hibernate.controller import kube
from hibernate.gateway import gpu_switch
from tests.cluster import Cluster, eventually, install_gpu_group_crd, new_namespace
from tests.modeldeployments import manifest
from tests.test_helm import VAP_API, helm_binary, render
from tests.test_pod_fields import CASES

pytestmark = pytest.mark.k8s

APPLIED_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


class Release:
    """The chart's agent and gateway identities, their RBAC and the four policies, applied."""

    def __init__(self, cluster: Cluster, namespace: str, docs: list[dict[str, Any]]) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.docs = docs

    def sa_user(self, component: str) -> str:
        [sa] = [
            d["metadata"]["name"]
            for d in self.docs
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith(f"-{component}")
        ]
        return f"system:serviceaccount:{self.namespace}:{sa}"

    def client_as(self, component: str) -> kubernetes.client.ApiClient:
        """An API client whose requests the API server takes as the component's ServiceAccount's."""
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.cluster.kubeconfig, client_configuration=config)
        api = kubernetes.client.ApiClient(config)
        api.set_default_header("Impersonate-User", self.sa_user(component))
        return api

    def policy(self, suffix: str) -> str:
        [name] = [
            d["metadata"]["name"]
            for d in self.docs
            if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"].endswith(suffix)
        ]
        return name


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    if cluster.minor < 30:
        pytest.skip(f"the API server is 1.{cluster.minor}: ValidatingAdmissionPolicy is GA from 1.30")
    helm = helm_binary()
    namespace = new_namespace(cluster)
    name = f"vap-{uuid.uuid4().hex[:6]}"
    docs = render(
        helm,
        "--api-versions",
        VAP_API,
        "--set",
        "rbac.agentPodPatchPolicy.enabled=true",
        "--set",
        "gateway.enabled=true",
        "--set",
        "crds.upgradeJob.enabled=false",
        release=name,
        namespace=namespace,
    )
    docs = [d for d in docs if d["kind"] in APPLIED_KINDS]
    assert sum(d["kind"] == "ValidatingAdmissionPolicy" for d in docs) == 4
    install_gpu_group_crd(cluster)
    for d in docs:
        if d["kind"] == "ValidatingAdmissionPolicyBinding" and d["metadata"]["name"].endswith("-pod-fields"):
            # The pod-fields policy checks every ModelDeployment of the cluster: keep it to this
            # test's namespace, so that the other tests' ModelDeployments meet only the operator.
            d["spec"]["matchResources"] = {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            }
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    cluster.kubectl("apply", "-f", "-", input=body)
    rel = Release(cluster, namespace, docs)
    try:
        _wait_until_enforced(rel)
        yield rel
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=body, check=False)
        cluster.core.delete_namespace(namespace)


def _pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {c.LABEL_MODEL: "llama"},
            "annotations": {"team": "a", c.ANN_STATE: "Awake"},
        },
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.33.0"}]},
    }
    obj: dict[str, Any] = cluster.core.create_namespaced_pod(namespace, body).to_dict()
    return obj


def _wait_until_enforced(rel: Release) -> None:
    """Policies take effect once the API server has loaded them (about a second): until a write of
    another annotation by the agent is refused. Each try writes a new value, so none is a no-op."""
    _pod(rel.cluster, rel.namespace, "probe")
    core = kubernetes.client.CoreV1Api(rel.client_as("agent"))
    tries = iter(range(10_000))

    def refused() -> bool:
        patch = {"metadata": {"annotations": {"team": f"probe-{next(tries)}"}}}
        try:
            core.patch_namespaced_pod("probe", rel.namespace, patch)
        except ApiException as e:
            return e.status in (403, 422) and rel.policy("-agent-pod-writes") in (e.body or "")
        return False

    eventually(refused, timeout=60, interval=0.5, what="the agent's pod-writes policy to be enforced")
    # the others were applied at the same time; the gateway's are checked the same way below
    rel.cluster.core.delete_namespaced_pod("probe", rel.namespace, grace_period_seconds=0)


def _refusal(call: Any) -> str:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status in (403, 422), info.value
    return str(info.value.body)


def test_the_agent_writes_its_annotations_and_condition_and_nothing_else(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's own write functions, as the agent's ServiceAccount: its annotations and the
    hibernate.dev/awake condition go through; another annotation, a label, another condition are
    refused by the policy, with its message (RBAC alone would let all of them through)."""
    ns = release.namespace
    _pod(release.cluster, ns, "engine")
    as_agent = release.client_as("agent")
    monkeypatch.setattr(agent_kube, "client", lambda: as_agent)
    policy = release.policy("-agent-pod-writes")

    assert agent_kube.report(ns, "engine", agent_kube.state_annotations("Asleep", 1))
    assert agent_kube.set_condition(ns, "engine", agent_kube.awake_condition(False, "Asleep", "L1"))
    assert agent_kube.set_condition(ns, "engine", agent_kube.awake_condition(True, "Awake", "woke"))
    assert agent_kube.remove_annotation(ns, "engine", c.ANN_STATE)
    pod = release.cluster.core.read_namespaced_pod("engine", ns)
    assert (
        c.ANN_STATE not in pod.metadata.annotations and pod.metadata.annotations[c.ANN_OBSERVED_LEVEL] == "1"
    )
    assert [x.status for x in pod.status.conditions if x.type == c.CONDITION_AWAKE] == ["True"]

    only_ours = "the hibernate agent may only write annotations under hibernate.dev/"
    for call in (
        lambda: agent_kube.report(ns, "engine", {"team": "b"}),
        lambda: agent_kube.report(ns, "engine", {"kubectl.kubernetes.io/restartedAt": "now"}),
        lambda: agent_kube.remove_annotation(ns, "engine", "team"),
    ):
        body = _refusal(call)
        assert policy in body and only_ours in body, body
    core = kubernetes.client.CoreV1Api(as_agent)
    body = _refusal(lambda: core.patch_namespaced_pod("engine", ns, {"metadata": {"labels": {"x": "y"}}}))
    assert "the hibernate agent may not change a pod's labels" in body, body
    ready = {"type": "Ready", "status": "True", "reason": "Agent", "message": ""}
    body = _refusal(lambda: agent_kube.set_condition(ns, "engine", ready))
    assert "the hibernate agent may only write the pod condition hibernate.dev/awake" in body, body

    pod = release.cluster.core.read_namespaced_pod("engine", ns)
    assert pod.metadata.annotations["team"] == "a" and "x" not in (pod.metadata.labels or {})
    # The policy binds the agent only: anyone else (here the admin) writes as RBAC allows.
    release.cluster.core.patch_namespaced_pod("engine", ns, {"metadata": {"annotations": {"team": "b"}}})


def test_the_gateway_writes_its_annotations_never_the_spec(release: Release) -> None:
    ns = release.namespace
    release.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest("llama")))
    custom = kubernetes.client.CustomObjectsApi(release.client_as("gateway"))

    def patch(body: dict[str, Any]) -> Any:
        return custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, "llama", body)

    def spec_refused() -> str:
        return _refusal(lambda: patch({"spec": {"sleepLevel": "L1"}}))

    body = eventually(spec_refused, timeout=30, what="the gateway's policy to be enforced")
    assert release.policy("-gateway-writes") in body
    assert "the hibernate gateway may not change a ModelDeployment's spec" in body, body
    patch({"metadata": {"annotations": {c.ANN_LAST_ACTIVITY: "2025-01-01T00:00:00.000Z"}}})
    patch({"metadata": {"annotations": {c.ANN_AUTO_LEVEL: "Awake", c.ANN_AUTO_SOURCE: "gateway"}}})
    body = _refusal(lambda: patch({"metadata": {"annotations": {"team": "b"}}}))
    assert "may only write its activity mark and its automatic level" in body, body
    md = release.cluster.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, "llama")
    assert md["spec"]["sleepLevel"] == "Awake"
    assert md["metadata"]["annotations"][c.ANN_AUTO_SOURCE] == "gateway"


def test_the_gateway_writes_a_gpugroups_lease_and_nothing_else(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's own GpuGroup functions (hibernate.gateway.gpu_switch), as the gateway's
    ServiceAccount: it reads the group and writes its lease; a change of the spec, a label or
    another annotation is refused by the policy (RBAC's patch would allow them), and the status is
    not the gateway's at all (RBAC)."""
    ns = release.namespace
    group = {
        "apiVersion": c.API_VERSION,
        "kind": c.GPU_GROUP_KIND,
        "metadata": {"name": "shared", "annotations": {"team": "a"}},
        "spec": {"maxAwake": 1},
    }
    release.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(group))
    custom = kubernetes.client.CustomObjectsApi(release.client_as("gateway"))
    monkeypatch.setattr(kube, "custom", lambda: custom)
    policy = release.policy("-gateway-gpugroup-writes")

    def patch(body: dict[str, Any]) -> Any:
        return custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, "shared", body
        )

    def spec_refused() -> str:
        return _refusal(lambda: patch({"spec": {"maxAwake": 2}}))

    body = eventually(spec_refused, timeout=30, what="the gateway's GpuGroup policy to be enforced")
    assert policy in body and "the hibernate gateway may not change a GpuGroup's spec" in body, body

    read = gpu_switch._read_group(ns, "shared")
    assert read is not None and read_lease(read).holders == []
    lease = Lease(holders=[LeaseEntry(name="llama", since=1.0, last_used=1.0)]).dump()
    gpu_switch._annotate_group(ns, "shared", lease, read["metadata"]["resourceVersion"])
    read = gpu_switch._read_group(ns, "shared")
    assert read is not None and [e.name for e in read_lease(read).holders] == ["llama"]

    lease_only = "the hibernate gateway may only write a GpuGroup's lease"
    body = _refusal(lambda: patch({"metadata": {"annotations": {"team": "b"}}}))
    assert policy in body and lease_only in body, body
    body = _refusal(lambda: patch({"metadata": {"annotations": {c.ANN_GPU_LEASE: "{}", "team": None}}}))
    assert lease_only in body, body
    body = _refusal(lambda: patch({"metadata": {"labels": {"x": "y"}}}))
    assert "the hibernate gateway may not change a GpuGroup's labels" in body, body
    with pytest.raises(ApiException) as info:
        custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, "shared", {"status": {"awake": 1}}
        )
    assert info.value.status == 403 and policy not in str(info.value.body), info.value

    gg = release.cluster.custom.get_namespaced_custom_object(
        c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, "shared"
    )
    assert gg["spec"]["maxAwake"] == 1 and gg["metadata"]["annotations"]["team"] == "a"
    assert "labels" not in gg["metadata"] and "status" not in gg
    # The policy binds the gateway only: the person (here the admin) changes the spec as RBAC allows.
    release.cluster.custom.patch_namespaced_custom_object(
        c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, "shared", {"spec": {"maxAwake": 2}}
    )


@pytest.mark.parametrize(
    ("engine", "expected"),
    [(engine, expected) for _, engine, policy, expected in CASES if policy == PodFieldPolicy()],
    ids=[case_id for case_id, _, policy, _ in CASES if policy == PodFieldPolicy()],
)
def test_the_pod_fields_policy_refuses_at_admission_what_the_operator_refuses(
    release: Release, engine: dict[str, Any], expected: list[str]
) -> None:
    """The chart's default `security` values, enforced by the API server: the same refusals as the
    operator's pure function (hibernate.api.pod_fields), each with the operator's message."""
    body = manifest(f"m-{uuid.uuid4().hex[:6]}", **engine)
    out = release.cluster.kubectl(
        "create", "--dry-run=server", "-n", release.namespace, "-f", "-", input=json.dumps(body), check=False
    )
    if not expected:
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode != 0, out.stdout
    assert release.policy("-modeldeployment-pod-fields") in out.stderr, out.stderr
    # The API server reports the first refusing validation; it is one of the operator's messages.
    assert any(message in out.stderr.replace("\n", " ") for message in expected), (expected, out.stderr)
