"""The gateway as deployed (no --upstream-template): it sends requests only to the ready addresses of a
model's Endpoints, round robin, and holds them while none is ready, against a real API server.

The Endpoints are written by the test, as the endpoints controller writes them from the pods' Ready
condition (which the agent's readiness gate makes False while a replica sleeps): one address per
replica, ready or not, each a fake engine with its own port on this machine's own non-loopback
address (the API server refuses loopback addresses in Endpoints). A request that reached the
sleeping engine would hang (a sleeping vLLM holds completions until it wakes), so a client timeout
catches any mistake.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hibernate.api import constants as c
from tests.cluster import Cluster
from tests.engine_fixtures import start_fake_engine
from tests.gateway_helpers import apply_model, complete, metric_sum, start_gateway

MODEL = "hib/tiny"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def own_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))
        except OSError as e:
            pytest.skip(f"no non-loopback IPv4 address to list in Endpoints: {e}")
        address: str = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address to list in Endpoints")
    return address


def write_endpoints(
    cluster: Cluster, namespace: str, name: str, ip: str, ready: list[int], not_ready: list[int]
) -> None:
    """The model's Endpoints: one subset per engine port (as the controller groups them), the
    address under `addresses` when ready, else under `notReadyAddresses`."""
    subsets: list[dict[str, Any]] = []
    for port, key in [(p, "addresses") for p in ready] + [(p, "notReadyAddresses") for p in not_ready]:
        subsets.append({key: [{"ip": ip}], "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
    body = {"metadata": {"name": name, "labels": {c.LABEL_MODEL: name}}, "subsets": subsets}
    try:
        cluster.core.replace_namespaced_endpoints(name, namespace, body)
    except Exception:
        cluster.core.create_namespaced_endpoints(namespace, body)


def test_requests_go_only_to_ready_replicas_and_wait_while_none_is(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    ip = own_address()
    on_all = ("--host", "0.0.0.0")  # reachable at `ip` too
    with (
        start_fake_engine(*on_all, model=MODEL, weights_mib=4, kv_mib=2) as awake,
        start_fake_engine(*on_all, model=MODEL, weights_mib=4, kv_mib=2) as asleep,
    ):
        a, b = port_of(awake.url), port_of(asleep.url)

        def endpoints(ready: list[int], not_ready: list[int]) -> None:
            write_endpoints(cluster, namespace, "m", ip, ready, not_ready)

        httpx.post(f"{asleep.url}/sleep?level=1", timeout=10).raise_for_status()
        apply_model(cluster, namespace, "m", MODEL, a)
        # A Service without a selector: the endpoints controller leaves its Endpoints to us.
        cluster.core.create_namespaced_service(
            namespace,
            {
                "metadata": {"name": "m", "labels": {c.LABEL_MODEL: "m"}},
                "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
            },
        )
        endpoints(ready=[a], not_ready=[b])
        with start_gateway(cluster, namespace, tmp_path, upstream_template=None, hold_timeout=30) as gw:
            # 100 requests: every one answered by the ready replica, none sent to the sleeping one.
            with httpx.Client(timeout=10) as client:
                expected = complete(client, awake.url, MODEL, "the same prompt").json()["choices"][0]["text"]
                statuses = []
                for i in range(100):
                    r = complete(client, gw, MODEL, "the same prompt")
                    statuses.append(r.status_code)
                    assert r.status_code != 200 or r.json()["choices"][0]["text"] == expected, i
            assert statuses == [200] * 100, statuses
            assert httpx.get(f"{asleep.url}/is_sleeping", timeout=5).json() == {"is_sleeping": True}
            models = httpx.get(f"{gw.url}/v1/models", timeout=5).json()["data"]
            assert [m["hibernate"]["ready"] for m in models] == [True]

            # No ready replica: the request is held (not sent to the sleeping engine, not refused) …
            endpoints(ready=[], not_ready=[a, b])
            time.sleep(1.0)  # the gateway's watch has seen it
            before = gw.metrics()
            answer: list[httpx.Response] = []

            def ask() -> None:
                with httpx.Client(timeout=30) as client:
                    answer.append(complete(client, gw, MODEL, "the same prompt"))

            held = threading.Thread(target=ask)
            held.start()
            time.sleep(2.0)
            assert not answer, "a request went out while no replica was ready"
            assert gw.metrics()["hibernate_gateway_requests_held"] == 1
            # … until a replica is ready again: the sleeping one woke and its address is ready.
            httpx.post(f"{asleep.url}/wake_up", timeout=10).raise_for_status()
            endpoints(ready=[b], not_ready=[a])
            held.join(20)
            assert [r.status_code for r in answer] == [200]
            assert answer[0].json()["choices"][0]["text"] == expected
            after = gw.metrics()
            # Held and answered without a wake: the spec says Awake, only its replicas were not ready.
            assert metric_sum(after, "hibernate_gateway_wakes_total") == metric_sum(
                before, "hibernate_gateway_wakes_total"
            )
            held_count = "hibernate_gateway_hold_seconds_count"
            assert after[held_count] - before.get(held_count, 0) == 1
