# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""Escalation to Stop: the last step of a failed sleep (design.md, "A failed sleep never leaves a half
state": "the failure escalates to the next level that can free the GPU, up to Stop").

The node agent performs levels 1-4. When a sleep fails and the pod can be neither put back nor freed at
CudaSuspend or Checkpoint (or a half-suspended pod cannot be restored), the agent asks on the pod:
`hibernate.dev/escalate-to: Stop`, and leaves the pod alone. Level 5 is the operator's: it stops the
whole ModelDeployment, as an automatic level (hibernate.api.auto_level, source `escalation`), never
through `spec.sleepLevel`, which stays the person's (and the GitOps tool's). A person's next change of
the spec ends it, as it ends any automatic level; the Deployment then starts fresh pods.
"""

from __future__ import annotations

import logging
from typing import Any

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller import kube
from hibernate.controller.auto_level import set_automatic_level
from hibernate.controller.status import PodView

log = logging.getLogger(__name__)
REASON = "EscalatedToStop"  # the Warning Event on the ModelDeployment
ATTEMPTS = 5  # conditional writes of the automatic level before leaving it to the next event


def asks_stop(pod: PodView) -> bool:
    return not pod.terminating and pod.annotations.get(c.ANN_ESCALATE_TO) == c.ESCALATE_TO_STOP


def request(md: dict[str, Any], pods: list[PodView]) -> tuple[str, str] | None:
    """(pod, why) for the first pod that asks for Stop while the model is not stopped already; None
    when no pod asks, or the model's level (automatic or the spec's) is Stop already."""
    if auto_level.effective_level_of(md) == SleepLevel.STOP:
        return None
    for pod in pods:
        if asks_stop(pod):
            return pod.name, pod.failure() or f"pod {pod.name}: a failed sleep could not be undone"
    return None


def stop_if_asked(md: dict[str, Any], pods: list[PodView]) -> str | None:
    """Make Stop the model's automatic level if one of `pods` asks for it. Returns the message of the
    Warning Event to post, or None when nothing was written.

    The write is conditional on the object's resourceVersion (decided on kopf's copy, which may be a
    moment old); on a conflict the decision is made again on a fresh read, so that one request gives
    one Stop and one Event. The operator's own status writes change the resourceVersion too, so a
    busy model can conflict more than once: a few attempts, each on a fresh read."""
    for attempt in range(ATTEMPTS):
        found = request(md, pods)
        if found is None:
            return None
        pod, why = found
        meta = md["metadata"]
        if set_automatic_level(
            meta["namespace"],
            meta["name"],
            SleepLevel.STOP,
            source=c.ESCALATION_SOURCE,
            reason=f"{why} (the agent could not free the GPU otherwise)",
            generation=int(meta.get("generation") or 0),
            resource_version=meta.get("resourceVersion"),
        ):
            spec = (md.get("spec") or {}).get("sleepLevel", SleepLevel.AWAKE.label)
            log.warning("%s/%s: stopped: pod %s asked for it: %s", meta["namespace"], meta["name"], pod, why)
            return (
                f"Stopping the model: pod {pod} could not be put to sleep nor back, and no level the agent "
                f"performs freed its GPU ({why}). The automatic level is Stop; spec.sleepLevel stays {spec}, "
                "and a change of the spec starts the model again"
            )
        if attempt < ATTEMPTS - 1:
            fresh = kube.read_model_deployment(meta["namespace"], meta["name"])
            if fresh is None:
                return None
            md = fresh
    return None  # changed at every attempt: the next pod event or resync decides again
