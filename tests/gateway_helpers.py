"""Helpers for the gateway and idle tests (and bench/gateway.py): a ModelDeployment on a fixed engine
port, the gateway as a real subprocess (`hibernate gateway`), requests and its metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hibernate.api import auto_level
from hibernate.api import constants as c
from tests.cluster import Cluster, Process, hibernate_process
from tests.engine_fixtures import free_port
from tests.modeldeployments import apply


def model_manifest(
    name: str,
    model: str,
    port: int,
    level: object = "Awake",
    idle: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": model,
        "replicas": 1,
        "sleepLevel": level,
        "engine": {"image": "vllm/vllm-openai:v0.33.0", "port": port},
    }
    if idle:
        spec["idle"] = idle
    meta: dict[str, Any] = {"name": name}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": meta, "spec": spec}


def apply_model(cluster: Cluster, namespace: str, name: str, model: str, port: int, **kwargs: Any) -> None:
    apply(cluster, namespace, model_manifest(name, model, port, **kwargs))


def level_in_effect(obj: dict[str, Any]) -> str | None:
    """The level the operator applies: the automatic level in effect (idle ladder, wake on request),
    else spec.sleepLevel."""
    level = auto_level.effective_level_of(obj)
    return level.label if level is not None else None


def settled(obj: dict[str, Any], level: str, phase: str) -> bool:
    """The model's level in effect is `level`, and its status, caught up with it, says `phase`."""
    status = obj.get("status") or {}
    return bool(
        level_in_effect(obj) == level
        and status.get("effectiveLevel") == level
        and status.get("phase") == phase
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


@dataclass
class GatewayProcess:
    url: str
    process: Process

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=5).text)


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` → value, for the gateway's own series."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hibernate_"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@contextmanager
def start_gateway(
    cluster: Cluster,
    namespace: str,
    workdir: Path,
    *args: str,
    hold_timeout: float = 30.0,
    upstream_template: str | None = "http://127.0.0.1:{port}",
) -> Iterator[GatewayProcess]:
    """The gateway, forwarding to `upstream_template` (each model's fixed engine port) when the status
    says the model serves; None: as deployed, to the ready endpoints of each model's Service."""
    port = free_port()
    upstream = ("--upstream-template", upstream_template) if upstream_template else ()
    process = hibernate_process(
        cluster,
        workdir / "gateway.log",
        "gateway",
        *("--bind", "127.0.0.1", "--port", str(port), "--namespace", namespace),
        *upstream,
        *("--hold-timeout", str(hold_timeout)),
        *("--activity-interval", "0.5", "--shutdown-timeout", "1"),
        *args,
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or (process.popen and process.popen.poll() is not None):
                raise RuntimeError(f"the gateway did not become ready:\n{process.output()}")
            time.sleep(0.05)
        yield GatewayProcess(url, process)
    finally:
        process.stop()
        print(f"--- gateway log ---\n{process.output()[-6000:]}")


def complete(
    client: httpx.Client, gateway: GatewayProcess | str, model: str, prompt: str, max_tokens: int = 8
) -> httpx.Response:
    base = gateway if isinstance(gateway, str) else gateway.url
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    return client.post(f"{base}/v1/completions", json=body)
