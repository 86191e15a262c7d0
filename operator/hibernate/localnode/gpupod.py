"""A GPU engine in a simulated pod: what tests/test_gpu_pod.py and bench/wake.py share (issue 16).

`pod_volumes` lists the host directories a PyTorch engine needs bound into its SimPod; `end_pod`
ends such a pod safely once criu may have restored its engine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from hibernate.localnode.simpod import SimPod

OPERATOR_DIR = Path(__file__).resolve().parents[2]  # the checkout's operator/ (PYTHONPATH)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(raw.encode().decode("unicode_escape") if "\\" in raw else raw)
    return points


def _mount_of(path: str, points: list[str]) -> str:
    return max((m for m in points if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default="/")


def pod_volumes(explicit: Sequence[Path]) -> list[str]:
    """Host directories the engine needs in its pod, bound there at the same path.

    The pod's root is an overlay of the host's / only: another file system mounted below it (the
    driver's libraries, a Python installation, the checkout) would look empty in the pod. So each
    mount point that holds something the engine loads is bound, and the `explicit` directories
    (the weights, which the engine may write) always are. Load the driver library in this process
    first (hibernate.agent.cuda.default_api()), so that its mount is found too.
    """
    needed = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.realpath(sys.executable),
        str(OPERATOR_DIR),
    ]
    needed += [p for p in sys.path if p and os.path.isdir(p)]
    needed += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and os.path.isdir(p)]
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        needed.append(spec.origin)
    with contextlib.suppress(OSError):  # the driver library this process loaded (cuda.default_api)
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "libcuda.so" in line or "libnvidia-ml.so" in line:
                needed.append(line.split()[-1])
    points = _mount_points()
    found = {str(p.resolve()) for p in explicit}
    for path in needed:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            continue
        mount = _mount_of(real, points)
        if mount != "/" and not any(
            mount == s or mount.startswith(s + "/") for s in ("/proc", "/sys", "/dev")
        ):
            found.add(mount)
    # A directory below another one in the list comes along with it (recursive binds).
    return sorted(v for v in found if not any(v != o and v.startswith(o.rstrip("/") + "/") for o in found))


def end_pod(sim: SimPod, url: str, restored: bool) -> None:
    """Ends the pod. An engine that criu restored (`restored`) is first put to sleep and
    CUDA-checkpointed: ending a live restored CUDA process has hung hosts (NVIDIA/cuda-checkpoint#53)."""
    from hibernate.agent import cuda

    pid = sim.engine_host_pid()
    if pid is not None and restored:
        with contextlib.suppress(Exception):
            if cuda.default_api().get_state(pid) is cuda.ProcessState.RUNNING:
                with contextlib.suppress(OSError):
                    request = urllib.request.Request(f"{url}/sleep?level=2", method="POST")
                    with urllib.request.urlopen(request, timeout=60) as response:
                        response.read()
                cuda.suspend_all([pid])
    sim.close()
