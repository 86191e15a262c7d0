"""Stop with a snapshot (docs/snapshots.md): the operator's side.

Before a Stop scales the Deployment to zero, the operator asks the node agent of ONE replica for a
snapshot of its engine (`hibernate.dev/snapshot-request` on that pod) and waits, bounded by
`spec.stop.timeoutSeconds`, for the agent's answer on the same pod (`hibernate.dev/snapshot`). A
snapshot taken is recorded in `status.snapshot` (node, spec hash, size, time), with a Normal event;
one that fails, times out or cannot be asked for gives a Warning event saying why. Either way the
Deployment then scales to zero: a Stop never fails because of its snapshot.

The wait runs in a thread of its own per model (one GET of the pod every POLL_SECONDS), so that the
kopf handlers stay free; while it runs, the reconcilers leave the Deployment's replicas as they are.
Where the operator restarts during the wait, the request on the pod is found again and waited for
until its own deadline (its `requested` time plus the timeout): never a second request.

A wake from Stop gives the new pods what they need to restore that snapshot (pod_template_restore):
the init's restore wait, the snapshot's node and spec hash, and a preference for that node, unless
the snapshot is on the volume that every node's agent mounts (`shared`): then any node restores it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import kube
from hibernate.controller.status import now_iso

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
REASON_TAKEN = "SnapshotTaken"
REASON_FAILED = "SnapshotFailed"
TOOLS_NEEDED = "Checkpoint needs the hibernate pod init (run the operator with --tools-image)"


@dataclass
class Job:
    """A snapshot being waited for, before a Stop."""

    thread: threading.Thread
    cancel: threading.Event  # the ModelDeployment is gone: the wait ends
    woken: threading.Event = field(default_factory=threading.Event)  # the level left Stop meanwhile


def enabled(spec: ModelDeploymentSpec, tools_image: str) -> bool:
    """Snapshots at Stop: on by default wherever Checkpoint is possible (the pods have the hibernate
    pod init, which waits for a restore); `spec.stop.snapshot: false` turns them off."""
    return bool(tools_image) and spec.stop.snapshot is not False


def usable(md: dict[str, Any], spec: ModelDeploymentSpec, tools_image: str) -> dict[str, Any] | None:
    """The recorded snapshot that the new pods of a wake may restore: snapshots on, and taken from
    the engine spec that the pods run now (its hash). None otherwise."""
    snap = (md.get("status") or {}).get("snapshot")
    if not enabled(spec, tools_image) or not isinstance(snap, dict):
        return None
    if snap.get("specHash") != spec.engine_hash() or not snap.get("node"):
        return None
    return snap


def restore_source(snap: dict[str, Any]) -> str:
    """The value of `hibernate.dev/restore-from` on the pod template: what the agent restores from,
    and the canary the restored engine must answer (as the agent wrote it: max_tokens)."""
    source: dict[str, Any] = {"node": snap["node"], "specHash": snap["specHash"], "taken": snap.get("taken")}
    if snap.get("shared") is True:
        source["shared"] = True
    check = snap.get("check")
    if isinstance(check, dict):
        source["check"] = {
            "model": check.get("model"),
            "prompt": check.get("prompt"),
            "max_tokens": check.get("maxTokens"),
            "text": check.get("text"),
            "taken": snap.get("taken"),
        }
    return json.dumps(source, sort_keys=True)


def pod_template_restore(template: dict[str, Any], snap: dict[str, Any], wait_seconds: int) -> None:
    """Marks a pod template for restore from `snap`: the init waits `wait_seconds` for the agent (then
    starts the engine cold), and the scheduler prefers the node that holds the snapshot (none for a
    shared one: every node's agent reaches it)."""
    template["metadata"]["annotations"][c.ANN_RESTORE_FROM] = restore_source(snap)
    pod = template["spec"]
    engine = next(x for x in pod["containers"] if x["name"] == c.ENGINE_CONTAINER)
    engine["env"] = [e for e in engine["env"] if e.get("name") != c.ENV_RESTORE_WAIT]
    engine["env"].append({"name": c.ENV_RESTORE_WAIT, "value": str(wait_seconds)})
    if snap.get("shared") is True:
        return
    affinity = pod["affinity"] = json.loads(json.dumps(pod.get("affinity") or {}))  # the spec's stays
    preferred = affinity.setdefault("nodeAffinity", {}).setdefault(
        "preferredDuringSchedulingIgnoredDuringExecution", []
    )
    preferred.append(
        {
            "weight": 100,
            "preference": {
                "matchExpressions": [{"key": c.HOSTNAME_LABEL, "operator": "In", "values": [snap["node"]]}]
            },
        }
    )


def condition_of(md: dict[str, Any], spec: ModelDeploymentSpec, tools_image: str) -> tuple[bool, str, str]:
    """(status, reason, message) of the SnapshotReady condition."""
    snap = (md.get("status") or {}).get("snapshot")
    if spec.stop.snapshot is False:
        return False, "Disabled", "spec.stop.snapshot is false: a wake from Stop starts cold"
    if not tools_image:
        return False, "Disabled", f"{TOOLS_NEEDED}: a wake from Stop starts cold"
    if not isinstance(snap, dict):
        return False, "NotTaken", "no snapshot yet: the next Stop takes one"
    place = (
        f"on the shared volume (taken on node {snap.get('node')})"
        if snap.get("shared") is True
        else f"on node {snap.get('node')}"
    )
    where = f"{place}, {_size(snap.get('bytes'))}, taken {snap.get('taken')}"
    if snap.get("specHash") != spec.engine_hash():
        return (
            False,
            "Outdated",
            f"the snapshot {where} was taken from another engine image, args or model: not used; "
            "the next Stop replaces it",
        )
    return True, "Ready", f"a wake from Stop restores the snapshot {where}"


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "size unknown"
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


# -- before a Stop ------------------------------------------------------------------------------


def hold_stop(md: dict[str, Any], spec: ModelDeploymentSpec, ctx: Any) -> bool:
    """Whether a Stop must keep the Deployment's replicas for now: a snapshot is being taken first.

    Starts the wait where none runs yet. `ctx` is the OperatorContext (its `snapshot_jobs`,
    `snapshot_done`, `tools_image`)."""
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    if not enabled(spec, ctx.tools_image):
        return False
    with ctx.guard:
        if key in ctx.snapshot_done:
            return False
        job = ctx.snapshot_jobs.get(key)
        if job is not None and job.thread.is_alive():
            return True
    dep = kube.read_deployment(*key)
    live = [p for p in kube.list_pods(*key) if not (p.get("metadata") or {}).get("deletionTimestamp")]
    if dep is None or not (dep.get("spec") or {}).get("replicas") or not live:
        with ctx.guard:
            ctx.snapshot_done.add(key)  # nothing running to take a snapshot of
        return False
    with ctx.guard:
        job = ctx.snapshot_jobs.get(key)
        if job is not None and job.thread.is_alive():
            return True
        job = Job(threading.Thread(), threading.Event())
        job.thread = threading.Thread(
            target=_run, args=(ctx, md, spec, live, job), name=f"snapshot {key[0]}/{key[1]}", daemon=True
        )
        ctx.snapshot_jobs[key] = job
        job.thread.start()
    return True


def not_stopping(key: tuple[str, str], ctx: Any) -> None:
    """The model's level is not Stop (any more): the next Stop takes a new snapshot. A wait under way
    goes on: the agent may be dumping the engine of its replica, and a dump is never cut short (the
    engine is at level 2 and CUDA suspended by then; criu is not stopped halfway). A snapshot it takes
    is recorded, and the pod template then names it, so the Deployment replaces its pods, which restore
    it (the snapshotted replica has no engine left); the replicas are never scaled to zero. A snapshot
    that fails is not recorded: the agent woke its engine back, and the pods stay as they are."""
    with ctx.guard:
        ctx.snapshot_done.discard(key)
        job = ctx.snapshot_jobs.get(key)
        if job is not None:
            job.woken.set()


def choose(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The replica to take the snapshot from: on a node, settled (Awake, or asleep in place), not
    failed; serving ones first, then the shallowest level, then by name."""
    candidates = []
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        ann = meta.get("annotations") or {}
        if meta.get("deletionTimestamp") or not spec.get("nodeName"):
            continue
        if ann.get(c.ANN_STATE) not in (c.STATE_AWAKE, c.STATE_ASLEEP):
            continue
        observed = SleepLevel.parse_or_none(ann.get(c.ANN_OBSERVED_LEVEL))
        if observed is None:
            continue
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(x.get("type") == "Ready" and x.get("status") == "True" for x in conditions)
        candidates.append((not ready, int(observed), meta.get("name", ""), pod))
    candidates.sort(key=lambda t: t[:3])
    return candidates[0][3] if candidates else None


def _request_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(c.ANN_SNAPSHOT_REQUEST)
    try:
        request = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return request if isinstance(request, dict) and request.get("id") else None


def answer_of(pod: dict[str, Any], request_id: str) -> dict[str, Any] | None:
    """The agent's answer to the request `request_id` on `pod`, or None (none yet, or another's)."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(c.ANN_SNAPSHOT)
    try:
        answer = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) and answer.get("id") == request_id else None


def late_answer(
    md: dict[str, Any], spec: ModelDeploymentSpec, pod: str, annotations: dict[str, str], ctx: Any
) -> bool:
    """A replica's snapshot answered with no wait for it any more: the Stop was cancelled (the level
    left Stop) and its wait ran out, or the operator restarted meanwhile. The pod's engine is in that
    snapshot, none is left in the pod; the snapshot is recorded where the agent took it from the engine
    spec the pods run now and it is newer than the one recorded, and the pod template then names it,
    so the Deployment replaces the pods with pods that restore it, as for an answer within the wait.
    Returns whether it was recorded. Only for a model whose level is not Stop."""
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    view = {"metadata": {"annotations": annotations}}
    request = _request_of(view)
    answer = answer_of(view, str(request["id"])) if request is not None else None
    if request is None or answer is None or answer.get("error") or not enabled(spec, ctx.tools_image):
        return False
    with ctx.guard:
        job = ctx.snapshot_jobs.get(key)
        if job is not None and job.thread.is_alive():
            return False  # the wait records it itself
    kind, _, message, snap = _outcome(pod, request, answer)
    if snap is None or snap["specHash"] != spec.engine_hash():
        return False
    with ctx.lock_for(key):
        recorded = (ctx.last_status.get(key) or md.get("status") or {}).get("snapshot")
        if isinstance(recorded, dict) and not _newer(snap.get("taken"), recorded.get("taken")):
            return False
        kube.patch_status(*key, {"snapshot": snap})
        previous = ctx.last_status.get(key) or md.get("status") or {}
        ctx.last_status[key] = {**previous, "snapshot": snap}
    message = message.replace(
        "scaling to zero",
        "answered after the Stop's wait, with the level no longer Stop: the pods are replaced, and restore it",
    )
    kube.post_event(md, kind, REASON_TAKEN, message)
    log.info("%s/%s: %s", *key, message)
    from hibernate.controller import reconcile  # reconcile imports this module

    fresh = kube.read_model_deployment(*key)
    if fresh is None or fresh["metadata"].get("deletionTimestamp"):
        return True
    try:
        fresh_spec = ModelDeploymentSpec.model_validate(fresh.get("spec") or {})
    except (ValueError, InvalidSleepLevel):
        return True  # the handlers report it
    fresh.setdefault("status", {})["snapshot"] = snap
    reconcile.apply_workload(fresh, fresh_spec, ctx)
    return True


def _newer(taken: Any, than: Any) -> bool:
    a, b = _parse_time(taken), _parse_time(than)
    return a > b if a is not None and b is not None else str(taken) > str(than)


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _run(
    ctx: Any,
    md: dict[str, Any],
    spec: ModelDeploymentSpec,
    pods: list[dict[str, Any]],
    job: Job,
) -> None:
    meta = md["metadata"]
    key = (meta["namespace"], meta["name"])
    cancel = job.cancel
    try:
        outcome = _take(key, md, spec, pods, cancel)
    except Exception as e:  # a Stop never fails because of its snapshot
        log.exception("%s/%s: the snapshot before Stop failed", *key)
        outcome = ("Warning", REASON_FAILED, f"No snapshot: {e}; scaling to zero without one", None)
    if outcome is None or cancel.is_set():
        log.info("%s/%s: the ModelDeployment is gone: no snapshot awaited any more", *key)
        return
    kind, reason, message, snap = outcome
    # The level may have left Stop before this operator's handler of that change ran (the answer can
    # come first): the ModelDeployment as it is now says so, not only the handler's flag.
    left_stop = job.woken.is_set() or not _still_stopping(key)
    if left_stop:
        message = message.replace("scaling to zero", "the level left Stop meanwhile")
        if snap is not None:
            message += ": the pods are replaced, and restore it"
    with ctx.lock_for(key):
        if snap is not None:
            kube.patch_status(*key, {"snapshot": snap})
            previous = ctx.last_status.get(key) or md.get("status") or {}
            ctx.last_status[key] = {**previous, "snapshot": snap}
    kube.post_event(md, kind, reason, message)
    (log.info if kind == "Normal" else log.warning)("%s/%s: %s", *key, message)
    with ctx.guard:
        if not left_stop:
            ctx.snapshot_done.add(key)
    # Now the Stop itself: scale to zero (with the new snapshot in the template of the next wake).
    from hibernate.controller import reconcile  # reconcile imports this module

    fresh = kube.read_model_deployment(*key)
    if fresh is None or cancel.is_set() or fresh["metadata"].get("deletionTimestamp"):
        return
    try:
        fresh_spec = ModelDeploymentSpec.model_validate(fresh.get("spec") or {})
    except (ValueError, InvalidSleepLevel):
        return  # the handlers report it
    if snap is not None:
        fresh.setdefault("status", {})["snapshot"] = snap  # the read may predate the status write
    reconcile.apply_workload(fresh, fresh_spec, ctx)


def _still_stopping(key: tuple[str, str]) -> bool:
    """Whether the ModelDeployment, read now, still asks for Stop (a gone or invalid one does not)."""
    md = kube.read_model_deployment(*key)
    if md is None or md["metadata"].get("deletionTimestamp"):
        return False
    try:
        spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    except (ValueError, InvalidSleepLevel):
        return False
    return auto_level.effective_level(md, spec.level) == SleepLevel.STOP


def _take(
    key: tuple[str, str],
    md: dict[str, Any],
    spec: ModelDeploymentSpec,
    pods: list[dict[str, Any]],
    cancel: threading.Event,
) -> tuple[str, str, str, dict[str, Any] | None] | None:
    """Asks for the snapshot (or finds the request an earlier operator made) and waits for the answer.
    Returns (event type, reason, message, the status record or None); None when cancelled."""
    namespace, _ = key
    timeout = spec.stop.timeout_seconds
    pod = next((p for p in pods if _request_of(p) is not None), None)
    if pod is not None:
        request = _request_of(pod)
        assert request is not None
    else:
        pod = choose(pods)
        if pod is None:
            return (
                "Warning",
                REASON_FAILED,
                "No snapshot: no replica can take one (none runs on a node, settled awake or asleep in "
                "place); scaling to zero without one",
                None,
            )
        request = {"id": uuid.uuid4().hex[:12], "specHash": spec.engine_hash(), "requested": now_iso()}
        name = pod["metadata"]["name"]
        kube.annotate_pod(
            namespace, name, {c.ANN_SNAPSHOT_REQUEST: json.dumps(request), c.ANN_SNAPSHOT: None}
        )
        log.info("%s/%s: asked pod %s for a snapshot before Stop (request %s)", *key, name, request["id"])
    name = pod["metadata"]["name"]
    requested = _parse_time(request.get("requested")) or datetime.now(UTC)
    deadline = requested + timedelta(seconds=timeout)
    unread: str | None = None  # why the last read of the pod failed: the API server away a moment
    while not cancel.is_set():
        try:
            current = kube.read_pod(namespace, name)
        except kube.API_ERRORS as e:
            why = kube.brief(e)
            if unread is None:  # once, not every poll; the agent's answer waits on the pod
                log.warning("%s/%s: pod %s could not be read (%s); the wait goes on", *key, name, why)
            unread = why
        else:
            unread = None
            if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
                return (
                    "Warning",
                    REASON_FAILED,
                    f"No snapshot: pod {name} went away before its agent answered; scaling to zero without one",
                    None,
                )
            answer = answer_of(current, str(request["id"]))
            if answer is not None:
                return _outcome(name, request, answer)
        if datetime.now(UTC) >= deadline:
            late = (
                f"pod {name} could not be read ({unread})"
                if unread
                else f"the agent of pod {name} did not answer"
            )
            return (
                "Warning",
                REASON_FAILED,
                f"No snapshot: {late} within {timeout} s (spec.stop.timeoutSeconds); scaling to zero "
                "without one",
                None,
            )
        cancel.wait(POLL_SECONDS)
    return None


def _outcome(
    pod: str, request: dict[str, Any], answer: dict[str, Any]
) -> tuple[str, str, str, dict[str, Any] | None]:
    error = answer.get("error")
    node = answer.get("node")
    if error or not node:
        why = error or "the agent's answer names no node"
        return ("Warning", REASON_FAILED, f"No snapshot: pod {pod}: {why}; scaling to zero without one", None)
    snap: dict[str, Any] = {
        "node": str(node),
        "pod": pod,
        "specHash": str(answer.get("specHash") or request.get("specHash") or ""),
        "taken": str(answer.get("taken") or now_iso()),
    }
    if answer.get("shared") is True:
        snap["shared"] = True
    if isinstance(answer.get("bytes"), int):
        snap["bytes"] = answer["bytes"]
    if isinstance(answer.get("seconds"), int | float):
        snap["seconds"] = round(float(answer["seconds"]), 3)
    check = answer.get("check")
    if (
        isinstance(check, dict)
        and all(isinstance(check.get(k), str) for k in ("model", "prompt", "text"))
        and isinstance(check.get("max_tokens"), int)
    ):
        snap["check"] = {
            "model": check["model"],
            "prompt": check["prompt"],
            "maxTokens": check["max_tokens"],
            "text": check["text"],
        }
    message = (
        f"Snapshot of pod {pod} taken on node {node}"
        + (" into the shared volume" if snap.get("shared") else "")
        + f" ({_size(snap.get('bytes'))}"
        + (f", {snap['seconds']:.1f} s" if "seconds" in snap else "")
        + "): the next wake restores it; scaling to zero"
    )
    return ("Normal", REASON_TAKEN, message, snap)
