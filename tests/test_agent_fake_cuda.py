"""The CUDA test double never stands in for the driver on a GPU node (issue 14).

With HIBERNATE_FAKE_CUDA set (reachable through the chart's agent.extraEnv), an agent on a node with
an NVIDIA GPU would report pods CudaSuspend while they hold their GPU. Where /dev/nvidiactl exists,
`hibernate agent` exits non-zero with a clear message before it watches anything.

The device path is a module constant (hibernate.agent.fakecuda.NVIDIA_CONTROL_DEVICE), not a setting:
whatever can set the environment must not move it. These tests run the real `hibernate agent` entry
point in a process whose constant they point at a file of their own.

The double also stands in for the driver's GPU remap: a snapshot restored into a pod given another
GPU (docs/snapshots.md) reaches the double's restore with the GPU pairs, which it keeps for the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.agent import criu, fakecuda
from hibernate.agent.criu import snapshot
from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import complete, free_port
from tests.faultkit import need_root_and_criu
from tests.pods import (
    ask_snapshot,
    create_chain,
    create_engine_pod,
    ensure_node,
    reached,
    restore_from,
    restore_verdict,
    start_pod,
)
from tests.test_snapshot import WaitingPod

NODE = "fake-cuda-test-node"
# `hibernate agent ...`, as `python -m hibernate` runs it, with the device constant set to argv[1].
ENTRY = (
    "import sys; from hibernate.agent import fakecuda; fakecuda.NVIDIA_CONTROL_DEVICE = sys.argv.pop(1); "
    "from hibernate.cli import main; sys.exit(main())"
)


def agent_argv(device: Path, metrics_port: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        ENTRY,
        str(device),
        "agent",
        "--node-name",
        NODE,
        "--metrics-port",
        str(metrics_port),
    ]


def test_the_device_checked_is_the_nvidia_control_device() -> None:
    assert fakecuda.NVIDIA_CONTROL_DEVICE == "/dev/nvidiactl"


def test_the_agent_refuses_the_cuda_double_where_an_nvidia_device_exists(
    cluster: Cluster, tmp_path: Path
) -> None:
    device = tmp_path / "nvidiactl"
    device.touch()
    env = {
        **cluster.env(),
        fakecuda.ENV: str(tmp_path / "fake-cuda"),
        # No API server to reach: the refusal comes before anything is watched.
        "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"),
    }
    started = time.monotonic()
    result = subprocess.run(
        agent_argv(device, free_port()), env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0, result.stderr
    assert f"{fakecuda.ENV} is set, but this node has an NVIDIA GPU ({device} exists)" in result.stderr
    assert "Refusing to start" in result.stderr
    assert "watching managed pods" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "fake-cuda").exists(), "the double was never set up"
    assert time.monotonic() - started < 30


def test_the_agent_runs_with_the_cuda_double_where_no_nvidia_device_exists(
    cluster: Cluster, tmp_path: Path
) -> None:
    ensure_node(cluster, NODE)
    port = free_port()
    proc = Process(
        agent_argv(tmp_path / "no-nvidiactl", port),
        {**cluster.env(), fakecuda.ENV: str(tmp_path / "fake-cuda")},
        tmp_path / "agent.log",
    ).start()
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(healthy, timeout=30, what="the agent's /healthz")
        assert proc.popen is not None and proc.popen.poll() is None
        assert "CUDA is the file-backed TEST DOUBLE" in proc.output()
    finally:
        proc.stop()


# -- the GPU remap of a snapshot, through the double ------------------------------------------------

OLD_GPU = "GPU-8c1e2f3a-1111-2222-3333-444455556666"
NEW_GPU = "GPU-0d9e8f7a-aaaa-bbbb-cccc-ddddeeeeffff"
THIRD_GPU = "GPU-12345678-9abc-def0-1234-56789abcdef0"


@pytest.mark.criu
def test_a_snapshot_restored_into_a_pod_given_another_gpu_hands_the_driver_the_gpu_pairs(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The device plugin gave the snapshotted pod one GPU and the new pod another (their
    NVIDIA_VISIBLE_DEVICES, what the double's nodes go by): the image records the first, and the
    CUDA restore of the engine in the new pod is handed the pair (old GPU, new GPU). A new pod with
    two GPUs cannot take a checkpoint of one: it starts cold, with the reason."""
    need_root_and_criu()
    ensure_node(cluster, NODE)
    fake, checkpoints = tmp_path / "fake-cuda", tmp_path / "checkpoints"
    agent = hibernate_process(
        cluster, tmp_path / "agent.log", "agent", "--node-name", NODE, "--metrics-port", "0",
        "--checkpoint-root", str(checkpoints), "--engine-timeout", "10",
    )  # fmt: skip
    agent.env[fakecuda.ENV] = str(fake)
    agent.start()
    port, owner = free_port(), create_chain(cluster, namespace, "llama")
    cmd = [sys.executable, "-m", "hibernate.engine.fake", "--model", "fake-model", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--weights-mib", "16", "--kv-mib", "8", "--enable-sleep-mode"]
    url = f"http://127.0.0.1:{port}"

    def pod(name: str, gpus: list[str], restore: dict[str, Any] | None = None) -> tuple[str, str, str]:
        made = create_engine_pod(
            cluster, namespace, NODE, port, name=name, level="Awake", owner=owner, model="llama",
            checkpoint_dir=str(checkpoints),
        )  # fmt: skip
        if restore is not None:
            restore_from(cluster, namespace, name, restore)
        return made["uid"], uuid.uuid4().hex * 2, ",".join(gpus)

    def verdict(name: str) -> dict[str, Any]:
        return restore_verdict(cluster, namespace, name, timeout=90)

    try:
        uid, cid, gpus = pod("llama-gpu-a", [OLD_GPU])
        with SimPod.start(
            cmd, uid=uid, container_id=cid, host_network=True, port=port, ready_path="/health",
            env={"NVIDIA_VISIBLE_DEVICES": gpus},
        ):  # fmt: skip
            start_pod(cluster, namespace, "llama-gpu-a", container_id=cid)
            before = complete(url)
            reached(cluster, namespace, "llama-gpu-a", 0, "Awake")
            taken = ask_snapshot(cluster, namespace, "llama-gpu-a", "r-gpu", "spec-gpu", timeout=90)
        cluster.core.delete_namespaced_pod("llama-gpu-a", namespace, grace_period_seconds=0)
        meta = criu.ImageMetadata.load(snapshot.snapshot_dir(checkpoints, namespace, "llama"))
        assert meta.gpus == [{"uuid": OLD_GPU, "model": None}], "the image names the GPU it was taken on"

        source = {"node": NODE, "specHash": "spec-gpu", "taken": taken["taken"], "check": taken["check"]}
        uid, cid, gpus = pod("llama-gpu-b", [NEW_GPU], source)
        with WaitingPod.start(
            cmd, uid=uid, container_id=cid, host_network=True, port=port, ready_path=None,
            env={c.ENV_RESTORE_WAIT: "60", "NVIDIA_VISIBLE_DEVICES": gpus},
        ) as new:  # fmt: skip
            start_pod(cluster, namespace, "llama-gpu-b", container_id=cid)
            restore = verdict("llama-gpu-b")
            assert restore["restored"] is True, restore
            reached(cluster, namespace, "llama-gpu-b", 0, "Awake", timeout=60)
            assert complete(url) == before
            engine = new.engine_host_pid()
            assert engine is not None
            record = fakecuda.FakeCheckpointApi(fake).record(engine)
            assert record["state"] == "running" and record["gpu_pairs"] == [[OLD_GPU, NEW_GPU]], record
        cluster.core.delete_namespaced_pod("llama-gpu-b", namespace, grace_period_seconds=0)

        uid, cid, gpus = pod("llama-gpu-two", [NEW_GPU, THIRD_GPU], source)
        with WaitingPod.start(
            cmd, uid=uid, container_id=cid, host_network=True, port=port, ready_path=None,
            env={c.ENV_RESTORE_WAIT: "60", "NVIDIA_VISIBLE_DEVICES": gpus},
        ):  # fmt: skip
            start_pod(cluster, namespace, "llama-gpu-two", container_id=cid)
            restore = verdict("llama-gpu-two")
            assert restore["restored"] is False
            assert "taken on 1 GPU(s)" in restore["reason"] and "this pod has 2" in restore["reason"], restore
            reached(cluster, namespace, "llama-gpu-two", 0, "Awake", timeout=60)
            assert complete(url) == before, "started cold by its init, it serves"
    finally:
        agent.stop()
        print(agent.output()[-4000:])
