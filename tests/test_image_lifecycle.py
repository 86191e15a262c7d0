"""Checkpoint images over the life of their pods (issue 15): the image sweep, a checkpointed pod that
loses its label, a restore refused for another GPU (posted once) and the way out (a cold start asked
for with `hibernate.dev/discard-checkpoint`), and the `/dev/shm` leftovers of a dumped engine.

The real agent runs as a subprocess against the real API server, on simulated pods with the fake
engine (tests/faultkit.py): level 4 is real CRIU; the kubelet's part (a container restarted once its
PID 1 exits) is played by the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hibernate.agent import criu, shm, sweep
from hibernate.api import constants as c
from hibernate.localnode import simpod
from tests.cluster import Cluster, eventually
from tests.engine_fixtures import free_port
from tests.faultkit import (
    NODE,
    AgentRunner,
    EnginePod,
    agent_image,
    assert_truth,
    engine_pod,
    need_root_and_criu,
    removed_while_checked,
    reported,
)
from tests.pods import create_engine_pod, ensure_node, pod_events


@pytest.fixture
def agents(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentRunner]:
    runner = AgentRunner(cluster, tmp_path, tmp_path / "checkpoints", tmp_path / "fake-cuda")
    yield runner
    runner.stop_all()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or os.environ.get("HIBERNATE_TEST_LOGS"):
        print(runner.logs())


def warnings_saying(pod: EnginePod, text: str) -> list[str]:
    events = pod_events(pod.cluster, pod.namespace, pod.name)
    return [e.message for e in events if e.type == "Warning" and text in e.message]


# -- the sweep ---------------------------------------------------------------------------------------


def test_the_sweep_removes_only_the_images_of_pods_that_are_gone_or_no_models(
    cluster: Cluster, namespace: str, agents: AgentRunner, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("images are root-only")
    root = agents.checkpoints
    ensure_node(cluster, NODE)
    ensure_node(cluster, "sweep-other-node")
    owned = create_engine_pod(cluster, namespace, NODE, free_port())["name"]  # no IP: the agent waits
    bare = create_engine_pod(cluster, namespace, NODE, free_port(), bare=True)["name"]
    elsewhere = create_engine_pod(cluster, namespace, "sweep-other-node", free_port())["name"]

    gone = agent_image(root, namespace, "gone-0")
    partial = gone.with_name(".engine.partial-0123abcd")
    partial.mkdir(mode=0o700)  # what a dump left when its pod was deleted mid-way
    nested = agent_image(root, namespace, "gone-1", under="team-a")  # a checkpoint dir below the root
    unowned = agent_image(root, namespace, bare)
    keep = {
        "owned": agent_image(root, namespace, owned),
        "elsewhere": agent_image(root, namespace, elsewhere),
    }
    not_image = root / namespace / "gone-2" / "engine"  # no metadata.json: not an image
    not_image.mkdir(mode=0o700, parents=True)
    (not_image / "notes").write_text("a person's file")
    open_image = agent_image(root, namespace, "gone-3")
    open_image.chmod(0o755)  # not as the agent writes them
    outside = tmp_path / "outside" / "engine"
    outside.mkdir(parents=True)
    (outside / criu.METADATA).write_text("{}")
    (root / namespace / "gone-4").symlink_to(outside.parent)  # never followed

    agent = agents.start("", "--image-sweep-interval", "1")
    eventually(lambda: not any(p.exists() for p in (gone, partial, nested, unowned)), what="the sweep")
    assert not (root / namespace / "gone-0").exists(), "the pod's directory went with its image"
    for what, image in keep.items():
        assert image.exists() and criu.check_private(image, root) == [], what
    assert (not_image / "notes").read_text() == "a person's file"
    assert open_image.exists(), "an image the agent did not write is left alone"
    assert (outside / criu.METADATA).exists() and (root / namespace / "gone-4").is_symlink()
    assert "removed" in agent.output() and "is not one this agent wrote, left alone" in agent.output()

    late = agent_image(root, namespace, "gone-5")  # a pod deleted later: the next sweep
    eventually(lambda: not late.exists(), timeout=30, what="the periodic sweep")
    assert all(image.exists() for image in keep.values())
    agent.stop()


def test_an_image_removed_while_the_sweep_looks_at_it_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker removes a deleted pod's image on its own thread; a sweep that listed it just before
    finds it gone, and goes on with the rest."""
    if os.geteuid() != 0:
        pytest.skip("images are root-only")
    root = tmp_path / "checkpoints"
    vanishing = agent_image(root, "team", "a-deleted-pod")
    staying = agent_image(root, "team", "b-pod")
    removed_while_checked(monkeypatch, vanishing)
    assert [found.path for found in sweep.find(root)] == [staying]


# -- a checkpointed pod that loses its label ------------------------------------------------------------


@pytest.mark.criu
def test_a_checkpointed_pod_that_loses_its_label_keeps_its_image_until_restored_or_deleted(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    """Decided: an unlabelled pod is not the agent's to act on, so it is not restored either; its image,
    its engine's only copy, stays while the pod lives and a ModelDeployment owns it. Labelled again, it
    is restored as asked; deleted while unlabelled (no watch event reaches the agent), the sweep
    removes its image."""
    need_root_and_criu()

    def label(value: str | None) -> None:
        body = {"metadata": {"labels": {c.LABEL_MANAGED: value}}}
        cluster.core.patch_namespaced_pod(pod.name, namespace, body)

    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Checkpoint") as pod:
        agent = agents.start("", "--image-sweep-interval", "1")
        reported(pod, 4, "Asleep", timeout=90)
        label(None)
        eventually(lambda: "left the agent's selection" in agent.output(), what="the agent saw it go")
        time.sleep(2.5)  # two sweeps
        assert criu.check_image(pod.image) == [] and pod.marker() and pod.engine_state() is None

        label("true")
        pod.annotate("Awake")
        reported(pod, 0, "Awake", timeout=90)
        assert_truth(pod, 0)

        pod.annotate("Checkpoint")
        reported(pod, 4, "Asleep", timeout=90)
        label(None)
        eventually(lambda: agent.output().count("left the agent's selection") >= 2, what="gone again")
        cluster.core.delete_namespaced_pod(pod.name, namespace, grace_period_seconds=0)
        eventually(lambda: not pod.image.exists(), timeout=30, what="the sweep removed its image")
        # The sweep logs why once the image is gone: the line may come a moment after.
        eventually(lambda: "the pod does not exist any more" in agent.output(), what="the sweep said why")
        agent.stop()


# -- a restore refused for another GPU, and the way out ---------------------------------------------------


@pytest.mark.criu
def test_a_restore_refused_for_another_gpu_is_said_once_and_discard_checkpoint_starts_the_engine_cold(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    need_root_and_criu()
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Checkpoint") as pod:
        agent = agents.start()
        reported(pod, 4, "Asleep", timeout=90)
        # The image names another GPU and driver, as after a driver upgrade under a sleeping model.
        meta = pod.shrunk()
        replace(meta, gpu_model="NVIDIA A100-SXM4-80GB", driver_version="570.86.15").write(pod.image)

        pod.annotate("Awake")
        op = reported(pod, 4, "Failed", timeout=60)
        assert op["action"] == "wake" and op["refused"] is True, op
        assert "only valid on the same GPU model and driver; refusing to restore" in op["error"]
        assert f"annotate the pod {c.ANN_DISCARD_CHECKPOINT}=true" in op["error"]
        time.sleep(5)  # retries, had there been any, come within seconds
        agent.stop()
        again = agents.start()  # a restarted agent does not try again either
        time.sleep(3)
        assert len(warnings_saying(pod, "refusing to restore")) == 1, "posted once"
        assert criu.check_image(pod.image) == [] and pod.marker(), "the image and the pod wait"

        pod.cluster.core.patch_namespaced_pod(
            pod.name, namespace, {"metadata": {"annotations": {c.ANN_DISCARD_CHECKPOINT: "true"}}}
        )
        pod.restart_container()  # once the agent removed the marker, the pod init exits: the kubelet's turn
        op = reported(pod, 0, "Awake", timeout=90)
        assert op["action"] == "cold-start" and op["error"] is None and op["seconds"] > 0, op
        assert c.ANN_DISCARD_CHECKPOINT not in pod.annotations()
        assert not pod.image.exists() and pod.leftovers() == []
        assert_truth(pod, 0)  # a new engine, cold, serving the same model in the same pod
        reasons = [e.reason for e in pod_events(cluster, namespace, pod.name)]
        assert "ColdStart" in reasons, reasons
        again.stop()


# -- /dev/shm ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sidecar_holding(pod: EnginePod, name: str) -> Iterator[int]:
    """A process of another container of the pod (its own cgroup under the pod's, the pod's namespaces)
    that holds /dev/shm/`name` open, as a sidecar's shared-memory segment would be."""
    (pod.sim.root / "dev" / "shm" / name).write_bytes(b"s" * 65536)
    proc = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(pod.sim.init_pid),
            "-m",
            "-p",
            "-i",
            "--",
            "sh",
            "-c",
            f"exec 3</dev/shm/{name}; exec sleep 600",
        ],
        start_new_session=True,
    )
    rel = Path("kubepods", "besteffort", f"pod{pod.sim.uid}", uuid.uuid4().hex * 2)
    cgroups = [simpod._make_cgroup(m, rel) for m in simpod._cgroup_mounts()]
    try:
        kids = eventually(lambda: simpod._children(proc.pid), what="the sidecar started")
        for cg in cgroups:
            (cg / "cgroup.procs").write_text(str(kids[0]))
        yield kids[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for kid in simpod._children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        proc.wait(10)
        for cg in cgroups:
            for _ in range(100):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


@pytest.mark.criu
def test_dev_shm_leftovers_go_after_a_dump_and_what_a_process_or_the_image_holds_stays(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    need_root_and_criu()
    with engine_pod(
        cluster,
        namespace,
        agents.checkpoints,
        agents.fake_cuda,
        "Awake",
        prelude="echo mine > /dev/shm/engine-held; exec 7</dev/shm/engine-held",
    ) as pod:
        shm_dir = pod.sim.root / "dev" / "shm"
        (shm_dir / "leftover").write_bytes(b"x" * (1 << 20))  # a segment of a worker that ended
        (shm_dir / "a-dir").mkdir()  # directories are not files: left alone
        with sidecar_holding(pod, "sidecar-held"):
            agent = agents.start()
            reported(pod, 0, "Awake")
            pod.annotate("Checkpoint")
            op = reported(pod, 4, "Asleep", timeout=90)
            assert sorted(p.name for p in shm_dir.iterdir()) == ["a-dir", "engine-held", "sidecar-held"]
            assert op["shm_removed"] == 1 and op["shm_bytes"] >= 1 << 20, op
            assert shm.named_by_image(pod.image, ["engine-held", "sidecar-held"]) == {"engine-held"}
            pod.annotate("Awake")
            reported(pod, 0, "Awake", timeout=90)
            assert_truth(pod, 0)  # the restore found the file its engine holds
            assert (shm_dir / "engine-held").read_text() == "mine\n"
            agent.stop()


def test_the_advice_of_a_refused_restore_names_the_annotation_the_agent_reads() -> None:
    assert f"{c.ANN_DISCARD_CHECKPOINT}=true" in criu.COLD_START_ADVICE


def test_the_image_names_a_file_only_by_its_exact_path(tmp_path: Path) -> None:
    """criu's files.img holds each path as a length-prefixed string: `/dev/shm/a` is not `/dev/shm/ab`."""
    image = tmp_path / "image"
    image.mkdir()
    path = b"/dev/shm/ab"
    (image / shm.FILES_IMAGE).write_bytes(b"\x00(\x002" + bytes([len(path)]) + path + b"@\x03")
    assert shm.named_by_image(image, ["ab", "a", "b", "abc"]) == {"ab"}
    assert shm.named_by_image(tmp_path / "no-image", ["ab"]) is None
