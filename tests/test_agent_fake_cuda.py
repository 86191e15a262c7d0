"""The CUDA test double never stands in for the driver on a GPU node (issue 14).

With HIBERNATE_FAKE_CUDA set (reachable through the chart's agent.extraEnv), an agent on a node with
an NVIDIA GPU would report pods CudaSuspend while they hold their GPU. Where /dev/nvidiactl exists,
`hibernate agent` exits non-zero with a clear message before it watches anything.

The device path is a module constant (hibernate.agent.fakecuda.NVIDIA_CONTROL_DEVICE), not a setting:
whatever can set the environment must not move it. These tests run the real `hibernate agent` entry
point in a process whose constant they point at a file of their own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from hibernate.agent import fakecuda
from tests.cluster import Cluster, Process, eventually
from tests.engine_fixtures import free_port
from tests.pods import ensure_node

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
