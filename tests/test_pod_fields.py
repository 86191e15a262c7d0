"""Pod-template fields that widen a pod's rights: one table, checked by the operator's pure function
and by the chart's ValidatingAdmissionPolicy (its CEL run here by cel-python, for every case and
every `security` value; tests/test_admission_policies.py runs the policy itself on the real 1.34 API
server), so the two layers refuse the same specs with the same messages."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from hibernate.api import pod_fields as pf
from hibernate.api.pod_fields import PodFieldPolicy, refusals
from hibernate.api.v1alpha1 import EngineSpec
from tests.test_helm import VAP_API, container, find, helm_binary, parse_cli, render

DEFAULT = PodFieldPolicy()
HOST = {"name": "host", "hostPath": {"path": "/var/run"}}
BIDI = {"name": "host", "mountPath": "/host", "mountPropagation": "Bidirectional"}
APPARMOR = "container.apparmor.security.beta.kubernetes.io/engine"
SECCOMP_POD = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CTR = "container.seccomp.security.alpha.kubernetes.io/engine"

# (id, spec.engine, policy, expected refusals)
CASES: list[tuple[str, dict[str, Any], PodFieldPolicy, list[str]]] = [
    ("nothing", {}, DEFAULT, []),
    (
        "ordinary volumes",
        {
            "volumes": [
                {"name": "a", "emptyDir": {"medium": "Memory"}},
                {"name": "b", "persistentVolumeClaim": {"claimName": "models"}},
                {"name": "c", "secret": {"secretName": "hf"}},
                {"name": "d", "configMap": {"name": "cfg"}},
            ],
            "volumeMounts": [{"name": "a", "mountPath": "/dev/shm", "mountPropagation": "HostToContainer"}],
        },
        DEFAULT,
        [],
    ),
    ("hostPath", {"volumes": [{"name": "a", "emptyDir": {}}, HOST]}, DEFAULT, [pf.HOST_PATH]),
    ("hostPath allowed", {"volumes": [HOST]}, PodFieldPolicy(allow_host_path=True), []),
    ("bidirectional", {"volumeMounts": [BIDI]}, DEFAULT, [pf.BIDIRECTIONAL]),
    (
        "bidirectional even with hostPath allowed",
        {"volumes": [HOST], "volumeMounts": [BIDI]},
        PodFieldPolicy(allow_host_path=True),
        [pf.BIDIRECTIONAL],
    ),
    ("default service account", {"serviceAccountName": "default"}, DEFAULT, []),
    ("empty service account", {"serviceAccountName": ""}, DEFAULT, []),
    (
        "another service account",
        {"serviceAccountName": "vllm"},
        DEFAULT,
        [pf.service_account_message("vllm")],
    ),
    (
        "an allowed service account",
        {"serviceAccountName": "vllm"},
        PodFieldPolicy(allow_service_accounts=frozenset({"vllm", "other"})),
        [],
    ),
    (
        "a service account not in the allowed list",
        {"serviceAccountName": "admin"},
        PodFieldPolicy(allow_service_accounts=frozenset({"vllm"})),
        [pf.service_account_message("admin")],
    ),
    ("apparmor unconfined", {"podAnnotations": {APPARMOR: "unconfined"}}, DEFAULT, [pf.UNCONFINED]),
    ("apparmor default", {"podAnnotations": {APPARMOR: "runtime/default"}}, DEFAULT, []),
    ("apparmor local profile", {"podAnnotations": {APPARMOR: "localhost/vllm"}}, DEFAULT, []),
    ("seccomp pod unconfined", {"podAnnotations": {SECCOMP_POD: "unconfined"}}, DEFAULT, [pf.UNCONFINED]),
    (
        "seccomp container unconfined",
        {"podAnnotations": {SECCOMP_CTR: "unconfined"}},
        DEFAULT,
        [pf.UNCONFINED],
    ),
    ("seccomp default", {"podAnnotations": {SECCOMP_POD: "runtime/default"}}, DEFAULT, []),
    (
        "unconfined allowed",
        {"podAnnotations": {APPARMOR: "unconfined", SECCOMP_POD: "unconfined"}},
        PodFieldPolicy(allow_unconfined_profiles=True),
        [],
    ),
    ("another annotation", {"podAnnotations": {"prometheus.io/scrape": "unconfined"}}, DEFAULT, []),
    ("the agent's annotation", {"podAnnotations": {"hibernate.dev/state": "Asleep"}}, DEFAULT, [pf.RESERVED]),
    (
        "reserved keys even when everything is allowed",
        {"podAnnotations": {"hibernate.dev/sleep-level": "1"}, "serviceAccountName": "x", "volumes": [HOST]},
        PodFieldPolicy(True, frozenset({"x"}), True),
        [pf.RESERVED],
    ),
    (
        "all at once, in a fixed order",
        {
            "volumes": [HOST],
            "volumeMounts": [BIDI],
            "serviceAccountName": "vllm",
            "podAnnotations": {SECCOMP_POD: "unconfined", "hibernate.dev/state": "Awake"},
        },
        DEFAULT,
        [pf.HOST_PATH, pf.BIDIRECTIONAL, pf.service_account_message("vllm"), pf.UNCONFINED, pf.RESERVED],
    ),
]
IDS = [case[0] for case in CASES]


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@pytest.mark.parametrize(("engine", "policy", "expected"), [c[1:] for c in CASES], ids=IDS)
def test_the_operator_refuses_what_widens_a_pods_rights(
    engine: dict[str, Any], policy: PodFieldPolicy, expected: list[str]
) -> None:
    assert refusals(EngineSpec.model_validate(engine), policy) == expected


def test_each_message_names_the_field_and_what_allows_it() -> None:
    for message in (pf.HOST_PATH, pf.UNCONFINED, pf.service_account_message("x")):
        assert message.startswith("spec.engine.") and "the chart value security.allow" in message
    assert pf.REASON == "ForbiddenPodField"


# ---- the same table through the chart's ValidatingAdmissionPolicy ---------------------------------


def _helm_args(policy: PodFieldPolicy) -> tuple[str, ...]:
    args = ["--api-versions", VAP_API]
    if policy.allow_host_path:
        args += ["--set", "security.allowHostPath=true"]
    if policy.allow_unconfined_profiles:
        args += ["--set", "security.allowUnconfinedProfiles=true"]
    if policy.allow_service_accounts:
        args += [
            "--set",
            "security.allowServiceAccounts={" + ",".join(sorted(policy.allow_service_accounts)) + "}",
        ]
    return tuple(args)


@cache
def _policy(helm: Path, args: tuple[str, ...]) -> dict[str, Any]:
    return find(render(helm, *args), "ValidatingAdmissionPolicy", "-modeldeployment-pod-fields")


_ENV = celpy.Environment()


def _cel(expression: str, activation: dict[str, Any]) -> Any:
    program = _ENV.program(_ENV.compile(expression))
    return program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})


def admission(
    policy: dict[str, Any], engine: dict[str, Any], old_engine: dict[str, Any] | None = None
) -> list[str] | None:
    """What the policy says of a ModelDeployment: None when it does not apply, else the refusals."""
    obj = {
        "apiVersion": "hibernate.dev/v1alpha1",
        "kind": "ModelDeployment",
        "spec": {"model": "m", "engine": engine},
    }
    old = None if old_engine is None else {**obj, "spec": {"model": "m", "engine": old_engine}}
    activation = {
        "object": obj,
        "oldObject": old,
        "request": {"operation": "CREATE" if old is None else "UPDATE"},
    }
    if not all(_cel(m["expression"], activation) for m in policy["spec"]["matchConditions"]):
        return None
    out = []
    for v in policy["spec"]["validations"]:
        if not _cel(v["expression"], activation):
            out.append(
                str(_cel(v["messageExpression"], activation)) if "messageExpression" in v else v["message"]
            )
    return out


@pytest.mark.parametrize(("engine", "policy", "expected"), [c[1:] for c in CASES], ids=IDS)
def test_the_admission_policy_refuses_the_same_with_the_same_messages(
    helm: Path, engine: dict[str, Any], policy: PodFieldPolicy, expected: list[str]
) -> None:
    vap = _policy(helm, _helm_args(policy))
    assert admission(vap, engine) == expected


def test_an_update_that_leaves_the_engine_alone_is_not_checked_again(helm: Path) -> None:
    """A model admitted under looser values must still take level changes and lose its finalizer."""
    vap = _policy(helm, _helm_args(DEFAULT))
    engine = {"volumes": [HOST]}
    assert admission(vap, engine, old_engine=engine) is None
    assert admission(vap, {"volumes": [HOST, {"name": "b", "emptyDir": {}}]}, old_engine=engine) == [
        pf.HOST_PATH
    ]
    assert admission(vap, {}, old_engine=engine) == []


def test_the_admission_policy_is_rendered_where_the_cluster_serves_it(helm: Path) -> None:
    # Only this policy's kinds: the agent's and the gateway's own admission policies render beside it.
    def kinds(docs: list[dict[str, Any]]) -> list[str]:
        return sorted(
            d["kind"] for d in docs if d["metadata"]["name"].endswith("-modeldeployment-pod-fields")
        )

    assert "ValidatingAdmissionPolicy" not in kinds(render(helm))  # 1.20-1.29: the operator refuses
    docs = render(helm, "--api-versions", VAP_API, namespace="hs")
    vap = find(docs, "ValidatingAdmissionPolicy", "-modeldeployment-pod-fields")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "-modeldeployment-pod-fields")
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    assert vap["spec"]["failurePolicy"] == "Fail"
    [rule] = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["modeldeployments"] and rule["operations"] == ["CREATE", "UPDATE"]
    # GitOps renders without the cluster: `true` forces it, `false` leaves it to the operator.
    assert "ValidatingAdmissionPolicy" in kinds(
        render(helm, "--set", "security.admissionPolicy.enabled=true")
    )
    assert "ValidatingAdmissionPolicy" not in kinds(
        render(helm, "--api-versions", VAP_API, "--set", "security.admissionPolicy.enabled=false")
    )
    # Allowing a field drops its check; the service-account check lists the allowed names.
    allowing = _policy(helm, _helm_args(PodFieldPolicy(True, frozenset({"vllm"}), True)))
    messages = [v.get("message", "") for v in allowing["spec"]["validations"]]
    assert pf.HOST_PATH not in messages and pf.UNCONFINED not in messages
    assert any('["","default","vllm"]' in v["expression"] for v in allowing["spec"]["validations"])


def test_the_operator_gets_the_same_allowances_from_the_chart(helm: Path) -> None:
    from hibernate.controller.main import context

    for policy in (DEFAULT, PodFieldPolicy(True, frozenset({"a", "b"}), True)):
        dep = find(render(helm, *_helm_args(policy)), "Deployment", "-operator")
        assert context(parse_cli(container(dep, "operator"))).pod_fields == policy


def test_values_file_documents_the_security_values() -> None:
    from tests.cluster import ROOT

    values = yaml.safe_load((ROOT / "helm" / "hibernate" / "values.yaml").read_text())
    assert values["security"] == {
        "allowHostPath": False,
        "allowServiceAccounts": [],
        "allowUnconfinedProfiles": False,
        "admissionPolicy": {"enabled": "auto"},
    }
