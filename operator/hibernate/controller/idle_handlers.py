# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""The idle timer: moves an idle ModelDeployment down its `spec.idle` ladder (the logic is in `idle`).

Every HIBERNATE_IDLE_INTERVAL seconds (default 15) for each ModelDeployment with `spec.idle`:
decide on kopf's copy; if a deeper level is due, read the object again and set `spec.sleepLevel`
only if nobody wrote the object since (a request that woke it a moment ago, or new activity, wins);
then keep `status.idle` {lastActivity, nextLevel, nextAt} up to date (a merge patch of that key only).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller import idle, kube

MD = (c.GROUP, c.VERSION, c.PLURAL)
SOURCE = "idle"  # recorded in ANN_LEVEL_SOURCE for the levels this timer sets


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


def _read(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = cast(
            dict[str, Any],
            kube.custom().get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name),
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return obj


def set_level_if_unchanged(namespace: str, name: str, level: SleepLevel, resource_version: str) -> bool:
    """`kube.patch_spec_level`, but only if the object is still at `resource_version` (False on 409)."""
    body = {
        "metadata": {"resourceVersion": resource_version, "annotations": {c.ANN_LEVEL_SOURCE: SOURCE}},
        "spec": {"sleepLevel": level.label},
    }
    try:
        kube.custom().patch_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name, body)
    except ApiException as e:
        if e.status in (404, 409):
            return False
        raise
    return True


def _seconds(decision: idle.Decision) -> str:
    seconds = decision.idle_for.total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@kopf.timer(*MD, interval=INTERVAL, when=_has_idle)
def idle_ladder(body: kopf.Body, namespace: str | None, name: str, logger: Any, **_: Any) -> None:
    namespace = namespace or ""
    md = _plain(body)
    decision = idle.decide(md, datetime.now(UTC))
    if decision.move_to is not None:
        # kopf's copy may be older than a wake or an activity mark: decide again on a fresh read,
        # and write only if the object is still that one.
        fresh = _read(namespace, name)
        if fresh is None:
            return
        md = fresh
        decision = idle.decide(md, datetime.now(UTC))
        target = decision.move_to
        if target is not None:
            if not set_level_if_unchanged(namespace, name, target, md["metadata"]["resourceVersion"]):
                logger.info("idle: %s/%s changed while deciding; deciding again next tick", namespace, name)
                return
            TRANSITIONS.labels(level=target.label).inc()
            message = (
                f"No requests for {_seconds(decision)}: idle ladder moves the model from "
                f"{decision.current.label} to {target.label}"
            )
            logger.info("idle: %s/%s: %s", namespace, name, message)
            kopf.event(cast(kopf.Body, md), type="Normal", reason="IdleSleep", message=message)
    wanted = decision.idle_status
    if wanted is not None and not idle.same_idle_status((md.get("status") or {}).get("idle"), wanted):
        try:
            kube.patch_status(namespace, name, {"idle": wanted})
        except ApiException as e:
            if e.status != 404:
                raise
