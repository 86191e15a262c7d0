"""Idle auto-sleep: the pure ladder logic (table-driven), then the whole ladder on a real API server
with the operator, the gateway, the agent stand-in and a fake engine: down every step, and a request
wakes the model from every step, Stop included; all of it as automatic levels, with the spec
untouched, so that a GitOps tool applying the manifest again changes nothing; and requests sent to
the engine directly (the engine's own counters) keep the model awake too."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.api.v1alpha1 import IdleSpec
from hibernate.controller import idle
from tests.agent_standin import AgentStandin
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import free_port
from tests.gateway_helpers import (
    apply_model,
    complete,
    level_in_effect,
    model_manifest,
    settled,
    start_gateway,
)
from tests.modeldeployments import events_for, get, pods

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
A, L1, L2, CS, CP, STOP = (
    SleepLevel.AWAKE,
    SleepLevel.L1,
    SleepLevel.L2,
    SleepLevel.CUDA_SUSPEND,
    SleepLevel.CHECKPOINT,
    SleepLevel.STOP,
)
LADDER = IdleSpec.model_validate(
    {
        "after": "10m",
        "level": "L1",
        "ladder": [{"after": "1h", "level": "CudaSuspend"}, {"after": "6h", "level": 5}],
    }
)


def at(**delta: float) -> datetime:
    return T0 + timedelta(**delta)


# (what, current level, idle for, expected level now, expected next level, next due after T0)
PLAN_CASES: list[tuple[str, SleepLevel, timedelta, SleepLevel, SleepLevel | None, timedelta | None]] = [
    ("fresh activity: stay, L1 next", A, timedelta(0), A, L1, timedelta(minutes=10)),
    ("just before the first step", A, timedelta(minutes=9, seconds=59), A, L1, timedelta(minutes=10)),
    ("exactly at the first step", A, timedelta(minutes=10), L1, CS, timedelta(hours=1)),
    ("between steps", L1, timedelta(minutes=30), L1, CS, timedelta(hours=1)),
    ("second step due", L1, timedelta(hours=1), CS, STOP, timedelta(hours=6)),
    ("several due at once: straight to the deepest", A, timedelta(hours=7), STOP, None, None),
    ("at the end of the ladder", STOP, timedelta(hours=9), STOP, None, None),
    (
        "a person's deeper level is never made shallower",
        CP,
        timedelta(minutes=20),
        CP,
        STOP,
        timedelta(hours=6),
    ),
    ("never wakes: a person's L2 with fresh activity", L2, timedelta(0), L2, CS, timedelta(hours=1)),
    ("a person's Stop stays Stop", STOP, timedelta(0), STOP, None, None),
    ("a person's L1 before any step: next is deeper", L1, timedelta(minutes=1), L1, CS, timedelta(hours=1)),
]


@pytest.mark.parametrize(
    ("current", "idle_for", "level", "next_level", "next_after"),
    [case[1:] for case in PLAN_CASES],
    ids=[case[0] for case in PLAN_CASES],
)
def test_plan(
    current: SleepLevel,
    idle_for: timedelta,
    level: SleepLevel,
    next_level: SleepLevel | None,
    next_after: timedelta | None,
) -> None:
    result = idle.plan(LADDER, T0, current, T0 + idle_for)
    assert result.level == level
    assert result.next_level == next_level
    assert result.next_at == (T0 + next_after if next_after is not None else None)
    assert result.level >= current  # only ever deeper


def test_plan_tolerates_an_unordered_ladder_and_shallower_later_steps() -> None:
    spec = IdleSpec.model_validate(
        {
            "after": "2s",
            "level": "L2",
            "ladder": [{"after": "6s", "level": "Stop"}, {"after": "4s", "level": "L1"}],
        }
    )
    assert idle.plan(spec, T0, A, at(seconds=5)).level == L2  # the L1 step at 4 s never goes shallower
    assert idle.plan(spec, T0, A, at(seconds=5)).next_level == STOP
    assert idle.plan(spec, T0, A, at(seconds=6)).level == STOP


def md(
    level: object = "Awake",
    activity: str | None = None,
    status_activity: str | None = None,
    created: str = "2025-01-01T11:00:00Z",
    transition: dict[str, Any] | None = None,
    phase: str = "Awake",
    generation: int = 3,
    observed: int | None = 3,
    idle_spec: dict[str, Any] | None = None,
    auto: str | None = None,
    folded_for: str | None = None,
) -> dict[str, Any]:
    annotations = {c.ANN_LAST_ACTIVITY: activity} if activity else {}
    if auto:  # an automatic level, decided on the current spec
        annotations |= {
            c.ANN_AUTO_LEVEL: auto,
            c.ANN_AUTO_SOURCE: "idle",
            c.ANN_AUTO_GENERATION: str(generation),
        }
    status: dict[str, Any] = {"phase": phase}
    if folded_for:
        status["effectiveLevel"] = folded_for
    if observed is not None:
        status["observedGeneration"] = observed
    if status_activity:
        status["idle"] = {"lastActivity": status_activity}
    if transition:
        status["lastTransition"] = transition
    spec: dict[str, Any] = {"model": "m", "sleepLevel": level}
    spec["idle"] = (
        idle_spec if idle_spec is not None else {"after": "10m", "ladder": [{"after": "1h", "level": 2}]}
    )
    return {
        "metadata": {
            "name": "m",
            "creationTimestamp": created,
            "generation": generation,
            "annotations": annotations,
        },
        "spec": spec,
        "status": status,
    }


# (what, object, expected last activity)
ACTIVITY_CASES: list[tuple[str, dict[str, Any], datetime]] = [
    ("only the creation", md(), at(hours=-1)),
    (
        "the annotation wins over the creation",
        md(activity="2025-01-01T11:50:00.250Z"),
        at(minutes=-10, seconds=0.25),
    ),
    (
        "status.idle.lastActivity when the annotation is older",
        md(activity="2025-01-01T11:10:00Z", status_activity="2025-01-01T11:20:00Z"),
        at(minutes=-40),
    ),
    (
        "a finished wake counts as activity",
        md(
            activity="2025-01-01T11:10:00Z",
            transition={
                "from": "Stop",
                "to": "Awake",
                "started": "2025-01-01T11:40:00Z",
                "finished": "2025-01-01T11:41:00Z",
            },
        ),
        at(minutes=-19),
    ),
    (
        "a wake under way is activity now",
        md(phase="Waking", transition={"from": "L2", "to": "Awake", "started": "2025-01-01T11:40:00Z"}),
        T0,
    ),
    (
        "a failed wake counts from its start",
        md(phase="Failed", transition={"from": "L2", "to": "Awake", "started": "2025-01-01T11:40:00Z"}),
        at(minutes=-20),
    ),
    (
        "a transition to a sleep level is not a wake",
        md(
            transition={
                "from": "Awake",
                "to": "L1",
                "started": "2025-01-01T11:55:00Z",
                "finished": "2025-01-01T11:55:01Z",
            }
        ),
        at(hours=-1),
    ),
    ("a clock ahead of ours counts as now", md(activity="2025-01-01T13:00:00Z"), T0),
    ("garbage in the annotation is ignored", md(activity="yesterday"), at(hours=-1)),
]


@pytest.mark.parametrize(
    ("obj", "expected"), [case[1:] for case in ACTIVITY_CASES], ids=[case[0] for case in ACTIVITY_CASES]
)
def test_last_activity(obj: dict[str, Any], expected: datetime) -> None:
    assert idle.last_activity(obj, T0) == expected


# (what, object, level to set or None, nextLevel written, skip reason or "")
DECIDE_CASES: list[tuple[str, dict[str, Any], SleepLevel | None, str | None, str]] = [
    ("idle for an hour: straight to L2", md(), L2, None, ""),
    ("recent activity: nothing yet", md(activity="2025-01-01T11:55:00Z"), None, "L1", ""),
    ("idle 20 min: L1, then L2", md(activity="2025-01-01T11:40:00Z"), L1, "L2", ""),
    (
        "already at L1 by the ladder: waits for L2",
        md(auto="L1", activity="2025-01-01T11:40:00Z", folded_for="L1"),
        None,
        "L2",
        "",
    ),
    (
        "a person's L1: waits for L2 the same",
        md(level="L1", activity="2025-01-01T11:40:00Z"),
        None,
        "L2",
        "",
    ),
    (
        "a wake on request over a person's L1 counts from its activity",
        md(level="L1", auto="Awake", activity="2025-01-01T11:40:00Z", folded_for="Awake"),
        L1,
        "L2",
        "",
    ),
    (
        "an automatic level the status does not show yet: wait",
        md(auto="Awake", folded_for="L1"),
        None,
        None,
        "status behind the automatic level",
    ),
    ("status behind the spec: wait", md(generation=4, observed=3), None, None, "status behind the spec"),
    ("no status yet: wait", md(observed=None), None, None, "status behind the spec"),
    ("first start under way: not idle", md(phase="Pending"), None, None, "starting or waking"),
    ("no idle spec", {**md(), "spec": {"model": "m"}}, None, None, "no idle spec"),
    ("an invalid spec", {**md(), "spec": {"model": "m", "sleepLevel": 9}}, None, None, "invalid spec"),
]


@pytest.mark.parametrize(
    ("obj", "move_to", "next_level", "skip"),
    [case[1:] for case in DECIDE_CASES],
    ids=[case[0] for case in DECIDE_CASES],
)
def test_decide(obj: dict[str, Any], move_to: SleepLevel | None, next_level: str | None, skip: str) -> None:
    decision = idle.decide(obj, T0)
    assert decision.move_to == move_to
    assert decision.skip.startswith(skip) if skip else not decision.skip
    if not skip:
        assert decision.idle_status is not None
        assert decision.idle_status["nextLevel"] == next_level
        assert idle.parse_time(decision.idle_status["lastActivity"]) == idle.last_activity(obj, T0)


def test_requests_the_engines_counted_are_activity() -> None:
    obj = md(activity="2025-01-01T11:40:00Z")  # idle 20 min by the gateway's mark: L1 due
    assert idle.decide(obj, T0).move_to == L1
    busy = idle.decide(obj, T0, engine_activity=at(seconds=-1))
    assert busy.move_to is None and busy.idle_status is not None
    assert busy.idle_status["lastActivity"] == "2025-01-01T11:59:59.000Z"  # kept in status.idle
    assert busy.idle_status["nextLevel"] == "L1"


def test_idle_status_comparison_and_time_format() -> None:
    wanted: dict[str, str | None] = {"lastActivity": "x", "nextLevel": None, "nextAt": None}
    assert idle.same_idle_status({"lastActivity": "x"}, wanted)
    assert not idle.same_idle_status({"lastActivity": "x", "nextLevel": "L1"}, wanted)
    assert not idle.same_idle_status(None, wanted)
    assert idle.format_time(at(seconds=1.5)) == "2025-01-01T12:00:01.500Z"
    assert idle.parse_time("2025-01-01T12:00:01.500Z") == at(seconds=1.5)


# --- end to end ------------------------------------------------------------------------------------

IDLE = {
    "after": "2s",
    "level": "L1",
    "ladder": [{"after": "4s", "level": "L2"}, {"after": "6s", "level": "Stop"}],
}


@pytest.fixture
def idle_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Process]:
    proc = hibernate_process(cluster, tmp_path / "operator.log", "operator")
    proc.env["HIBERNATE_IDLE_INTERVAL"] = "0.25"
    proc.start()
    yield proc
    proc.stop()


def current_level(cluster: Cluster, ns: str, name: str = "m") -> str | None:
    return level_in_effect(get(cluster, ns, name))


def settled_at(
    cluster: Cluster, ns: str, level: str, phase: str, timeout: float, name: str = "m"
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get(cluster, ns, name)
        return obj if settled(obj, level, phase) else None

    result: dict[str, Any] = eventually(check, timeout=timeout, what=f"{name} {level} {phase}")
    return result


def test_a_model_idles_down_the_whole_ladder_and_a_request_wakes_it_from_every_step(
    cluster: Cluster, namespace: str, idle_operator: Process, tmp_path: Path
) -> None:
    port = free_port()
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path) as gw,
    ):
        standin.serve("m", "hib/idle", port)
        apply_model(cluster, namespace, "m", "hib/idle", port, idle=IDLE)
        settled_at(cluster, namespace, "Awake", "Awake", timeout=30)
        with httpx.Client(timeout=30) as client:
            expected = complete(client, gw, "hib/idle", "a prompt").json()["choices"][0]["text"]
            woke = time.monotonic()

            # Down the ladder, step by step, with nobody sending requests.
            seen: list[tuple[str | None, float]] = []

            def at_stop() -> bool:
                level = current_level(cluster, namespace)
                if not seen or seen[-1][0] != level:
                    seen.append((level, time.monotonic() - woke))
                return level == "Stop"

            eventually(at_stop, timeout=20, interval=0.05, what="the ladder down to Stop")
            assert [level for level, _ in seen] == ["Awake", "L1", "L2", "Stop"], seen
            times = dict(seen)
            assert 1.5 <= times["L1"] < times["L2"] < times["Stop"], seen
            assert times["L2"] >= 3.5 and times["Stop"] >= 5.5, seen
            obj = settled_at(cluster, namespace, "Stop", "Stopped", timeout=20)
            # Automatic levels: the spec is the person's and was never written.
            assert obj["spec"]["sleepLevel"] == "Awake" and obj["metadata"]["generation"] == 1
            assert obj["metadata"]["annotations"][c.ANN_AUTO_SOURCE] == "idle"
            assert obj["status"]["automaticLevel"]["level"] == "Stop"
            assert obj["status"]["automaticLevel"]["source"] == "idle"
            assert obj["status"]["idle"]["lastActivity"]
            assert "nextLevel" not in obj["status"]["idle"]  # the end of the ladder
            moves = [e.message for e in events_for(cluster, namespace, "m") if e.reason == "IdleSleep"]
            assert len(moves) == 3 and "from L2 to Stop" in " ".join(moves), moves
            assert standin.engine_starts("m") == 1

            # From Stop: a cold start behind the held request.
            for level, phase in (("Stop", "Stopped"), ("L1", "Asleep"), ("L2", "Asleep")):
                settled_at(cluster, namespace, level, phase, timeout=20)
                started = time.monotonic()
                response = complete(client, gw, "hib/idle", "a prompt")
                assert response.status_code == 200, (level, response.text)
                assert response.json()["choices"][0]["text"] == expected, (
                    f"wrong answer after a wake from {level}"
                )
                obj = get(cluster, namespace, "m")
                # The wake removed the automatic level; the spec (Awake) applies again.
                assert level_in_effect(obj) == "Awake"
                assert c.ANN_AUTO_LEVEL not in obj["metadata"]["annotations"]
                assert obj["metadata"]["generation"] == 1
                # The request is activity: the ladder starts again from it, not from long ago.
                eventually(
                    lambda: get(cluster, namespace, "m")["status"]["idle"].get("nextLevel") == "L1",
                    timeout=1.5,
                    what="status.idle: L1 next again",
                )
                print(f"wake from {level}: {time.monotonic() - started:.2f} s")
            assert standin.engine_starts("m") == 2  # one cold start, for the wake from Stop
            assert standin.wakes("m") == 2  # from L1 and L2; Stop was a new engine
            # After the last wake the model is given its full first step again.
            awake_since = time.monotonic()
            eventually(lambda: current_level(cluster, namespace) == "L1", timeout=10, what="L1 again")
            assert time.monotonic() - awake_since >= 1.0


ARGO = "argocd-controller"


def sync(cluster: Cluster, ns: str, manifest: dict[str, Any]) -> None:
    """What Argo CD (or Flux) does at every sync: apply the manifest from Git, server-side, as its own
    field manager, taking over any field someone else changed (--force-conflicts)."""
    cluster.kubectl(
        *("apply", "-n", ns, "-f", "-", "--server-side", "--field-manager", ARGO, "--force-conflicts"),
        input=json.dumps(manifest),
    )


def test_a_gitops_managed_model_sleeps_when_idle_and_wakes_on_request_while_its_manifest_is_reapplied(
    cluster: Cluster, namespace: str, idle_operator: Process, tmp_path: Path
) -> None:
    port = free_port()
    manifest = model_manifest("m", "hib/gitops", port, idle={"after": "2s", "level": "L1"})
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path) as gw,
        httpx.Client(timeout=30) as client,
    ):
        standin.serve("m", "hib/gitops", port)
        sync(cluster, namespace, manifest)
        settled_at(cluster, namespace, "Awake", "Awake", timeout=30)
        expected = complete(client, gw, "hib/gitops", "a prompt").json()["choices"][0]["text"]

        # Idle: the ladder puts it to sleep, as an automatic level beside the spec.
        obj = settled_at(cluster, namespace, "L1", "Asleep", timeout=20)
        assert obj["spec"]["sleepLevel"] == "Awake" and obj["metadata"]["generation"] == 1
        assert obj["metadata"]["annotations"][c.ANN_AUTO_LEVEL] == "L1"

        # Argo CD syncs again, server-side and (as older setups do) client-side: nothing to revert.
        sync(cluster, namespace, manifest)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        time.sleep(1.0)
        obj = get(cluster, namespace, "m")
        assert obj["metadata"]["generation"] == 1, "the spec changed"
        assert settled(obj, "L1", "Asleep"), obj.get("status")
        assert standin.wakes("m") == 0
        # Only the appliers own fields of the spec: no automaton wrote it.
        spec_owners = {
            m["manager"]
            for m in obj["metadata"]["managedFields"]
            if '"f:spec"' in json.dumps(m.get("fieldsV1") or {})
        }
        assert spec_owners <= {ARGO, "kubectl-client-side-apply"}, spec_owners

        # A request wakes it: through its automatic level, not through the spec.
        response = complete(client, gw, "hib/gitops", "a prompt")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
        obj = get(cluster, namespace, "m")
        assert obj["metadata"]["generation"] == 1 and obj["spec"]["sleepLevel"] == "Awake"
        assert level_in_effect(obj) == "Awake" and standin.wakes("m") == 1
        sync(cluster, namespace, manifest)
        woke = time.monotonic()

        # ... and idle again, it sleeps again: the sync reverted nothing of either.
        obj = settled_at(cluster, namespace, "L1", "Asleep", timeout=20)
        assert time.monotonic() - woke >= 1.0
        assert obj["metadata"]["generation"] == 1

        # A person's change in Git resets the automatic level: the spec applies again (Awake).
        changed = json.loads(json.dumps(manifest))
        changed["spec"]["drainSeconds"] = 5
        sync(cluster, namespace, changed)
        obj = settled_at(cluster, namespace, "Awake", "Awake", timeout=20)
        assert obj["metadata"]["generation"] == 2
        eventually(
            lambda: (
                not set(c.AUTO_ANNOTATIONS) & set(get(cluster, namespace, "m")["metadata"]["annotations"])
            ),
            what="the stale automatic annotations removed",
        )
        assert any(e.reason == "AutomaticLevelReset" for e in events_for(cluster, namespace, "m"))
        [pod] = pods(cluster, namespace, "m")
        assert pod.metadata.annotations[c.ANN_DRAIN_SECONDS] == "5"


def test_requests_sent_straight_to_the_engine_keep_the_model_awake_past_its_idle_timeout(
    cluster: Cluster, namespace: str, idle_operator: Process, tmp_path: Path
) -> None:
    port = free_port()
    with AgentStandin(cluster, namespace, tmp_path) as standin, httpx.Client(timeout=30) as client:
        standin.serve("d", "hib/direct", port)
        apply_model(cluster, namespace, "d", "hib/direct", port, idle={"after": "2s", "level": "L1"})
        settled_at(cluster, namespace, "Awake", "Awake", timeout=30, name="d")
        # No gateway: a client calls the model's engine directly, every 0.5 s, for three idle timeouts.
        started = last = time.monotonic()
        while time.monotonic() - started < 6.0:
            assert complete(client, standin.engine_url("d"), "hib/direct", "hello").status_code == 200
            last = time.monotonic()
            assert current_level(cluster, namespace, "d") == "Awake", "put to sleep while busy"
            time.sleep(0.5)
        # Once the traffic stops, the ladder counts from the last request the engine counted.
        eventually(lambda: current_level(cluster, namespace, "d") == "L1", timeout=10, what="L1")
        assert time.monotonic() - last >= 1.5
        obj = get(cluster, namespace, "d")
        assert c.ANN_LAST_ACTIVITY not in obj["metadata"].get("annotations", {})  # no gateway ran
        since = idle.parse_time(obj["status"]["idle"]["lastActivity"])
        assert (
            since is not None
            and (since - idle.parse_time(obj["metadata"]["creationTimestamp"])).total_seconds() >= 5
        )
