# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; the watch threads are the typed boundary around it)
"""The ready endpoints of each model's Service, kept by list + watch of Endpoints in a thread per namespace.

The gateway sends a request only to an address the Endpoints object lists as ready. An engine pod is
Ready only while the node agent says it is Awake (its readiness gate, `hibernate.dev/awake`), so a
replica that sleeps, or is about to, is never picked; with no ready address the request is held until
one appears. Requests go to the pod IPs directly, round robin: no kube-proxy, no cluster DNS needed.

Only Endpoints labelled `hibernate.dev/model` are watched: the endpoints controller copies a Service's
labels onto its Endpoints, and the operator labels each model's Service so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from kubernetes import watch

from hibernate.api import constants as c
from hibernate.controller import kube

log = logging.getLogger("hibernate.gateway")

Key = tuple[str, str]  # (namespace, Service name = ModelDeployment name)
PORT_NAME: Final = "http"  # the model Service's port (controller/workload.py)
WATCH_SECONDS: Final = 240


def ready_urls(obj: dict[str, Any]) -> tuple[str, ...]:
    """`http://ip:port` of every ready address of an Endpoints object, on its `http` port (or its only
    port); the not-ready addresses (sleeping replicas, engines still starting) are left out."""
    urls: list[str] = []
    for subset in obj.get("subsets") or []:
        ports = subset.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for address in subset.get("addresses") or []:
            ip = str(address.get("ip") or "")
            if ip:
                urls.append(f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}")
    return tuple(sorted(set(urls)))


class Endpoints:
    """Ready engine URLs by model; lives on the event loop (not thread-safe), fed by watch threads."""

    def __init__(self, on_change: Callable[[Key], None] = lambda key: None) -> None:
        self.on_change = on_change  # called on the loop when a model's ready set changes
        self.urls: dict[Key, tuple[str, ...]] = {}
        self._turns: dict[Key, itertools.count[int]] = {}

    def ready(self, key: Key) -> tuple[str, ...]:
        return self.urls.get(key, ())

    def pick(self, key: Key) -> str | None:
        """The next ready URL of the model, round robin; None when no replica is ready."""
        urls = self.ready(key)
        if not urls:
            return None
        turn = next(self._turns.setdefault(key, itertools.count()))
        return urls[turn % len(urls)]

    # --- writing (on the loop) ------------------------------------------------------------------

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        self._set(key, () if kind == "DELETED" else ready_urls(obj))

    def replace(self, scope: str | None, objects: Iterable[dict[str, Any]]) -> None:
        """A fresh list for one namespace (None: all): what is not in it has no ready endpoint."""
        fresh = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            fresh[(str(meta.get("namespace", "")), str(meta.get("name", "")))] = ready_urls(obj)
        for key in [k for k in self.urls if (scope is None or k[0] == scope) and k not in fresh]:
            self._set(key, ())
        for key, urls in fresh.items():
            self._set(key, urls)

    def _set(self, key: Key, urls: tuple[str, ...]) -> None:
        if self.urls.get(key, ()) == urls:
            return
        if urls:
            self.urls[key] = urls
        else:
            self.urls.pop(key, None)
        log.debug("ready endpoints of %s/%s: %s", *key, ", ".join(urls) or "none")
        self.on_change(key)

    # --- the watch threads ----------------------------------------------------------------------

    def start_watching(
        self, loop: asyncio.AbstractEventLoop, namespaces: list[str] | None, stop: threading.Event
    ) -> list[threading.Thread]:
        threads = []
        for scope in list(namespaces) if namespaces else [None]:
            thread = threading.Thread(
                target=_watch_forever,
                args=(scope, loop, self, stop),
                name=f"endpoints-{scope or 'all'}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        return threads


def _watch_forever(
    scope: str | None, loop: asyncio.AbstractEventLoop, endpoints: Endpoints, stop: threading.Event
) -> None:
    pause = 0.5
    while not stop.is_set():
        try:
            _list_and_watch(scope, loop, endpoints, stop)
            pause = 0.5
        except Exception as e:  # the API server restarted, a 410 Gone, a network error …
            log.warning("watch of Endpoints in %s failed: %s; again in %.1f s", scope or "all", e, pause)
            stop.wait(pause)
            pause = min(pause * 2, 10.0)


def _list_and_watch(
    scope: str | None, loop: asyncio.AbstractEventLoop, endpoints: Endpoints, stop: threading.Event
) -> None:
    api: Any = kube.core()  # the generated signatures do not know the legacy `_preload_content`
    lister: Callable[..., Any]
    args: tuple[str, ...]
    if scope:
        lister, args = api.list_namespaced_endpoints, (scope,)
    else:
        lister, args = api.list_endpoints_for_all_namespaces, ()
    selector = {"label_selector": c.LABEL_MODEL}
    listed = cast(dict[str, Any], json.loads(lister(*args, **selector, _preload_content=False).data))
    loop.call_soon_threadsafe(endpoints.replace, scope, list(listed.get("items") or []))
    stream = watch.Watch()
    for event in stream.stream(
        lister,
        *args,
        **selector,
        resource_version=listed["metadata"]["resourceVersion"],
        timeout_seconds=WATCH_SECONDS,
        _request_timeout=WATCH_SECONDS + 30,
        deserialize=False,
    ):
        if stop.is_set():
            stream.stop()
            return
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR" or not isinstance(obj, dict):
            raise RuntimeError(f"watch error: {obj}")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            loop.call_soon_threadsafe(endpoints.apply, kind, obj)
