"""Snapshots on a shared volume (docs/snapshots.md, "Where it lives"): taken by one node's agent,
restored by another node's.

Two nodes, each with an agent of its own (`hibernate agent`, a subprocess, on the real control
plane) and a checkpoint root of its own, which stands for each node's disk. With the chart's
agent.snapshots.sharedClaim every agent also mounts one ReadWriteMany volume: here one directory
that both agents are given as --snapshot-dir. A replica on node A is snapshotted before a Stop; a
new pod of the wake, bound to node B, is restored by B's agent, its engine the one A dumped. Without
the shared volume the same new pod finds no image on node B's disk and starts cold, with the reason.

Then the rules of a snapshot shared by several agents, without criu: one lock per snapshot (one
writer or many readers, nobody waits), and sweeps of the volume by several agents at once. Last, the
operator's side: a shared snapshot is recorded as such and the new pods prefer no node.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from hibernate.agent import criu
from hibernate.agent.criu import images, snaplock, snapshot
from hibernate.agent.criu.images import make_private_dirs, write_private
from hibernate.agent.ownership import Ownership
from hibernate.agent.sweep import Sweeper
from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import complete, free_port
from tests.faultkit import need_root_and_criu, removed_while_checked
from tests.modeldeployments import apply, condition, get, pods, set_level
from tests.pods import (
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
from tests.test_snapshot import WaitingPod
from tests.test_stop_snapshot import (  # noqa: F401 (operator_with_tools is a fixture)
    CANARY,
    answer,
    kubelet_ends_pods,
    model,
    operator_with_tools,
    requests,
    running_on_nodes,
)

NODE_A, NODE_B = "snapshot-node-a", "snapshot-node-b"
SPEC = "spec-shared-1"


class TwoNodes:
    """An agent on each of two nodes, each with its checkpoint root ("its disk"), and, where
    `shared`, one directory that both mount as their snapshot volume."""

    def __init__(self, cluster: Cluster, tmp_path: Path, shared: bool) -> None:
        self.cluster, self.tmp = cluster, tmp_path
        self.shared = tmp_path / "shared-volume" if shared else None
        self.disks = {NODE_A: tmp_path / "node-a-disk", NODE_B: tmp_path / "node-b-disk"}
        self.agents: list[Process] = []

    def start(self) -> TwoNodes:
        for node, disk in self.disks.items():
            ensure_node(self.cluster, node)
            extra = ["--snapshot-dir", str(self.shared)] if self.shared else []
            self.agents.append(
                hibernate_process(
                    self.cluster,
                    self.tmp / f"agent-{node}.log",
                    "agent",
                    "--node-name",
                    node,
                    "--metrics-port",
                    "0",
                    "--checkpoint-root",
                    str(disk),
                    "--engine-timeout",
                    "10",
                    *extra,
                ).start()
            )
        return self

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
            print(f"--- {agent.log.name} ---\n{agent.output()[-3000:]}")


@pytest.fixture
def criu_bundle() -> object:
    return need_root_and_criu()


def _take_on_a_restore_on_b(cluster: Cluster, namespace: str, nodes: TwoNodes) -> dict[str, Any]:
    """The engine of a replica on node A snapshotted (the operator's request, the agent's answer);
    its pod gone; a new pod of the wake on node B, waiting for its restore. Returns what happened."""
    port = free_port()
    owner = create_chain(cluster, namespace, "llama")
    cmd = [sys.executable, "-m", "hibernate.engine.fake", "--model", "fake-model", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--weights-mib", "64", "--kv-mib", "16", "--enable-sleep-mode"]
    url = f"http://127.0.0.1:{port}"

    def pod_on(node: str, name: str) -> dict[str, Any]:
        return create_engine_pod(
            cluster, namespace, node, port, name=name, level="Awake", owner=owner, model="llama",
            checkpoint_dir=str(nodes.disks[node]),
        )  # fmt: skip

    old = pod_on(NODE_A, "llama-on-a")
    old_cid = uuid.uuid4().hex * 2
    with SimPod.start(
        cmd, uid=old["uid"], container_id=old_cid, host_network=True, port=port, ready_path="/health"
    ) as pod:
        start_pod(cluster, namespace, old["name"], container_id=old_cid)
        before, engine_pid = complete(url), pod.engine_ns_pid()
        reached(cluster, namespace, old["name"], 0, "Awake")
        taken = ask_snapshot(cluster, namespace, old["name"], "r-shared", SPEC, timeout=90)
    cluster.core.delete_namespaced_pod(old["name"], namespace, grace_period_seconds=0)

    new = pod_on(NODE_B, "llama-on-b")
    source = {"node": NODE_A, "specHash": SPEC, "taken": taken["taken"], "check": taken["check"]}
    if taken.get("shared"):
        source["shared"] = True  # as the operator's template says it (controller/snapshots.py)
    restore_from(cluster, namespace, new["name"], source)
    new_cid = uuid.uuid4().hex * 2
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
        restore = restore_verdict(cluster, namespace, new["name"], timeout=90)
        reached(cluster, namespace, new["name"], 0, "Awake", timeout=60)
        return {
            "taken": taken,
            "restore": restore,
            "same_engine": pod.engine_ns_pid() == engine_pid,
            "same_answer": complete(url) == before,
            "events": [e.reason for e in pod_events(cluster, namespace, new["name"])],
        }


@pytest.mark.criu
def test_a_snapshot_on_the_shared_volume_is_restored_by_another_nodes_agent(
    cluster: Cluster, namespace: str, tmp_path: Path, criu_bundle: object
) -> None:
    nodes = TwoNodes(cluster, tmp_path, shared=True).start()
    try:
        seen = _take_on_a_restore_on_b(cluster, namespace, nodes)
    finally:
        nodes.stop()
    assert seen["taken"]["shared"] is True and seen["taken"]["node"] == NODE_A
    assert nodes.shared is not None
    image = snapshot.snapshot_dir(nodes.shared, namespace, "llama")
    assert criu.check_image(image) == [] and criu.check_private(image, nodes.shared) == []
    assert not (nodes.disks[NODE_A] / ".snapshots").exists(), "nothing of it on node A's own disk"
    assert seen["restore"]["restored"] is True, seen["restore"]
    print(
        f"\n[shared snapshot] taken on {NODE_A}, restored on {NODE_B} in {seen['restore']['seconds']:.2f} s"
    )
    assert seen["same_engine"], "the engine node A dumped, with its pid, in the new pod on node B"
    assert seen["same_answer"] and "Restored" in seen["events"]


@pytest.mark.criu
def test_a_snapshot_on_a_nodes_disk_is_not_found_on_another_node_which_starts_cold(
    cluster: Cluster, namespace: str, tmp_path: Path, criu_bundle: object
) -> None:
    nodes = TwoNodes(cluster, tmp_path, shared=False).start()
    try:
        seen = _take_on_a_restore_on_b(cluster, namespace, nodes)
    finally:
        nodes.stop()
    assert "shared" not in seen["taken"]
    assert criu.check_image(snapshot.snapshot_dir(nodes.disks[NODE_A], namespace, "llama")) == []
    assert seen["restore"]["restored"] is False
    assert "does not exist" in seen["restore"]["reason"], seen["restore"]
    assert seen["same_answer"], "started cold by its init, it serves"
    assert "SnapshotNotUsed" in seen["events"]


# -- one snapshot, several agents: its lock, and sweeps at once ----------------------------------------


def sealed_snapshot(root: Path, namespace: str, model: str) -> Path:
    """A directory laid out and sealed as an agent writes a snapshot; nothing was dumped into it."""
    image = snapshot.snapshot_dir(root, namespace, model)
    make_private_dirs(image, root)
    write_private(image / criu.METADATA, b'{"format": 1}')
    write_private(image / "pages-1.img", b"\0" * 4096)
    return image


@pytest.fixture
def root_only() -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("snapshots are root-only")


def test_a_snapshot_has_one_writer_or_many_readers_and_nobody_waits(tmp_path: Path, root_only: None) -> None:
    image = sealed_snapshot(tmp_path, "default", "llama")
    with (
        snaplock.held(image, exclusive=False),  # two restores at once
        snaplock.held(image, exclusive=False),
        pytest.raises(snaplock.SnapshotBusy, match="being used by another agent"),
    ):
        snaplock.acquire(image, exclusive=True)  # a take (or the sweep) must not replace it now
    with snaplock.held(image, exclusive=True):  # a take, e.g. by another node's agent
        with pytest.raises(snaplock.SnapshotBusy, match="being taken or removed by another agent"):
            snaplock.acquire(image, exclusive=False)
        with pytest.raises(snaplock.SnapshotBusy):
            snaplock.acquire(image, exclusive=True)  # a second take of the same model
    assert snaplock.lock_path(image) == image.with_name(".llama.lock")
    assert snaplock.lock_path(image).stat().st_mode & 0o777 == 0o600


def test_a_lock_removed_with_its_snapshot_is_not_held_by_a_late_opener(
    tmp_path: Path, root_only: None
) -> None:
    image = sealed_snapshot(tmp_path, "default", "llama")
    fd = snaplock.acquire(image, exclusive=True)
    snaplock.remove(image)  # the sweep, holding it, removes the snapshot and its lock
    import os

    os.close(fd)
    again = snaplock.acquire(image, exclusive=True)  # a new take: a new lock file, really held
    try:
        assert os.fstat(again).st_ino == snaplock.lock_path(image).stat().st_ino
    finally:
        os.close(again)


def _sweeper(node: str, shared: Path) -> Sweeper:
    """A node's sweeper, that reads every ModelDeployment as gone, and has only the shared volume."""
    return Sweeper((), node, Ownership(lambda kind, namespace, name: None), snapshot_roots=(shared,))


def test_two_agents_sweeping_the_shared_volume_at_once_remove_a_snapshot_once(
    tmp_path: Path, root_only: None
) -> None:
    shared = tmp_path / "shared"
    taken = [sealed_snapshot(shared, "team", f"model-{i}") for i in range(20)]
    results: dict[str, list[str]] = {}
    start = threading.Barrier(2)

    def sweep(node: str) -> None:
        start.wait()
        results[node] = _sweeper(node, shared).sweep()

    threads = [threading.Thread(target=sweep, args=(node,)) for node in (NODE_A, NODE_B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    removed = results[NODE_A] + results[NODE_B]
    assert sorted(removed) == sorted(str(i) for i in taken), "each removed once, by one of them"
    assert not any(i.exists() for i in taken)
    assert not list((shared / ".snapshots" / "team").iterdir()), "their lock files went with them"


def test_a_snapshot_that_another_node_removes_while_this_one_looks_at_it_is_passed_over(
    tmp_path: Path, root_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race that two sweeps of one volume run into: a snapshot listed, then removed by the other
    node before its owner and modes are read. It is gone, not an error that ends this sweep."""
    shared = tmp_path / "shared"
    vanishing = sealed_snapshot(shared, "team", "a-vanishing")
    staying = sealed_snapshot(shared, "team", "b-staying")
    removed_while_checked(monkeypatch, vanishing)
    assert _sweeper(NODE_A, shared).sweep() == [str(staying)]
    assert not vanishing.exists() and not staying.exists()


def test_the_sweep_leaves_a_snapshot_that_another_agent_is_using(tmp_path: Path, root_only: None) -> None:
    shared = tmp_path / "shared"
    image = sealed_snapshot(shared, "team", "llama")
    with snaplock.held(image, exclusive=False):  # a restore on another node, right now
        assert _sweeper(NODE_A, shared).sweep() == [] and image.exists()
    assert _sweeper(NODE_A, shared).sweep() == [str(image)]


def test_a_volume_that_cannot_lock_a_directory_still_takes_dumps_and_is_swept(
    tmp_path: Path, root_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS clients emulate flock with byte-range locks: an exclusive one needs a file open for
    writing, so flock of a directory fails (EBADF). A dump's own temporary directory is then used
    unlocked (nothing else writes it), and the sweep goes by the snapshot's lock file alone."""
    import errno
    import fcntl
    import os
    import stat

    real = fcntl.flock

    def like_nfs(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) and operation & fcntl.LOCK_EX:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", like_nfs)
    partial = tmp_path / ".llama.partial-0123abcd"
    partial.mkdir(mode=0o700)
    os.close(images.locked_dir(partial))
    shared = tmp_path / "shared"
    image = sealed_snapshot(shared, "team", "llama")
    with snaplock.held(image, exclusive=False):
        assert _sweeper(NODE_A, shared).sweep() == [], "a restore holds its lock file"
    assert _sweeper(NODE_A, shared).sweep() == [str(image)] and not image.exists()


# -- the operator: a shared snapshot prefers no node -------------------------------------------------------


def test_a_shared_snapshot_is_recorded_as_such_and_its_new_pods_prefer_no_node(
    cluster: Cluster,
    namespace: str,
    operator_with_tools: Process,  # noqa: F811
) -> None:
    apply(cluster, namespace, model("m", replicas=1, timeoutSeconds=60))
    (pod,) = running_on_nodes(cluster, namespace, "m", 1)
    set_level(cluster, namespace, "m", "Stop")
    ((_, request),) = eventually(lambda: requests(cluster, namespace, "m"), what="a request").items()
    node = cluster.core.read_namespaced_pod(pod, namespace).spec.node_name
    body = {"id": request["id"], "node": node, "specHash": request["specHash"], "bytes": 1 << 20}
    answer(cluster, namespace, pod, {**body, "shared": True, "check": CANARY})
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"].get("snapshot") and m, what="recorded"
    )
    assert md["status"]["snapshot"]["shared"] is True and md["status"]["snapshot"]["node"] == node
    kubelet_ends_pods(cluster, namespace, "m")
    ready = eventually(
        lambda: (x := condition(get(cluster, namespace, "m"), "SnapshotReady"))["status"] == "True" and x
    )
    assert f"on the shared volume (taken on node {node})" in ready["message"]
    eventually(lambda: get(cluster, namespace, "m")["status"].get("phase") == "Stopped", what="Stopped")

    set_level(cluster, namespace, "m", "Awake")
    (new,) = eventually(lambda: pods(cluster, namespace, "m"), what="a new pod")
    source = json.loads(new.metadata.annotations[c.ANN_RESTORE_FROM])
    assert source["shared"] is True and source["node"] == node
    affinity = new.spec.affinity
    assert affinity is None or affinity.node_affinity is None, "any node restores it: none preferred"
