"""The CRD: generated from the API types, kept in sync, and enforced by the API server itself."""

from __future__ import annotations

import json

import pytest

from hibernate.api.crd import crd_yaml
from tests.cluster import CRD_FILE, Cluster


def model(name: str, level: object = "Awake", **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "hibernate.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": "facebook/opt-125m", "sleepLevel": level, **spec},
    }


def test_checked_in_crd_is_generated_from_the_types() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ is stale: run `hibernate crds -o crds/modeldeployments.hibernate.dev.yaml`"
    )


@pytest.mark.parametrize("level", [0, 5, "3", "Awake", "l1", "L2", "cudasuspend", "CHECKPOINT", "Stop"])
def test_api_server_accepts_every_level_as_integer_or_name(
    cluster: Cluster, namespace: str, level: object
) -> None:
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(model("ok", level)))
    assert "created" in result.stdout


@pytest.mark.parametrize("level", [7, -1, 6, "L9", "deep", "", "3.0", "-1"])
def test_api_server_refuses_invalid_levels_with_the_valid_values(
    cluster: Cluster, namespace: str, level: object
) -> None:
    result = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(model("bad", level)), check=False
    )
    assert result.returncode != 0
    assert "sleepLevel" in result.stderr
    # The message names what is allowed: the numeric range or the names.
    assert (
        "cudasuspend" in result.stderr.lower()
        or "less than or equal to 5" in result.stderr
        or ("greater than or equal to 0" in result.stderr)
    )
    assert cluster.kubectl("get", "md", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_api_server_refuses_a_level_of_the_wrong_type(cluster: Cluster, namespace: str) -> None:
    result = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(model("bad", True)), check=False
    )
    assert result.returncode != 0
    assert "spec.sleepLevel in body must be of type integer,string" in result.stderr


def test_defaults_are_applied_by_the_api_server(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps({**model("d"), "spec": {"model": "m"}})
    )
    obj = cluster.custom.get_namespaced_custom_object(
        "hibernate.dev", "v1alpha1", namespace, "modeldeployments", "d"
    )
    assert obj["spec"]["sleepLevel"] == "Awake"
    assert obj["spec"]["replicas"] == 1


def test_get_md_shows_model_desired_auto_level_phase_age(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(model("cols", "L1")))

    def table() -> dict[str, str]:
        header, row = cluster.kubectl("get", "md", "-n", namespace).stdout.splitlines()[:2]
        names = header.split()
        starts = [header.index(f" {n} ") + 1 if i else 0 for i, n in enumerate(names[:-1])]
        starts.append(header.rindex(names[-1]))
        bounds = [*starts, None]
        return {n: row[bounds[i] : bounds[i + 1]].strip() for i, n in enumerate(names)}

    columns = table()
    assert list(columns) == ["NAME", "MODEL", "DESIRED", "AUTO", "LEVEL", "PHASE", "GPU", "SNAPSHOT", "AGE"]
    # DESIRED is the person's spec; AUTO the automatic level in effect (none here), from the status.
    assert (columns["DESIRED"], columns["AUTO"]) == ("L1", "")
    cluster.custom.patch_namespaced_custom_object_status(
        "hibernate.dev",
        "v1alpha1",
        namespace,
        "modeldeployments",
        "cols",
        {"status": {"automaticLevel": {"level": "L2", "source": "idle"}, "effectiveLevel": "L2"}},
    )
    columns = table()
    assert (columns["DESIRED"], columns["AUTO"], columns["LEVEL"]) == ("L1", "L2", "")


@pytest.mark.parametrize(
    "spec",
    [{"replicas": -1}, {"engine": {"port": 0}}, {"idle": {"after": "soon"}}, {"model": ""}],
)
def test_api_server_refuses_other_bad_fields(
    cluster: Cluster, namespace: str, spec: dict[str, object]
) -> None:
    body = model("bad")
    body["spec"] = {**body["spec"], **spec}  # type: ignore[dict-item]
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0, result.stdout
