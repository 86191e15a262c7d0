"""Reconciliation steps, as plain functions over the API (called from the kopf handlers)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec
from hibernate.api.levels import SleepLevel
from hibernate.api.pod_fields import PodFieldPolicy, refusals
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import kube, snapshots, workload
from hibernate.controller.gpu_placement import DRA_API, GroupPlacement
from hibernate.controller.gpu_placement import problems as placement_problems
from hibernate.controller.status import Fold, PodView, condition, fold, now_iso
from hibernate.faults import fault_point

log = logging.getLogger(__name__)


@dataclass
class OperatorContext:
    """Configuration plus the small in-memory caches one operator process keeps (kopf's memo)."""

    tools_image: str = ""
    # None: the operator owns no NetworkPolicy (the cluster's CNI enforces none, or its admin writes them).
    network: workload.EngineNetwork | None = None
    pod_fields: PodFieldPolicy = field(default_factory=PodFieldPolicy)
    locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    last_status: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # (generation, effective level) of the last full reconcile of each model: a change of the
    # automatic level (annotations, no new generation) is noticed against it.
    applied: dict[tuple[str, str], tuple[int, SleepLevel]] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)
    # Why a GpuGroup member's pods cannot be placed (hibernate.controller.gpu_placement), per model.
    gpu_refused: dict[tuple[str, str], str] = field(default_factory=dict)
    # Stop with a snapshot (hibernate.controller.snapshots): the waits under way, and the models whose
    # current Stop has had its snapshot (taken, failed or not possible) and may scale to zero.
    snapshot_jobs: dict[tuple[str, str], snapshots.Job] = field(default_factory=dict)
    snapshot_done: set[tuple[str, str]] = field(default_factory=set)

    def lock_for(self, key: tuple[str, str]) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(key, threading.Lock())

    def forget(self, key: tuple[str, str]) -> None:
        with self.guard:
            self.locks.pop(key, None)
            self.last_status.pop(key, None)
            self.applied.pop(key, None)
            self.gpu_refused.pop(key, None)
            self.snapshot_done.discard(key)
            job = self.snapshot_jobs.pop(key, None)
            if job is not None:
                job.cancel.set()


def target_level(md: dict[str, Any], spec: ModelDeploymentSpec) -> SleepLevel:
    """The level the operator applies: the automatic level in effect (the idle ladder's, a wake on
    request's), else spec.sleepLevel (hibernate.api.auto_level)."""
    return auto_level.effective_level(md, spec.level)


def awake_replicas(spec: ModelDeploymentSpec, level: SleepLevel | None = None) -> int:
    return 0 if (level if level is not None else spec.level) == SleepLevel.STOP else spec.replicas


def apply_workload(md: dict[str, Any], spec: ModelDeploymentSpec, ctx: OperatorContext) -> list[str]:
    """NetworkPolicy, Deployment and Service, owned by the ModelDeployment. Stop scales to zero and
    records the count. The policy comes first, so no engine pod ever runs unprotected. A spec with
    fields that widen a pod's rights gets no Deployment (nor a change of the one it has): returns the
    refusals, which the status reports."""
    if ctx.network is not None:
        kube.server_side_apply(workload.network_policy(md, spec, ctx.network))
    refused = refusals(spec.engine, ctx.pod_fields)
    if refused:
        return refused
    placement, refused = _gpu_group(md, spec, ctx)
    if refused:
        return refused
    level = target_level(md, spec)
    meta = md["metadata"]
    if level != SleepLevel.STOP:
        snapshots.not_stopping((meta["namespace"], meta["name"]), ctx)
    elif snapshots.hold_stop(md, spec, ctx):
        # A snapshot is being taken of one replica: the pods stay until it is (or its wait ends).
        kube.server_side_apply(workload.service(md, spec))
        return []
    restore = snapshots.usable(md, spec, ctx.tools_image)
    dep = workload.deployment(md, spec, awake_replicas(spec, level), ctx.tools_image, placement, restore)
    if level == SleepLevel.STOP:
        dep["metadata"]["annotations"] = {c.ANN_REPLICAS_BEFORE_STOP: str(spec.replicas)}
    kube.server_side_apply(dep)
    fault_point("operator.after-deployment")
    kube.server_side_apply(workload.service(md, spec))
    return []


def _gpu_group(
    md: dict[str, Any], spec: ModelDeploymentSpec, ctx: OperatorContext
) -> tuple[GroupPlacement | None, list[str]]:
    """The member's GpuGroup placement, or why it cannot be placed (remembered for the status)."""
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    if spec.gpu_group is None:
        ctx.gpu_refused.pop(key, None)
        return None, []
    name = spec.gpu_group.name
    obj = kube.read_gpu_group(meta["namespace"], name)
    placement = None
    if obj is not None:
        try:
            placement = GroupPlacement(name, GpuGroupSpec.model_validate(obj.get("spec") or {}))
        except ValueError as e:
            return None, _remember(ctx, key, [f"GpuGroup {name} has an invalid spec: {e}"])
    dra = placement is not None and placement.spec.placement.mode == "DRA" and kube.serves(DRA_API)
    return placement, _remember(ctx, key, placement_problems(placement, name, spec, dra))


def _remember(ctx: OperatorContext, key: tuple[str, str], found: list[str]) -> list[str]:
    if found:
        ctx.gpu_refused[key] = "; ".join(found)
    else:
        ctx.gpu_refused.pop(key, None)
    return found


def level_patch(
    pod: dict[str, Any], level: SleepLevel, drain_seconds: int | None = None
) -> dict[str, str | None] | None:
    """The annotations to write on one pod so that it carries the model's level (and, given
    `drain_seconds`, the drain deadline of its sleeps); None if nothing to do.

    A pod whose recorded model level equals the current one keeps its own sleep-level, which may be a
    person's override; a change of the model's level overrides everyone again.
    """
    meta = pod.get("metadata") or {}
    return _level_patch(
        meta.get("annotations") or {}, bool(meta.get("deletionTimestamp")), level, drain_seconds
    )


def needs_level(pod: PodView, level: SleepLevel, drain_seconds: int | None = None) -> bool:
    """`level_patch` decided from the operator's view of a pod (kopf's pod index)."""
    return _level_patch(pod.annotations, pod.terminating, level, drain_seconds) is not None


def _level_patch(
    annotations: dict[str, str], terminating: bool, level: SleepLevel, drain_seconds: int | None
) -> dict[str, str | None] | None:
    if terminating or level == SleepLevel.STOP:
        return None  # Stop is the operator's scaling; the agent never sees level 5
    patch: dict[str, str | None] = {}
    if annotations.get(c.ANN_SPEC_LEVEL) != level.label or c.ANN_SLEEP_LEVEL not in annotations:
        patch = {c.ANN_SLEEP_LEVEL: level.label, c.ANN_SPEC_LEVEL: level.label}
    if drain_seconds is not None and annotations.get(c.ANN_DRAIN_SECONDS) != str(drain_seconds):
        patch[c.ANN_DRAIN_SECONDS] = str(drain_seconds)
    return patch or None


def ensure_pod_level(
    namespace: str, pod: dict[str, Any] | None, level: SleepLevel, drain_seconds: int | None = None
) -> bool:
    """Give one pod the model's level unless it already has it (or a person's override of it).

    The write is conditional on the pod's resourceVersion: decided on a stale copy, it could undo a
    person's annotation made a moment ago. On a conflict, read the pod again and decide again.
    """
    for _ in range(5):
        if pod is None:
            return False
        patch = level_patch(pod, level, drain_seconds)
        if patch is None:
            return False
        meta = pod["metadata"]
        try:
            kube.annotate_pod(namespace, meta["name"], patch, meta.get("resourceVersion"))
            fault_point("operator.mid-propagate")
            return True
        except kube.Conflict:
            pod = kube.read_pod(namespace, meta["name"])
    raise RuntimeError(f"pod {namespace}/{pod and pod['metadata']['name']} keeps changing; will retry")


def propagate_level(
    namespace: str, name: str, level: SleepLevel, pods: list[dict[str, Any]], drain_seconds: int | None = None
) -> int:
    """Write the desired level onto every pod that needs it; returns how many were patched."""
    patched = 0
    for pod in pods:
        if ensure_pod_level(namespace, pod, level, drain_seconds):
            patched += 1
    if patched:
        log.info("level %s written on %d pod(s) of %s/%s", level.label, patched, namespace, name)
    return patched


def level_first(
    namespace: str, name: str, level: SleepLevel, was: SleepLevel, drain_seconds: int | None = None
) -> int:
    """A change of the effective level between two levels other than Stop changes nothing of the
    owned objects (only Stop scales the Deployment): write it on the pods at once, before the
    reconcile that applies the owned objects again (a GpuGroup read and two applies, which a switch
    would otherwise wait for on each of its two halves). Returns how many pods were patched; 0 for a
    change to or from Stop, which goes through the owned objects first."""
    if SleepLevel.STOP in (level, was):
        return 0
    return propagate_level(namespace, name, level, kube.list_pods(namespace, name), drain_seconds)


def compute_status(
    md: dict[str, Any], spec: ModelDeploymentSpec, pods: list[PodView], ctx: OperatorContext
) -> Fold:
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    previous = ctx.last_status.get(key) or md.get("status") or {}
    level = target_level(md, spec)
    result = fold(
        desired=level,
        replicas=awake_replicas(spec, level),
        generation=int(meta.get("generation") or 0),
        pods=pods,
        previous=previous,
        refused="; ".join([*refusals(spec.engine, ctx.pod_fields), *_gpu_refusal(key, ctx)]),
    )
    # What the fold was made for: the gateway and the idle timer know from it that the status has
    # caught up with an automatic level (which, unlike a spec change, bumps no generation).
    result.status["effectiveLevel"] = level.label
    auto = auto_level.automatic_level(md)
    result.status["automaticLevel"] = auto.to_status() if auto is not None else None  # None: removed
    result.status["gpu"] = gpu_column(spec, level, result.status.get("phase"), key in ctx.gpu_refused)
    # The snapshot a wake from Stop restores: recorded by the Stop that took it (snapshots.py).
    result.status["snapshot"] = previous.get("snapshot")
    ok, reason, message = snapshots.condition_of({"status": previous}, spec, ctx.tools_image)
    earlier = {x["type"]: x for x in previous.get("conditions", []) if "type" in x}
    result.status["conditions"].append(
        condition(
            earlier,
            c.CONDITION_SNAPSHOT_READY,
            ok,
            reason,
            message,
            int(meta.get("generation") or 0),
            now_iso(),
        )
    )
    return result


def _gpu_refusal(key: tuple[str, str], ctx: OperatorContext) -> list[str]:
    found = ctx.gpu_refused.get(key)
    return [found] if found else []


def gpu_column(spec: ModelDeploymentSpec, level: SleepLevel, phase: str | None, refused: bool) -> str | None:
    """`status.gpu` (the GPU column): whether a GpuGroup member holds the group's GPU now. It holds it
    while awake and until it has settled asleep (a sleep under way still has its memory)."""
    if spec.gpu_group is None:
        return None  # removed by the merge patch
    if refused:
        return "Refused"
    if level != SleepLevel.AWAKE and phase in ("Asleep", "Stopped"):
        return "Released"
    return "Holding"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keep = ("idle",)  # owned by the idle timer, not by the fold

    def mine(status: dict[str, Any]) -> dict[str, Any]:
        # A key set to None is removed by the merge patch: absent and None say the same.
        return {k: v for k, v in status.items() if k not in keep and v is not None}

    return mine(a) == mine(b)


def write_status(md: dict[str, Any], result: Fold, ctx: OperatorContext) -> bool:
    """Patch the status subresource when it changed; returns whether it did."""
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    previous = ctx.last_status.get(key) or md.get("status") or {}
    if _same(previous, result.status):
        return False
    fault_point("operator.before-status")
    kube.patch_status(meta["namespace"], meta["name"], result.status)
    fault_point("operator.after-status")  # before the caller posts the fold's Events
    ctx.last_status[key] = {**previous, **result.status}
    return True
