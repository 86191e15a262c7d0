"""A cold start of one engine container, in its own pod: the way out when a checkpoint cannot be used.

Two things start one:

- a person, with `kubectl annotate pod POD hibernate.dev/discard-checkpoint=true`: the advice of a
  restore refused for good (an image taken on another GPU model or driver, or not one this agent
  wrote), which is posted once and not retried;
- the wake check (wakecheck.py): a woken engine that answers otherwise than before its sleep.

The steps, each one safe to do again, so that an agent that dies mid-way finishes after its restart:

1. report it under way: last-operation `{"action": "cold-start", …}` without `seconds`, naming the
   container being replaced; state `Waking` (asked for) or `Failed` (a wrong answer, with both
   answers in the error); then remove the request annotation;
2. end the old engine: the checkpoint marker is written first, so that the pod init outlives its
   engine, then the engine's processes are killed (a checkpointed engine has none left);
3. remove the image, and any temporary directory beside it;
4. clean the pod's `/dev/shm` (shm.py): nothing of the old engine runs and no image is kept;
5. remove the marker (through podfs): the pod init, which has no child left, exits, and the kubelet
   restarts the container: the engine starts cold, in the same pod (same node, IP and volumes);
6. once the kubelet reports a new container and its engine answers `/health`, report `Awake` at 0.

An engine that is PID 1 of its container (no pod init) is killed outright; the kubelet restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hibernate.agent import criu, discovery, kube, shm
from hibernate.agent.engine_client import EngineClient
from hibernate.agent.levels import Host
from hibernate.agent.podref import PodRef
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.faults import fault_point

log = logging.getLogger(__name__)

ACTION = "cold-start"
POLL_S = 1.0  # how often a cold start under way looks for the new container and its engine
_KILL_WAIT_S = 10.0

Report = Callable[[dict[str, Any], dict[str, str]], Awaitable[None]]
Event = Callable[[dict[str, Any], str, str, str], Awaitable[None]]


def requested(ref: PodRef) -> bool:
    return ref.annotations.get(c.ANN_DISCARD_CHECKPOINT, "").strip().lower() == "true"


def under_way(ref: PodRef) -> dict[str, Any] | None:
    """The cold start the pod's last-operation says is under way, if any."""
    op = ref.last_operation()
    return op if op.get("action") == ACTION and "seconds" not in op else None


def incarnation(pod: dict[str, Any], ref: PodRef) -> tuple[str | None, int | None]:
    """The engine container as the kubelet reports it now: its id and its restart count."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == ref.container:
            count = status.get("restartCount")
            return status.get("containerID") or None, count if isinstance(count, int) else None
    return None, None


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _since(stamp: object) -> float:
    try:
        return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(str(stamp))).total_seconds())
    except ValueError:
        return 0.0


def _alive(pid: int, proc_root: str) -> bool:
    try:
        state = Path(f"{proc_root}/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class ColdStarts:
    host: Host
    remove: Callable[[str, str, str], bool] = kube.remove_annotation
    active: dict[str, dict[str, Any]] = field(default_factory=dict)  # by pod uid: the op under way
    # By pod uid: the resourceVersion of the pod whose request was taken. The watch may hand that copy
    # over again (nothing newer arrived yet); its request is not a new one.
    taken: dict[str, str] = field(default_factory=dict)

    def wanted(self, pod: dict[str, Any], ref: PodRef) -> bool:
        if ref.uid in self.active or under_way(ref) is not None:
            return True
        version = (pod.get("metadata") or {}).get("resourceVersion")
        return requested(ref) and not (version is not None and self.taken.get(ref.uid) == version)

    async def begin(
        self,
        pod: dict[str, Any],
        ref: PodRef,
        level: SleepLevel,
        reason: str,
        report: Report,
        event: Event,
        *,
        failed: bool,
    ) -> None:
        """Steps 1: the cold start is on record before anything is done."""
        container, restarts = incarnation(pod, ref)
        op: dict[str, Any] = {
            "action": ACTION,
            "level": int(level),
            "target": SleepLevel.AWAKE.label,
            "started": _stamp(),
            "reason": reason,
            "error": reason if failed else None,
            "container": container,
            "restarts": restarts,
        }
        await report(
            pod, kube.state_annotations(c.STATE_FAILED if failed else c.STATE_WAKING, int(level), op)
        )
        self.active[ref.uid] = op
        fault_point("agent.discard-after-report")
        await self._take_request(pod, ref)
        if failed:
            await event(
                pod, "Warning", "Failed", f"wake {level.label} failed: {reason}; restarting the engine cold"
            )
        else:
            await event(
                pod, "Normal", "ColdStart", f"restarting the engine container cold, in this pod: {reason}"
            )
        log.info("%s/%s: cold start of container %s: %s", *ref.key, container, reason)

    async def advance(self, pod: dict[str, Any], ref: PodRef, report: Report, event: Event) -> float | None:
        """One look at a cold start asked for or under way: begins it, does what is left of steps 2-5,
        and reports Awake once a new engine answers (returns None then; else seconds to the next look)."""
        op = self.active.get(ref.uid) or under_way(ref)
        if op is None:  # asked for, not begun
            level = ref.observed() or SleepLevel.AWAKE
            who = f"asked for with {c.ANN_DISCARD_CHECKPOINT}=true"
            await self.begin(
                pod, ref, level, f"the checkpoint is discarded ({who})", report, event, failed=False
            )
            op = self.active[ref.uid]
        self.active[ref.uid] = op
        if requested(ref):
            await self._take_request(pod, ref)
        await asyncio.to_thread(self._tear_down, ref, op)
        container, restarts = incarnation(pod, ref)
        was = op.get("restarts")
        replaced = (container is not None and container != op.get("container")) or (
            isinstance(restarts, int) and isinstance(was, int) and restarts > was
        )
        if not replaced or not ref.ip or not await self._answers(ref):
            return POLL_S
        seconds = _since(op.get("started"))
        done = {k: v for k, v in op.items() if k not in ("container", "restarts")}
        done.update(seconds=round(seconds, 3), error=None)
        await report(pod, kube.state_annotations(c.STATE_AWAKE, int(SleepLevel.AWAKE), done))
        await event(pod, "Normal", c.STATE_AWAKE, f"Cold-started in {seconds:.1f} s ({op.get('reason')})")
        log.info("%s/%s: cold-started in %.1f s", *ref.key, seconds)
        self.active.pop(ref.uid, None)
        return None

    async def _take_request(self, pod: dict[str, Any], ref: PodRef) -> None:
        if not requested(ref):
            return
        version = (pod.get("metadata") or {}).get("resourceVersion")
        if version is not None:
            self.taken[ref.uid] = version
        await asyncio.to_thread(self.remove, ref.namespace, ref.name, c.ANN_DISCARD_CHECKPOINT)

    async def _answers(self, ref: PodRef) -> bool:
        async with EngineClient(ref.engine_url, timeout=2.0, retries=0) as engine:
            return await engine.health()

    def _tear_down(self, ref: PodRef, op: dict[str, Any]) -> None:
        """Steps 2-5 for the container the cold start replaces; what is done already is skipped."""
        proc_root = self.host.proc_root
        old = op.get("container")
        procs = discovery.container_processes(ref.uid, old, proc_root) if isinstance(old, str) else []
        root: discovery.EngineRoot | None = None
        with contextlib.suppress(LookupError, ValueError):
            root = discovery.engine_root(procs) if procs else None
        if root is not None and root.init_is_engine:
            # No pod init to outlive the engine: the container ends with it, and the kubelet restarts it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(root.init.pid, signal.SIGKILL)
            root = None
        marker = criu.Pod(root.init.pid) if root is not None else None
        if root is not None and marker is not None:
            engine = [p.pid for p in root.processes if _alive(p.pid, proc_root)]
            if engine:
                marker.write_marker("cold start\n")  # the init waits for a restore instead of exiting
                for pid in engine:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + _KILL_WAIT_S
                while time.monotonic() < deadline and any(_alive(pid, proc_root) for pid in engine):
                    time.sleep(0.02)
        try:
            image = ref.image_dir(self.host.checkpoint_roots)
        except PermissionError:
            image = None
        if image is not None and image.parent.exists():
            criu.wait_for_criu(image, self.host.criu_timeout_s)
            criu.settle(image, True)  # temporary directories go; nothing is adopted
            if image.exists():
                criu.remove_image(image)
                log.info("%s/%s: removed the checkpoint image %s", *ref.key, image)
        fault_point("agent.discard-after-image")
        if root is not None and marker is not None:
            holders = [p.pid for p in discovery.pod_processes(ref.uid, proc_root)]
            shm.clean_quietly(root.init.pid, holders, None, proc_root)
            with contextlib.suppress(OSError):
                marker.remove_marker()  # the init has no child left: it exits, and the kubelet restarts it
