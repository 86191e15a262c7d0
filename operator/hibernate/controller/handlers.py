"""kopf handlers: one small handler per reaction; the work is in `reconcile`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import escalation, kube, metrics, reconcile, snapshots
from hibernate.controller.auto_level import clear_automatic_level
from hibernate.controller.reconcile import OperatorContext
from hibernate.controller.status import PodView

log = logging.getLogger(__name__)
MD = (c.GROUP, c.VERSION, c.PLURAL)
MANAGED = {c.LABEL_MANAGED: "true"}
RESYNC_SECONDS = 30.0
RETRY_SECONDS = 5.0  # an API error is retried this soon, not after kopf's default minute


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes to annotations with our prefix, never into the user's status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = c.FINALIZER
    settings.posting.level = logging.WARNING  # our own events say what happened; kopf's would repeat it
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.batch_window = 0.05
    settings.batching.idle_timeout = 0.5


def _spec(spec: Any) -> ModelDeploymentSpec:
    try:
        return ModelDeploymentSpec.model_validate(dict(spec))
    except (ValueError, InvalidSleepLevel) as e:
        # The schema refuses these at admission; reaching here means an old or hand-edited object.
        raise kopf.PermanentError(f"invalid spec: {e}") from e


def _md_ref(md: dict[str, Any]) -> dict[str, Any]:
    meta = md["metadata"]
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
    }


def _refresh(key: tuple[str, str], memo: Any, indices: Mapping[str, Any]) -> None:
    """Fold the model's pods into its status, written where it changed.

    The model and its pods are read from kopf's indices under the model's lock, where the status is
    computed and written, not by the caller before it waits for the lock: the handlers of several
    pods' events run at once, and one whose view was taken first could write last, over a newer
    status (under load a Stop's status read Stopped, then Sleeping again for a pod already gone,
    until the next resync). The indices only move forward, and kopf updates them before it calls a
    handler for the same event, so every write is at least as new as the one before it."""
    ctx: OperatorContext = memo.ctx
    with ctx.lock_for(key):
        md = _indexed_model(indices["models"], key)
        if md is None:
            return  # deleted: nothing to write on
        pods: list[PodView] = list(indices["pods_by_model"].get(key, []))
        result = reconcile.compute_status(md, _spec(md["spec"]), pods, ctx)
        if reconcile.write_status(md, result, ctx):
            for kind, reason, message in result.events:
                kopf.event(cast(kopf.Body, _md_ref(md)), type=kind, reason=reason, message=message)
                if reason == "Reached":
                    transition = result.status["lastTransition"]
                    metrics.TRANSITIONS.labels(transition["to"]).inc()
                    metrics.TRANSITION_SECONDS.labels(transition["to"]).observe(transition["seconds"])
                elif reason == "Failed":
                    metrics.FAILURES.inc()


def _plain(body: kopf.Body) -> dict[str, Any]:
    """The parts of a ModelDeployment the reconcilers read, as plain dicts (kopf's views are live)."""
    return {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


@kopf.index(*MD)
def models(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", name): _plain(body)}


def _indexed_model(
    models: kopf.Index[tuple[str, str], dict[str, Any]], key: tuple[str, str]
) -> dict[str, Any] | None:
    """The ModelDeployment (namespace, name) as the `models` index holds it; None if there is none."""
    return next(iter(models.get(key, [])), None)


@kopf.index("pods", labels=MANAGED)
def pods_by_model(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], PodView]:
    return {(namespace or "", labels.get(c.LABEL_MODEL, "")): PodView.from_pod(dict(body))}


def _reconcile(md: dict[str, Any], namespace: str, name: str, memo: Any, indices: Mapping[str, Any]) -> None:
    """Owned objects, then the level on every pod, then the status; for the model's effective level
    (the automatic level in effect, else the spec's). `indices`: kopf's, as handlers get them."""
    spec = _spec(md["spec"])
    level = reconcile.target_level(md, spec)
    refused = reconcile.apply_workload(md, spec, memo.ctx)
    if refused:
        log.warning("%s/%s: no Deployment written: %s", namespace, name, "; ".join(refused))
    pods = kube.list_pods(namespace, name)
    reconcile.propagate_level(namespace, name, level, pods, spec.drain_seconds)
    _late_snapshots(md, spec, level, [PodView.from_pod(p) for p in pods], memo)
    _refresh((namespace, name), memo, indices)
    ctx: OperatorContext = memo.ctx
    ctx.applied[(namespace, name)] = (int(md["metadata"].get("generation") or 0), level)


def _late_snapshots(
    md: dict[str, Any], spec: ModelDeploymentSpec, level: SleepLevel, pods: list[PodView], memo: Any
) -> None:
    """A snapshot answered on a pod after its wait, with the model no longer at Stop (a cancelled
    Stop): recorded, so that the pods restore it (snapshots.late_answer)."""
    if level == SleepLevel.STOP:
        return
    for pod in pods:
        if c.ANN_SNAPSHOT in pod.annotations and not pod.terminating:
            snapshots.late_answer(md, spec, pod.name, pod.annotations, memo.ctx)


def reconcile_member(
    md: dict[str, Any], namespace: str, name: str, memo: Any, indices: Mapping[str, Any]
) -> None:
    """Reconcile one ModelDeployment for a change outside it (its GpuGroup's placement)."""
    _reconcile(md, namespace, name, memo, indices)


@kopf.on.resume(*MD, backoff=RETRY_SECONDS)
@kopf.on.create(*MD, backoff=RETRY_SECONDS)
@kopf.on.update(*MD, field="spec", backoff=RETRY_SECONDS)
def reconcile_model(body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    """Owned objects, then the level on every pod, then the status."""
    _reconcile(_plain(body), namespace or "", name, memo, kwargs)


@kopf.on.event(*MD)
def automatic_level_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """An automaton set or cleared the automatic level (annotations: no new generation, so no spec
    update): apply the new effective level. Automatic annotations left over from before a person's
    change of the spec no longer apply; they are removed, so that nobody reads them as in effect."""
    if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
        return
    namespace = namespace or ""
    md = _plain(body)
    if auto_level.stale(md):
        old = auto_level.recorded(md)
        # Conditional: an automaton may have decided anew on the current spec a moment ago.
        cleared = clear_automatic_level(
            namespace, name, resource_version=md["metadata"].get("resourceVersion")
        )
        if cleared and old is not None:
            message = (
                f"The spec changed since {old.source or 'an automaton'} set {old.level.label}: "
                "spec.sleepLevel applies again"
            )
            kopf.event(
                cast(kopf.Body, _md_ref(md)), type="Normal", reason="AutomaticLevelReset", message=message
            )
        return  # the removal comes back as an event
    ctx: OperatorContext = memo.ctx
    applied = ctx.applied.get((namespace, name))
    if applied is None:
        return  # not reconciled yet: the resume or create handler will be, with this level
    generation = int(md["metadata"].get("generation") or 0)
    if applied[0] != generation:
        return  # a spec change: the update handler reconciles it
    try:
        spec = ModelDeploymentSpec.model_validate(md["spec"])
        level = reconcile.target_level(md, spec)
    except (ValueError, InvalidSleepLevel):
        return  # reported by the spec handlers
    if level != applied[1]:
        log.info("%s/%s: automatic level: now %s (was %s)", namespace, name, level.label, applied[1].label)
        try:  # the pods first: a GpuGroup switch and a wake on request wait for the engines only
            reconcile.level_first(namespace, name, level, applied[1], spec.drain_seconds)
        except Exception as e:  # the reconcile below writes the level again
            log.warning("%s/%s: level %s not written on the pods first: %s", namespace, name, level.label, e)
        _reconcile(md, namespace, name, memo, kwargs)


@kopf.timer(*MD, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    """Level-based safety net: a missed pod event is caught here.

    It reads the pods from kopf's pod index, which the pod watch keeps current, and lists them from
    the API only when one needs its level written: a LIST per model every 30 s (the pods of the
    whole namespace read from etcd and filtered) kept a 500-model cluster busy and delayed every
    other handler (bench/scale.py).
    """
    namespace = namespace or ""
    md = _plain(body)
    spec = _spec(md["spec"])
    level = reconcile.target_level(md, spec)
    applied = memo.ctx.applied.get((namespace, name))
    if applied is not None and applied != (int(md["metadata"].get("generation") or 0), level):
        _reconcile(md, namespace, name, memo, kwargs)  # a missed change of the automatic level
        return
    pods_by_model: kopf.Index[tuple[str, str], PodView] = kwargs["pods_by_model"]
    views = list(pods_by_model.get((namespace, name), []))
    _escalate_if_asked(md, views)  # a request missed, or not granted (the object changed meanwhile)
    _late_snapshots(md, spec, level, views, memo)
    if any(reconcile.needs_level(view, level, spec.drain_seconds) for view in views):
        reconcile.propagate_level(namespace, name, level, kube.list_pods(namespace, name), spec.drain_seconds)
    _refresh((namespace, name), memo, kwargs)


@kopf.on.event("apps", "v1", "deployments", labels={c.LABEL_MODEL: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={c.LABEL_MODEL: kopf.PRESENT})
def owned_object_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    labels: kopf.Labels,
    memo: Any,
    **kwargs: Any,
) -> None:
    """A Deployment, Service or NetworkPolicy of a live ModelDeployment was deleted: make it again.

    Deleting a ModelDeployment and applying one of the same name at once lets the garbage collector
    delete the new owner's objects (it had decided on the old owner); nothing else would notice.
    """
    if event.get("type") != "DELETED":
        return
    key = (namespace or "", labels.get(c.LABEL_MODEL, ""))
    md = _indexed_model(kwargs["models"], key)
    if md is None or md["metadata"].get("deletionTimestamp"):
        return
    log.info("re-creating the objects of %s/%s: its %s was deleted", *key, body.get("kind"))
    reconcile.apply_workload(md, _spec(md["spec"]), memo.ctx)


def watch_network_policies() -> None:
    """Re-create a deleted per-model NetworkPolicy too; registered only when the operator writes them,
    since without them its RBAC has no right to watch NetworkPolicies."""
    kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels={c.LABEL_MODEL: kopf.PRESENT})(
        owned_object_changed
    )


def _escalate_if_asked(md: dict[str, Any], pods: list[PodView]) -> None:
    """A pod's agent asked for Stop (hibernate.dev/escalate-to): stop the model as an automatic level,
    never through its spec; the change of the automatic level is then applied like any other."""
    message = escalation.stop_if_asked(md, pods)
    if message is not None:
        kopf.event(cast(kopf.Body, _md_ref(md)), type="Warning", reason=escalation.REASON, message=message)


@kopf.on.event("pods", labels=MANAGED)
def pod_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    labels: kopf.Labels,
    memo: Any,
    **kwargs: Any,
) -> None:
    """A pod appeared or the agent reported: give it its level, fold the pods into the status."""
    namespace = namespace or ""
    key = (namespace, labels.get(c.LABEL_MODEL, ""))
    md = _indexed_model(kwargs["models"], key)
    if md is None:
        return
    spec = _spec(md["spec"])
    if event.get("type") != "DELETED":
        _escalate_if_asked(md, [PodView.from_pod(dict(body))])
        level = reconcile.target_level(md, spec)
        reconcile.ensure_pod_level(namespace, dict(body), level, spec.drain_seconds)
        _late_snapshots(md, spec, level, [PodView.from_pod(dict(body))], memo)
    # kopf has taken a deleted pod out of the index before this handler runs.
    _refresh(key, memo, kwargs)


@kopf.on.delete(*MD, optional=True)
def forget(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """Children go by owner reference (the garbage collector); checkpoint images go with their pods."""
    memo.ctx.forget((namespace or "", name))
