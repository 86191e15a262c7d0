"""What the loopback benchmarks share to run: a throwaway control plane with hibernate's CRDs and the
operator as a process (the tests' own helpers, tests/cluster.py), torn down when the block ends."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster import (  # noqa: E402
    Cluster,
    hibernate_process,
    install_crd,
    install_gpu_group_crd,
    start_cluster,
    stop_cluster,
)


@contextlib.contextmanager
def operator_on_control_plane(
    work: Path, gpu_groups: bool = False, scheduler: bool = True
) -> Iterator[Cluster]:
    """A control plane under `work`/k8s with the ModelDeployment CRD (and with `gpu_groups` the
    GpuGroup one), and the operator logging to `work`/operator.log. `scheduler=False`: no
    kube-scheduler (the benches' stand-in plays the kubelet and needs no pod scheduled)."""
    cluster = start_cluster(work / "k8s", scheduler=scheduler)
    operator = None
    try:
        install_crd(cluster)
        if gpu_groups:
            install_gpu_group_crd(cluster)
        operator = hibernate_process(cluster, work / "operator.log", "operator").start()
        yield cluster
    finally:
        if operator is not None:
            operator.stop()
        stop_cluster(cluster)
