"""Session fixtures: one real control plane for the whole run, one namespace per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ports
from tests.cluster import (
    Cluster,
    Process,
    hibernate_process,
    install_crd,
    new_namespace,
    start_cluster,
    stop_cluster,
)

# pytest-xdist (hack/test.sh runs three workers, each with its own control plane): each worker picks
# loopback ports from a range of its own (tests/ports.py), its control plane's included, so that no
# port one worker picked is taken by another before it is bound.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[ports.ENV] = ports.worker_range(
        os.environ["PYTEST_XDIST_WORKER"], int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU tests run only where a driver is: on the GPU machine, never in CI.
    if Path("/proc/driver/nvidia").exists():
        return
    skip = pytest.mark.skip(reason="no NVIDIA driver on this machine (/proc/driver/nvidia missing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.environ.get("HIBERNATE_SKIP_K8S"):
        pytest.skip("HIBERNATE_SKIP_K8S is set")
    c = start_cluster(tmp_path_factory.mktemp("k8s"))
    try:
        install_crd(c)
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    ns = new_namespace(cluster)
    yield ns
    cluster.core.delete_namespace(ns)


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Process]:
    """The operator, as users run it (`hibernate operator`), watching the whole cluster."""
    proc = hibernate_process(cluster, tmp_path / "operator.log", "operator", "--verbose").start()
    yield proc
    proc.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(proc.output()[-5000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
