"""The node agent killed in the middle of a restore into a new pod (docs/snapshots.md, "The agent
restarted mid-restore"), end to end: the real agent (a subprocess) against a real API server, simulated
pods and real criu.

An agent takes a snapshot of a serving engine; its pod goes. A new pod of the model waits for the
restore, and the agent that claims it is SIGKILLed at a named fault point: while criu restores, or
with the engine restored and checked but the pod's init not told. The agent started next must not
leave the init waiting out its claim limit (900 s): it takes the orphaned claim over, and the pod ends
serving the snapshot's engine, one engine and no leftover, with an event that says what happened.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from hibernate.agent import snapshot as agent_snapshot
from hibernate.agent.criu import nsexec
from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod
from tests.cluster import Cluster, eventually
from tests.engine_fixtures import complete, free_port
from tests.faultkit import need_root_and_criu
from tests.pods import (
    annotations,
    ask_snapshot,
    create_chain,
    create_engine_pod,
    ensure_node,
    pod_events,
    reached,
    restore_from,
    restore_verdict,
    start_pod,
)
from tests.test_agent import NODE, start_agent
from tests.test_snapshot import WaitingPod

SPEC = "spec-h1"


@pytest.fixture
def criu_bundle() -> object:
    return need_root_and_criu()


@pytest.mark.criu
@pytest.mark.parametrize("point", ["agent.criu-restore-running", "agent.snapshot-before-tell"])
def test_the_next_agent_takes_over_a_restore_whose_agent_was_killed(
    cluster: Cluster, namespace: str, tmp_path: Path, criu_bundle: object, point: str
) -> None:
    ensure_node(cluster, NODE)
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

    # The snapshot, taken by an agent as before a Stop; then its pod goes.
    first = start_agent(cluster, tmp_path, "--engine-timeout", "5")
    try:
        old, old_cid = pod_of_the_model("llama-old"), uuid.uuid4().hex * 2
        with SimPod.start(
            cmd, uid=old["uid"], container_id=old_cid, host_network=True, port=port, ready_path="/health"
        ) as pod:
            start_pod(cluster, namespace, old["name"], container_id=old_cid)
            before, engine_pid = complete(url), pod.engine_ns_pid()
            reached(cluster, namespace, old["name"], 0, "Awake")
            answer = ask_snapshot(cluster, namespace, old["name"], "r-1", SPEC, timeout=60)
        cluster.core.delete_namespaced_pod(old["name"], namespace, grace_period_seconds=0)
    finally:
        first.stop()

    # A new pod waits for its restore; the agent that claims it dies at `point`.
    dying = start_agent(cluster, tmp_path, "--engine-timeout", "5", faults=point)
    new, new_cid = pod_of_the_model("llama-new"), uuid.uuid4().hex * 2
    source = {"node": NODE, "specHash": SPEC, "taken": answer["taken"], "check": answer["check"]}
    restore_from(cluster, namespace, new["name"], source)
    with WaitingPod.start(
        cmd,
        uid=new["uid"],
        container_id=new_cid,
        host_network=True,
        port=port,
        ready_path=None,
        env={c.ENV_RESTORE_WAIT: "60"},
    ) as pod:
        start_pod(cluster, namespace, new["name"], container_id=new_cid)
        try:
            eventually(
                lambda: dying.popen is not None and dying.popen.poll() is not None, timeout=60, what="killed"
            )
            assert f"fault point {point} armed" in dying.output()
        finally:
            dying.stop()
        state = agent_snapshot.handshake(pod.agent_pod())
        assert state.orphaned and c.ANN_RESTORE not in annotations(cluster, namespace, new["name"])

        agent = start_agent(cluster, tmp_path, "--engine-timeout", "5")
        try:
            restore = restore_verdict(cluster, namespace, new["name"], timeout=90)
            assert restore["restored"] is True and restore["takenOver"] is True, restore
            print(
                f"\n[snapshot] {point}: the next agent took over and restored in {restore['seconds']:.2f} s"
            )
            (event,) = [e for e in pod_events(cluster, namespace, new["name"]) if e.reason == "Restored"]
            assert "the agent restarted during an earlier attempt" in event.message
            reached(cluster, namespace, new["name"], 0, "Awake", timeout=30)
            assert complete(url) == before, "the snapshot's engine, woken, answers as before"
            # One engine in the pod, the snapshot's: what the dead agent left is gone.
            engine = pod.engine_host_pid()
            assert engine is not None and pod.engine_ns_pid() == engine_pid
            assert set(agent_snapshot.pod_processes(pod.init_pid)) == {engine, *nsexec.descendants(engine)}
            assert "starting the engine cold" not in pod.log()
        finally:
            agent.stop()
