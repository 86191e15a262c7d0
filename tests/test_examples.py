"""Every file in examples/ is a ModelDeployment the real API server accepts, and works as written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from hibernate.api import constants as c
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import workload
from hibernate.engine import fake
from tests.cluster import ROOT, Cluster

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
IDS = [p.stem for p in EXAMPLES]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_examples_the_docs_name_exist() -> None:
    assert {"llama", "fake-engine"} <= set(IDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_is_accepted_by_the_api_server(cluster: Cluster, namespace: str, path: Path) -> None:
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(documents(path))
    assert all(line.endswith("created (server dry run)") for line in lines), result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_the_deployment_the_operator_makes_of_it_is_accepted_too(
    cluster: Cluster, namespace: str, path: Path
) -> None:
    for doc in documents(path):
        assert doc["apiVersion"] == c.API_VERSION and doc["kind"] == c.KIND
        spec = ModelDeploymentSpec.model_validate(doc["spec"])
        assert spec.idle is not None, "the examples show the idle ladder"
        levels = [level for _, level in spec.idle.steps()]
        assert levels == sorted(levels) and len(set(levels)) == len(levels)
        md = {
            "metadata": {
                **doc["metadata"],
                "namespace": namespace,
                "uid": "0" * 8 + "-0000-0000-0000-" + "0" * 12,
            }
        }
        body = workload.deployment(md, spec, spec.replicas, "ghcr.io/hibernate-dev/hibernate:0.1.0")
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body))
        assert "(server dry run)" in result.stdout


def test_llama_asks_for_a_gpu_and_leaves_host_memory_for_its_sleeping_weights() -> None:
    [doc] = documents(ROOT / "examples" / "llama.yaml")
    spec = ModelDeploymentSpec.model_validate(doc["spec"])
    assert spec.engine.image.startswith("vllm/vllm-openai:")
    assert spec.engine.resources.limits["nvidia.com/gpu"] == 1
    assert str(spec.engine.resources.limits["memory"]).endswith("Gi")
    assert [level.label for _, level in spec.idle.steps()] == ["L1", "CudaSuspend", "Stop"]  # type: ignore[union-attr]


def test_fake_engine_example_runs_the_fake_engine_with_the_operators_arguments() -> None:
    [doc] = documents(ROOT / "examples" / "fake-engine.yaml")
    spec = ModelDeploymentSpec.model_validate(doc["spec"])
    assert "nvidia.com/gpu" not in spec.engine.resources.limits
    command, args = workload.engine_command(spec, "ghcr.io/hibernate-dev/hibernate:0.1.0")
    # podinit wraps it: python3 /.hibernate/podinit.py --log ... -- python3 -m hibernate.engine.fake
    engine = command[command.index("--") + 1 :]
    assert engine == ["python3", "-m", "hibernate.engine.fake"]
    parsed, unknown = fake.parse_args(args)
    assert unknown == []
    assert parsed.model == spec.model
    assert parsed.port == spec.engine.port
    assert parsed.enable_sleep_mode is True
    assert parsed.weights_mib == 256
