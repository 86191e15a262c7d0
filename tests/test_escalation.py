"""Failures converge (issue 15, items 1 and 2): the node agent's worker driven without processes.

A stand-in for `Levels` (`World`) plays a pod whose operations succeed or fail as a table says; the
worker's `converge` runs as the watch would run it, each report coming back as the pod's next event,
on a virtual clock, so that backoff is measured rather than waited for. The contract (design.md, "A
failed sleep never leaves a half state") and docs/reliability.md say what must hold:

- a failed sleep that was undone is tried again with backoff, a bounded number of times;
- a failed sleep that could not be undone escalates: CudaSuspend, Checkpoint, then the whole
  ModelDeployment to Stop, which the agent asks of the operator (`hibernate.dev/escalate-to: Stop`);
  a deeper level reached that way is never undone to retry the shallower one;
- a partial CUDA rollback is reported as such (the deepest level, Failed, the processes named) and
  restored with backoff; a pod whose restore keeps failing goes to Stop;
- the pod ends at the level asked for or a deeper one, or awake with the failure reported, or asked
  to Stop; never half suspended, and never in a loop.

The CUDA part of item 2 runs the real `Levels` over a stand-in for the driver's checkpoint API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hibernate.agent.levels import Host, LevelError, Levels
from hibernate.agent.podref import PodRef
from hibernate.agent.worker import Agent, Reporter
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller.status import PodView, fold
from tests.cluster import Cluster, Process, eventually
from tests.modeldeployments import apply, events_for, get, manifest, mark_ready, pods, report, set_level
from tests.test_cuda import CHECKPOINTED, RUNNING, FakeDriver

L = SleepLevel
PROCESSES = {"pid 101 (python3)": "checkpointed", "pid 102 (python3)": "running"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """A stand-in for Levels: one pod whose operations follow `table`.

    `table[(action, level)]` lists the outcomes of successive calls; the last one repeats for ever (a
    fault that stays). Sleep outcomes: `ok`; `rolled_back` (undone: nothing changed); `stuck` (the
    engine slept and could not be woken back); `partial` (CUDA half suspended: a process checkpointed,
    another running; at levels 1-2 the same as `stuck`). Wake outcomes: `ok`, `fail` (nothing changed).
    """

    table: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    clock: Clock = field(default_factory=Clock)
    level: SleepLevel = L.AWAKE  # the deepest level any part of the pod is at: what a probe reads
    half: bool = False  # between levels: part of it asleep, part not (or an engine that cannot wake)
    escalated: bool = False  # at a level deeper than the wish, reached by an escalation
    wish: SleepLevel = L.AWAKE
    calls: list[tuple[float, str, SleepLevel, str]] = field(default_factory=list)
    used: dict[tuple[str, int], int] = field(default_factory=dict)
    host: Any = field(default_factory=lambda: SimpleNamespace(checkpoint_roots=()))

    def _next(self, action: str, level: SleepLevel) -> str:
        outcomes = self.table.get((action, int(level))) or ["ok"]
        n = self.used.get((action, int(level)), 0)
        self.used[(action, int(level))] = n + 1
        outcome = outcomes[min(n, len(outcomes) - 1)]
        self.calls.append((self.clock(), action, level, outcome))
        return outcome

    async def probe(
        self, ref: PodRef, claimed: SleepLevel | None, hint: SleepLevel | None = None
    ) -> SleepLevel:
        return self.level

    async def sleep(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        assert self.half or self.level == L.AWAKE, f"a sleep of a pod already at {self.level.label}"
        outcome = self._next("sleep", level)
        if outcome == "ok":
            self.escalated = level > self.wish
            self.level, self.half = level, False
            return {"path": "stand-in"}
        if outcome == "rolled_back":
            raise LevelError(f"sleep {level.label} refused", rolled_back=True)
        if outcome == "partial" and level >= L.CUDA_SUSPEND:
            self.level, self.half = max(self.level, L.CUDA_SUSPEND), True
            raise LevelError(
                f"suspend failed; ROLLBACK INCOMPLETE; processes left: {PROCESSES}",
                rolled_back=False,
                level=L.CUDA_SUSPEND,
                processes=dict(PROCESSES),
            )
        under = L.L1 if level in (L.L1, L.CUDA_SUSPEND) else L.L2
        self.level, self.half = max(self.level, under), True
        raise LevelError(f"sleep {level.label} failed; waking the engine back failed too", rolled_back=False)

    async def wake(self, ref: PodRef, level: SleepLevel) -> dict[str, Any]:
        # Never undo a deeper level reached by an escalation to retry a shallower wish.
        assert self.half or not self.escalated or self.wish == L.AWAKE or self.wish > self.level, (
            f"woke a pod escalated to {self.level.label} while {self.wish.label} is asked: {self.calls}"
        )
        if self._next("wake", level) != "ok":
            raise LevelError(f"wake from {level.label} failed", rolled_back=False)
        self.level, self.half, self.escalated = L.AWAKE, False, False
        return {"path": "stand-in"}


@dataclass
class Run:
    """The agent under test, its pod's annotations and everything it wrote and posted."""

    world: World
    annotations: dict[str, str]
    writes: list[dict[str, str]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    agent: Agent = field(init=False)

    def __post_init__(self) -> None:
        reporter = Reporter(
            node="n",
            annotate=lambda namespace, name, annotations: self.writes.append(annotations) or True,
            post_event=lambda pod, node, kind, reason, message: self.events.append((kind, reason, message)),
            post_warning_once=lambda pod, node, reason, message: self.events.append(
                ("Warning", reason, message)
            ),
        )
        reporter.put_condition = lambda *_: True  # type: ignore[attr-defined]  # no readiness gate here
        self.agent = Agent(levels=self.world, reporter=reporter, clock=self.world.clock)  # type: ignore[arg-type]

    def pod(self, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "metadata": {
                "namespace": "ns",
                "name": "m-0",
                "uid": "u1",
                "annotations": dict(annotations or self.annotations),
            },
            "spec": {"containers": [{"name": c.ENGINE_CONTAINER, "ports": [{"containerPort": 8000}]}]},
            "status": {"podIP": "10.0.0.9"},
        }

    def ask(self, level: SleepLevel) -> None:
        if level == self.world.level:
            self.world.escalated = False  # asked for where it is: an ordinary level from now on
        self.world.wish = level
        self.annotations[c.ANN_SLEEP_LEVEL] = level.label

    def settle(self, horizon_s: float = 3600.0, late_events: bool = False, max_passes: int = 400) -> str:
        """Run passes as the watch would (each report comes back as an event) until the agent has
        nothing left to do ("settled") or only a retry after `horizon_s` ("horizon")."""
        return asyncio.run(self._settle(horizon_s, late_events, max_passes))

    async def _settle(self, horizon_s: float, late_events: bool, max_passes: int) -> str:
        start = self.world.clock()
        for _ in range(max_passes):
            n = len(self.writes)
            retry = await self.agent.converge(self.pod())
            fresh = self.writes[n:]
            if fresh and late_events and len(fresh) > 1:
                stale = {**self.annotations, **fresh[0]}  # the first report, delivered after the last
                for w in fresh:
                    self.annotations.update(w)
                await self.agent.converge(self.pod(stale))
                fresh = self.writes[n:]
            for w in fresh:
                self.annotations.update(w)
            if fresh:
                continue  # its echo comes back at once
            if retry is None:
                return "settled"
            assert retry > 0, "an immediate retry without anything written is a busy loop"
            self.world.clock.now += retry
            if self.world.clock() - start > horizon_s:
                return "horizon"
        raise AssertionError(f"no end after {max_passes} passes: {self.world.calls}")

    @property
    def op(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.annotations.get(c.ANN_LAST_OPERATION, "{}"))
        return result

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]


def run(table: dict[tuple[str, int], list[str]], wish: SleepLevel) -> Run:
    r = Run(World(table), {c.ANN_STATE: c.STATE_AWAKE, c.ANN_OBSERVED_LEVEL: "0"})
    r.ask(wish)
    return r


def ops(r: Run) -> list[str]:
    return [f"{action} {level.label}" for _, action, level, _ in r.world.calls]


# -- item 1: escalation that converges ---------------------------------------------------------------


def test_a_sleep_escalated_deeper_is_not_undone_to_retry_the_shallower_one() -> None:
    """The loop of issue 15: the agent's own annotation echo woke the pod from CudaSuspend to retry L1."""
    r = run({("sleep", 1): ["stuck"]}, L.L1)
    assert r.settle() == "settled"
    assert ops(r) == ["sleep L1", "sleep CudaSuspend"], "escalated once, then left there"
    assert (r.annotations[c.ANN_STATE], r.annotations[c.ANN_OBSERVED_LEVEL]) == (c.STATE_FAILED, "3")
    assert r.op["action"] == "sleep" and r.op["target"] == "L1" and r.op["escalated"] == "CudaSuspend"
    assert "escalated to CudaSuspend to free the GPU" in r.op["error"]
    assert ("Warning", "Escalating") in [(k, reason) for k, reason, _ in r.events]

    r.world.clock.now += 3600  # nothing is retried, however long it waits
    assert r.settle() == "settled" and len(r.world.calls) == 2

    r.ask(L.AWAKE)  # a wake (or a deeper wish) moves it on
    assert r.settle() == "settled"
    assert ops(r)[2:] == ["wake CudaSuspend"] and r.world.level == L.AWAKE
    assert r.annotations[c.ANN_STATE] == c.STATE_AWAKE


def test_escalation_goes_on_to_checkpoint_then_asks_the_operator_to_stop_the_model() -> None:
    r = run({("sleep", 1): ["stuck"], ("sleep", 3): ["rolled_back"], ("sleep", 4): ["stuck"]}, L.L1)
    assert r.settle() == "settled"
    assert ops(r) == ["sleep L1", "sleep CudaSuspend", "sleep Checkpoint"]
    assert r.annotations[c.ANN_ESCALATE_TO] == c.ESCALATE_TO_STOP
    assert r.annotations[c.ANN_STATE] == c.STATE_FAILED and r.op["escalated"] == "Stop"
    assert "asked the operator to stop the ModelDeployment" in r.op["error"]
    escalating = [m for _, reason, m in r.events if reason == "Escalating"]
    assert len(escalating) == 3, escalating  # one Event per step: CudaSuspend, Checkpoint, Stop
    assert "escalating to CudaSuspend" in escalating[0] and "escalating to Checkpoint" in escalating[1]
    assert f"{c.ANN_ESCALATE_TO}={c.ESCALATE_TO_STOP}" in escalating[2]

    r.ask(L.AWAKE)  # the pod is the operator's now: nothing more is done to it
    assert r.settle() == "settled" and len(r.world.calls) == 3


def test_a_sleep_that_was_undone_is_retried_with_backoff_a_bounded_number_of_times() -> None:
    r = run({("sleep", 1): ["rolled_back"]}, L.L1)
    assert r.settle() == "settled"
    times = [t - 1000.0 for t, *_ in r.world.calls]
    assert ops(r) == ["sleep L1"] * 3 and times == [0.0, 1.0, 3.0], times
    assert (r.annotations[c.ANN_STATE], r.annotations[c.ANN_OBSERVED_LEVEL]) == (c.STATE_FAILED, "0")
    assert r.op["attempt"] == 3 and "not tried again until another level is asked for" in r.op["error"]

    r.ask(L.L2)  # another wish: served at once
    assert r.settle() == "settled" and ops(r)[3:] == ["sleep L2"] and r.world.level == L.L2


def test_a_sleep_that_fails_then_works_reaches_its_level() -> None:
    r = run({("sleep", 2): ["rolled_back", "ok"]}, L.L2)
    assert r.settle() == "settled"
    assert ops(r) == ["sleep L2", "sleep L2"] and r.annotations[c.ANN_STATE] == c.STATE_ASLEEP


def test_an_agent_restarted_mid_escalation_goes_on_with_it_and_never_wakes_the_pod() -> None:
    r = run({}, L.L1)
    r.world.level, r.world.half = L.L1, True  # the engine slept and could not be woken back
    step = {
        "action": "sleep",
        "level": 3,
        "target": "CudaSuspend",
        "started": "2026-01-01T00:00:00.000Z",
        "escalation": {"from": "L1", "error": "sleep L1 failed; waking the engine back failed too"},
    }
    r.annotations.update(
        {c.ANN_STATE: c.STATE_SLEEPING, c.ANN_OBSERVED_LEVEL: "0", c.ANN_LAST_OPERATION: json.dumps(step)}
    )
    assert r.settle() == "settled"
    assert ops(r) == ["sleep CudaSuspend"]
    assert (r.annotations[c.ANN_STATE], r.annotations[c.ANN_OBSERVED_LEVEL]) == (c.STATE_FAILED, "3")
    assert r.op["escalated"] == "CudaSuspend" and r.op["interrupted"]["escalation"]["from"] == "L1"


def test_an_agent_restarted_after_an_escalation_step_finished_records_it() -> None:
    r = run({}, L.L1)
    r.world.level = L.CUDA_SUSPEND
    step = {
        "action": "sleep",
        "level": 3,
        "target": "CudaSuspend",
        "started": "x",
        "escalation": {"from": "L1"},
    }
    r.annotations.update(
        {c.ANN_STATE: c.STATE_SLEEPING, c.ANN_OBSERVED_LEVEL: "0", c.ANN_LAST_OPERATION: json.dumps(step)}
    )
    assert r.settle() == "settled" and ops(r) == []
    assert r.annotations[c.ANN_OBSERVED_LEVEL] == "3" and r.op["escalated"] == "CudaSuspend"


# -- item 2: a partial CUDA rollback -----------------------------------------------------------------


def test_a_partial_rollback_is_reported_as_partial_and_restored_with_backoff() -> None:
    r = run({("sleep", 3): ["partial", "ok"], ("wake", 3): ["fail", "fail", "ok"]}, L.CUDA_SUSPEND)
    first = asyncio.run(r.agent.converge(r.pod()))
    for w in r.writes:
        r.annotations.update(w)
    assert first is not None and first > 0, "the restore waits its backoff"
    assert (r.annotations[c.ANN_STATE], r.annotations[c.ANN_OBSERVED_LEVEL]) == (c.STATE_FAILED, "3")
    assert r.op["partial"] is True and r.op["processes"] == PROCESSES
    assert "pid 101" in r.op["error"] and "pid 102" in r.op["error"]

    assert r.settle() == "settled"
    assert ops(r) == [
        "sleep CudaSuspend",
        "wake CudaSuspend",
        "wake CudaSuspend",
        "wake CudaSuspend",
        "sleep CudaSuspend",
    ]
    restores = [t for t, action, *_ in r.world.calls if action == "wake"]
    assert restores[1] - restores[0] >= 1 and restores[2] - restores[1] >= 2, restores
    assert (r.annotations[c.ANN_STATE], r.annotations[c.ANN_OBSERVED_LEVEL]) == (c.STATE_ASLEEP, "3")
    assert not r.world.half


def test_a_failed_restore_of_a_half_pod_still_reports_it_half_and_names_the_processes() -> None:
    r = run({("sleep", 3): ["partial"], ("wake", 3): ["fail"]}, L.CUDA_SUSPEND)
    asyncio.run(r.agent.converge(r.pod()))
    for w in r.writes:
        r.annotations.update(w)
    r.world.clock.now += 1
    asyncio.run(r.agent.converge(r.pod()))
    for w in r.writes:
        r.annotations.update(w)
    assert r.op["action"] == "wake" and r.op["partial"] is True and r.op["processes"] == PROCESSES
    # The pod is at 3, as asked, but half: it is not taken for a level reached.
    assert r.annotations[c.ANN_STATE] == c.STATE_FAILED


def test_a_half_pod_whose_restore_keeps_failing_is_stopped_by_the_operator() -> None:
    r = run({("sleep", 4): ["partial"], ("wake", 3): ["fail"]}, L.CHECKPOINT)
    assert r.settle() == "settled"
    assert ops(r) == ["sleep Checkpoint"] + ["wake CudaSuspend"] * 5
    assert r.annotations[c.ANN_ESCALATE_TO] == c.ESCALATE_TO_STOP
    assert r.op["escalated"] == "Stop" and "5 failed restores" in r.op["error"]


def test_the_status_names_the_processes_a_partial_rollback_left() -> None:
    """Degraded=True on the ModelDeployment carries the pod's report, which names the processes."""
    op = {
        "action": "sleep",
        "level": 3,
        "target": "CudaSuspend",
        "seconds": 1.0,
        "partial": True,
        "processes": PROCESSES,
        "error": "suspend failed at checkpoint of pid 102; ROLLBACK INCOMPLETE: restore of pid 101: "
        "CUDA_ERROR_UNKNOWN; processes left: pid 101 (python3) checkpointed, pid 102 (python3) running",
    }
    pod = PodView(
        name="m-0",
        annotations={
            c.ANN_SLEEP_LEVEL: "CudaSuspend",
            c.ANN_STATE: c.STATE_FAILED,
            c.ANN_OBSERVED_LEVEL: "3",
            c.ANN_LAST_OPERATION: json.dumps(op),
        },
    )
    status = fold(desired=L.CUDA_SUSPEND, replicas=1, generation=1, pods=[pod], previous={}).status
    degraded = next(x for x in status["conditions"] if x["type"] == "Degraded")
    assert status["phase"] == "Failed" and degraded["status"] == "True"
    assert "pid 101 (python3) checkpointed" in degraded["message"]
    assert "pid 102 (python3) running" in degraded["message"]


class EngineDouble:
    """The engine's sleep API, as far as the CUDA level uses it."""

    def __init__(self) -> None:
        self.sleeping = False
        self.hints: list[str | None] = []
        self.calls: list[str] = []  # the requests the agent made, by the client's method

    async def __aenter__(self) -> EngineDouble:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def is_sleeping(self) -> bool:
        self.calls.append("is_sleeping")
        return self.sleeping

    async def sleep_level(self, level: int, prepare: str | None = None) -> None:
        self.calls.append("sleep_level")
        self.hints.append(prepare)
        self.sleeping = True

    async def wake(self, level: int) -> None:
        self.calls.append("wake")
        self.sleeping = False


@dataclass
class TwoProcesses(Host):
    """A pod of two CUDA processes (pids 101 and 102) over a stand-in for the driver."""

    double: EngineDouble = field(default_factory=EngineDouble)

    def engine(self, pod: PodRef) -> Any:
        return self.double

    def cuda_pids(self, pod: PodRef) -> list[int]:
        return [101, 102]


def two_processes(tmp_path: Path, driver: FakeDriver) -> tuple[Levels, TwoProcesses, PodRef]:
    for pid in (101, 102):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text("python3\n")
    host = TwoProcesses(proc_root=str(tmp_path), cuda_api=lambda: driver)
    ref = PodRef.from_pod(run({}, L.CUDA_SUSPEND).pod())
    return Levels(host), host, ref


def test_the_wake_from_cuda_suspend_asks_the_engine_once_whether_it_sleeps(tmp_path: Path) -> None:
    """Every request before the engine's wake delays the first token: one GET /is_sleeping says both
    that the engine has the sleep API and that it sleeps (issue 17, the agent's overhead)."""
    driver = FakeDriver({101: RUNNING, 102: RUNNING})
    levels, host, ref = two_processes(tmp_path, driver)
    asyncio.run(levels.sleep(ref, L.CUDA_SUSPEND))
    host.double.calls.clear()
    asyncio.run(levels.wake(ref, L.CUDA_SUSPEND))
    assert host.double.calls == ["is_sleeping", "wake"]
    assert driver.states == {101: RUNNING, 102: RUNNING} and not host.double.sleeping


def test_levels_report_a_partial_cuda_rollback_as_partial(tmp_path: Path) -> None:
    """Two processes: the checkpoint of one fails, and so does the restore of the other."""
    driver = FakeDriver({101: RUNNING, 102: RUNNING})
    driver.fail("checkpoint", 102, "CUDA_ERROR_OUT_OF_MEMORY")
    driver.fail("restore", 101, "CUDA_ERROR_UNKNOWN")
    levels, host, ref = two_processes(tmp_path, driver)
    with pytest.raises(LevelError) as caught:
        asyncio.run(levels.sleep(ref, L.CUDA_SUSPEND))
    e = caught.value
    assert driver.states == {101: CHECKPOINTED, 102: RUNNING}
    assert not e.rolled_back and e.partial and e.level == L.CUDA_SUSPEND
    assert e.processes == {"pid 101 (python3)": "checkpointed", "pid 102 (python3)": "running"}
    assert "pid 101 (python3) checkpointed, pid 102 (python3) running" in str(e)
    assert host.double.sleeping, "the engine stays asleep under the half suspension, for the restore"
    assert host.double.hints == [c.PREPARE_CUDA_SUSPEND], "the engine was told the driver comes next"

    del driver.failures[("restore", 101)]  # the restore the agent retries, now that it works
    asyncio.run(levels.wake(ref, L.CUDA_SUSPEND))
    assert driver.states == {101: RUNNING, 102: RUNNING} and not host.double.sleeping


def test_levels_report_a_complete_cuda_rollback_as_rolled_back(tmp_path: Path) -> None:
    driver = FakeDriver({101: RUNNING, 102: RUNNING})
    driver.fail("checkpoint", 102, "CUDA_ERROR_OUT_OF_MEMORY")
    levels, host, ref = two_processes(tmp_path, driver)
    with pytest.raises(LevelError) as caught:
        asyncio.run(levels.sleep(ref, L.CUDA_SUSPEND))
    assert caught.value.rolled_back and not caught.value.partial and caught.value.processes is None
    assert driver.states == {101: RUNNING, 102: RUNNING} and not host.double.sleeping


# -- the properties, over generated failures ---------------------------------------------------------

SLEEP_OUTCOMES = st.lists(st.sampled_from(["ok", "rolled_back", "stuck", "partial"]), min_size=1, max_size=4)
WAKE_OUTCOMES = st.lists(st.sampled_from(["ok", "fail"]), min_size=1, max_size=4)
TABLES = st.fixed_dictionaries(
    {
        **{("sleep", level): SLEEP_OUTCOMES for level in range(1, 5)},
        **{("wake", level): WAKE_OUTCOMES for level in range(1, 5)},
    }
)
SLEEP_LEVELS = st.sampled_from([L.L1, L.L2, L.CUDA_SUSPEND, L.CHECKPOINT])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=TABLES,
    wishes=st.tuples(SLEEP_LEVELS, st.lists(st.sampled_from(list(L)[:5]), max_size=2)),
    late_events=st.booleans(),
)
def test_failures_converge_whatever_fails(
    table: dict[tuple[str, int], list[str]],
    wishes: tuple[SleepLevel, list[SleepLevel]],
    late_events: bool,
) -> None:
    first, then = wishes
    r = run(table, first)
    for wish in (first, *then):
        r.ask(wish)
        before = len(r.world.calls)
        end = r.settle(late_events=late_events)
        calls = r.world.calls[before:]
        stop = r.annotations.get(c.ANN_ESCALATE_TO) == c.ESCALATE_TO_STOP
        # Bounded: each wish gets a few sleeps (attempts, each escalating at most twice); wakes only
        # with backoff (at most one per second after a failure).
        sleeps = [x for x in calls if x[1] == "sleep"]
        assert len(sleeps) <= 3 * r.agent.max_sleep_attempts, calls
        for a, b in itertools.pairwise(calls):
            if a[1] == "wake" and a[3] != "ok":
                assert b[0] - a[0] >= 1.0, f"a failed wake retried without backoff: {calls}"
        if end == "horizon":
            # Only a wake that keeps failing is tried for ever (with backoff), on a whole pod.
            assert calls[-1][1] == "wake" and calls[-1][3] == "fail" and not r.world.half, calls
            assert not stop
            break
        if stop:
            assert len(r.world.calls) == before + len(calls)
            r.world.clock.now += 3600
            assert r.settle() == "settled" and len(r.world.calls) == before + len(calls), "left alone"
            break
        # Settled: never half suspended, and at the wish, deeper (escalated), or awake and Failed.
        assert not r.world.half, r.world.calls
        observed = r.annotations[c.ANN_OBSERVED_LEVEL]
        assert observed == str(int(r.world.level)), (r.annotations, r.world.calls)
        state = r.annotations[c.ANN_STATE]
        if r.world.level == wish:
            assert state in (c.STATE_AWAKE, c.STATE_ASLEEP), r.annotations
        else:
            assert state == c.STATE_FAILED, r.annotations
            if r.world.level == L.AWAKE:
                assert r.op["action"] == "sleep" and r.op["attempt"] == r.agent.max_sleep_attempts, r.op
            else:
                assert r.world.level > wish and r.op.get("escalated") == r.world.level.label, r.op


# -- the last step: the operator stops the model --------------------------------------------------


def test_a_pod_that_asks_for_stop_stops_its_model_and_the_spec_stays_the_persons(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", level="L1", replicas=2))
    names = eventually(
        lambda: (
            [p.metadata.name for p in pods(cluster, namespace, "m")]
            if len(pods(cluster, namespace, "m")) == 2
            else None
        ),
        what="2 pods",
    )
    for name in names:
        mark_ready(cluster, namespace, name)
        report(cluster, namespace, name, 1, "Asleep")
    eventually(lambda: get(cluster, namespace, "m")["status"].get("phase") == "Asleep", what="Asleep")

    # What the agent writes when no level it performs could free the GPU.
    error = "sleep L1 failed: engine stuck; escalation to CudaSuspend failed; asked the operator to stop"
    op = {"action": "sleep", "level": 1, "target": "L1", "seconds": 1.0, "error": error, "escalated": "Stop"}
    cluster.core.patch_namespaced_pod(
        names[0],
        namespace,
        {
            "metadata": {
                "annotations": {
                    c.ANN_STATE: c.STATE_FAILED,
                    c.ANN_OBSERVED_LEVEL: "1",
                    c.ANN_LAST_OPERATION: json.dumps(op),
                    c.ANN_ESCALATE_TO: c.ESCALATE_TO_STOP,
                }
            }
        },
    )
    eventually(
        lambda: cluster.apps.read_namespaced_deployment("m", namespace).spec.replicas == 0, what="scaled to 0"
    )
    eventually(lambda: not pods(cluster, namespace, "m"), what="pods gone")
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"].get("phase") == "Stopped" and m, what="Stopped"
    )
    assert md["spec"]["sleepLevel"] == "L1", "the spec is the person's: never written"
    assert md["status"]["sleepLevel"] == "Stop"
    annotations = md["metadata"]["annotations"]
    assert annotations[c.ANN_AUTO_LEVEL] == "Stop" and annotations[c.ANN_AUTO_SOURCE] == c.ESCALATION_SOURCE
    assert names[0] in annotations[c.ANN_AUTO_REASON] and "engine stuck" in annotations[c.ANN_AUTO_REASON]
    stops = [e for e in events_for(cluster, namespace, "m") if e.reason == "EscalatedToStop"]
    assert len(stops) == 1 and stops[0].type == "Warning", [e.message for e in stops]
    assert names[0] in stops[0].message and "spec.sleepLevel stays L1" in stops[0].message

    # Re-applying the same manifest (a GitOps sync) changes nothing: the model stays stopped.
    apply(cluster, namespace, manifest("m", level="L1", replicas=2))
    assert get(cluster, namespace, "m")["metadata"]["annotations"][c.ANN_AUTO_LEVEL] == "Stop"
    assert cluster.apps.read_namespaced_deployment("m", namespace).spec.replicas == 0

    # A person's change of the spec starts it again, with fresh pods.
    set_level(cluster, namespace, "m", "Awake")
    eventually(
        lambda: cluster.apps.read_namespaced_deployment("m", namespace).spec.replicas == 2, what="2 replicas"
    )
    eventually(
        lambda: c.ANN_AUTO_LEVEL not in (get(cluster, namespace, "m")["metadata"].get("annotations") or {}),
        what="the automatic level removed",
    )
    assert len([e for e in events_for(cluster, namespace, "m") if e.reason == "EscalatedToStop"]) == 1
