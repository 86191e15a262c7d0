"""kopf handlers for GpuGroups (docs/gpu-sharing.md): the group's status (members, who holds the GPU,
the switch under way, conditions), its events, the shared DRA claim, and the budget kept when people
wake members by hand. The switches on request are the gateway's (hibernate.gateway.gpu_switch)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec, Lease, make_room_level, now_text, parse_time, read_lease
from hibernate.api.levels import SleepLevel
from hibernate.controller import gpu_placement, handlers, kube
from hibernate.controller.auto_level import set_automatic_level
from hibernate.controller.status import now_iso

log = logging.getLogger(__name__)
GG = (c.GROUP, c.VERSION, c.GPU_GROUP_PLURAL)
STATUS_SECONDS = 1.0  # the status reads only the index; it writes only what changed
ENFORCE_AFTER_SECONDS = 3.0  # over budget this long (a person woke a member by hand): make room

REASON_PLACED = "Placed"
REASON_NOT_PLACEABLE = "NotPlaceable"
REASON_WITHIN = "WithinBudget"
REASON_OVER = "OverBudget"
REASON_SWITCHED = "Switched"
REASON_MADE_ROOM = "MadeRoom"


@dataclass
class _Seen:
    """What this operator process remembers of each group between two timer runs."""

    over_since: dict[tuple[str, str], float] = field(default_factory=dict)


_seen = _Seen()


def _members(
    models: kopf.Index[tuple[str, str], dict[str, Any]], namespace: str, group: str
) -> list[dict[str, Any]]:
    out = []
    for key in models:
        if key[0] != namespace:
            continue
        for md in models[key]:
            ref = (md.get("spec") or {}).get("gpuGroup") or {}
            if ref.get("name") == group and not md["metadata"].get("deletionTimestamp"):
                out.append(md)
    return sorted(out, key=lambda md: str(md["metadata"]["name"]))


def _gpu(md: dict[str, Any]) -> str:
    """Holding, Released or Refused, as the member's status says (Holding until it says otherwise:
    a new member starts awake)."""
    return str((md.get("status") or {}).get("gpu") or "Holding")


def _last_used(md: dict[str, Any], lease: Lease) -> float:
    name = md["metadata"]["name"]
    entry = lease.entry(name)
    annotations = md["metadata"].get("annotations") or {}
    woke = ((md.get("status") or {}).get("lastTransition") or {}).get("finished")
    return max(
        entry.last_used if entry else 0.0,
        entry.since if entry else 0.0,
        parse_time(annotations.get(c.ANN_LAST_ACTIVITY)),
        parse_time(woke),
    )


def _condition(
    previous: dict[str, Any], ctype: str, ok: bool, reason: str, message: str, generation: int
) -> dict[str, Any]:
    old = next((x for x in previous.get("conditions") or [] if x.get("type") == ctype), None)
    status = "True" if ok else "False"
    since = old["lastTransitionTime"] if old and old.get("status") == status else now_iso()
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def group_status(
    group: dict[str, Any], spec: GpuGroupSpec, members: list[dict[str, Any]], dra_served: bool
) -> dict[str, Any]:
    """The GpuGroup's status from its members' statuses and its lease, plus `meantAwake` (the holders
    whose level in effect is Awake), which the caller takes out before writing it."""
    lease = read_lease(group)
    previous = group.get("status") or {}
    generation = int(group["metadata"].get("generation") or 0)
    holders = []
    by_name = {md["metadata"]["name"]: md for md in members}
    for md in members:
        if _gpu(md) != "Holding":
            continue
        name = md["metadata"]["name"]
        entry = lease.entry(name)
        used = _last_used(md, lease)
        holders.append(
            {
                "name": name,
                "since": now_text(entry.since) if entry and entry.since else None,
                "lastUsed": now_text(used) if used else None,
            }
        )
    refused = [f"{md['metadata']['name']}: {_degraded(md)}" for md in members if _gpu(md) == "Refused"]
    if spec.placement.mode == "DRA" and not dra_served:
        refused.insert(0, f"this cluster does not serve {gpu_placement.DRA_API}: DRA placement needs it")
    placeable = _condition(
        previous,
        "Placeable",
        not refused,
        REASON_NOT_PLACEABLE if refused else REASON_PLACED,
        "; ".join(refused) if refused else f"{spec.placement.mode}: every member can share the GPU",
        generation,
    )
    # Over budget: more members meant to be awake than maxAwake (one on its way to sleep still holds
    # its memory, but it is already making room).
    wanted = [h for h in holders if _meant_awake(by_name[h["name"]])]
    over = len(wanted) > spec.max_awake
    within = _condition(
        previous,
        "WithinBudget",
        not over,
        REASON_OVER if over else REASON_WITHIN,
        (
            f"{len(holders)} members hold the GPU ({', '.join(h['name'] for h in holders)}); "
            f"maxAwake is {spec.max_awake}"
        )
        if over
        else f"{len(holders)} of {spec.max_awake} may hold the GPU",
        generation,
    )
    handing = next((e for e in lease.holders if e.handover_to), None)
    return {
        "meantAwake": [h["name"] for h in wanted],
        "members": [md["metadata"]["name"] for md in members],
        "holders": holders,
        "awake": len(holders),
        "holding": ",".join(h["name"] for h in holders) or None,
        "switching": (
            {"from": handing.name, "to": handing.handover_to, "at": now_text(handing.handover_since or 0.0)}
            if handing
            else None
        ),
        "lastSwitch": lease.last_switch,
        "conditions": [placeable, within],
        "observedGeneration": generation,
    }


def _meant_awake(md: dict[str, Any]) -> bool:
    return auto_level.effective_level_of(md) == SleepLevel.AWAKE


def _degraded(md: dict[str, Any]) -> str:
    conditions = (md.get("status") or {}).get("conditions") or []
    found = next((x for x in conditions if x.get("type") == "Degraded"), None)
    return str((found or {}).get("message") or "cannot be placed")


def _ref(group: dict[str, Any]) -> kopf.Body:
    meta = group["metadata"]
    return cast(
        kopf.Body,
        {
            "apiVersion": c.API_VERSION,
            "kind": c.GPU_GROUP_KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        },
    )


def _changed_conditions(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    before = {x.get("type"): x for x in old.get("conditions") or []}
    return [x for x in new["conditions"] if (before.get(x["type"]) or {}).get("status") != x["status"]]


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


def _spec(group: dict[str, Any]) -> GpuGroupSpec:
    try:
        return GpuGroupSpec.model_validate(group.get("spec") or {})
    except ValueError as e:
        raise kopf.PermanentError(f"invalid spec: {e}") from e


@kopf.on.resume(*GG)
@kopf.on.create(*GG)
@kopf.on.update(*GG, field="spec")
def group_changed(
    body: kopf.Body, namespace: str | None, name: str, reason: str, memo: Any, **kwargs: Any
) -> None:
    """A new or changed group: its DRA claim, then the pod templates (placement) of the members that
    need it: all of them when the spec changed; those refused before (the group did not exist yet)
    when it is new. The others are reconciled by their own handlers."""
    group = _plain(body)
    spec = _spec(group)
    if spec.placement.mode == "DRA" and kube.serves(gpu_placement.DRA_API):
        kube.server_side_apply(gpu_placement.resource_claim(group, spec))
    ctx = memo.ctx
    for md in _members(kwargs["models"], namespace or "", name):
        key = (namespace or "", md["metadata"]["name"])
        if reason == "update" or key in ctx.gpu_refused:
            handlers.reconcile_member(md, key[0], key[1], memo, kwargs)


@kopf.timer(*GG, interval=STATUS_SECONDS, initial_delay=0.5)
def group_status_timer(body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> None:
    """Level-based: the status from the members as they are now; events for what changed; the budget
    kept when people wake members by hand."""
    namespace = namespace or ""
    group = _plain(body)
    spec = _spec(group)
    members = _members(kwargs["models"], namespace, name)
    dra = spec.placement.mode != "DRA" or kube.serves(gpu_placement.DRA_API)
    status = group_status(group, spec, members, dra)
    meant_awake: list[str] = status.pop("meantAwake")
    previous = group.get("status") or {}
    for cond in _changed_conditions(previous, status):
        if cond["status"] == "False" or cond["type"] in {
            x.get("type") for x in previous.get("conditions") or []
        }:
            kind = "Normal" if cond["status"] == "True" else "Warning"
            kopf.event(_ref(group), type=kind, reason=cond["reason"], message=cond["message"])
    switch = status["lastSwitch"]
    if switch and switch != previous.get("lastSwitch"):
        message = (
            f"{switch.get('from')} made room for {switch.get('to')} in {switch.get('seconds')} s "
            f"({switch.get('result')})"
        )
        kind = "Normal" if switch.get("result") == "ok" else "Warning"
        kopf.event(_ref(group), type=kind, reason=REASON_SWITCHED, message=message)
    if _differs(previous, status):
        kube.patch_gpu_group_status(namespace, name, status)
    _keep_budget(group, spec, members, status, meant_awake)


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _keep_budget(
    group: dict[str, Any],
    spec: GpuGroupSpec,
    members: list[dict[str, Any]],
    status: dict[str, Any],
    meant_awake: list[str],
) -> None:
    """More members hold the GPU than maxAwake (a person woke one by hand, or set two Awake): after a
    short grace, the least recently used one that may be put to sleep goes to its makeRoomLevel."""
    key = (group["metadata"]["namespace"], group["metadata"]["name"])
    if len(meant_awake) <= spec.max_awake or status["switching"] is not None:
        _seen.over_since.pop(key, None)
        return
    now = time.time()
    since = _seen.over_since.setdefault(key, now)
    if now - since < ENFORCE_AFTER_SECONDS:
        return
    lease = read_lease(group)
    by_name = {md["metadata"]["name"]: md for md in members}
    candidates = []
    for name in meant_awake:
        md = by_name[name]
        entry = lease.entry(name)
        if entry is not None and entry.since + spec.min_awake_seconds > now:
            continue
        candidates.append((_last_used(md, lease), name))
    if not candidates:
        return
    _, victim = min(candidates)
    md = by_name[victim]
    ref = (md.get("spec") or {}).get("gpuGroup") or {}
    level = make_room_level(ref.get("makeRoomLevel") or spec.make_room_level)
    reason = (
        f"GpuGroup {key[1]} allows {spec.max_awake} awake and {len(meant_awake)} were: {victim} was the "
        "least recently used"
    )
    done = set_automatic_level(
        key[0],
        victim,
        level,
        source=c.GPU_GROUP_SOURCE,
        reason=reason,
        generation=int(md["metadata"].get("generation") or 0),
        resource_version=md["metadata"].get("resourceVersion"),
    )
    if done:
        _seen.over_since.pop(key, None)
        log.info("GpuGroup %s/%s: %s to %s (over budget)", key[0], key[1], victim, level.label)
        kopf.event(
            _ref(group),
            type="Warning",
            reason=REASON_MADE_ROOM,
            message=f"{victim} to {level.label}: {reason}",
        )
