"""Idle auto-sleep: which level an idle model should be at now, and its next step. Pure: no API calls.

The ladder (`spec.idle`) counts from the model's last activity: the gateway's
`hibernate.dev/last-activity` annotation, the `status.idle.lastActivity` we wrote before (which
also carries the requests the engines counted themselves, see engine_activity), the
ModelDeployment's creation, or the moment it last became awake, whichever is latest (a model woken
by a person must not fall back asleep at once because nobody sent it a request for hours). A wake
still in progress counts as activity now.

The level it moves is the model's effective level (hibernate.api.auto_level): its decisions are
automatic levels, never spec changes. Steps only go deeper: the ladder never wakes a model, and a
deeper level a person chose by hand is never made shallower. Several steps due at once (an operator
that was down) go straight to the deepest one due; there is no point in passing through the
shallower ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from hibernate.api.v1alpha1 import IdleSpec, ModelDeploymentSpec

# Phases in which a wake (or the first start) is still under way: the model is not idle.
_STARTING = ("Pending", "Waking")


@dataclass(frozen=True)
class Plan:
    """Where an idle model should be now and what comes next."""

    level: SleepLevel  # the level it should be at now (never shallower than the current one)
    next_level: SleepLevel | None  # the next deeper step, None at the end of the ladder
    next_at: datetime | None

    def moves(self, current: SleepLevel) -> bool:
        return self.level > current


def plan(idle: IdleSpec, last_activity: datetime, current: SleepLevel, now: datetime) -> Plan:
    """The level due at `now` for a model idle since `last_activity` whose desired level is `current`."""
    steps = sorted(idle.steps(), key=lambda step: step[0])
    level = current
    for after, step_level in steps:
        if last_activity + after <= now and step_level > level:
            level = step_level
    for after, step_level in steps:
        due = last_activity + after
        if due > now and step_level > level:
            return Plan(level=level, next_level=step_level, next_at=due)
    return Plan(level=level, next_level=None, next_at=None)


def parse_time(text: object) -> datetime | None:
    """RFC 3339 (`2025-01-02T03:04:05.678Z`, any offset) → aware datetime; None when absent or bad."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, like the rest of the status."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def woken_at(status: dict[str, Any], now: datetime) -> datetime | None:
    """When the model last became awake (from `status.lastTransition`); `now` while a wake is under way."""
    transition = status.get("lastTransition") or {}
    if transition.get("to") != SleepLevel.AWAKE.label:
        return None
    finished = parse_time(transition.get("finished"))
    if finished is not None:
        return finished
    if status.get("phase") in _STARTING:
        return now
    return parse_time(transition.get("started"))  # a wake that failed: counted from its start


def last_activity(md: dict[str, Any], now: datetime, engine_activity: datetime | None = None) -> datetime:
    """The latest of: the activity annotation, status.idle.lastActivity, creation, the last wake, and
    `engine_activity` (when the engines' own counters last moved)."""
    meta = md.get("metadata") or {}
    status = md.get("status") or {}
    candidates = [
        parse_time((meta.get("annotations") or {}).get(c.ANN_LAST_ACTIVITY)),
        parse_time((status.get("idle") or {}).get("lastActivity")),
        parse_time(meta.get("creationTimestamp")),
        woken_at(status, now),
        engine_activity,
    ]
    found = [moment for moment in candidates if moment is not None]
    # Activity stamped in the future (a skewed clock) counts as now, so the ladder cannot stall.
    return min(max(found), now) if found else now


@dataclass(frozen=True)
class Decision:
    """What the idle timer does for one ModelDeployment at one tick."""

    current: SleepLevel  # the effective level: the automatic one in effect, else the spec's
    move_to: SleepLevel | None  # a deeper automatic level to set now, or None
    idle_status: dict[str, str | None] | None  # status.idle to write, or None to leave it
    idle_for: timedelta  # how long the model has been without activity
    skip: str = ""  # why nothing is decided this tick (status behind the spec, …)


def decide(
    md: dict[str, Any], now: datetime | None = None, engine_activity: datetime | None = None
) -> Decision:
    """Decide for a ModelDeployment as read from the API (a plain dict); `engine_activity`: when its
    engines last counted a request (engine_activity.EngineActivity), if they did."""
    now = now or datetime.now(UTC)
    meta = md.get("metadata") or {}
    status = md.get("status") or {}
    try:
        spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        current = auto_level.effective_level(md, spec.level)
    except (ValueError, InvalidSleepLevel) as e:
        return Decision(SleepLevel.AWAKE, None, None, timedelta(0), skip=f"invalid spec: {e}")
    if spec.idle is None:
        return Decision(current, None, None, timedelta(0), skip="no idle spec")
    observed = status.get("observedGeneration")
    if not isinstance(observed, int) or observed < int(meta.get("generation") or 0):
        # The operator has not folded the current spec yet (a wake may have been asked a moment
        # ago, and our copy may be older than it): decide on the next tick, on a settled view.
        return Decision(current, None, None, timedelta(0), skip="status behind the spec")
    folded_for = status.get("effectiveLevel")
    if folded_for is not None and folded_for != current.label:
        # An automatic level set a moment ago (a wake on request, say) that the status does not
        # show yet: the phase and the last transition are about the level before it.
        return Decision(current, None, None, timedelta(0), skip="status behind the automatic level")
    if current == SleepLevel.AWAKE and status.get("phase") in _STARTING:
        return Decision(current, None, None, timedelta(0), skip="starting or waking")
    since = last_activity(md, now, engine_activity)
    result = plan(spec.idle, since, current, now)
    idle_status = {  # the next step after the move, if there is one
        "lastActivity": format_time(since),
        "nextLevel": result.next_level.label if result.next_level is not None else None,
        "nextAt": format_time(result.next_at) if result.next_at is not None else None,
    }
    return Decision(
        current=current,
        move_to=result.level if result.moves(current) else None,
        idle_status=idle_status,
        idle_for=now - since,
    )


def same_idle_status(written: object, wanted: dict[str, str | None]) -> bool:
    """Whether `status.idle` as it is already says what we would write (absent keys mean None)."""
    if not isinstance(written, dict):
        return False
    return all(written.get(key) == value for key, value in wanted.items())
