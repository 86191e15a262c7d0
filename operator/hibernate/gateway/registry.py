# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; the watch threads are the typed boundary around it)
"""The gateway's in-memory view of ModelDeployments, kept by list + watch in a thread per namespace.

A watch that ends or fails is started again from a fresh list (with a growing pause after errors), so
the view heals by itself. Changes are handed to the event loop, where waiters for one model are woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from kubernetes import watch

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.gpu_group import parse_bytes, parse_time
from hibernate.api.levels import SleepLevel
from hibernate.controller import kube

log = logging.getLogger("hibernate.gateway")

ANN_WAKE_ON_REQUEST: Final = c.ANN_WAKE_ON_REQUEST
DEFAULT_UPSTREAM_TEMPLATE: Final = "http://{name}.{namespace}.svc:{port}"

Key = tuple[str, str]  # (namespace, name)


def served_name(spec: dict[str, Any]) -> str:
    """What the engine answers to: `--served-model-name` in the engine args, else `spec.model`."""
    engine = spec.get("engine") or {}
    args = [str(a) for a in engine.get("args") or []]
    for i, arg in enumerate(args):
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--served-model-name="):
            value = arg.split("=", 1)[1]
            return shlex.split(value)[0] if value else str(spec.get("model", ""))
    return str(spec.get("model", ""))


@dataclass(frozen=True)
class ModelView:
    """What the gateway needs of one ModelDeployment."""

    namespace: str
    name: str
    model: str  # the served model name
    upstream: str  # base URL of the model's Service
    generation: int
    desired: SleepLevel | None  # spec.sleepLevel (the person's); None when unparseable
    effective: SleepLevel | None  # the automatic level in effect, else spec.sleepLevel
    automatic: SleepLevel | None  # the automatic level in effect (hibernate.api.auto_level), if any
    folded_for: SleepLevel | None  # status.effectiveLevel: the level the status describes
    phase: str | None
    ready: bool  # the Ready condition is True
    observed_generation: int
    reached: str | None  # status.sleepLevel
    message: str  # the Ready/Degraded message, for errors
    wake_on_request: bool
    gpu_group: str | None = None  # spec.gpuGroup.name: it takes turns on one GPU with the group
    make_room_level: SleepLevel | None = None  # spec.gpuGroup.makeRoomLevel, when it overrides the group's
    gpu_memory: int | None = None  # spec.gpuGroup.gpuMemory in bytes
    ready_since: float = 0.0  # epoch seconds of the Ready condition's last change to True (0: not True)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def serving(self) -> bool:
        return self.effective == SleepLevel.AWAKE and self.caught_up and self.phase == "Awake" and self.ready

    @property
    def caught_up(self) -> bool:
        """The status describes the level in effect now: the spec of this generation, and the
        automatic level (which changes no generation)."""
        return self.observed_generation >= self.generation and self.folded_for == self.effective

    @classmethod
    def from_object(cls, obj: dict[str, Any], template: str) -> ModelView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        desired = auto_level.spec_level(obj)
        automatic = auto_level.automatic_level(obj)
        effective = automatic.level if automatic is not None else desired
        # An operator from before automatic levels writes no effectiveLevel: its status is the spec's.
        folded_for = (
            SleepLevel.parse_or_none(status.get("effectiveLevel")) if "effectiveLevel" in status else desired
        )
        conditions = {x.get("type"): x for x in status.get("conditions") or [] if isinstance(x, dict)}
        ready = conditions.get("Ready") or {}
        degraded = conditions.get("Degraded") or {}
        message = str(degraded.get("message") or ready.get("message") or "")
        annotations = meta.get("annotations") or {}
        port = int((spec.get("engine") or {}).get("port") or 8000)
        name = str(meta.get("name", ""))
        namespace = str(meta.get("namespace", ""))
        observed = status.get("observedGeneration")
        raw_group = spec.get("gpuGroup")
        group: dict[str, Any] = raw_group if isinstance(raw_group, dict) else {}
        return cls(
            namespace=namespace,
            name=name,
            model=served_name(spec) or name,
            upstream=template.format(name=name, namespace=namespace, port=port).rstrip("/"),
            generation=int(meta.get("generation") or 0),
            desired=desired,
            effective=effective,
            automatic=automatic.level if automatic is not None else None,
            folded_for=folded_for,
            phase=status.get("phase"),
            ready=ready.get("status") == "True",
            observed_generation=observed if isinstance(observed, int) else -1,
            reached=status.get("sleepLevel"),
            message=message,
            wake_on_request=str(annotations.get(ANN_WAKE_ON_REQUEST, "true")).strip().lower() != "false",
            gpu_group=str(group["name"]) if group.get("name") else None,
            make_room_level=SleepLevel.parse_or_none(group.get("makeRoomLevel")),
            gpu_memory=_bytes_or_none(group.get("gpuMemory")),
            ready_since=parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "True" else 0.0,
        )


def _bytes_or_none(value: object) -> int | None:
    if not isinstance(value, int | str):
        return None
    try:
        return parse_bytes(value)
    except ValueError:
        return None


class Registry:
    """ModelDeployments by key and by model name; lives on the event loop (not thread-safe)."""

    def __init__(self, template: str = DEFAULT_UPSTREAM_TEMPLATE) -> None:
        self.template = template
        self.models: dict[Key, ModelView] = {}
        self._events: dict[Key, asyncio.Event] = {}
        self._synced: set[str | None] = set()
        self._scopes: list[str | None] = []
        self._index: dict[str, ModelView] | None = None  # by served name, then by name; rebuilt lazily

    # --- reading --------------------------------------------------------------------------------

    def lookup(self, model: str) -> ModelView | None:
        """By served model name first, then by ModelDeployment name (`name` or `namespace/name`).

        Two ModelDeployments serving the same name: the first by (namespace, name) gets the traffic.
        """
        if self._index is None:
            index: dict[str, ModelView] = {}
            ordered = sorted(self.models.values(), key=lambda v: v.key)
            for view in ordered:
                index.setdefault(f"{view.namespace}/{view.name}", view)
            for view in ordered:
                index.setdefault(view.name, view)
            served: dict[str, ModelView] = {}
            for view in ordered:
                served.setdefault(view.model, view)
            index.update(served)  # a served name wins over a ModelDeployment name
            self._index = index
        return self._index.get(model)

    def listing(self) -> list[ModelView]:
        """One entry per served model name, in the order `lookup` resolves them."""
        seen: dict[str, ModelView] = {}
        for view in sorted(self.models.values(), key=lambda v: v.key):
            seen.setdefault(view.model, view)
        return list(seen.values())

    def get(self, key: Key) -> ModelView | None:
        return self.models.get(key)

    def group_members(self, namespace: str, group: str) -> list[ModelView]:
        """The ModelDeployments of one GpuGroup."""
        return [v for v in self.models.values() if v.namespace == namespace and v.gpu_group == group]

    @property
    def synced(self) -> bool:
        return bool(self._scopes) and all(scope in self._synced for scope in self._scopes)

    async def changed(self, key: Key, timeout: float) -> None:
        """Wait until the view of `key` changes (or `timeout` seconds pass)."""
        event = self._events.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # --- writing (on the loop) ------------------------------------------------------------------

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        view = ModelView.from_object(obj, self.template)
        if kind == "DELETED":
            self.models.pop(view.key, None)
        else:
            self.models[view.key] = view
        self._notify(view.key)

    def replace(self, scope: str | None, objects: Iterable[dict[str, Any]]) -> None:
        """A fresh list for one namespace (None: all): what is not in it is gone."""
        views = {v.key: v for v in (ModelView.from_object(o, self.template) for o in objects)}
        stale = [k for k in self.models if (scope is None or k[0] == scope) and k not in views]
        for key in stale:
            del self.models[key]
        self.models.update(views)
        self._synced.add(scope)
        for key in [*stale, *views]:
            self._notify(key)

    def notify(self, key: Key) -> None:
        """Wake whoever waits on `key`: something else about the model changed (its ready endpoints)."""
        self._notify(key)

    def _notify(self, key: Key) -> None:
        self._index = None
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    # --- the watch threads ----------------------------------------------------------------------

    def start_watching(
        self, loop: asyncio.AbstractEventLoop, namespaces: list[str] | None, stop: threading.Event
    ) -> list[threading.Thread]:
        self._scopes = list(namespaces) if namespaces else [None]
        threads = []
        for scope in self._scopes:
            thread = threading.Thread(
                target=_watch_forever,
                args=(scope, loop, self, stop),
                name=f"watch-{scope or 'all'}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        return threads

    def refresh(self, obj: dict[str, Any] | None, key: Key) -> None:
        """A direct read (the watch may lag or be down): apply it, or forget the object if gone."""
        if obj is None:
            if self.models.pop(key, None) is not None:
                self._notify(key)
        else:
            self.apply("MODIFIED", obj)


WATCH_SECONDS = 240  # the server ends each watch after this; we list again and go on


def _watch_forever(
    scope: str | None, loop: asyncio.AbstractEventLoop, registry: Registry, stop: threading.Event
) -> None:
    pause = 0.5
    while not stop.is_set():
        try:
            _list_and_watch(scope, loop, registry, stop)
            pause = 0.5
        except Exception as e:  # the API server restarted, a 410 Gone, a network error …
            log.warning(
                "watch of ModelDeployments in %s failed: %s; again in %.1f s", scope or "all", e, pause
            )
            stop.wait(pause)
            pause = min(pause * 2, 10.0)


def _list_and_watch(
    scope: str | None, loop: asyncio.AbstractEventLoop, registry: Registry, stop: threading.Event
) -> None:
    api = kube.custom()
    lister: Callable[..., Any]
    args: tuple[str, ...]
    if scope:
        lister, args = api.list_namespaced_custom_object, (c.GROUP, c.VERSION, scope, c.PLURAL)
    else:
        lister, args = api.list_cluster_custom_object, (c.GROUP, c.VERSION, c.PLURAL)
    listed = cast(dict[str, Any], lister(*args))
    loop.call_soon_threadsafe(registry.replace, scope, list(listed.get("items") or []))
    version = listed["metadata"]["resourceVersion"]
    stream = watch.Watch()
    for event in stream.stream(
        lister,
        *args,
        resource_version=version,
        timeout_seconds=WATCH_SECONDS,
        _request_timeout=WATCH_SECONDS + 30,
    ):
        if stop.is_set():
            stream.stop()
            return
        kind = event.get("type")
        obj = event.get("object")
        if kind == "ERROR" or not isinstance(obj, dict):
            raise RuntimeError(f"watch error: {obj}")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            loop.call_soon_threadsafe(registry.apply, kind, obj)
