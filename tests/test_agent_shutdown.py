"""The agent on SIGTERM (Agent.stop): an operation in flight finishes and is reported; a worker that
only waits to retry ends at once, and nothing new starts. A DaemonSet rollout must not wait out a
backoff (up to the pod's termination grace period) for a pod that nothing is being done to."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hibernate.agent.levels import LevelError
from hibernate.agent.podref import PodRef
from hibernate.agent.worker import Agent, Reporter
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel


class Levels:
    """Pod `refused` refuses every sleep (undone: the agent retries with backoff); pod `held` sleeps
    once `release` is set, so its sleep is in flight until then."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.host = SimpleNamespace(checkpoint_roots=[])

    async def probe(self, ref: PodRef, claimed: SleepLevel | None, hint: SleepLevel | None) -> SleepLevel:
        return SleepLevel.AWAKE

    async def sleep(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        self.calls.append(f"sleep {ref.name}")
        if ref.name == "refused":
            raise LevelError("the engine refused", rolled_back=True)
        await self.release.wait()
        return {"path": "engine"}

    async def wake(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        raise AssertionError("nothing is woken here")


def pod(name: str) -> dict[str, Any]:
    annotations = {c.ANN_SLEEP_LEVEL: "L1", c.ANN_STATE: c.STATE_AWAKE, c.ANN_OBSERVED_LEVEL: "0"}
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": f"u-{name}", "annotations": annotations},
        "spec": {"containers": [{"name": c.ENGINE_CONTAINER, "ports": [{"containerPort": 8000}]}]},
        "status": {"podIP": "10.0.0.9"},
    }


async def until(check: Callable[[], bool], what: str) -> None:
    """Let the agent's tasks run until `check` holds (a minute at most: a liveness bound, no timing)."""
    for _ in range(6000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def stop_with_one_in_flight_and_one_waiting() -> None:
    levels = Levels()
    writes: dict[str, list[str]] = {"refused": [], "held": []}

    def annotate(namespace: str, name: str, annotations: dict[str, str]) -> bool:
        writes[name].append(annotations[c.ANN_STATE])
        return True

    reporter = Reporter(node="n", annotate=annotate, post_event=lambda *_: None)
    reporter.put_condition = lambda *_: True  # no readiness gate here
    # A clock that stands still: the refused sleep's retry is never due.
    agent = Agent(levels=levels, reporter=reporter, clock=lambda: 1000.0)  # type: ignore[arg-type]
    for name in writes:
        ref = PodRef.from_pod(pod(name))
        agent.pods[ref.key] = pod(name)
        agent.kick(ref.key)
    refused, held = agent.workers[("ns", "refused")], agent.workers[("ns", "held")]
    await until(lambda: writes["refused"] == [c.STATE_SLEEPING, c.STATE_FAILED], "the refused sleep undone")
    await until(lambda: writes["held"] == [c.STATE_SLEEPING], "the held sleep in flight")
    # Its next try an hour away (a pod that failed often); an event (its report's echo) wakes its worker,
    # which goes back to waiting for the hour.
    agent.retry_at[("ns", "refused")] = ("L1", 1000.0 + 3600)
    agent.kick(("ns", "refused"))
    await until(lambda: not agent.dirty[("ns", "refused")].is_set(), "the worker woken by the event")

    agent.stop()
    await until(refused.done, "the worker that waits to retry ended")
    assert not held.done(), "the operation in flight goes on"
    agent.kick(("ns", "refused"))
    assert agent.workers[("ns", "refused")] is refused, "nothing new starts once stopping"

    levels.release.set()
    await until(held.done, "the operation in flight finished")
    assert writes["held"] == [c.STATE_SLEEPING, c.STATE_ASLEEP], "finished and reported"
    assert levels.calls == ["sleep refused", "sleep held"], "no retry after the stop"


def test_a_stop_lets_the_operation_in_flight_finish_and_ends_the_workers_that_wait_to_retry() -> None:
    asyncio.run(stop_with_one_in_flight_and_one_waiting())
