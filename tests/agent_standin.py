"""A test stand-in for the node agent AND the kubelet, for CPU tests where neither runs.

For each ModelDeployment it serves (one replica: one fake engine on the model's fixed port):

- as the kubelet: when a live pod exists and no engine runs, it starts a fake vLLM engine on the
  port of `spec.engine.port`, waits for `/health`, marks the pod Ready through the status subresource
  and reports it Awake at level 0; when no live pod is left (Stop scaled the Deployment to zero) it
  stops the engine, as the kubelet would end the container;
- as the agent: when a pod's `hibernate.dev/sleep-level` differs from the level it last reached, it
  reports Sleeping/Waking, calls the engine's real sleep API over HTTP (`POST /sleep?level=1|2`,
  `POST /wake_up`, and for level 2 the weights wake, `reload_weights`, the KV wake and
  `/reset_prefix_cache`; levels 3 and 4 are level 1 for the fake), then writes `state` and
  `observed-sleep-level` (or `Failed` with the error when an engine call fails).

Knobs for failure tests: `paused(name)` makes the agent side never answer (the kubelet side goes on);
engine faults go through the fake's own `POST /debug/faults`. `transitions` and `calls` record what
was done, so tests can count wakes.

    with AgentStandin(cluster, namespace, workdir) as standin:
        standin.serve("m", model="hib/tiny", port=port)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from tests.cluster import Cluster
from tests.engine_fixtures import FakeEngine, _spawn, _stop, _wait_healthy
from tests.modeldeployments import mark_ready, report

POLL_SECONDS = 0.1
ENGINE_CALL_SECONDS = 15.0


def engine_level(level: int) -> int:
    """What the fake engine does for a level: 3 and 4 are engine level 1 (CUDA is the agent's part)."""
    return {0: 0, 1: 1, 2: 2, 3: 1, 4: 1}.get(level, 1)


@dataclass
class _Model:
    name: str
    model: str
    port: int
    engine_args: tuple[str, ...]
    engine: FakeEngine | None = None
    levels: dict[str, int] = field(default_factory=dict)  # pod uid -> level reached
    failed: dict[str, str] = field(default_factory=dict)  # pod uid -> sleep-level whose change failed
    paused: bool = False
    thread: threading.Thread | None = None
    engine_starts: int = 0


class AgentStandin:
    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        workdir: Path,
        weights_mib: int = 8,
        engine_command: Callable[[str, int], list[str]] | None = None,
    ) -> None:
        self.cluster = cluster
        # (model, port) -> the engine's command line; default: the fake engine (bench/switch.py gives
        # the reference engine on a GPU).
        self.engine_command = engine_command
        self.namespace = namespace
        self.workdir = workdir
        self.weights_mib = weights_mib
        self.models: dict[str, _Model] = {}
        self.transitions: list[tuple[str, int, int]] = []  # (model name, from, to) that succeeded
        self.calls: list[tuple[str, str]] = []  # (model name, "POST /wake_up?…") engine calls made
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._http = httpx.Client(timeout=ENGINE_CALL_SECONDS)

    # --- use ----------------------------------------------------------------------------------

    def serve(self, name: str, model: str, port: int, *engine_args: str) -> None:
        slot = _Model(name, model, port, tuple(engine_args))
        self.models[name] = slot
        slot.thread = threading.Thread(target=self._run, args=(slot,), name=f"standin-{name}", daemon=True)
        slot.thread.start()

    def paused(self, name: str, value: bool = True) -> None:
        """While paused, the agent side never answers a level change for this model."""
        self.models[name].paused = value

    def engine_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.models[name].port}"

    def wakes(self, name: str) -> int:
        """Transitions to level 0 from a sleep level (not the first start of an engine)."""
        return sum(1 for n, a, b in self.transitions if n == name and b == 0 and a > 0)

    def engine_starts(self, name: str) -> int:
        return self.models[name].engine_starts

    def __enter__(self) -> AgentStandin:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for slot in self.models.values():
            if slot.thread is not None:
                slot.thread.join(ENGINE_CALL_SECONDS + 5)
            self._stop_engine(slot)
        self._http.close()
        if self.errors:
            print("--- agent stand-in errors ---\n" + "\n".join(self.errors))

    # --- the loop -----------------------------------------------------------------------------

    def _run(self, slot: _Model) -> None:
        while not self._stop.is_set():
            try:
                self._step(slot)
            except Exception as e:  # the test reads errors; the loop goes on, as an agent would
                self.errors.append(f"{slot.name}: {type(e).__name__}: {e}")
            self._stop.wait(POLL_SECONDS)

    def _step(self, slot: _Model) -> None:
        items = self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"{c.LABEL_MODEL}={slot.name}"
        ).items
        # (metadata, uid) of the pods that are not going away
        live = [
            (p.metadata, str(p.metadata.uid))
            for p in items
            if p.metadata is not None and p.metadata.deletion_timestamp is None
        ]
        if not live:
            if slot.engine is not None:
                self._stop_engine(slot)  # scaled to zero: the kubelet ends the container
            slot.levels.clear()
            return
        for meta, uid in live:
            name = str(meta.name)
            annotations = meta.annotations or {}
            if uid not in slot.levels:
                self._start_pod(slot, name)
                slot.levels[uid] = 0
                continue
            raw = annotations.get(c.ANN_SLEEP_LEVEL)
            if raw is None or slot.paused or self._stop.is_set():
                continue
            try:
                desired = int(SleepLevel.parse(raw))
            except InvalidSleepLevel:
                continue
            current = slot.levels[uid]
            if desired == current or slot.failed.get(uid) == raw:
                continue
            self._transition(slot, name, uid, raw, current, desired)

    def _start_pod(self, slot: _Model, pod: str) -> None:
        """The kubelet's part: an engine for the pod, readiness, and the agent's first report."""
        if slot.engine is None or slot.engine.process.poll() is not None:
            slot.engine = self._start_engine(slot)
        mark_ready(self.cluster, self.namespace, pod)
        report(self.cluster, self.namespace, pod, 0, c.STATE_AWAKE)

    def _transition(self, slot: _Model, pod: str, uid: str, raw: str, current: int, desired: int) -> None:
        moving = c.STATE_WAKING if desired < current else c.STATE_SLEEPING
        report(self.cluster, self.namespace, pod, current, moving)
        try:
            self._engine_to(slot, engine_level(current), engine_level(desired))
        except (httpx.HTTPError, RuntimeError) as e:
            slot.failed[uid] = raw
            action = "wake" if desired < current else "sleep"
            report(self.cluster, self.namespace, pod, current, c.STATE_FAILED, error=f"{action} failed: {e}")
            return
        slot.levels[uid] = desired
        slot.failed.pop(uid, None)
        self.transitions.append((slot.name, current, desired))
        state = c.STATE_AWAKE if desired == 0 else c.STATE_ASLEEP
        report(self.cluster, self.namespace, pod, desired, state)

    # --- the engine ---------------------------------------------------------------------------

    def _engine_to(self, slot: _Model, current: int, target: int) -> None:
        if current == target:
            return
        if current == 1:
            self._call(slot, "/wake_up")
        elif current == 2:
            self._call(slot, "/wake_up?tags=weights")
            self._call(slot, "/collective_rpc", {"method": "reload_weights"})
            self._call(slot, "/wake_up?tags=kv_cache")
            self._call(slot, "/reset_prefix_cache")
        if target:
            self._call(slot, f"/sleep?level={target}")

    def _call(self, slot: _Model, path: str, body: dict[str, Any] | None = None) -> None:
        if slot.engine is None:
            raise RuntimeError("no engine runs for this pod")
        self.calls.append((slot.name, f"POST {path}"))
        response = self._http.post(slot.engine.url + path, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text[:200]}")

    def _start_engine(self, slot: _Model) -> FakeEngine:
        log = self.workdir / f"engine-{slot.name}.log"
        command = (
            [*self.engine_command(slot.model, slot.port), *slot.engine_args]
            if self.engine_command is not None
            else [
                sys.executable,
                "-m",
                "hibernate.engine.fake",
                *("--model", slot.model, "--host", "127.0.0.1", "--port", str(slot.port)),
                *("--weights-mib", str(self.weights_mib), "--kv-mib", "4", "--enable-sleep-mode"),
                *slot.engine_args,
            ]
        )
        for _ in range(50):  # the port may still be held by the engine that just ended
            engine = _spawn(command, log, None)
            if _wait_healthy(engine, 20.0):
                slot.engine_starts += 1
                return engine
            time.sleep(0.1)
        raise RuntimeError(f"could not start the fake engine on port {slot.port}")

    def _stop_engine(self, slot: _Model) -> None:
        if slot.engine is not None:
            _stop(slot.engine.process)
            slot.engine = None
