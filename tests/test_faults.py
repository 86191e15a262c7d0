"""Hold under faults: the node agent and the operator SIGKILLed at every named step, then restarted.

Every step comes from the code: `hibernate.faults.FAULT_POINTS` names each point, and the first test
checks that the code uses exactly those names and that this file arms every one of them.

Agent cases run the real agent (a subprocess) against the real API server on a simulated pod (real
namespaces and pod cgroup) that runs the fake vLLM engine: levels 1-2 through the engine's HTTP API,
level 3 through the fake CUDA driver (hibernate.agent.fakecuda, a test double: CI has no GPU; it
stops the engine while "suspended"), level 4 through real CRIU. For each level one test kills the
agent at a step of the sleep, restarts it, checks the truth, then kills it at a step of the wake,
restarts it and checks again. "The truth" is read from the processes, files and engine, not from
the annotations (faultkit.assert_truth): the level really reached, the annotations saying so, no
half image beside the image and no image lost, the engine serving the same answers once awake.

Operator cases run `hibernate operator` with a stand-in that plays kubelet and agent for its pods.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import httpx
import pytest

from hibernate.agent import criu
from hibernate.api import constants as c
from hibernate.faults import FAULT_POINTS
from tests import test_snapshot
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.faultkit import (
    AgentRunner,
    MirrorAgent,
    agent_image,
    assert_truth,
    engine_pod,
    need_root_and_criu,
    reported,
)
from tests.modeldeployments import apply, get, manifest, pods, set_level
from tests.pods import pod_events

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {0: "Awake", 1: "L1", 2: "L2", 3: "CudaSuspend", 4: "Checkpoint"}

# The steps each transition passes, in order (see FAULT_POINTS for what each one leaves behind).
SLEEP_STEPS = {
    1: ["agent.after-start-report", "agent.before-report"],
    2: ["agent.after-start-report", "agent.before-report"],
    3: [
        "agent.after-start-report",
        "agent.after-engine-sleep",
        "agent.cuda-after-lock",
        "agent.after-cuda-suspend",
        "agent.before-report",
    ],
    4: [
        "agent.after-start-report",
        "agent.after-engine-sleep",
        "agent.cuda-after-lock",
        "agent.after-cuda-suspend",
        "agent.criu-dump-running",
        "agent.criu-after-dump",
        "agent.after-dump",
        "agent.before-report",
    ],
}
WAKE_STEPS = {
    1: ["agent.after-start-report", "agent.before-report"],
    2: ["agent.after-start-report", "agent.before-report"],
    3: [
        "agent.after-start-report",
        "agent.cuda-after-restore",
        "agent.after-cuda-resume",
        "agent.before-report",
    ],
    4: [
        "agent.after-start-report",
        "agent.criu-restore-running",
        "agent.after-restore",
        "agent.cuda-after-restore",
        "agent.after-cuda-resume",
        "agent.before-report",
    ],
}
# One test per pair: killed at a sleep step, recovered, killed at a wake step, recovered.
AGENT_CASES = [
    (level, sleep, wake)
    for level in (1, 2, 3, 4)
    for sleep, wake in zip_longest(SLEEP_STEPS[level], WAKE_STEPS[level])
]
# Killed mid-transition, and the wish changes while no agent runs.
CHANGE_OF_MIND = [
    (2, "sleep", "agent.before-report", 0),  # an L2 engine must be woken with a weight reload
    (3, "sleep", "agent.after-cuda-suspend", 0),
    (4, "sleep", "agent.after-cuda-suspend", 0),  # CUDA suspended over an L2 engine
    (4, "sleep", "agent.criu-dump-running", 1),  # criu finishes alone: its image is adopted, then woken
    (4, "wake", "agent.after-restore", 3),  # restored, still CUDA-suspended: that is level 3 now
]
# Behind a Checkpoint sleep, its image losing its zero pages (criu/shrink.py): in the rewrite of the
# copy, and with the copy complete, before it takes the image's place.
SHRINK_STEPS = ["agent.zero-pages-after-rename", "agent.shrink-before-exchange"]
# A sleep that failed and could not be undone escalates; the agent is killed before the next step.
ESCALATION_CASES = ["agent.before-escalation-step"]
# The wake check, a cold start (the discarded checkpoint of hibernate.dev/discard-checkpoint) and the
# image sweep, each killed at its named step (tests below).
CHECK_DISCARD_SWEEP = [
    "agent.after-wake-reference",
    "agent.before-wake-check",
    "agent.discard-after-report",
    "agent.discard-after-image",
    "agent.sweep-after-remove",
]
OPERATOR_CASES = [
    ("operator.after-deployment", "Awake", "Stop"),
    ("operator.mid-propagate", "L1", "L2"),
    ("operator.before-status", "CudaSuspend", "Awake"),
    ("operator.after-status", "Checkpoint", "L1"),
]


def _case_id(case: tuple[int, str | None, str | None]) -> str:
    level, sleep, wake = case
    short = [(p or "none").removeprefix("agent.") for p in (sleep, wake)]
    return f"L{level}-sleep@{short[0]}-wake@{short[1]}"


def test_every_fault_point_is_registered_used_and_armed_here() -> None:
    code = "\n".join(
        p.read_text() for p in (ROOT / "operator" / "hibernate").rglob("*.py") if p.name != "faults.py"
    )
    used = set(re.findall(r'fault_point\(\s*"([^"]+)"', code)) | set(re.findall(r'\bfault="([^"]+)"', code))
    assert used == set(FAULT_POINTS), (
        f"in the code, not registered: {used - set(FAULT_POINTS)}; registered, not in the code: "
        f"{set(FAULT_POINTS) - used}"
    )
    armed = {p for _, s, w in AGENT_CASES for p in (s, w) if p} | {p for p, _, _ in OPERATOR_CASES}
    armed |= {p for _, _, p, _ in CHANGE_OF_MIND}
    armed |= set(CHECK_DISCARD_SWEEP)
    armed |= set(SHRINK_STEPS)
    armed |= set(ESCALATION_CASES)
    armed |= set(test_snapshot.AGENT_RESTART_POINTS)  # the agent killed mid-restore into a new pod
    assert armed == set(FAULT_POINTS), f"registered but never armed: {set(FAULT_POINTS) - armed}"
    assert len(FAULT_POINTS) == len(set(FAULT_POINTS))


# -- the agent --------------------------------------------------------------------------------------


@pytest.fixture
def agents(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentRunner]:
    need_root_and_criu()
    runner = AgentRunner(cluster, tmp_path, tmp_path / "checkpoints", tmp_path / "fake-cuda")
    yield runner
    runner.stop_all()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or os.environ.get("HIBERNATE_TEST_LOGS"):
        print(runner.logs())


@pytest.mark.criu
@pytest.mark.parametrize("case", AGENT_CASES, ids=_case_id)
def test_agent_killed_at_a_step_of_a_sleep_and_of_a_wake_recovers_the_truth(
    cluster: Cluster, namespace: str, agents: AgentRunner, case: tuple[int, str, str | None]
) -> None:
    level, sleep_step, wake_step = case
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, LEVELS[level]) as pod:
        agents.died_at(agents.start(sleep_step), sleep_step)
        assert pod.annotations()[c.ANN_STATE] == "Sleeping", "it died mid-operation"
        again = agents.start()
        reported(pod, level, "Asleep")
        assert_truth(pod, level)

        if wake_step is not None:
            again.stop()
            armed = agents.start(wake_step)
            pod.annotate("Awake")
            agents.died_at(armed, wake_step)
            assert pod.annotations()[c.ANN_STATE] == "Waking", "it died mid-operation"
            again = agents.start()
        else:
            pod.annotate("Awake")
        reported(pod, 0, "Awake")
        assert_truth(pod, 0)
        again.stop()


@pytest.mark.criu
@pytest.mark.parametrize("step", SHRINK_STEPS, ids=[s.removeprefix("agent.") for s in SHRINK_STEPS])
def test_agent_killed_while_a_checkpoint_image_loses_its_zero_pages_wakes_the_engine_from_it(
    cluster: Cluster, namespace: str, agents: AgentRunner, step: str
) -> None:
    """The shrink runs behind a sleep already done: the agent killed in it leaves a whole image (criu's)
    and a copy beside it; the restarted agent finds level 4, removes the copy, and the engine wakes."""
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Checkpoint") as pod:
        agents.died_at(agents.start(step), step)
        assert pod.leftovers(), "killed with the copy beside the image"
        again = agents.start()
        reported(pod, 4, "Asleep")
        eventually(lambda: not pod.leftovers(), what="the copy removed by the restarted agent")
        assert_truth(pod, 4)
        assert criu.verify_image(pod.image).zero_pages_left_out == 0, "criu's image, as it wrote it"
        pod.annotate("Awake")
        reported(pod, 0, "Awake")
        assert_truth(pod, 0)
        again.stop()


@pytest.mark.criu
@pytest.mark.parametrize(
    "level,action,step,then", CHANGE_OF_MIND, ids=[f"L{a}-{b}@{c}-then-{d}" for a, b, c, d in CHANGE_OF_MIND]
)
def test_agent_killed_mid_transition_while_the_wish_changes_serves_the_new_wish(
    cluster: Cluster, namespace: str, agents: AgentRunner, level: int, action: str, step: str, then: int
) -> None:
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, LEVELS[level]) as pod:
        if action == "wake":
            first = agents.start()
            reported(pod, level, "Asleep")
            first.stop()
            armed = agents.start(step)
            pod.annotate("Awake")
        else:
            armed = agents.start(step)
        agents.died_at(armed, step)
        pod.annotate(LEVELS[then])  # changed while no agent runs
        again = agents.start()
        reported(pod, then, "Awake" if then == 0 else "Asleep")
        assert_truth(pod, then)
        op = json.loads(pod.annotations()[c.ANN_LAST_OPERATION])
        assert op.get("error") is None, op
        if then != 0:
            pod.annotate("Awake")
            reported(pod, 0, "Awake")
            assert_truth(pod, 0)
        again.stop()


@pytest.mark.criu
@pytest.mark.parametrize("step", ESCALATION_CASES)
def test_agent_killed_during_an_escalation_goes_on_with_it_after_restart(
    cluster: Cluster, namespace: str, agents: AgentRunner, step: str
) -> None:
    """CudaSuspend fails (the driver refuses the lock) and the engine, slept at L1 first, cannot be
    woken back: the agent escalates to Checkpoint and is killed before that step. The restarted agent
    goes on with the escalation, not back to a wake and a retry of CudaSuspend, and holds there."""
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Awake") as pod:
        first = agents.start(step)
        reported(pod, 0, "Awake")
        agents.fake_cuda.mkdir(parents=True, exist_ok=True)
        (agents.fake_cuda / "fail-lock").touch()
        httpx.post(f"{pod.url}/debug/faults", json={"fail_wake": True}, timeout=10).raise_for_status()
        pod.annotate("CudaSuspend")
        agents.died_at(first, step)
        ann = pod.annotations()
        running = json.loads(ann[c.ANN_LAST_OPERATION])
        assert ann[c.ANN_STATE] == "Sleeping" and running["target"] == "Checkpoint", ann
        assert running["escalation"]["from"] == "CudaSuspend", running

        # The faults are gone by the time it restarts: a wake would work now, but the escalation goes on.
        (agents.fake_cuda / "fail-lock").unlink()
        httpx.post(f"{pod.url}/debug/faults", json={"fail_wake": False}, timeout=10).raise_for_status()
        again = agents.start()
        op = reported(pod, 4, "Failed", timeout=90)
        assert op["action"] == "sleep" and op["target"] == "CudaSuspend", op
        assert op["escalated"] == "Checkpoint", op
        assert op["interrupted"]["escalation"]["from"] == "CudaSuspend", op
        assert "escalated to Checkpoint to free the GPU" in op["error"], op
        # Level 4 for real: a complete image, the engine's processes gone, the pod init waiting.
        assert pod.engine_state() is None and criu.check_image(pod.image) == [] and pod.marker()
        eventually(lambda: not pod.leftovers(), what="the copy the shrink behind the sleep made, gone")
        reasons = [e.reason for e in pod_events(cluster, namespace, pod.name)]
        assert reasons.count("Escalating") >= 2, reasons  # one per agent that took the step
        assert "Waking" not in reasons, "the deeper level was never undone to retry CudaSuspend"

        pod.annotate("Awake")
        reported(pod, 0, "Awake", timeout=90)
        assert_truth(pod, 0)
        again.stop()


@pytest.mark.criu
def test_an_interrupted_operation_is_reported_as_verified_not_left_running(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    """last-operation says an operation is under way while it is, and what was found after a crash."""
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "L1") as pod:
        agents.died_at(agents.start("agent.before-report"), "agent.before-report")
        running = json.loads(pod.annotations()[c.ANN_LAST_OPERATION])
        assert running["action"] == "sleep" and running["target"] == "L1" and "seconds" not in running
        again = agents.start()
        op = reported(pod, 1, "Asleep")
        assert op["action"] == "verify" and op["level"] == 1 and op["error"] is None
        assert op["interrupted"] == {k: running[k] for k in ("action", "level", "target", "started")}
        again.stop()


@pytest.mark.criu
def test_a_disk_that_fills_during_a_dump_leaves_the_engine_serving_and_says_why(
    cluster: Cluster, namespace: str, tmp_path: Path, agents: AgentRunner
) -> None:
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        agents.checkpoints = small
        with engine_pod(cluster, namespace, small, agents.fake_cuda, "Awake") as pod:
            agent = agents.start()
            reported(pod, 0, "Awake")
            pod.annotate("Checkpoint")
            op = reported(pod, 0, "Failed", timeout=90)
            assert op["action"] == "sleep" and op["target"] == "Checkpoint"
            assert op["error"].startswith("criu dump of pid"), op["error"]
            assert "No space left on device for the image under" in op["error"].splitlines()[0], op["error"]
            assert "rolling back failed" not in op["error"], "the rollback worked: the engine serves"
            warnings = eventually(
                lambda: [e for e in pod_events(cluster, namespace, pod.name) if e.type == "Warning"],
                what="a Warning event",
            )
            assert any(
                "sleep Checkpoint failed" in e.message and "No space left on device" in e.message
                for e in warnings
            ), [e.message for e in warnings]
            # Serving, as it was: awake, CUDA running, the same answer; no partial image anywhere.
            assert (pod.memory()["sleep_level"] or 0) == 0
            assert pod.engine_state() not in (None, "T")
            assert set(pod.cuda_states().values()) <= {"running"}
            assert pod.complete() == pod.baseline
            assert not pod.marker()
            left = [str(p.relative_to(small)) for p in small.rglob("*") if p.is_file()]
            assert left == [], f"a failed dump left files on the full disk: {left}"
            assert httpx.get(f"{pod.url}/health").status_code == 200
            agent.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# -- the wake check, cold starts and the image sweep -------------------------------------------------


@pytest.mark.criu
def test_agent_killed_after_recording_the_wake_check_sleeps_and_checks_after_restart(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    step = "agent.after-wake-reference"
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "CudaSuspend") as pod:
        agents.died_at(agents.start(step), step)
        assert c.ANN_WAKE_CHECK in pod.annotations(), "recorded before it died"
        again = agents.start()
        op = reported(pod, 3, "Asleep")
        assert op.get("wake_check") == "recorded", op
        assert_truth(pod, 3)
        recorded = json.loads(pod.annotations()[c.ANN_WAKE_CHECK])
        assert recorded["model"] == "fake-model" and recorded["text"].strip(), recorded
        pod.annotate("Awake")
        reported(pod, 0, "Awake")
        assert_truth(pod, 0)
        eventually(lambda: c.ANN_WAKE_CHECK not in pod.annotations(), what="the record removed once checked")
        again.stop()


@pytest.mark.criu
def test_agent_killed_between_the_wake_and_the_check_checks_after_restart(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    """Restored from Checkpoint, then killed before comparing: the restarted agent finds the engine awake
    with the record still there, and checks before it calls the pod Awake for good."""
    step = "agent.before-wake-check"
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Checkpoint") as pod:
        first = agents.start()
        reported(pod, 4, "Asleep", timeout=90)
        first.stop()
        armed = agents.start(step)
        pod.annotate("Awake")
        agents.died_at(armed, step)
        assert pod.annotations()[c.ANN_STATE] == "Waking" and c.ANN_WAKE_CHECK in pod.annotations()
        again = agents.start()
        reported(pod, 0, "Awake", timeout=90)
        eventually(lambda: c.ANN_WAKE_CHECK not in pod.annotations(), what="checked and removed")
        assert_truth(pod, 0)
        assert "the woken engine answers as before the sleep" in again.output(), "checked after the restart"
        again.stop()


@pytest.mark.criu
@pytest.mark.parametrize("step", ["agent.discard-after-report", "agent.discard-after-image"])
def test_agent_killed_during_a_cold_start_finishes_it_after_restart(
    cluster: Cluster, namespace: str, agents: AgentRunner, step: str
) -> None:
    """A checkpointed pod asked to discard its checkpoint (and be Awake): the agent dies after writing
    the cold start down, or after removing the image; the restarted agent finishes: the marker goes,
    the pod init exits, and once the kubelet has started the container again the pod is Awake."""
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Checkpoint") as pod:
        first = agents.start()
        reported(pod, 4, "Asleep", timeout=90)
        first.stop()
        armed = agents.start(step)
        cluster.core.patch_namespaced_pod(
            pod.name,
            namespace,
            {"metadata": {"annotations": {c.ANN_SLEEP_LEVEL: "Awake", c.ANN_DISCARD_CHECKPOINT: "true"}}},
        )
        agents.died_at(armed, step)
        running = json.loads(pod.annotations()[c.ANN_LAST_OPERATION])
        assert running["action"] == "cold-start" and "seconds" not in running, running
        assert pod.image.exists() == (step == "agent.discard-after-report")
        assert pod.sim.init_alive() and pod.marker(), "the pod init waits while the marker is there"
        again = agents.start()
        pod.restart_container()
        op = reported(pod, 0, "Awake", timeout=90)
        assert op["action"] == "cold-start" and op["error"] is None and op["seconds"] > 0, op
        assert c.ANN_DISCARD_CHECKPOINT not in pod.annotations()
        assert not pod.image.exists() and pod.leftovers() == []
        assert_truth(pod, 0)
        again.stop()


def test_agent_killed_mid_sweep_removes_the_rest_after_restart(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    step = "agent.sweep-after-remove"
    gone = [agent_image(agents.checkpoints, namespace, f"gone-{i}") for i in range(2)]
    agents.died_at(agents.start(step), step)
    assert sum(image.exists() for image in gone) == 1, "one removed, then killed"
    again = agents.start("", "--image-sweep-interval", "600")
    # The sweep removes an image, then its pod's directory: wait for both, not only the image.
    eventually(lambda: not any(image.exists() for image in gone), what="the other image swept")
    eventually(
        lambda: not any((agents.checkpoints / namespace).iterdir()), what="their pods' directories gone too"
    )
    again.stop()


# -- the operator ------------------------------------------------------------------------------------


def _operator(cluster: Cluster, tmp_path: Path, n: list[int], faults: str = "") -> Process:
    n[0] += 1
    proc = hibernate_process(cluster, tmp_path / f"operator-{n[0]}.log", "operator", "--verbose")
    if faults:
        proc.env["HIBERNATE_FAULTS"] = faults
    return proc.start()


def _died_at(proc: Process, point: str, timeout: float = 60) -> None:
    assert proc.popen is not None
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{point} did not fire:\n{proc.output()[-3000:]}") from None
    assert proc.popen.returncode == -signal.SIGKILL and f"fault point {point} armed" in proc.output()


def _converged(cluster: Cluster, namespace: str, name: str, level: str, replicas: int) -> None:
    """Owned objects, every pod's wish and the status all say `level`, for the current generation."""

    def check() -> bool:
        md = get(cluster, namespace, name)
        status = md.get("status") or {}
        assert status.get("observedGeneration") == md["metadata"]["generation"], status
        want = {"Awake": "Awake", "Stop": "Stopped"}.get(level, "Asleep")
        assert (status.get("phase"), status.get("sleepLevel")) == (want, level), status
        assert (status.get("lastTransition") or {}).get("to") == level, status
        dep = cluster.apps.read_namespaced_deployment(name, namespace)
        assert dep.spec.replicas == (0 if level == "Stop" else replicas)
        cluster.core.read_namespaced_service(name, namespace)
        live = pods(cluster, namespace, name)
        if level == "Stop":
            assert live == []
        else:
            assert len(live) == replicas
            assert {(p.metadata.annotations or {}).get(c.ANN_SLEEP_LEVEL) for p in live} == {level}
        return True

    eventually(check, timeout=60, what=f"{name} converged at {level}")


@pytest.mark.parametrize("point,first,then", OPERATOR_CASES, ids=[p for p, _, _ in OPERATOR_CASES])
def test_operator_killed_at_a_step_finishes_after_restart(
    cluster: Cluster, namespace: str, tmp_path: Path, point: str, first: str, then: str
) -> None:
    n = [0]
    started: list[Process] = []
    try:
        with MirrorAgent(cluster, namespace):
            started.append(armed := _operator(cluster, tmp_path, n, point))
            apply(cluster, namespace, manifest("m", level=first, replicas=2))
            _died_at(armed, point)
            started.append(clean := _operator(cluster, tmp_path, n))
            _converged(cluster, namespace, "m", first, 2)
            clean.stop()

            started.append(armed := _operator(cluster, tmp_path, n, point))
            set_level(cluster, namespace, "m", then)
            _died_at(armed, point)
            started.append(clean := _operator(cluster, tmp_path, n))
            _converged(cluster, namespace, "m", then, 2)
            transition = get(cluster, namespace, "m")["status"]["lastTransition"]
            assert transition["from"] == first and transition["finished"], transition
    except BaseException:
        for p in started:
            print(f"--- {p.log.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        for p in started:
            p.stop()
