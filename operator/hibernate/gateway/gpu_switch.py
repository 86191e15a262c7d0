# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""Make room on a GpuGroup's GPU before a request wakes one of its members (docs/gpu-sharing.md).

One switch at a time per group in this gateway, first come first served (asyncio.Lock wakes its
waiters in order). Across gateway replicas the GpuGroup's lease annotation is the arbiter: every
write is a compare-and-swap on its resourceVersion, and a member that makes room keeps its place in
the lease (marked as handing over) until it has reached its level, so no reader ever counts a free
slot that is not free yet. The member put to sleep gets an automatic level (source `gpu-group`),
never a change of its spec. A member that fails to make room in switchTimeoutSeconds is stopped
(Stop scales it to zero, which needs no engine); one that cannot even be stopped keeps the GPU and
the request is refused, so the group never waits on it for ever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from hibernate.api import constants as c
from hibernate.api.gpu_group import (
    GpuGroupSpec,
    Lease,
    LeaseEntry,
    Member,
    current_holders,
    decide,
    make_room_level,
    now_text,
    read_lease,
)
from hibernate.api.levels import SleepLevel
from hibernate.controller import kube
from hibernate.controller.auto_level import set_automatic_level
from hibernate.gateway import metrics as m
from hibernate.gateway.registry import Key, ModelView, Registry

log = logging.getLogger("hibernate.gateway")

POLL_SECONDS = 1.0  # while waiting for a member to make room, read it directly this often
Busy = Callable[[Key], bool]  # requests in flight for a model through this gateway


@dataclass(frozen=True)
class Room:
    """The answer of `make_room`: `refusal` (a reason to answer 503, with its Retry-After), or room;
    `switched_at` (monotonic) when a member was put to sleep for it."""

    refusal: str | None = None
    retry_after: int = 0
    switched_at: float | None = None


class Conflict(Exception):
    """The GpuGroup changed since it was read: read it again and decide again."""


class GpuSwitch:
    def __init__(self, registry: Registry, metrics: m.GatewayMetrics, busy: Busy) -> None:
        self.registry = registry
        self.metrics = metrics
        self.busy = busy
        self.locks: dict[Key, asyncio.Lock] = {}
        self.last_used: dict[Key, float] = {}  # epoch seconds of each model's last request here

    def touch(self, key: Key) -> None:
        self.last_used[key] = time.time()

    async def make_room(self, view: ModelView, deadline: float) -> Room:
        """Return once `view`'s model may wake without the group going over its budget (it holds the
        GPU in the lease), or with the refusal. `deadline` is the request's (loop time)."""
        assert view.gpu_group is not None
        loop = asyncio.get_running_loop()
        lock = self.locks.setdefault((view.namespace, view.gpu_group), asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return Room(
                refusal=f"GpuGroup {view.gpu_group} is busy switching; model `{view.model}` waited too long",
                retry_after=10,
            )
        try:
            return await self._make_room(view, deadline)
        finally:
            lock.release()

    # --- one switch ---------------------------------------------------------------------------

    async def _make_room(self, view: ModelView, deadline: float) -> Room:
        loop = asyncio.get_running_loop()
        group_name = str(view.gpu_group)
        while True:
            group = await asyncio.to_thread(_read_group, view.namespace, group_name)
            if group is None:
                return Room(
                    refusal=f"model `{view.model}` is in GpuGroup {group_name}, which does not exist",
                    retry_after=30,
                )
            try:
                spec = GpuGroupSpec.model_validate(group.get("spec") or {})
            except ValidationError as e:
                return Room(refusal=f"GpuGroup {group_name} has an invalid spec: {e}", retry_after=30)
            members = self._members(view.namespace, group_name)
            if view.name not in members:
                return Room()  # it left the group meanwhile
            lease = read_lease(group)
            now = time.time()
            timeout = float(spec.switch_timeout_seconds)
            holders = current_holders(lease, members, now, grace=timeout)
            decision = decide(spec, holders, members, view.name, now, timeout)
            version = str(group["metadata"]["resourceVersion"])
            try:
                if decision.action == "hold":
                    return Room()
                if decision.action == "join":
                    joined = [*holders, LeaseEntry(name=view.name, since=now, last_used=now)]
                    await self._write(view.namespace, group_name, lease, joined, version)
                    log.info("GpuGroup %s/%s: %s takes a free slot", view.namespace, group_name, view.name)
                    return Room()
                if decision.action == "wait":
                    until = decision.until or now + 0.5
                    if loop.time() + (until - now) > deadline:
                        return Room(
                            refusal=(
                                f"GpuGroup {group_name} has no room for model `{view.model}` before the "
                                f"hold timeout: {decision.reason}"
                            ),
                            retry_after=max(1, int(until - now)),
                        )
                    await asyncio.sleep(min(max(until - now, 0.05), POLL_SECONDS))
                    continue
                victim = str(decision.victim)
                marked = [
                    e.model_copy(update={"handover_to": view.name, "handover_since": now})
                    if e.name == victim
                    else e
                    for e in holders
                ]
                await self._write(view.namespace, group_name, lease, marked, version)
            except Conflict:
                continue
            return await self._switch(view, group_name, spec, victim)

    async def _switch(self, view: ModelView, group_name: str, spec: GpuGroupSpec, victim: str) -> Room:
        started = time.monotonic()
        namespace = view.namespace
        level = self._level_for(namespace, victim, spec)
        log.info(
            "GpuGroup %s/%s: putting %s to %s to make room for %s",
            namespace,
            group_name,
            victim,
            level.label,
            view.name,
        )
        reason = f"made room on GpuGroup {group_name} for {view.name}"
        result = m.SWITCH_OK
        if not await self._put_to(namespace, victim, level, reason, spec.switch_timeout_seconds):
            result = m.SWITCH_STOPPED
            log.warning(
                "GpuGroup %s/%s: %s did not reach %s in %d s; stopping it",
                namespace,
                group_name,
                victim,
                level.label,
                spec.switch_timeout_seconds,
            )
            stop_reason = f"{reason}: it did not reach {level.label} in {spec.switch_timeout_seconds} s"
            if level == SleepLevel.STOP or not await self._put_to(
                namespace, victim, SleepLevel.STOP, stop_reason, spec.switch_timeout_seconds
            ):
                result = m.SWITCH_FAILED
        seconds = round(time.monotonic() - started, 3)
        await self._finish(namespace, group_name, victim, view.name, result, seconds)
        self.metrics.gpu_switches.labels(result=result).inc()
        if result == m.SWITCH_FAILED:
            return Room(
                refusal=(
                    f"GpuGroup {group_name} has no room for model `{view.model}`: {victim} could not be "
                    f"put to sleep nor stopped within {spec.switch_timeout_seconds} s each"
                ),
                retry_after=30,
            )
        return Room(switched_at=started)

    async def _finish(
        self, namespace: str, group_name: str, victim: str, to: str, result: str, seconds: float
    ) -> None:
        """Second write of a switch: the victim leaves the lease and `to` takes its place (or, when the
        victim could not be moved, it keeps its place and nobody takes it)."""
        for _ in range(20):
            group = await asyncio.to_thread(_read_group, namespace, group_name)
            if group is None:
                return
            lease = read_lease(group)
            now = time.time()
            entries = [e for e in lease.holders if e.name not in (victim, to)]
            if result == m.SWITCH_FAILED:
                old = lease.entry(victim)
                entries.append(LeaseEntry(name=victim, since=old.since if old else 0.0))
            else:
                entries.append(LeaseEntry(name=to, since=now, last_used=now))
            lease.last_switch = {
                "from": victim,
                "to": to,
                "at": now_text(now),
                "seconds": seconds,
                "result": result,
            }
            try:
                await self._write(
                    namespace, group_name, lease, entries, str(group["metadata"]["resourceVersion"])
                )
                return
            except Conflict:
                continue
        log.error("GpuGroup %s/%s: could not record the switch %s -> %s", namespace, group_name, victim, to)

    # --- putting a member to a level ------------------------------------------------------------

    async def _put_to(
        self, namespace: str, name: str, level: SleepLevel, reason: str, timeout: float
    ) -> bool:
        """Give the member `level` as its automatic level and wait until it has reached it (True),
        or it failed, or `timeout` seconds passed (False). A member deleted meanwhile frees its slot."""
        key = (namespace, name)
        view = self.registry.get(key) or await self._reread(key)
        if view is None:
            return True
        done = await asyncio.to_thread(
            functools.partial(
                set_automatic_level,
                namespace,
                name,
                level,
                source=c.GPU_GROUP_SOURCE,
                reason=reason,
                generation=view.generation,
            )
        )
        if not done:
            return (await self._reread(key)) is None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_read = loop.time()
        while True:
            view = self.registry.get(key)
            if view is None:
                return True
            if view.effective == level and view.caught_up:
                if view.phase in ("Asleep", "Stopped"):
                    return True
                if view.phase == "Failed":
                    return False
            now = loop.time()
            if now >= deadline:
                return False
            if now - last_read >= POLL_SECONDS:
                last_read = now
                await self._reread(key)
                continue
            await self.registry.changed(key, min(deadline - now, POLL_SECONDS))

    async def _reread(self, key: Key) -> ModelView | None:
        try:
            obj = await asyncio.to_thread(kube.read_model_deployment, *key)
        except Exception as e:
            self.metrics.api_errors.labels(call="read").inc()
            log.warning("could not read %s/%s: %s", key[0], key[1], e)
            return self.registry.get(key)
        self.registry.refresh(obj, key)
        return self.registry.get(key)

    # --- views and writes -----------------------------------------------------------------------

    def _members(self, namespace: str, group_name: str) -> dict[str, Member]:
        out = {}
        for view in self.registry.group_members(namespace, group_name):
            out[view.name] = Member(
                name=view.name,
                holds=holds_gpu(view),
                last_used=self.last_used.get(view.key, 0.0),
                memory=view.gpu_memory,
                busy=self.busy(view.key),
                waking=view.effective == SleepLevel.AWAKE and not view.serving,
                awake_since=view.ready_since if view.serving else 0.0,
            )
        return out

    def _level_for(self, namespace: str, name: str, spec: GpuGroupSpec) -> SleepLevel:
        view = self.registry.get((namespace, name))
        if view is not None and view.make_room_level is not None:
            return view.make_room_level
        return make_room_level(spec.make_room_level)

    async def _write(
        self, namespace: str, group_name: str, lease: Lease, holders: list[LeaseEntry], version: str
    ) -> None:
        body = Lease(holders=holders, last_switch=lease.last_switch).dump()
        try:
            await asyncio.to_thread(_annotate_group, namespace, group_name, body, version)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(group_name) from e
            self.metrics.api_errors.labels(call="gpu-lease").inc()
            raise


def holds_gpu(view: ModelView) -> bool:
    """Awake, waking, or not yet settled asleep: it has (or is taking) its GPU memory."""
    settled = view.caught_up and view.phase in ("Asleep", "Stopped")
    return view.effective == SleepLevel.AWAKE or not settled


def _read_group(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = kube.custom().get_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.GPU_GROUP_PLURAL, name
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return cast(dict[str, Any], obj)


def _annotate_group(namespace: str, name: str, lease: str, version: str) -> None:
    patch = {"metadata": {"resourceVersion": version, "annotations": {c.ANN_GPU_LEASE: lease}}}
    kube.custom().patch_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.GPU_GROUP_PLURAL, name, patch
    )
