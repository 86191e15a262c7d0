# mypy: disallow-untyped-calls=False
"""Watch the managed pods of one node (server-side field selector) in a thread, forever.

A plain watch, not kopf: kopf filters fields client-side, so every agent would receive every pod of
the cluster. List, then watch from the list's resourceVersion; relist on 410 Gone or any error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import watch

from hibernate.agent import kube
from hibernate.api import constants as c

log = logging.getLogger(__name__)
OnEvent = Callable[[str, dict[str, Any]], None]


class PodWatch(threading.Thread):
    def __init__(self, node: str, on_event: OnEvent, timeout_s: int = 300) -> None:
        super().__init__(name="pod-watch", daemon=True)
        self.node = node
        self.on_event = on_event
        self.timeout_s = timeout_s
        self.stopping = threading.Event()
        self.last_contact = 0.0  # monotonic time of the last successful list or event
        self.selectors = {
            "field_selector": f"spec.nodeName={node}",
            "label_selector": f"{c.LABEL_MANAGED}=true",
        }

    def healthy(self, max_silence_s: float = 600.0) -> bool:
        return self.is_alive() and time.monotonic() - self.last_contact < max_silence_s

    def run(self) -> None:
        known: dict[tuple[str, str], dict[str, Any]] = {}
        while not self.stopping.is_set():
            try:
                known = self._list_and_watch(known)
            except Exception as e:  # network, 410 Gone, API restart: list again
                log.warning("pod watch interrupted (%s); listing again", e)
                self.stopping.wait(1.0)

    def _list_and_watch(
        self, known: dict[tuple[str, str], dict[str, Any]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        api: Any = kube.core()  # the generated signatures do not know the legacy `_preload_content`
        response = api.list_pod_for_all_namespaces(**self.selectors, _preload_content=False)
        listing = json.loads(response.data)
        self.last_contact = time.monotonic()
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for pod in listing.get("items", []):
            meta = pod["metadata"]
            current[(meta["namespace"], meta["name"])] = pod
            self.on_event("ADDED", pod)
        for key in known.keys() - current.keys():  # deleted while we were not watching
            self.on_event("DELETED", known[key])
        known = current
        stream = watch.Watch().stream(
            api.list_pod_for_all_namespaces,
            **self.selectors,
            resource_version=listing["metadata"]["resourceVersion"],
            timeout_seconds=self.timeout_s,
            allow_watch_bookmarks=True,
            deserialize=False,  # raw dicts: no model objects for every pod event
        )
        for event in stream:
            if self.stopping.is_set():
                break
            self.last_contact = time.monotonic()
            kind, pod = event["type"], event["object"]  # deserialize=False: the plain JSON event
            if kind == "ERROR":
                raise RuntimeError(f"watch error: {pod.get('message', pod)}")
            if kind == "BOOKMARK":
                continue
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            if kind == "DELETED":
                known.pop(key, None)
            else:
                known[key] = pod
            self.on_event(kind, pod)
        return known
