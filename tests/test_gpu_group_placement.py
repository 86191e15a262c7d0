"""GpuGroups without a cluster: who makes room for whom (least recently used first, never one just
woken, never past the budget), and the pod templates that put the members on one node and one GPU
(time-slicing, or one shared DRA claim), or the reason they cannot be placed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from hibernate.api import constants as c
from hibernate.api.gpu_group import (
    GpuGroupSpec,
    Lease,
    LeaseEntry,
    Member,
    current_holders,
    decide,
    parse_bytes,
    read_lease,
)
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import gpu_placement, workload
from hibernate.controller.gpu_placement import GroupPlacement

NOW = 1_000_000.0


def members(*names: str, awake: tuple[str, ...] = ()) -> dict[str, Member]:
    return {n: Member(name=n, holds=n in awake) for n in names}


def test_room_is_made_by_the_least_recently_used_holder_at_the_group_budget() -> None:
    spec = GpuGroupSpec(max_awake=2, min_awake_seconds=30)
    group = members("a", "b", "c", awake=("a", "b"))
    holders = [
        LeaseEntry(name="a", since=NOW - 100, last_used=NOW - 5),
        LeaseEntry(name="b", since=NOW - 100, last_used=NOW - 50),
    ]
    assert decide(spec, holders, group, "c", NOW, 120).victim == "b"
    assert decide(spec, holders, group, "a", NOW, 120).action == "hold"
    # With a free slot nobody sleeps.
    assert decide(GpuGroupSpec(max_awake=3), holders, group, "c", NOW, 120).action == "join"


def test_a_member_woken_less_than_min_awake_seconds_ago_or_busy_is_not_put_to_sleep() -> None:
    spec = GpuGroupSpec(max_awake=1, min_awake_seconds=30)
    group = members("a", "b", awake=("a",))
    just_woken = [LeaseEntry(name="a", since=NOW - 10, last_used=NOW - 10)]
    decision = decide(spec, just_woken, group, "b", NOW, 120)
    assert decision.action == "wait" and decision.until == NOW + 20
    busy = {**group, "a": Member(name="a", holds=True, busy=True)}
    old = [LeaseEntry(name="a", since=NOW - 100)]
    assert decide(spec, old, busy, "b", NOW, 120).action == "wait"
    assert decide(spec, old, group, "b", NOW, 120).victim == "a"


def test_min_awake_seconds_count_from_when_the_member_serves_and_a_waking_member_is_not_put_to_sleep() -> (
    None
):
    """A wake slower than minAwakeSeconds (a loaded node, a Checkpoint restore) must not be undone
    before the woken member served the request another gateway replica holds for it."""
    spec = GpuGroupSpec(max_awake=1, min_awake_seconds=30)
    given_long_ago = [LeaseEntry(name="a", since=NOW - 100)]
    waking = {"a": Member(name="a", holds=True, waking=True), "b": Member(name="b", holds=False)}
    decision = decide(spec, given_long_ago, waking, "b", NOW, 120)
    assert decision.action == "wait" and decision.until == NOW + 0.5
    served_just_now = {**waking, "a": Member(name="a", holds=True, awake_since=NOW - 10)}
    decision = decide(spec, given_long_ago, served_just_now, "b", NOW, 120)
    assert decision.action == "wait" and decision.until == NOW + 20
    served_long_ago = {**waking, "a": Member(name="a", holds=True, awake_since=NOW - 40)}
    assert decide(spec, given_long_ago, served_long_ago, "b", NOW, 120).victim == "a"
    # A wake that hangs past the switch timeout no longer keeps the GPU from the others.
    assert decide(spec, given_long_ago, waking, "b", NOW, 60).victim == "a"


def test_a_holder_making_room_counts_until_it_is_asleep_and_nobody_else_takes_its_place() -> None:
    spec = GpuGroupSpec(max_awake=1, min_awake_seconds=0)
    group = members("a", "b", "c", awake=("a",))
    handing = [LeaseEntry(name="a", since=NOW - 100, handover_to="b", handover_since=NOW - 1)]
    assert decide(spec, handing, group, "c", NOW, 120).action == "wait"
    assert decide(spec, handing, group, "b", NOW, 120).action == "wait"
    # A handover abandoned for twice the switch timeout (a gateway that died) no longer blocks.
    stale = [LeaseEntry(name="a", since=NOW - 1000, handover_to="b", handover_since=NOW - 300)]
    assert decide(spec, stale, group, "c", NOW, 120).victim == "a"


def test_the_memory_budget_counts_besides_max_awake() -> None:
    spec = GpuGroupSpec(max_awake=3, gpu_memory="80Gi", min_awake_seconds=0)
    group = {
        "a": Member(name="a", holds=True, memory=parse_bytes("40Gi")),
        "b": Member(name="b", holds=False, memory=parse_bytes("30Gi")),
        "c": Member(name="c", holds=False, memory=parse_bytes("50Gi")),
    }
    holders = [LeaseEntry(name="a", since=0.0)]
    assert decide(spec, holders, group, "b", NOW, 120).action == "join"
    assert decide(spec, holders, group, "c", NOW, 120).victim == "a"


def test_holders_are_the_lease_pruned_of_members_asleep_or_gone_plus_members_woken_by_hand() -> None:
    lease = Lease(
        holders=[
            LeaseEntry(name="asleep", since=NOW - 500),
            LeaseEntry(name="gone", since=NOW - 500),
            LeaseEntry(name="just-given", since=NOW - 1),
            LeaseEntry(name="awake", since=NOW - 500),
        ]
    )
    group = members("asleep", "just-given", "awake", "by-hand", awake=("awake", "by-hand"))
    names = [e.name for e in current_holders(lease, group, NOW, grace=60)]
    assert names == ["just-given", "awake", "by-hand"]


def test_the_lease_reads_back_what_was_written_and_an_unreadable_one_is_empty() -> None:
    lease = Lease(
        holders=[LeaseEntry(name="a", since=1.5, last_used=2.5)], last_switch={"from": "b", "to": "a"}
    )
    group = {"metadata": {"annotations": {c.ANN_GPU_LEASE: lease.dump()}}}
    assert read_lease(group) == lease
    assert read_lease({"metadata": {"annotations": {c.ANN_GPU_LEASE: "{not json"}}}) == Lease()


@pytest.mark.parametrize("level", ["Awake", 0, "sideways"])
def test_make_room_level_must_be_a_sleep_level(level: object) -> None:
    with pytest.raises(ValidationError):
        GpuGroupSpec.model_validate({"makeRoomLevel": level})
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate({"model": "m", "gpuGroup": {"name": "g", "makeRoomLevel": level}})


# --- placement ------------------------------------------------------------------------------------


def member_spec(**spec: Any) -> ModelDeploymentSpec:
    base: dict[str, Any] = {
        "model": "m",
        "gpuGroup": {"name": "g"},
        "engine": {
            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}},
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        },
    }
    return ModelDeploymentSpec.model_validate({**base, **spec})


def render(spec: ModelDeploymentSpec, group: dict[str, Any]) -> dict[str, Any]:
    placement = GroupPlacement("g", GpuGroupSpec.model_validate(group))
    template: dict[str, Any] = workload.pod_template("m1", spec, "", placement)
    return template


def test_time_slicing_asks_for_the_shared_resource_on_the_group_node_next_to_the_other_members() -> None:
    spec = member_spec()
    template = render(spec, {"placement": {"nodeSelector": {"nvidia.com/gpu.count": "1"}}})
    pod = template["spec"]
    assert template["metadata"]["labels"][c.LABEL_GPU_GROUP] == "g"
    engine = pod["containers"][0]
    assert engine["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu.shared": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.count": "1"}
    assert pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {"labelSelector": {"matchLabels": {c.LABEL_GPU_GROUP: "g"}}, "topologyKey": "kubernetes.io/hostname"}
    ]
    assert "nodeAffinity" in pod["affinity"], "the engine's own affinity stays"
    assert "resourceClaims" not in pod
    # SameNode: kept together, the engine's resources as they are (the GPU given another way).
    bare = render(spec, {"placement": {"mode": "SameNode"}})["spec"]
    assert bare["containers"][0]["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert bare["affinity"]["podAffinity"] == pod["affinity"]["podAffinity"]
    # The spec is not changed by rendering: twice gives the same template.
    assert render(spec, {"placement": {"nodeSelector": {"nvidia.com/gpu.count": "1"}}}) == template


def test_dra_shares_one_claim_owned_by_the_group() -> None:
    template = render(member_spec(), {"placement": {"mode": "DRA", "deviceClassName": "gpu.example.com"}})
    pod = template["spec"]
    assert pod["resourceClaims"] == [{"name": "gpu", "resourceClaimName": "g-gpu"}]
    assert pod["containers"][0]["resources"] == {"limits": {"memory": "64Gi"}, "claims": [{"name": "gpu"}]}
    group = {"metadata": {"name": "g", "namespace": "ns", "uid": "u-1"}}
    claim = gpu_placement.resource_claim(group, GpuGroupSpec.model_validate({"placement": {"mode": "DRA"}}))
    assert claim["apiVersion"] == "resource.k8s.io/v1" and claim["metadata"]["name"] == "g-gpu"
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "GpuGroup"
    assert claim["spec"]["devices"]["requests"] == [
        {"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}
    ]


def test_a_member_that_cannot_be_placed_is_refused_with_the_reason() -> None:
    group = GroupPlacement(
        "g",
        GpuGroupSpec.model_validate(
            {"gpuMemory": "40Gi", "placement": {"mode": "DRA", "nodeSelector": {"pool": "a"}}}
        ),
    )
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": "m",
            "replicas": 2,
            "gpuGroup": {"name": "g", "gpuMemory": "48Gi"},
            "engine": {"resources": {"limits": {"nvidia.com/gpu": 2}}, "nodeSelector": {"pool": "b"}},
        }
    )
    found = gpu_placement.problems(group, "g", spec, dra_served=False)
    assert len(found) == 5, found
    assert "spec.replicas is 2" in found[0]
    assert "asks for 2 GPUs" in found[1]
    assert "does not serve resource.k8s.io/v1" in found[2]
    assert "pool=b contradicts the group's pool=a" in found[3]
    assert "could never be awake" in found[4]
    assert gpu_placement.problems(None, "g", member_spec(), dra_served=True) == [
        "GpuGroup g does not exist in this namespace"
    ]
    assert gpu_placement.problems(GroupPlacement("g", GpuGroupSpec()), "g", member_spec(), True) == []
