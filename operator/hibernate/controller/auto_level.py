# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""Set and clear a ModelDeployment's automatic level: the one API through which automata (the idle
ladder, the gateway's wake on request, an escalation to Stop) change a model's level without
touching the person's `spec` (the rule is in hibernate.api.auto_level).

    set_automatic_level(ns, name, SleepLevel.STOP, source="escalation",
                        reason="CudaSuspend and Checkpoint both failed", generation=md_generation)
    clear_automatic_level(ns, name)

Both write only annotations (a merge patch of metadata.annotations), so GitOps tools, which apply
the person's manifest, neither revert them nor are reverted by them. The operator notices the change
and applies the new effective level (pod annotations, Stop scaling) as it applies a spec change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller import kube


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _patch(
    namespace: str, name: str, annotations: dict[str, str | None], resource_version: str | None
) -> bool:
    meta: dict[str, Any] = {"annotations": annotations}
    if resource_version:
        meta["resourceVersion"] = resource_version
    try:
        kube.custom().patch_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"metadata": meta}
        )
    except ApiException as e:
        if e.status in (404, 409):  # gone, or changed since it was read (with resource_version)
            return False
        raise
    return True


def set_automatic_level(
    namespace: str,
    name: str,
    level: SleepLevel,
    *,
    source: str,
    reason: str,
    generation: int,
    resource_version: str | None = None,
) -> bool:
    """Make `level` the model's automatic level, decided by `source` (e.g. "idle", "gateway",
    "escalation") for `reason` (words a person reads in `kubectl describe`), on the spec of
    `generation` (the `metadata.generation` of the object the decision was made on: if the spec has
    changed since, the decision never takes effect, as a person's change resets automatic levels).

    With `resource_version`, only if the object is still that one (the decision was made on a copy
    that nothing has changed since). Returns False when the object is gone or has changed (decide
    again on a fresh read); raises ApiException on other API errors. Posts no Event: the caller says
    what it did."""
    patch = auto_level.annotations_for(
        level, source=source, reason=reason, generation=generation, time=_now()
    )
    return _patch(namespace, name, patch, resource_version)


def clear_automatic_level(namespace: str, name: str, *, resource_version: str | None = None) -> bool:
    """Remove the automatic level: the spec's level applies again. Same conditions and answers as
    `set_automatic_level`."""
    return _patch(namespace, name, auto_level.cleared(), resource_version)
