"""The status fold in every mixed case, as a table: what the spec asks, what each pod reports, and the
phase, reached level, Ready condition and messages the ModelDeployment shows for it (pure: no API).

A pod is written `name: state@level` (the agent's report), with `+ready` when the kubelet has it Ready
(with the readiness gate: only while the agent says it is Awake), `!wish` for its own sleep-level (a
person's override of one pod), `~` for a pod being deleted, and `?` for a pod the agent has not reported
on yet. Failed pods carry their error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller.status import PodView, fold

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def pod(spec: str, spec_level: str, error: str | None = None) -> PodView:
    """`a: Awake@0 +ready !L1`: name, state@level (or `?`), flags."""
    name, _, rest = spec.partition(":")
    words = rest.split()
    annotations = {c.ANN_SLEEP_LEVEL: spec_level, c.ANN_SPEC_LEVEL: spec_level}
    ready = terminating = False
    for word in words:
        if word == "+ready":
            ready = True
        elif word == "~":
            terminating = True
        elif word.startswith("!"):
            annotations[c.ANN_SLEEP_LEVEL] = word[1:]
        elif word != "?":
            state, _, level = word.partition("@")
            annotations[c.ANN_STATE] = state
            annotations[c.ANN_OBSERVED_LEVEL] = level
    if error is not None:
        annotations[c.ANN_LAST_OPERATION] = json.dumps({"action": "sleep", "level": 1, "error": error})
    return PodView(name=name.strip(), annotations=annotations, ready=ready, terminating=terminating)


@dataclass(frozen=True)
class Case:
    id: str
    spec: str  # spec.sleepLevel
    pods: tuple[str, ...]
    phase: str
    level: str | None  # status.sleepLevel
    ready: str  # the Ready condition: "True"/"False" and its reason, e.g. "True Serving"
    ready_message: str
    asleep_message: str = ""
    progressing: bool = False
    degraded: str = ""  # a fragment of the Degraded message ("" : not degraded)
    reached: bool = False  # a Reached event (every replica at the spec's level)
    replicas: int = 2
    previous_level: str | None = "Awake"  # status.sleepLevel before this fold
    errors: tuple[tuple[str, str], ...] = ()  # (pod, error of its last operation)


STOP_MESSAGE = "Stop applies to a whole ModelDeployment"

CASES = [
    Case(
        "one replica awake and ready",
        "Awake",
        ("a: Awake@0 +ready",),
        "Awake",
        "Awake",
        "True Serving",
        "1/1 replicas ready",
        replicas=1,
        reached=True,
    ),
    Case(
        "cold start: nothing reported yet",
        "Awake",
        ("a: ?", "b: ?"),
        "Pending",
        None,
        "False NotReady",
        "0/2 replicas ready; pod a is starting, pod b is starting",
        progressing=True,
        previous_level=None,
    ),
    Case(
        "one of two still starting",
        "Awake",
        ("a: Awake@0 +ready", "b: ?"),
        "Pending",
        None,
        "True Serving",
        "1/2 replicas ready; pod b is starting",
        progressing=True,
    ),
    Case(
        "a replica missing (the Deployment has not made it yet)",
        "Awake",
        ("a: Awake@0 +ready",),
        "Pending",
        "Awake",
        "True Serving",
        "1/2 replicas ready",
        progressing=True,
    ),
    Case(
        "spec Awake, one pod overridden to L1: the model serves from the other",
        "Awake",
        ("a: Awake@0 +ready", "b: Asleep@1 !L1"),
        "Awake",
        "Awake",
        "True Serving",
        f"1/2 replicas ready; pod b is at L1 (its own {c.ANN_SLEEP_LEVEL})",
    ),
    Case(
        "spec Awake, every pod overridden to a sleep level: nothing serves",
        "Awake",
        ("a: Asleep@1 !L1", "b: Asleep@3 !CudaSuspend"),
        "Asleep",
        "L1",
        "False Asleep",
        f"0/2 replicas ready; pod a is at L1 (its own {c.ANN_SLEEP_LEVEL}), "
        f"pod b is at CudaSuspend (its own {c.ANN_SLEEP_LEVEL})",
        asleep_message="every replica is asleep: pod a at L1, pod b at CudaSuspend",
    ),
    Case(
        "spec CudaSuspend, one pod overridden to Awake: Awake, not 'every replica is at Awake'",
        "CudaSuspend",
        ("a: Asleep@3", "b: Awake@0 +ready !Awake"),
        "Awake",
        "Awake",
        "True Serving",
        f"1/2 replicas ready; pod b is awake (its own {c.ANN_SLEEP_LEVEL})",
    ),
    Case(
        "spec CudaSuspend, one pod overridden to L1: asleep at two levels",
        "CudaSuspend",
        ("a: Asleep@3", "b: Asleep@1 !L1"),
        "Asleep",
        "L1",
        "False Asleep",
        f"0/2 replicas ready; pod b is at L1 (its own {c.ANN_SLEEP_LEVEL})",
        asleep_message="every replica is asleep: pod a at CudaSuspend, pod b at L1",
    ),
    Case(
        "spec L1, every replica at L1",
        "L1",
        ("a: Asleep@1", "b: Asleep@1"),
        "Asleep",
        "L1",
        "False Asleep",
        "0/2 replicas ready",
        asleep_message="every replica is at L1",
        reached=True,
    ),
    Case(
        "a pod made before the readiness gate: Ready while asleep, yet not serving",
        "L1",
        ("a: Asleep@1 +ready",),
        "Asleep",
        "L1",
        "False Asleep",
        "0/1 replicas ready",
        asleep_message="every replica is at L1",
        replicas=1,
        reached=True,
    ),
    Case(
        "spec L1, one asleep, one going to sleep",
        "L1",
        ("a: Asleep@1", "b: Sleeping@0"),
        "Sleeping",
        "Awake",
        "False NotReady",
        "0/2 replicas ready; pod b is going to sleep",
        progressing=True,
    ),
    Case(
        "spec L1, one asleep, the other not picked up yet: it still serves",
        "L1",
        ("a: Asleep@1", "b: Awake@0 +ready"),
        "Sleeping",
        "Awake",
        "True Serving",
        "1/2 replicas ready; pod b is awake",
        progressing=True,
    ),
    Case(
        "spec Awake from L1, one woken, one waking",
        "Awake",
        ("a: Awake@0 +ready", "b: Waking@1"),
        "Waking",
        "Awake",
        "True Serving",
        "1/2 replicas ready; pod b is waking",
        progressing=True,
        previous_level="L1",
    ),
    Case(
        "spec Awake from L1, woken but not Ready yet (the kubelet catching up with the gate)",
        "Awake",
        ("a: Awake@0",),
        "Waking",
        "Awake",
        "False NotReady",
        "0/1 replicas ready; pod a is awake, not ready yet",
        progressing=True,
        replicas=1,
        previous_level="L1",
    ),
    Case(
        "one Failed (a sleep undone, serving again), one awake",
        "Awake",
        ("a: Awake@0 +ready", "b: Failed@0 +ready !L1"),
        "Failed",
        "Awake",
        "True Serving",
        "2/2 replicas ready; pod b failed",
        degraded="pod b: sleep L1 failed: engine did not answer",
        errors=(("b", "sleep L1 failed: engine did not answer"),),
    ),
    Case(
        "the only pod Failed asleep",
        "L1",
        ("a: Failed@1",),
        "Failed",
        "L1",
        "False Failed",
        "pod a: wake failed",
        degraded="pod a: wake failed",
        replicas=1,
        errors=(("a", "wake failed"),),
    ),
    Case(
        "one pod annotated Stop, before the agent says anything: Failed, not Progressing for ever",
        "Awake",
        ("a: Awake@0 +ready", "b: Awake@0 +ready !Stop"),
        "Failed",
        "Awake",
        "True Serving",
        "2/2 replicas ready; pod b failed",
        degraded=f"pod b: {STOP_MESSAGE}",
    ),
    Case(
        "one pod annotated 5, the agent has refused it",
        "L1",
        ("a: Asleep@1", "b: Failed@1 !5"),
        "Failed",
        "L1",
        "False Failed",
        f"pod b: {c.STOP_ON_POD}",
        degraded=f"pod b: {STOP_MESSAGE}",
        errors=(("b", c.STOP_ON_POD),),
    ),
    Case(
        "an unreadable sleep-level on one pod",
        "Awake",
        ("a: Awake@0 +ready", "b: Awake@0 +ready !deep"),
        "Failed",
        "Awake",
        "True Serving",
        "2/2 replicas ready; pod b failed",
        degraded="is not a sleep level",
    ),
    Case(
        "a pod being deleted does not count",
        "Awake",
        ("a: Awake@0 +ready", "b: Asleep@1 ~"),
        "Awake",
        "Awake",
        "True Serving",
        "1/1 replicas ready",
        replicas=1,
        reached=True,
    ),
    Case(
        "Stop with pods still there",
        "Stop",
        ("a: Awake@0 +ready ~",),
        "Sleeping",
        None,
        "False NotReady",
        "0/0 replicas ready",
        progressing=True,
        replicas=0,
    ),
    Case(
        "Stop, scaled to zero",
        "Stop",
        (),
        "Stopped",
        "Stop",
        "False Stopped",
        "0/0 replicas ready",
        asleep_message="every replica is at Stop",
        replicas=0,
        reached=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_fold_of_each_mix_of_pods(case: Case) -> None:
    errors = dict(case.errors)
    views = [pod(p, case.spec, errors.get(p.split(":")[0])) for p in case.pods]
    previous = (
        {
            "sleepLevel": case.previous_level,
            "lastTransition": {"to": "Awake", "started": "2025-01-01T00:00:00Z"},
        }
        if case.previous_level
        else None
    )
    result = fold(
        desired=SleepLevel.parse(case.spec),
        replicas=case.replicas,
        generation=3,
        pods=views,
        previous=previous,
        now=NOW,
    )
    status = result.status
    conditions = {x["type"]: x for x in status["conditions"]}
    ready = conditions["Ready"]
    assert (status["phase"], status["sleepLevel"]) == (case.phase, case.level)
    assert f"{ready['status']} {ready['reason']}" == case.ready
    assert ready.get("message", "") == case.ready_message
    assert conditions["Asleep"].get("message", "") == case.asleep_message
    assert conditions["Asleep"]["status"] == ("True" if case.phase in ("Asleep", "Stopped") else "False")
    assert conditions["Progressing"]["status"] == ("True" if case.progressing else "False")
    degraded = conditions["Degraded"]
    assert degraded["status"] == ("True" if case.degraded else "False")
    assert case.degraded in degraded.get("message", "")
    if "replicas ready" in case.ready_message:
        assert status["readyReplicas"] == int(case.ready_message.split("/")[0])
    reasons = [reason for _, reason, _ in result.events]
    assert ("Reached" in reasons) == case.reached, result.events
    if "Reached" in reasons:
        assert status["lastTransition"]["finished"]


def test_a_person_override_is_no_arrival_of_the_whole_model() -> None:
    """With one pod kept awake, the transition to the spec's level stays open (no Reached event, no
    finished time), and the phase says what serves; once the pod joins the others, it is reached."""
    kept = fold(
        desired=SleepLevel.L1,
        replicas=2,
        generation=2,
        pods=[pod("a: Asleep@1", "L1"), pod("b: Awake@0 +ready !Awake", "L1")],
        previous={"sleepLevel": "Awake", "phase": "Awake"},
        now=NOW,
    )
    assert kept.status["phase"] == "Awake" and "finished" not in kept.status["lastTransition"]
    assert [r for _, r, _ in kept.events] == ["Transition"]
    joined = fold(
        desired=SleepLevel.L1,
        replicas=2,
        generation=2,
        pods=[pod("a: Asleep@1", "L1"), pod("b: Asleep@1", "L1")],
        previous=kept.status,
        now=NOW,
    )
    assert joined.status["phase"] == "Asleep" and joined.status["lastTransition"]["finished"]
    assert [r for _, r, _ in joined.events] == ["Reached"]


def test_a_stop_on_one_pod_is_one_failure_event_not_one_per_resync() -> None:
    pods = [pod("a: Awake@0 +ready", "Awake"), pod("b: Awake@0 +ready !Stop", "Awake")]
    first = fold(desired=SleepLevel.AWAKE, replicas=2, generation=1, pods=pods, previous=None, now=NOW)
    assert [e for e in first.events if e[0] == "Warning"] == [
        ("Warning", "Failed", f"pod b: {c.STOP_ON_POD}")
    ]
    again = fold(
        desired=SleepLevel.AWAKE, replicas=2, generation=1, pods=pods, previous=first.status, now=NOW
    )
    assert again.events == [] and again.status == first.status
