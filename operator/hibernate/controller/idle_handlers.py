# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""The idle timer: moves an idle ModelDeployment down its `spec.idle` ladder (the logic is in `idle`).

Every HIBERNATE_IDLE_INTERVAL seconds (default 15) for each ModelDeployment with `spec.idle`: read
the request counters of its awake engines (engine_activity: direct traffic counts too); decide on
kopf's copy; if a deeper level is due, read the object again and set the automatic level
(auto_level.set_automatic_level; never `spec`, which is the person's) only if nobody wrote the object
since (a request that woke it a moment ago, or new activity, wins); then keep `status.idle`
{lastActivity, nextLevel, nextAt} up to date (a merge patch of that key only).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from hibernate.api import constants as c
from hibernate.api.auto_level import SOURCE_IDLE
from hibernate.api.levels import SleepLevel
from hibernate.controller import idle, kube
from hibernate.controller.auto_level import set_automatic_level
from hibernate.controller.engine_activity import EngineActivity
from hibernate.controller.status import PodView

MD = (c.GROUP, c.VERSION, c.PLURAL)
SOURCE = SOURCE_IDLE  # the source of the automatic levels this timer sets
ENGINES = EngineActivity()


def interval_seconds() -> float:
    try:
        value = float(os.environ.get("HIBERNATE_IDLE_INTERVAL", "15"))
    except ValueError:
        return 15.0
    return value if value > 0 else 15.0


INTERVAL = interval_seconds()

TRANSITIONS = Counter(
    "hibernate_idle_transitions_total",
    "Levels set by the idle timer, by the level it set.",
    ["level"],
)
for _level in SleepLevel:
    if _level != SleepLevel.AWAKE:
        TRANSITIONS.labels(level=_level.label)  # every series exists from the start, at 0


def _has_idle(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("idle"))


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


def _seconds(decision: idle.Decision) -> str:
    seconds = decision.idle_for.total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _engine_activity(md: dict[str, Any], namespace: str, name: str, pods: list[PodView]) -> datetime | None:
    """Now, if an awake engine of the model counted a request since the last tick (or runs one)."""
    try:
        port = int(((md.get("spec") or {}).get("engine") or {}).get("port") or 8000)
    except (TypeError, ValueError):
        return None
    return datetime.now(UTC) if ENGINES.active(namespace, name, pods, port) else None


@kopf.timer(*MD, interval=INTERVAL, when=_has_idle)
def idle_ladder(body: kopf.Body, namespace: str | None, name: str, logger: Any, **kwargs: Any) -> None:
    namespace = namespace or ""
    md = _plain(body)
    pods_by_model: kopf.Index[tuple[str, str], PodView] = kwargs["pods_by_model"]
    engines = _engine_activity(md, namespace, name, list(pods_by_model.get((namespace, name), [])))
    decision = idle.decide(md, datetime.now(UTC), engines)
    if decision.move_to is not None:
        # kopf's copy may be older than a wake or an activity mark: decide again on a fresh read,
        # and write only if the object is still that one.
        fresh = kube.read_model_deployment(namespace, name)
        if fresh is None:
            return
        md = fresh
        decision = idle.decide(md, datetime.now(UTC), engines)
        target = decision.move_to
        if target is not None:
            message = (
                f"No requests for {_seconds(decision)}: idle ladder moves the model from "
                f"{decision.current.label} to {target.label}"
            )
            if not set_automatic_level(
                namespace,
                name,
                target,
                source=SOURCE,
                reason=message,
                generation=int(md["metadata"].get("generation") or 0),
                resource_version=md["metadata"]["resourceVersion"],
            ):
                logger.info("idle: %s/%s changed while deciding; deciding again next tick", namespace, name)
                return
            TRANSITIONS.labels(level=target.label).inc()
            logger.info("idle: %s/%s: %s", namespace, name, message)
            kopf.event(cast(kopf.Body, md), type="Normal", reason="IdleSleep", message=message)
    wanted = decision.idle_status
    if wanted is not None and not idle.same_idle_status((md.get("status") or {}).get("idle"), wanted):
        try:
            kube.patch_status(namespace, name, {"idle": wanted})
        except ApiException as e:
            if e.status != 404:
                raise
