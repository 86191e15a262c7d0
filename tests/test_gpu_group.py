"""Models that take turns on one GPU (GpuGroup), against a real API server, the operator, the gateway
as a process, and fake engines behind the agent stand-in: a request for a sleeping member of a full
group puts the least recently used member to sleep at its level, then wakes the one asked for; many
requests for every member at once are all answered and never wake more than the budget; a member
that fails to sleep is stopped instead; a member deleted mid-switch frees its place."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec, read_lease
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import gpu_placement, workload
from hibernate.controller.gpu_placement import GroupPlacement
from tests.agent_standin import AgentStandin
from tests.cluster import ROOT, Cluster, Process, eventually, install_gpu_group_crd
from tests.engine_fixtures import free_port
from tests.gateway_helpers import complete, model_manifest, settled, start_gateway
from tests.modeldeployments import apply, get


@pytest.fixture(scope="module", autouse=True)
def gpu_group_crd(cluster: Cluster) -> None:
    install_gpu_group_crd(cluster)


def apply_group(cluster: Cluster, ns: str, name: str, **spec: Any) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.GPU_GROUP_KIND, "metadata": {"name": name}, "spec": spec}
    apply(cluster, ns, body)


def get_group(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, name
    )
    return obj


def apply_member(
    cluster: Cluster, ns: str, name: str, port: int, group: str, level: str = "Awake", **ref: Any
) -> None:
    body = model_manifest(name, f"hib/{name}", port, level=level)
    body["spec"]["gpuGroup"] = {"name": group, **ref}
    apply(cluster, ns, body)


def gpu_column(cluster: Cluster, ns: str) -> dict[str, str]:
    out = cluster.kubectl("get", "md", "-n", ns, "-o", "custom-columns=NAME:.metadata.name,GPU:.status.gpu")
    return dict(line.split() for line in out.stdout.splitlines()[1:])


def wait_settled(cluster: Cluster, ns: str, name: str, level: str, phase: str, timeout: float = 30) -> None:
    eventually(lambda: settled(get(cluster, ns, name), level, phase), timeout=timeout, what=f"{name} {level}")


def serving(cluster: Cluster, ns: str, name: str) -> bool:
    return settled(get(cluster, ns, name), "Awake", "Awake")


def metric(gw: Any, series: str) -> float:
    return gw.metrics().get(series, 0.0)


@pytest.fixture
def three(cluster: Cluster, namespace: str, operator: Process, tmp_path: Path) -> Iterator[AgentStandin]:
    """Members a, b and c, each with a fake engine; all three start awake (the operator then keeps
    the group's budget)."""
    with AgentStandin(cluster, namespace, tmp_path) as standin:
        for name in ("a", "b", "c"):
            standin.serve(name, f"hib/{name}", free_port())
        yield standin


def test_a_request_for_a_sleeping_member_puts_the_least_recently_used_to_sleep_at_its_level(
    cluster: Cluster, namespace: str, three: AgentStandin, tmp_path: Path
) -> None:
    ns = namespace
    apply_group(cluster, ns, "g", maxAwake=2, makeRoomLevel="L1", minAwakeSeconds=0)
    apply_member(cluster, ns, "a", three.models["a"].port, "g")
    apply_member(cluster, ns, "b", three.models["b"].port, "g", makeRoomLevel="L2")
    apply_member(cluster, ns, "c", three.models["c"].port, "g", level="L1")
    with start_gateway(cluster, ns, tmp_path) as gw, httpx.Client(timeout=30) as client:
        wait_settled(cluster, ns, "a", "Awake", "Awake")
        wait_settled(cluster, ns, "b", "Awake", "Awake")
        wait_settled(cluster, ns, "c", "L1", "Asleep")
        eventually(lambda: get_group(cluster, ns, "g")["status"]["awake"] == 2, what="group status")
        assert gpu_column(cluster, ns) == {"a": "Holding", "b": "Holding", "c": "Released"}

        assert complete(client, gw, "hib/b", "first").status_code == 200
        assert complete(client, gw, "hib/a", "second").status_code == 200  # a is now the most recent
        answer = complete(client, gw, "hib/c", "wake c")
        assert answer.status_code == 200, answer.text
        # b, the least recently used, made room at its own level (L2); a kept the GPU.
        b = get(cluster, ns, "b")
        assert b["metadata"]["annotations"][c.ANN_AUTO_SOURCE] == c.GPU_GROUP_SOURCE
        assert b["spec"]["sleepLevel"] == "Awake", "the spec stays the person's"
        wait_settled(cluster, ns, "b", "L2", "Asleep")
        assert serving(cluster, ns, "a") and serving(cluster, ns, "c")

        # Now a is the least recently used: a request for b puts a to the group's level, L1.
        assert complete(client, gw, "hib/b", "b again").status_code == 200
        wait_settled(cluster, ns, "a", "L1", "Asleep")
        assert serving(cluster, ns, "b") and serving(cluster, ns, "c")
        assert metric(gw, 'hibernate_gateway_gpu_switch_total{result="ok"}') == 2
        assert metric(gw, "hibernate_gateway_gpu_switch_seconds_count") == 2

    def group_says() -> bool:
        status = get_group(cluster, ns, "g")["status"]
        holders = sorted(h["name"] for h in status["holders"])
        return holders == ["b", "c"] and status["lastSwitch"]["from"] == "a" and status["awake"] == 2

    eventually(group_says, what="the group's status names b and c as holders")
    assert gpu_column(cluster, ns) == {"a": "Released", "b": "Holding", "c": "Holding"}
    table = cluster.kubectl("get", "gg", "-n", ns).stdout
    assert "b,c" in table or "c,b" in table, table
    reasons = [
        e.reason for e in cluster.core.list_namespaced_event(ns).items if e.involved_object.name == "g"
    ]
    assert "Switched" in reasons


def first_awake(cluster: Cluster, ns: str, three: AgentStandin, members: str = "abc", **spec: Any) -> None:
    """GpuGroup g of `spec`, with the first of `members` awake and the others at L1."""
    apply_group(cluster, ns, "g", **spec)
    for name in members:
        apply_member(
            cluster, ns, name, three.models[name].port, "g", level="L1" if name != members[0] else "Awake"
        )


def wait_first_awake(cluster: Cluster, ns: str, members: str = "abc") -> None:
    wait_settled(cluster, ns, members[0], "Awake", "Awake")
    for name in members[1:]:
        wait_settled(cluster, ns, name, "L1", "Asleep")


def burst(three: AgentStandin, targets: list[tuple[str, str]]) -> tuple[list[httpx.Response], int]:
    """A completion for each (gateway URL, member) at once, the engines' own levels sampled all along:
    the responses, and the most engines that were awake at one time."""
    most_awake = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most_awake
        while not stop.is_set():
            awake = sum(1 for slot in three.models.values() if 0 in slot.levels.values())
            most_awake = max(most_awake, awake)
            time.sleep(0.01)

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=90) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": f"hib/{name}", "prompt": f"{name} {i}", "max_tokens": 4},
                    )
                    for i, (url, name) in enumerate(targets)
                )
            )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        responses = asyncio.run(send())
    finally:
        stop.set()
        sampler.join()
    return responses, most_awake


def test_concurrent_requests_for_every_member_are_all_answered_and_never_exceed_the_budget(
    cluster: Cluster, namespace: str, three: AgentStandin, tmp_path: Path
) -> None:
    ns = namespace
    first_awake(cluster, ns, three, maxAwake=1, minAwakeSeconds=0)
    with start_gateway(cluster, ns, tmp_path, hold_timeout=60) as gw:
        wait_first_awake(cluster, ns)
        started = time.monotonic()
        responses, most_awake = burst(three, [(gw.url, name) for _ in range(4) for name in ("b", "c", "a")])
        elapsed = time.monotonic() - started
        bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not bad, bad
        assert most_awake == 1, f"{most_awake} engines were awake at once"
        switches = metric(gw, 'hibernate_gateway_gpu_switch_total{result="ok"}')
        assert 2 <= switches <= 3, switches
        print(
            f"12 requests for 3 members of a one-GPU group answered in {elapsed:.2f} s, {switches:g} switches"
        )


def test_a_member_that_fails_to_make_room_is_stopped_and_the_group_goes_on(
    cluster: Cluster, namespace: str, three: AgentStandin, tmp_path: Path
) -> None:
    ns = namespace
    first_awake(cluster, ns, three, "ab", maxAwake=1, minAwakeSeconds=0, switchTimeoutSeconds=5)
    with start_gateway(cluster, ns, tmp_path) as gw, httpx.Client(timeout=40) as client:
        wait_first_awake(cluster, ns, "ab")
        three.paused("a")  # a's agent never answers: a cannot reach L1
        answer = complete(client, gw, "hib/b", "wake b")
        assert answer.status_code == 200, answer.text
        a = get(cluster, ns, "a")
        assert a["metadata"]["annotations"][c.ANN_AUTO_LEVEL] == "Stop"
        assert "did not reach L1 in 5 s" in a["metadata"]["annotations"][c.ANN_AUTO_REASON]
        assert a["status"]["phase"] == "Stopped"
        assert metric(gw, 'hibernate_gateway_gpu_switch_total{result="stopped"}') == 1
        switch = read_lease(get_group(cluster, ns, "g")).last_switch or {}
        assert (switch["from"], switch["to"], switch["result"]) == ("a", "b", "stopped")

        # a comes back for a request (a cold start), and b makes room for it, this time at L1. The
        # 5 s that made a fail would be tight for b on a busy 2-core machine: the group gets 30 s.
        three.paused("a", False)
        cluster.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, "g", {"spec": {"switchTimeoutSeconds": 30}}
        )
        again = complete(client, gw, "hib/a", "a again")
        assert again.status_code == 200, again.text
        wait_settled(cluster, ns, "b", "L1", "Asleep")
        assert metric(gw, 'hibernate_gateway_gpu_switch_total{result="ok"}') == 1


def test_a_member_deleted_mid_switch_frees_its_place_and_one_asked_for_is_refused(
    cluster: Cluster, namespace: str, three: AgentStandin, tmp_path: Path
) -> None:
    ns = namespace
    first_awake(cluster, ns, three, maxAwake=1, minAwakeSeconds=0, switchTimeoutSeconds=30)

    def delete(name: str) -> None:
        cluster.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, name)

    with start_gateway(cluster, ns, tmp_path) as gw, httpx.Client(timeout=40) as client:
        wait_first_awake(cluster, ns)
        three.paused("a")
        # The member making room (a, stuck) is deleted: its place is free, b wakes.
        result: dict[str, httpx.Response] = {}
        asking = threading.Thread(target=lambda: result.update(b=complete(client, gw, "hib/b", "b")))
        asking.start()
        eventually(lambda: get(cluster, ns, "a")["metadata"]["annotations"].get(c.ANN_AUTO_LEVEL) == "L1")
        started = time.monotonic()
        delete("a")
        asking.join(40)
        assert result["b"].status_code == 200, result["b"].text
        assert time.monotonic() - started < 20, "the switch waited for the deleted member"

        # The member asked for (c) is deleted while b makes room for it (b stuck): 503, and the
        # group is not left blocked: b, unstuck, still serves.
        three.paused("b")
        asking = threading.Thread(target=lambda: result.update(c=complete(client, gw, "hib/c", "c")))
        asking.start()
        eventually(lambda: get(cluster, ns, "b")["metadata"]["annotations"].get(c.ANN_AUTO_LEVEL) == "L1")
        delete("c")
        three.paused("b", False)
        asking.join(40)
        assert result["c"].status_code == 503 and "deleted" in result["c"].json()["error"]["message"]
        assert complete(client, gw, "hib/b", "b still").status_code == 200

    eventually(lambda: get_group(cluster, ns, "g")["status"]["members"] == ["b"], what="members: b only")


def test_the_operator_keeps_the_budget_when_people_wake_members_and_refuses_what_cannot_be_placed(
    cluster: Cluster, namespace: str, operator: Process, tmp_path: Path
) -> None:
    ns = namespace

    def condition(group: str, ctype: str) -> dict[str, Any]:
        conditions = get_group(cluster, ns, group).get("status", {}).get("conditions", [])
        return next(x for x in conditions if x["type"] == ctype)

    apply_group(cluster, ns, "g", maxAwake=1, minAwakeSeconds=0)
    apply_group(cluster, ns, "dra", placement={"mode": "DRA"})
    with AgentStandin(cluster, ns, tmp_path) as standin:
        for name in ("x", "y"):
            standin.serve(name, f"hib/{name}", free_port())
            apply_member(cluster, ns, name, standin.models[name].port, "g")

        # Both were applied Awake: one of them is put to sleep by the operator, at the group's level.
        def one_asleep() -> bool:
            objs = [get(cluster, ns, n) for n in ("x", "y")]
            return sorted(o["status"].get("gpu", "") for o in objs) == ["Holding", "Released"]

        eventually(one_asleep, timeout=40, what="one of x and y released the GPU")
        eventually(lambda: condition("g", "WithinBudget")["status"] == "True", what="back within budget")
        reasons = {
            e.reason for e in cluster.core.list_namespaced_event(ns).items if e.involved_object.name == "g"
        }
        assert {"OverBudget", "MadeRoom"} <= reasons, reasons

    # Two replicas cannot share one GPU's turns: refused with the reason, no Deployment.
    body = model_manifest("wide", "hib/wide", free_port())
    body["spec"]["replicas"] = 2
    body["spec"]["gpuGroup"] = {"name": "g"}
    apply(cluster, ns, body)
    eventually(lambda: get(cluster, ns, "wide")["status"].get("gpu") == "Refused", what="wide refused")
    degraded = next(x for x in get(cluster, ns, "wide")["status"]["conditions"] if x["type"] == "Degraded")
    assert "spec.replicas is 2" in degraded["message"]
    assert cluster.apps.list_namespaced_deployment(ns, label_selector=f"{c.LABEL_MODEL}=wide").items == []

    def placeable(group: str) -> dict[str, Any]:
        return condition(group, "Placeable")

    eventually(lambda: placeable("g")["status"] == "False", what="g not placeable")
    assert "wide: " in placeable("g")["message"] and "spec.replicas is 2" in placeable("g")["message"]

    # DRA: placed where the API server serves resource.k8s.io/v1 (the shared claim is made), refused
    # with the reason where it does not.
    versions = cluster.kubectl("api-versions").stdout.split()
    if "resource.k8s.io/v1" in versions:
        eventually(lambda: placeable("dra")["status"] == "True", what="dra placeable")
        claim = cluster.kubectl("get", "resourceclaim", "dra-gpu", "-n", ns, "-o", "json").stdout
        assert json.loads(claim)["metadata"]["ownerReferences"][0]["name"] == "dra"
    else:
        eventually(lambda: placeable("dra")["status"] == "False", what="dra not placeable")
        assert "does not serve resource.k8s.io/v1" in placeable("dra")["message"]


def test_the_two_models_example_is_accepted_and_renders_one_shared_gpu(
    cluster: Cluster, namespace: str
) -> None:
    path = ROOT / "examples" / "gpu-sharing" / "two-models.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert result.stdout.count("created (server dry run)") == len(docs) == 3, result.stdout
    group = next(d for d in docs if d["kind"] == c.GPU_GROUP_KIND)
    placement = GroupPlacement(group["metadata"]["name"], GpuGroupSpec.model_validate(group["spec"]))
    uid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    for doc in (d for d in docs if d["kind"] == c.KIND):
        spec = ModelDeploymentSpec.model_validate(doc["spec"])
        assert gpu_placement.problems(placement, "shared-h100", spec, dra_served=False) == []
        md = {"metadata": {**doc["metadata"], "namespace": namespace, "uid": uid}}
        body = workload.deployment(md, spec, spec.replicas, "", placement)
        limits = body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu.shared"] == "1"
        out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body))
        assert "(server dry run)" in out.stdout


def test_two_gateway_replicas_share_the_lease_and_never_wake_more_than_the_budget(
    cluster: Cluster, namespace: str, three: AgentStandin, tmp_path: Path
) -> None:
    ns = namespace
    first_awake(cluster, ns, three, maxAwake=1, minAwakeSeconds=2)
    first, second = tmp_path / "gw1", tmp_path / "gw2"
    first.mkdir()
    second.mkdir()
    with start_gateway(cluster, ns, first, hold_timeout=60) as gw1, start_gateway(cluster, ns, second) as gw2:
        wait_first_awake(cluster, ns)
        responses, most_awake = burst(three, [(gw1.url, "b"), (gw2.url, "c")] * 3)
        bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not bad, bad
        assert most_awake == 1, f"{most_awake} engines were awake at once"
        ok = 'hibernate_gateway_gpu_switch_total{result="ok"}'
        assert metric(gw1, ok) == metric(gw2, ok) == 1, "each replica made one switch"
    lease = read_lease(get_group(cluster, ns, "g"))
    assert [e.name for e in lease.holders] in (["b"], ["c"]), lease
