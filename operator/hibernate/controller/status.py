"""Fold the pods' agent-written annotations into a ModelDeployment status. Pure: no API calls.

The agent reports per pod (`state`, `observed-sleep-level`, `last-operation`); the operator's job is
to say, for the whole model, what phase it is in, which level every replica has reached, and to
keep conditions and the last transition honest across restarts (they are recomputed, not stored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from hibernate.api.pod_fields import REASON as REFUSED


def now_iso(now: datetime | None = None) -> str:
    """RFC 3339 in UTC with milliseconds: transitions of a second or less must still be measurable."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know of one pod."""

    name: str
    annotations: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    terminating: bool = False
    ip: str | None = None  # status.podIP: where the idle timer reads the engine's /metrics

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(x.get("type") == "Ready" and x.get("status") == "True" for x in conditions)
        return cls(
            name=meta.get("name", ""),
            annotations=dict(meta.get("annotations") or {}),
            ready=ready,
            terminating=bool(meta.get("deletionTimestamp")),
            ip=(pod.get("status") or {}).get("podIP") or None,
        )

    def desired(self, default: SleepLevel) -> SleepLevel | None:
        """The pod's own desired level (a person may override one pod); None when unparseable."""
        raw = self.annotations.get(c.ANN_SLEEP_LEVEL)
        if raw is None:
            return default
        try:
            return SleepLevel.parse(raw)
        except InvalidSleepLevel:
            return None

    @property
    def observed(self) -> SleepLevel | None:
        """The level the agent reports; None before the agent has looked at this pod."""
        return SleepLevel.parse_or_none(self.annotations.get(c.ANN_OBSERVED_LEVEL))

    @property
    def state(self) -> str | None:
        return self.annotations.get(c.ANN_STATE)

    def failure(self) -> str | None:
        if self.state != c.STATE_FAILED:
            raw = self.annotations.get(c.ANN_SLEEP_LEVEL)
            if raw is not None and self.desired(SleepLevel.AWAKE) is None:
                return f"pod {self.name}: annotation {c.ANN_SLEEP_LEVEL}={raw!r} is not a sleep level"
            if self.desired(SleepLevel.AWAKE) == SleepLevel.STOP:
                # Cannot be done on one pod (the agent says the same, with one Warning on the pod).
                return f"pod {self.name}: {c.STOP_ON_POD}"
            return None
        try:
            op = json.loads(self.annotations.get(c.ANN_LAST_OPERATION, "{}"))
        except json.JSONDecodeError:
            op = {}
        error = op.get("error") if isinstance(op, dict) else None
        return f"pod {self.name}: {error or 'the agent reports Failed'}"

    def settled(self, desired: SleepLevel) -> bool:
        """The agent has brought this pod to its desired level and is not working on it; at Awake, the
        pod also serves (Ready: the kubelet has let it into its Service)."""
        if self.state in (c.STATE_SLEEPING, c.STATE_WAKING, c.STATE_FAILED):
            return False
        return self.observed == desired and (desired != SleepLevel.AWAKE or self.serving)

    def at_spec(self, spec_level: SleepLevel) -> bool:
        """Settled at the spec's level, and meant to be there (no override of this pod)."""
        return self.settled(spec_level) and self.desired(spec_level) == spec_level

    @property
    def serving(self) -> bool:
        """Receives requests: Ready (with the readiness gate, only while the agent says Awake) and at
        level 0 by the agent's report (a pod made before the gate is Ready while asleep too)."""
        return (
            self.ready and self.observed == SleepLevel.AWAKE and self.state in (c.STATE_AWAKE, c.STATE_FAILED)
        )

    def note(self, desired: SleepLevel) -> str:
        """Where this pod is, for a status message (`pod b is at L1 (its own sleep-level)`)."""
        own = self.desired(desired)
        mine = f" (its own {c.ANN_SLEEP_LEVEL})" if own is not None and own != desired else ""
        observed = self.observed
        if self.failure() is not None:
            return f"pod {self.name} failed"
        if self.state == c.STATE_SLEEPING:
            return f"pod {self.name} is going to sleep{mine}"
        if self.state == c.STATE_WAKING:
            return f"pod {self.name} is waking{mine}"
        if observed is None:
            return f"pod {self.name} is starting"
        if observed == SleepLevel.AWAKE:
            return f"pod {self.name} is awake{mine}" + ("" if self.serving else ", not ready yet")
        return f"pod {self.name} is at {observed.label}{mine}"


@dataclass
class Fold:
    status: dict[str, Any]
    events: list[tuple[str, str, str]]  # (type, reason, message)


def condition(
    prev: dict[str, dict[str, Any]], ctype: str, ok: bool, reason: str, message: str, gen: int, now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = prev.get(ctype)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    condition: dict[str, Any] = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "lastTransitionTime": since,
        "observedGeneration": gen,
    }
    if message:  # the API client drops empty strings to null, which the schema refuses
        condition["message"] = message
    return condition


def fold(
    *,
    desired: SleepLevel,
    replicas: int,
    generation: int,
    pods: list[PodView],
    previous: dict[str, Any] | None,
    now: datetime | None = None,
    refused: str = "",
) -> Fold:
    """Compute the status for a model whose spec asks for `desired` and whose live pods are `pods`.

    `refused`: why the operator would not write the spec's pods (fields that widen their rights); the
    model is Failed until the spec changes, and its pods, if any, are those of an earlier spec."""
    previous = previous or {}
    stamp = now_iso(now)
    live = [p for p in pods if not p.terminating]
    ready = sum(1 for p in live if p.serving)
    failures = [f for f in (p.failure() for p in live) if f]
    reached: SleepLevel | None
    uniform = True  # every live pod is at the spec's level (no person's override, nothing in transit)

    if desired == SleepLevel.STOP:
        reached = SleepLevel.STOP if not pods else None
        phase = "Stopped" if not pods else "Sleeping"
    else:
        # Each pod's own target: the spec's level, or a person's override of that one pod.
        targets = [(p, p.desired(desired)) for p in live]
        settled = all(t is not None and p.settled(t) for p, t in targets)
        uniform = all(p.at_spec(desired) for p in live)
        observed = [p.observed for p in live]
        # Every replica has reached a level only once the agent has reported on every one of them.
        reached = None if None in observed else min((o for o in observed if o is not None), default=None)
        # A pod meant to be awake that does not serve yet: a cold start, or readiness catching up.
        starting = any(
            t == SleepLevel.AWAKE
            and p.observed in (None, SleepLevel.AWAKE)
            and p.state not in (c.STATE_SLEEPING, c.STATE_WAKING)
            and not p.serving
            for p, t in targets
        )
        if failures:
            phase = "Failed"
        elif len(live) < replicas or starting:
            # Pods still starting (a cold start, or waking from Stop).
            waking = previous.get("sleepLevel") not in (None, SleepLevel.AWAKE.label)
            phase = "Waking" if waking else "Pending"
        elif settled:
            # Every pod is where it is meant to be. Awake as long as one replica serves (a person may
            # keep one awake while the spec sleeps, or put one to sleep while the spec is awake).
            if live:
                phase = "Awake" if ready else "Asleep"
            else:
                phase = "Awake" if desired == SleepLevel.AWAKE else "Asleep"
                reached = desired
        elif any(p.state == c.STATE_WAKING for p in live):
            phase = "Waking"
        elif any(p.state == c.STATE_SLEEPING for p in live):
            phase = "Sleeping"
        else:  # the agent has not picked the change up yet
            deeper = any(t is not None and t > (p.observed or SleepLevel.AWAKE) for p, t in targets)
            phase = "Sleeping" if deeper else "Waking"
        if desired == SleepLevel.AWAKE and not live and replicas == 0:
            reached = SleepLevel.AWAKE
    if refused:
        phase = "Failed"

    problems = [refused, *failures] if refused else failures
    level_name = reached.label if reached is not None else None
    # Reached only when every replica is at the spec's level: a person's override is no arrival.
    done = phase in ("Awake", "Asleep", "Stopped") and reached == desired and uniform
    # What the messages say of the pods that are not simply at the spec's level.
    notes = [] if uniform else [p.note(desired) for p in live if not p.at_spec(desired)]
    if notes:
        ready_message = f"{ready}/{replicas} replicas ready; " + ", ".join(notes)
    else:
        ready_message = f"{ready}/{replicas} replicas ready"
    if phase not in ("Asleep", "Stopped"):
        asleep_message = ""
    elif uniform or desired == SleepLevel.STOP:
        asleep_message = f"every replica is at {level_name}"
    else:
        asleep_message = "every replica is asleep: " + ", ".join(
            f"pod {p.name} at {p.observed.label if p.observed is not None else 'an unknown level'}"
            for p in live
        )
    gen = generation
    prev_conditions = {x["type"]: x for x in previous.get("conditions", []) if "type" in x}
    in_transit = "Transitioning to " + desired.label
    conditions = [
        # Ready: requests are served now, by at least one replica (whatever the phase says of the
        # others: a failed sleep undone, a replica kept awake by a person, one woken before the rest).
        condition(
            prev_conditions,
            "Ready",
            ready > 0,
            "Serving"
            if ready
            else {"Asleep": "Asleep", "Stopped": "Stopped", "Failed": "Failed"}.get(phase, "NotReady"),
            ready_message if ready or phase != "Failed" else "; ".join(problems),
            gen,
            stamp,
        ),
        condition(
            prev_conditions,
            "Asleep",
            phase in ("Asleep", "Stopped"),
            "ReachedLevel" if phase in ("Asleep", "Stopped") else "NotAsleep",
            asleep_message,
            gen,
            stamp,
        ),
        condition(
            prev_conditions,
            "Progressing",
            phase in ("Pending", "Sleeping", "Waking"),
            phase if phase in ("Pending", "Sleeping", "Waking") else "Settled",
            in_transit if phase in ("Pending", "Sleeping", "Waking") else "",
            gen,
            stamp,
        ),
        condition(
            prev_conditions,
            "Degraded",
            bool(problems),
            REFUSED if refused else "SleepOrWakeFailed" if failures else "AsExpected",
            "; ".join(problems),
            gen,
            stamp,
        ),
    ]

    events: list[tuple[str, str, str]] = []
    transition = dict(previous.get("lastTransition") or {})
    degraded_before = prev_conditions.get("Degraded") or {}
    if refused:
        # No transition starts while the spec is refused; the Warning is posted once per refusal.
        if degraded_before.get("reason") != REFUSED or refused not in degraded_before.get("message", ""):
            events.append(("Warning", REFUSED, refused))
    elif transition.get("to") != desired.label:
        transition = {"from": previous.get("sleepLevel"), "to": desired.label, "started": stamp}
        origin = previous.get("sleepLevel") or "nothing"
        events.append(("Normal", "Transition", f"Moving from {origin} to {desired.label}"))
    if done and not transition.get("finished"):
        started = _parse_time(transition.get("started")) or (now or datetime.now(UTC))
        seconds = max(0.0, ((now or datetime.now(UTC)) - started).total_seconds())
        transition.update(finished=stamp, seconds=round(seconds, 3))
        events.append(("Normal", "Reached", f"Every replica reached {desired.label} in {seconds:.1f} s"))
    if failures and previous.get("phase") != "Failed":
        events.append(("Warning", "Failed", "; ".join(failures)))

    status: dict[str, Any] = {
        "phase": phase,
        "sleepLevel": level_name,
        "replicas": len(live),
        "readyReplicas": ready,
        "conditions": conditions,
        "observedGeneration": gen,
    }
    if transition:  # none yet while a new model's spec is refused
        status["lastTransition"] = transition
    return Fold(status=status, events=events)
