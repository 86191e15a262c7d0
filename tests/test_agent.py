"""The node agent against a real API server and real fake-engine processes, driven by pod annotations.

Each test binds pods to a node named for the test session (no kubelet runs: the tests report the pod
IP themselves) and runs `hibernate agent` as users do, as a subprocess.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.api import constants as c
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import FakeEngine, complete, free_port, start_fake_engine
from tests.faultkit import need_root_and_criu
from tests.pods import (
    annotate,
    annotations,
    ask_snapshot,
    create_engine_pod,
    ensure_node,
    pod_events,
    reached,
    restore_from,
    restore_verdict,
    start_pod,
)

NODE = "agent-test-node"


def memory(url: str) -> dict[str, int]:
    data: dict[str, int] = httpx.get(f"{url}/debug/memory", timeout=10).json()
    return data


def start_agent(cluster: Cluster, tmp_path: Path, *extra: str, faults: str = "") -> Process:
    proc = hibernate_process(
        cluster,
        tmp_path / f"agent-{time.monotonic_ns()}.log",
        "agent",
        "--node-name",
        NODE,
        "--metrics-port",
        str(free_port()),
        "--checkpoint-root",
        str(tmp_path / "checkpoints"),
        # No test here waits on the graceful stop (tests/test_agent_shutdown.py checks it): a stop must
        # not wait out what the agent may be doing on the pods that earlier tests left on NODE.
        *("--shutdown-timeout", "1"),
        *extra,
    )
    if faults:
        proc.env["HIBERNATE_FAULTS"] = faults
    return proc.start()


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[Process]:
    ensure_node(cluster, NODE)
    proc = start_agent(cluster, tmp_path, "--engine-timeout", "5")
    yield proc
    proc.stop()
    print(proc.output()[-4000:])


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with start_fake_engine(weights_mib=64, kv_mib=16) as e:
        yield e


def engine_pod(cluster: Cluster, namespace: str, engine: FakeEngine, **kw: object) -> str:
    port = int(engine.url.rsplit(":", 1)[1])
    pod = create_engine_pod(cluster, namespace, NODE, port, **kw)  # type: ignore[arg-type]
    start_pod(cluster, namespace, pod["name"])
    return str(pod["name"])


def test_level_1_cycle_frees_the_engine_memory_and_answers_the_same(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    before = complete(engine.url)
    pod = engine_pod(cluster, namespace, engine, level="Awake")
    reached(cluster, namespace, pod, 0, "Awake")
    held = memory(engine.url)["device_bytes"]

    annotate(cluster, namespace, pod, "L1")
    op = reached(cluster, namespace, pod, 1, "Asleep")
    assert (op["action"], op["level"], op["error"]) == ("sleep", 1, None) and op["seconds"] >= 0
    asleep = memory(engine.url)
    assert asleep["device_bytes"] <= held - 64 * 2**20, "the weights left the 'GPU'"
    assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": True}

    annotate(cluster, namespace, pod, 0)
    op = reached(cluster, namespace, pod, 0, "Awake")
    assert (op["action"], op["level"]) == ("wake", 1)
    assert memory(engine.url)["device_bytes"] == held
    assert complete(engine.url) == before
    eventually(
        lambda: (
            {"Sleeping", "Asleep", "Waking", "Awake"}
            <= {e.reason for e in pod_events(cluster, namespace, pod)}
        ),
        what="an event for each transition",
    )


def test_level_2_cycle_reloads_the_weights_so_the_answer_is_right(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    before = complete(engine.url)
    pod = engine_pod(cluster, namespace, engine, level="l2")
    reached(cluster, namespace, pod, 2, "Asleep")
    assert memory(engine.url)["device_bytes"] < 16 * 2**20

    annotate(cluster, namespace, pod, "Awake")
    reached(cluster, namespace, pod, 0, "Awake")
    assert complete(engine.url) == before, "a level-2 wake without reload answers garbage"


def test_any_level_to_any_other_goes_through_awake(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    before = complete(engine.url)
    pod = engine_pod(cluster, namespace, engine, level="L2")
    reached(cluster, namespace, pod, 2, "Asleep")
    annotate(cluster, namespace, pod, "L1")
    op = reached(cluster, namespace, pod, 1, "Asleep")
    assert (op["action"], op["level"]) == ("sleep", 1)
    annotate(cluster, namespace, pod, "Awake")
    reached(cluster, namespace, pod, 0, "Awake")
    assert complete(engine.url) == before


def test_an_invalid_level_is_refused_with_the_valid_values_and_changes_nothing(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    pod = engine_pod(cluster, namespace, engine, level="deep")
    op = reached(cluster, namespace, pod, 0, "Failed")
    assert "invalid sleep level 'deep'" in op["error"] and "CudaSuspend" in op["error"]
    assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": False}
    eventually(
        lambda: any(e.reason == "InvalidSleepLevel" for e in pod_events(cluster, namespace, pod)),
        what="event",
    )


def test_a_sleep_the_engine_refuses_is_rolled_back_and_reported(
    cluster: Cluster, namespace: str, agent: Process
) -> None:
    with start_fake_engine("--fail-sleep") as engine:
        pod = engine_pod(cluster, namespace, engine, level="L1")
        op = reached(cluster, namespace, pod, 0, "Failed")
        assert op["action"] == "sleep" and "500" in op["error"]
        assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": False}
        assert complete(engine.url)  # still serving
        warnings = eventually(lambda: [e for e in pod_events(cluster, namespace, pod) if e.type == "Warning"])
        assert "sleep L1 failed" in warnings[0].message


def test_an_engine_that_hangs_gives_a_clear_failure_not_a_hung_agent(
    cluster: Cluster, namespace: str, agent: Process
) -> None:
    with start_fake_engine("--hang-sleep") as engine:
        # A 2 s drain, not the default 30 s: the hung `mode=wait` sleep is cut there, then the
        # `mode=abort` one times out (the agent's --engine-timeout 5).
        pod = engine_pod(cluster, namespace, engine, level="L1", drain_seconds=2)
        op = reached(cluster, namespace, pod, 0, "Failed", timeout=60)
        assert "timed out" in op["error"] or "timeout" in op["error"].lower()


def _completion(url: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "fake-model", "prompt": "drain me", "max_tokens": max_tokens}
    choice: dict[str, Any] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    return choice


def _until_running(url: str) -> None:
    def running() -> bool:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return any(
            line.startswith("vllm:num_requests_running{") and not line.endswith(" 0")
            for line in text.splitlines()
        )

    eventually(running, timeout=10, interval=0.02, what="a request running in the engine")


def test_a_sleep_lets_the_requests_in_flight_finish_up_to_the_pods_drain_deadline(
    cluster: Cluster, namespace: str, agent: Process
) -> None:
    with start_fake_engine("--token-delay", "0.05", weights_mib=4, kv_mib=1) as engine:
        pod = engine_pod(cluster, namespace, engine, level="Awake")
        reached(cluster, namespace, pod, 0, "Awake")
        # The operator writes spec.drainSeconds on each pod; here by hand.
        drain = {"metadata": {"annotations": {c.ANN_DRAIN_SECONDS: "20"}}}
        cluster.core.patch_namespaced_pod(pod, namespace, drain)
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(_completion, engine.url, 40)  # about 2 s of tokens
            _until_running(engine.url)
            annotate(cluster, namespace, pod, "L1")
            reached(cluster, namespace, pod, 1, "Asleep")
            assert request.done(), "the engine slept under a request in flight"
            choice = request.result()
        assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 40

        # Past the deadline, what still runs is aborted, and the sleep goes on.
        annotate(cluster, namespace, pod, "Awake")
        reached(cluster, namespace, pod, 0, "Awake")
        drain = {"metadata": {"annotations": {c.ANN_DRAIN_SECONDS: "1"}}}
        cluster.core.patch_namespaced_pod(pod, namespace, drain)
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(_completion, engine.url, 1000)  # about 50 s of tokens
            _until_running(engine.url)
            started = time.monotonic()
            annotate(cluster, namespace, pod, "L1")
            reached(cluster, namespace, pod, 1, "Asleep", timeout=20)
            assert time.monotonic() - started < 15
            assert request.result(timeout=10)["finish_reason"] == "abort"


def test_cuda_suspend_of_a_pod_without_gpu_fails_clearly_and_leaves_it_serving(
    cluster: Cluster, namespace: str, agent: Process, engine: FakeEngine
) -> None:
    pod = engine_pod(cluster, namespace, engine, level="CudaSuspend")
    op = reached(cluster, namespace, pod, 0, "Failed")
    assert "no CUDA process" in op["error"]
    assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": False}
    assert complete(engine.url)


def test_checkpoint_without_criu_fails_clearly_and_leaves_the_engine_serving(
    cluster: Cluster, namespace: str, tmp_path: Path, engine: FakeEngine
) -> None:
    ensure_node(cluster, NODE)
    proc = hibernate_process(
        cluster, tmp_path / "agent.log", "agent", "--node-name", NODE, "--metrics-port", "0"
    )
    proc.env["HIBERNATE_CRIU"] = str(tmp_path / "no-such-criu")
    proc.env.pop("HIBERNATE_CRIU_BUNDLE", None)
    proc.env["PATH"] = "/usr/bin:/bin"
    proc.start()
    try:
        pod = engine_pod(cluster, namespace, engine, level="Checkpoint")
        op = reached(cluster, namespace, pod, 0, "Failed")
        assert "CRIU 4.2 or newer is required" in op["error"]
        assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": False}
        assert complete(engine.url)
    finally:
        proc.stop()


def test_an_agent_killed_before_reporting_finds_the_truth_after_restart(
    cluster: Cluster, namespace: str, tmp_path: Path, engine: FakeEngine
) -> None:
    ensure_node(cluster, NODE)
    first = start_agent(cluster, tmp_path, faults="agent.before-report")
    try:
        pod = engine_pod(cluster, namespace, engine, level="L1")
        assert first.popen is not None
        first.popen.wait(30)
        assert "agent.before-report armed" in first.output()
        assert annotations(cluster, namespace, pod)[c.ANN_STATE] == "Sleeping", "it died mid-operation"
        assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": True}
    finally:
        first.stop()
    second = start_agent(cluster, tmp_path)
    try:
        reached(cluster, namespace, pod, 1, "Asleep")
        # Read from the engine, not repeated: the engine was asleep already and was not slept twice.
        assert "sleep" not in json.loads(
            annotations(cluster, namespace, pod).get(c.ANN_LAST_OPERATION, "{}")
        ).get("action", "")
    finally:
        second.stop()


def test_metrics_and_health_are_served(
    cluster: Cluster, namespace: str, tmp_path: Path, engine: FakeEngine
) -> None:
    ensure_node(cluster, NODE)
    port = free_port()
    proc = hibernate_process(
        cluster, tmp_path / "agent.log", "agent", "--node-name", NODE, "--metrics-port", str(port)
    )
    proc.start()
    try:
        pod = engine_pod(cluster, namespace, engine, level="L1")
        reached(cluster, namespace, pod, 1, "Asleep")
        eventually(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, what="healthz")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'hibernate_agent_operations_total{action="sleep",level="L1",result="ok"} 1.0' in text
        assert "hibernate_agent_operation_seconds_bucket" in text
        assert "hibernate_agent_reaction_seconds_count" in text
    finally:
        proc.stop()


# -- level 4: real CRIU on a simulated pod whose cgroup carries the real Pod's UID ----------------


@pytest.fixture
def criu_bundle() -> object:
    return need_root_and_criu()


# (runtime as the pod status's containerID scheme says, the container's cgroup as the runtime names
# it, a cgroup namespace of its own): docker on cgroupfs, and containerd with the systemd driver as
# GPU clusters run it (tests/test_cgroup_layouts.py has every layout).
LAYOUTS = [
    ("docker", "kubepods/besteffort/pod{uid}/{id}", False, "cgroupfs"),
    (
        "containerd",
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope",
        True,
        "systemd",
    ),
]


@pytest.mark.criu
@pytest.mark.parametrize(
    ("runtime", "cgroup_path", "cgroupns", "driver"), LAYOUTS, ids=["docker", "containerd"]
)
def test_level_4_checkpoints_the_engine_in_its_pod_and_restores_it_in_place(
    cluster: Cluster,
    namespace: str,
    agent: Process,
    tmp_path: Path,
    criu_bundle: object,
    runtime: str,
    cgroup_path: str,
    cgroupns: bool,
    driver: str,
) -> None:
    import sys
    import uuid

    from hibernate.localnode.simpod import SimPod

    port = free_port()
    checkpoints = tmp_path / "checkpoints"
    created = create_engine_pod(
        cluster, namespace, NODE, port, level="Awake", checkpoint_dir=str(checkpoints)
    )
    name, cid = created["name"], uuid.uuid4().hex * 2
    cmd = [sys.executable, "-m", "hibernate.engine.fake", "--model", "fake-model", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--weights-mib", "64", "--kv-mib", "16", "--enable-sleep-mode"]
    with SimPod.start(
        cmd,
        uid=created["uid"],
        container_id=cid,
        host_network=True,
        port=port,
        ready_path="/health",
        cgroup_path=cgroup_path,
        cgroupns=cgroupns,
    ) as pod:
        start_pod(cluster, namespace, name, container_id=cid, scheme=runtime)
        url = f"http://127.0.0.1:{port}"
        before, engine_pid = complete(url), pod.engine_ns_pid()
        cgroup_before = Path(f"/proc/{pod.engine_host_pid()}/cgroup").read_text()
        reached(cluster, namespace, name, 0, "Awake")

        annotate(cluster, namespace, name, "Checkpoint")
        op = reached(cluster, namespace, name, 4, "Asleep", timeout=60)
        image = checkpoints / namespace / name / "engine"
        assert op["image"] == str(image) and op["image_bytes"] > 0
        assert pod.engine_host_pid() is None, "the engine's processes ended"
        assert pod.init_alive(), "the pod stays: its init outlives the engine"
        meta = json.loads((image / "metadata.json").read_text())
        assert meta["criu_version"].startswith("4.") and meta["kernel_release"]
        # The engine slept at level 2 first, so the image holds no weights.
        assert op["image_bytes"] < 64 * 2**20 + 40 * 2**20
        # The agent says which cgroup layout it found, at the dump and at the restore.
        assert (op["cgroup"]["runtime"], op["cgroup"]["driver"]) == (runtime, driver)
        assert op["cgroup"]["namespace"] == ("own" if cgroupns else "host")

        annotate(cluster, namespace, name, "Awake")
        woke = reached(cluster, namespace, name, 0, "Awake", timeout=60)
        assert woke["cgroup"] == op["cgroup"] and "cgroup_warning" not in woke
        assert pod.engine_ns_pid() == engine_pid, "restored in place with the same pid"
        restored = pod.engine_host_pid()
        assert Path(f"/proc/{restored}/cgroup").read_text() == cgroup_before, "in the same cgroups"
        assert (
            os.stat(f"/proc/{restored}/ns/cgroup").st_ino == os.stat(f"/proc/{pod.init_pid}/ns/cgroup").st_ino
        )
        assert complete(url) == before, "same answer after a level-4 cycle"
        assert memory(url)["sleep_hints"] == [c.PREPARE_CHECKPOINT], "the engine was told a dump follows"
        assert not image.exists(), "the image is removed once the engine runs again"

        annotate(cluster, namespace, name, 4)
        reached(cluster, namespace, name, 4, "Asleep", timeout=60)
        cluster.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        eventually(
            lambda: not (checkpoints / namespace / name).exists(), what="images of a deleted pod removed"
        )


@pytest.mark.criu
def test_a_snapshot_asked_before_stop_is_taken_and_a_new_pod_restores_it(
    cluster: Cluster, namespace: str, agent: Process, tmp_path: Path, criu_bundle: object
) -> None:
    """Stop with a snapshot, the agent's side (docs/snapshots.md): the operator's request on one pod
    is answered with the snapshot taken (engine at level 2 first, then dumped and ended), and a NEW pod
    of the model whose init waits for a restore gets the same engine back, woken, answering the same."""
    import sys
    import uuid

    from hibernate.localnode.simpod import SimPod
    from tests.pods import create_chain
    from tests.test_snapshot import WaitingPod

    port, checkpoints = free_port(), tmp_path / "checkpoints"
    owner = create_chain(cluster, namespace, "llama")
    cmd = [sys.executable, "-m", "hibernate.engine.fake", "--model", "fake-model", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--weights-mib", "64", "--kv-mib", "16", "--enable-sleep-mode"]
    url = f"http://127.0.0.1:{port}"

    def pod_of_the_model(name: str) -> dict[str, Any]:
        return create_engine_pod(
            cluster, namespace, NODE, port, name=name, level="Awake", checkpoint_dir=str(checkpoints),
            owner=owner, model="llama",
        )  # fmt: skip

    old = pod_of_the_model("llama-old")
    old_cid = uuid.uuid4().hex * 2
    with SimPod.start(
        cmd, uid=old["uid"], container_id=old_cid, host_network=True, port=port, ready_path="/health"
    ) as pod:
        start_pod(cluster, namespace, old["name"], container_id=old_cid)
        before, engine_pid = complete(url), pod.engine_ns_pid()
        reached(cluster, namespace, old["name"], 0, "Awake")

        answer = ask_snapshot(cluster, namespace, old["name"], "r-1", "spec-h1", timeout=60)
        assert (answer["id"], answer["node"], answer["specHash"]) == ("r-1", NODE, "spec-h1")
        assert answer["bytes"] > 0 and answer["seconds"] > 0 and answer["taken"]
        image = checkpoints / ".snapshots" / namespace / "llama"
        meta = json.loads((image / "metadata.json").read_text())
        assert meta["spec_hash"] == "spec-h1" and engine_pid in meta["pids"]
        assert answer["bytes"] < 64 * 2**20, "the engine slept at level 2 first: no weights in the image"
        assert pod.engine_host_pid() is None, "the dump ends the engine: the Stop takes its pod next"
        reasons = [e.reason for e in pod_events(cluster, namespace, old["name"])]
        assert "SnapshotTaken" in reasons
    cluster.core.delete_namespaced_pod(old["name"], namespace, grace_period_seconds=0)

    new = pod_of_the_model("llama-new")
    # The operator's template names the snapshot and its canary: the engine's answer before it.
    assert answer["check"]["model"] == "fake-model" and answer["check"]["text"]
    source = {"node": NODE, "specHash": "spec-h1", "taken": answer["taken"], "check": answer["check"]}
    restore_from(cluster, namespace, new["name"], source)
    new_cid = uuid.uuid4().hex * 2
    with WaitingPod.start(  # ready once its init waits for the restore
        cmd,
        uid=new["uid"],
        container_id=new_cid,
        host_network=True,
        port=port,
        ready_path=None,
        env={c.ENV_RESTORE_WAIT: "60"},
    ) as pod:
        start_pod(cluster, namespace, new["name"], container_id=new_cid)
        restore = restore_verdict(cluster, namespace, new["name"], timeout=60)
        assert restore["restored"] is True, restore
        print(f"\n[snapshot] restored into a new pod in {restore['seconds']:.2f} s")
        assert pod.engine_ns_pid() == engine_pid, "the dumped engine, with its pid, in the new pod"
        reached(cluster, namespace, new["name"], 0, "Awake", timeout=30)
        assert complete(url) == before, "woken (weights reloaded), it answers as before the snapshot"
        assert "Restored" in [e.reason for e in pod_events(cluster, namespace, new["name"])]

    # A restored engine that does not give the canary's answer again does not serve: it is ended and
    # the pod's init starts the engine cold (here the canary is forged: the engine is right).
    cluster.core.delete_namespaced_pod(new["name"], namespace, grace_period_seconds=0)
    forged = pod_of_the_model("llama-forged")
    source = {**source, "check": {**answer["check"], "text": " not what it said"}}
    restore_from(cluster, namespace, forged["name"], source)
    forged_cid = uuid.uuid4().hex * 2
    with WaitingPod.start(
        cmd,
        uid=forged["uid"],
        container_id=forged_cid,
        host_network=True,
        port=port,
        ready_path=None,
        env={c.ENV_RESTORE_WAIT: "60"},
    ):
        start_pod(cluster, namespace, forged["name"], container_id=forged_cid)
        restore = restore_verdict(cluster, namespace, forged["name"], timeout=60)
        assert restore["restored"] is False and "to the wake check, where it answered" in restore["reason"]
        reached(cluster, namespace, forged["name"], 0, "Awake", timeout=60)
        assert complete(url) == before, "started cold by its init, it serves"

    # The engine changed since (another image, args or model: another spec hash): the snapshot is
    # refused, and the pod's init starts the engine cold, with the reason in a Warning on the pod.
    cluster.core.delete_namespaced_pod(forged["name"], namespace, grace_period_seconds=0)
    changed = pod_of_the_model("llama-changed")
    source = {"node": NODE, "specHash": "spec-h2", "taken": answer["taken"]}
    restore_from(cluster, namespace, changed["name"], source)
    changed_cid = uuid.uuid4().hex * 2
    with WaitingPod.start(
        cmd,
        uid=changed["uid"],
        container_id=changed_cid,
        host_network=True,
        port=port,
        ready_path=None,
        env={c.ENV_RESTORE_WAIT: "60"},
    ):
        start_pod(cluster, namespace, changed["name"], container_id=changed_cid)
        restore = restore_verdict(cluster, namespace, changed["name"], timeout=60)
        assert restore["restored"] is False and "taken from another engine spec" in restore["reason"]
        reached(cluster, namespace, changed["name"], 0, "Awake", timeout=60)
        assert complete(url) == before, "started cold by its init, it serves"
        (warning,) = [
            e for e in pod_events(cluster, namespace, changed["name"]) if e.reason == "SnapshotNotUsed"
        ]
        assert warning.type == "Warning" and "taken from another engine spec" in warning.message
