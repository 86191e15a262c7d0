"""Automatic levels (the idle ladder's and the gateway's decisions, outside the spec) and the engines'
own request counters: the pure rules, table-driven. The end-to-end behaviour against a real API
server is in test_idle.py and test_gateway.py."""

from __future__ import annotations

from typing import Any

import pytest

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller import reconcile
from hibernate.controller.engine_activity import EngineActivity, parse
from hibernate.controller.status import PodView

A, L1, L2, STOP = SleepLevel.AWAKE, SleepLevel.L1, SleepLevel.L2, SleepLevel.STOP


def md(spec_level: object = "Awake", gen: int = 4, /, **annotations: str) -> dict[str, Any]:
    keys = {
        "level": c.ANN_AUTO_LEVEL,
        "source": c.ANN_AUTO_SOURCE,
        "generation": c.ANN_AUTO_GENERATION,
        "reason": c.ANN_AUTO_REASON,
        "time": c.ANN_AUTO_TIME,
    }
    return {
        "metadata": {
            "name": "m",
            "generation": gen,
            "annotations": {keys[k]: v for k, v in annotations.items()},
        },
        "spec": {"model": "x", "sleepLevel": spec_level},
    }


# (what, object, automatic level in effect, effective level, stale annotations)
CASES: list[tuple[str, dict[str, Any], SleepLevel | None, SleepLevel | None, bool]] = [
    ("no automatic level: the spec's", md("L2"), None, L2, False),
    (
        "the idle ladder's L1 on the current spec",
        md(level="L1", source="idle", generation="4"),
        L1,
        L1,
        False,
    ),
    (
        "a wake on request over a person's L2",
        md("L2", level="Awake", source="gateway", generation="4"),
        A,
        A,
        False,
    ),
    ("a person changed the spec since: reset", md("Awake", 5, level="L1", generation="4"), None, A, True),
    ("a person's Stop since the ladder's L1", md("Stop", 5, level="L1", generation="4"), None, STOP, True),
    ("no generation recorded: not in effect", md(level="L1"), None, A, True),
    ("garbage generation: not in effect", md(level="L1", generation="four"), None, A, True),
    ("an invalid automatic level is ignored", md("L1", level="deep", generation="4"), None, L1, True),
    (
        "a name in any case, or a number",
        md(level="cudasuspend", generation="4"),
        SleepLevel.CUDA_SUSPEND,
        SleepLevel.CUDA_SUSPEND,
        False,
    ),
    ("Stop by escalation", md(level="5", source="escalation", generation="4"), STOP, STOP, False),
    ("leftover annotations without a level", md(source="idle", generation="4"), None, A, True),
    ("an invalid spec and no automatic level", md("deep"), None, None, False),
    ("an automatic level over an invalid spec", md("deep", level="L1", generation="4"), L1, L1, False),
]


@pytest.mark.parametrize(
    ("obj", "automatic", "effective", "stale"), [x[1:] for x in CASES], ids=[x[0] for x in CASES]
)
def test_the_rule(
    obj: dict[str, Any], automatic: SleepLevel | None, effective: SleepLevel | None, stale: bool
) -> None:
    found = auto_level.automatic_level(obj)
    assert (found.level if found is not None else None) == automatic
    assert auto_level.effective_level_of(obj) == effective
    assert auto_level.stale(obj) is stale


def test_the_annotations_written_are_the_ones_read_and_clearing_removes_them_all() -> None:
    written = auto_level.annotations_for(
        L2, source="idle", reason="No requests\nfor 10 min", generation=7, time="2025-01-01T00:00:00.000Z"
    )
    obj = {"metadata": {"generation": 7, "annotations": written}, "spec": {"sleepLevel": "Awake"}}
    found = auto_level.automatic_level(obj)
    assert found is not None
    assert (found.level, found.source, found.reason, found.generation) == (
        L2,
        "idle",
        "No requests for 10 min",
        7,
    )
    assert found.to_status() == {
        "level": "L2",
        "source": "idle",
        "reason": "No requests for 10 min",
        "since": "2025-01-01T00:00:00.000Z",
    }
    assert set(auto_level.cleared()) == set(c.AUTO_ANNOTATIONS) == set(written)
    assert all(v is None for v in auto_level.cleared().values())


def test_the_status_carries_the_effective_and_the_automatic_level() -> None:
    spec_md = md("Awake", level="Stop", source="escalation", generation="4", reason="CudaSuspend failed")
    spec_md["metadata"]["namespace"] = "ns"
    spec = reconcile.ModelDeploymentSpec.model_validate(spec_md["spec"])
    assert reconcile.target_level(spec_md, spec) == STOP
    assert reconcile.awake_replicas(spec, STOP) == 0 and reconcile.awake_replicas(spec) == 1
    status = reconcile.compute_status(spec_md, spec, [], reconcile.OperatorContext()).status
    assert status["effectiveLevel"] == "Stop" and status["phase"] == "Stopped"
    assert status["automaticLevel"] == {
        "level": "Stop",
        "source": "escalation",
        "reason": "CudaSuspend failed",
    }
    # Without one, the key is removed (None in the merge patch), and absent and None compare equal.
    plain = md("L1")
    plain["metadata"]["namespace"] = "ns"
    status = reconcile.compute_status(
        plain, reconcile.ModelDeploymentSpec.model_validate(plain["spec"]), [], reconcile.OperatorContext()
    ).status
    assert status["effectiveLevel"] == "L1" and status["automaticLevel"] is None
    assert reconcile._same(
        {**status, "automaticLevel": None}, {k: v for k, v in status.items() if k != "automaticLevel"}
    )


def test_the_operator_writes_the_drain_deadline_on_each_pod_with_its_level() -> None:
    pod = {"metadata": {"name": "p", "annotations": {}}}
    assert reconcile.level_patch(pod, L1, 30) == {
        c.ANN_SLEEP_LEVEL: "L1",
        c.ANN_SPEC_LEVEL: "L1",
        c.ANN_DRAIN_SECONDS: "30",
    }
    settled = {c.ANN_SLEEP_LEVEL: "L1", c.ANN_SPEC_LEVEL: "L1", c.ANN_DRAIN_SECONDS: "30"}
    assert reconcile.level_patch({"metadata": {"annotations": settled}}, L1, 30) is None
    # A new deadline alone: only the deadline (a person's override of the pod's level holds).
    overridden = {**settled, c.ANN_SLEEP_LEVEL: "Awake"}
    assert reconcile.level_patch({"metadata": {"annotations": overridden}}, L1, 5) == {
        c.ANN_DRAIN_SECONDS: "5"
    }
    assert reconcile.level_patch({"metadata": {"annotations": settled}}, L1) is None  # not managed
    assert reconcile.level_patch(pod, STOP, 30) is None  # Stop is scaling: pods get nothing


# --- the engines' own counters ---------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {stop}
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} 2.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{{engine="0",finished_reason="stop",model_name="m"}} 1.7e9
"""


def page(stop: float, running: float = 0) -> str:
    return VLLM_METRICS.format(stop=stop, running=running)


def test_the_request_counters_of_a_vllm_metrics_page() -> None:
    counters = parse(page(5, running=1))
    assert counters is not None and (counters.finished, counters.running) == (7.0, 1.0)
    # The counter as an untyped sample without _total (older exports), and a page that has neither.
    untyped = parse('vllm:request_success{finished_reason="stop"} 3\n')
    assert untyped is not None and untyped.finished == 3.0
    assert parse("# nothing of vLLM\nprocess_cpu_seconds_total 1.0\n") is None
    assert parse("not { prometheus") is None


def awake_pod(name: str = "p", ip: str | None = "10.0.0.7", **annotations: str) -> PodView:
    base = {c.ANN_STATE: c.STATE_AWAKE, c.ANN_OBSERVED_LEVEL: "0"}
    return PodView(name=name, annotations={**base, **annotations}, ready=True, ip=ip)


def test_a_counter_that_moves_or_a_running_request_is_activity() -> None:
    pages: dict[str, str | None] = {"http://10.0.0.7:8000/metrics": page(5)}
    reads: list[str] = []

    def read(url: str) -> str | None:
        reads.append(url)
        return pages.get(url)

    now = [0.0]
    engines = EngineActivity(read=read, clock=lambda: now[0])
    pod = awake_pod()
    assert engines.active("ns", "m", [pod], 8000) is False  # the first read is a baseline
    assert engines.active("ns", "m", [pod], 8000) is False  # nothing moved
    pages["http://10.0.0.7:8000/metrics"] = page(6)
    assert engines.active("ns", "m", [pod], 8000) is True  # one more finished request
    pages["http://10.0.0.7:8000/metrics"] = page(6, running=2)
    assert engines.active("ns", "m", [pod], 8000) is True  # a long stream still running
    pages["http://10.0.0.7:8000/metrics"] = page(0)
    assert engines.active("ns", "m", [pod], 8000) is False  # a restarted engine: a new baseline
    # Asleep, not reported yet, or without an IP: not read at all.
    reads.clear()
    asleep = awake_pod(**{c.ANN_STATE: c.STATE_ASLEEP, c.ANN_OBSERVED_LEVEL: "1"})
    assert (
        engines.active("ns", "m", [asleep, awake_pod(ip=None), PodView(name="new", ip="10.0.0.8")], 8000)
        is False
    )
    assert reads == []
    # An engine that cannot be read is left alone for a while, then read again.
    v6 = awake_pod("q", ip="fd00::7")
    assert engines.active("ns", "m", [v6], 8000) is False
    assert reads == ["http://[fd00::7]:8000/metrics"]
    assert engines.active("ns", "m", [v6], 8000) is False and len(reads) == 1
    now[0] += 301
    engines.active("ns", "m", [v6], 8000)
    assert len(reads) == 2
