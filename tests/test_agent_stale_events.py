"""The agent and its own reports arriving late: the watch may deliver the agent's `Sleeping` write
after the agent has finished the sleep and written `Asleep`. That late event must not make the
finished operation look interrupted (a probe, and a `verify` record instead of the sleep's)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from hibernate.agent.podref import PodRef
from hibernate.agent.worker import Agent, Reporter
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel


class RecordingLevels:
    """Levels whose engine moves at once; it records what the agent asked of it."""

    def __init__(self) -> None:
        self.level = SleepLevel.AWAKE
        self.calls: list[str] = []
        self.host = SimpleNamespace(checkpoint_roots=[])

    async def probe(self, ref: PodRef, claimed: SleepLevel | None, hint: SleepLevel | None) -> SleepLevel:
        self.calls.append("probe")
        return self.level

    async def sleep(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        self.calls.append(f"sleep {level.label}")
        self.level = level
        return {"path": "engine"}

    async def wake(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        self.calls.append(f"wake {level.label}")
        self.level = SleepLevel.AWAKE
        return {"path": "engine"}


def pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "m-0", "uid": "u1", "annotations": annotations},
        "spec": {"containers": [{"name": c.ENGINE_CONTAINER, "ports": [{"containerPort": 8000}]}]},
        "status": {"podIP": "10.0.0.9"},
    }


def agent_with_records() -> tuple[Agent, RecordingLevels, list[dict[str, str]]]:
    writes: list[dict[str, str]] = []

    def annotate(namespace: str, name: str, annotations: dict[str, str]) -> bool:
        writes.append(annotations)
        return True

    levels = RecordingLevels()
    reporter = Reporter(node="n", annotate=annotate, post_event=lambda *_: None)
    return Agent(levels=levels, reporter=reporter), levels, writes  # type: ignore[arg-type]


def test_the_agents_own_late_sleeping_report_is_not_taken_for_an_interrupted_sleep() -> None:
    agent, levels, writes = agent_with_records()
    awake = {c.ANN_SLEEP_LEVEL: "L1", c.ANN_STATE: c.STATE_AWAKE, c.ANN_OBSERVED_LEVEL: "0"}

    asyncio.run(agent.converge(pod(awake)))
    assert [w[c.ANN_STATE] for w in writes] == [c.STATE_SLEEPING, c.STATE_ASLEEP]
    assert levels.calls == ["probe", "sleep L1"]

    late = pod({c.ANN_SLEEP_LEVEL: "L1", **writes[0]})  # the agent's first write, delivered last
    asyncio.run(agent.converge(late))
    assert levels.calls == ["probe", "sleep L1"], "no probe of a pod whose operation this agent finished"
    assert len(writes) == 2, "nothing written over the sleep's own record"
    assert json.loads(writes[-1][c.ANN_LAST_OPERATION])["action"] == "sleep"

    echo = pod({c.ANN_SLEEP_LEVEL: "L1", **writes[1]})  # the echo of its last write: settled
    asyncio.run(agent.converge(echo))
    assert len(writes) == 2 and levels.calls == ["probe", "sleep L1"]


def test_after_a_restart_a_sleeping_report_is_still_verified_against_the_engine() -> None:
    """A new agent process has written nothing: `Sleeping` then means an operation was cut short."""
    agent, levels, writes = agent_with_records()
    levels.level = SleepLevel.L1
    under_way = json.dumps({"action": "sleep", "level": 1, "target": "L1", "started": "2026-11-25T12:00:00Z"})
    asyncio.run(
        agent.converge(
            pod(
                {
                    c.ANN_SLEEP_LEVEL: "L1",
                    c.ANN_STATE: c.STATE_SLEEPING,
                    c.ANN_OBSERVED_LEVEL: "0",
                    c.ANN_LAST_OPERATION: under_way,
                }
            )
        )
    )
    assert levels.calls == ["probe"], "the engine is asked, and not slept again"
    assert json.loads(writes[0][c.ANN_LAST_OPERATION])["action"] == "verify"
    assert writes[-1][c.ANN_STATE] == c.STATE_ASLEEP
