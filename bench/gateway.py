"""Benchmark of the wake-on-request gateway, on loopback:

1. the latency the gateway adds to an awake model: N completions straight to a fake engine and N
   through the gateway, interleaved (p50/p99 each, and the difference; the goal is < 2 ms at p50);
2. the hold time of a request to a sleeping model, per level (L1, L2, CudaSuspend, Stop): from the
   request to its answer, through the whole loop (gateway → ModelDeployment spec → operator → pod
   annotation → agent stand-in → fake engine → pod report → operator status → gateway).

It starts its own throwaway control plane, the operator, the agent stand-in of the tests and a
fake engine, prints a table and writes its section of bench/RESULTS.md, naming the machine.

    .venv/bin/python bench/gateway.py [--requests 2000] [--wakes 5] [--no-write]

The hold times measure this harness, not a GPU: the stand-in polls pods every 100 ms and the fake
engine's sleep and wake take milliseconds. On a GPU the engine's own wake time adds to them.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tests.agent_standin import AgentStandin  # noqa: E402
from tests.cluster import Cluster, eventually, new_namespace  # noqa: E402
from tests.engine_fixtures import free_port  # noqa: E402
from tests.gateway_helpers import apply_model, start_gateway  # noqa: E402
from tests.gateway_helpers import settled as model_settled  # noqa: E402
from tests.modeldeployments import get, set_level  # noqa: E402

from harness import operator_on_control_plane  # noqa: E402
from reporting import machine, percentile, write_section  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
MODEL = "bench/tiny"


def settled(cluster: Cluster, ns: str, level: str, phase: str) -> bool:
    """The level in effect (the gateway's wake is an automatic level over the spec) is `level`, at `phase`."""
    return model_settled(get(cluster, ns, "m"), level, phase)


def latency(client: httpx.Client, direct: str, gateway: str, count: int) -> dict[str, list[float]]:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    targets = {"direct": direct, "gateway": gateway}
    for i in range(count + 100):  # the first 100 of each warm up connections and caches
        for name in ("direct", "gateway") if i % 2 else ("gateway", "direct"):
            started = time.perf_counter()
            response = client.post(f"{targets[name]}/v1/completions", json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if i >= 100:
                samples[name].append(elapsed * 1000)
    return samples


def hold_times(
    cluster: Cluster, ns: str, client: httpx.Client, gateway: str, wakes: int
) -> dict[str, list[float]]:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    out: dict[str, list[float]] = {}
    for level, phase in (("L1", "Asleep"), ("L2", "Asleep"), ("CudaSuspend", "Asleep"), ("Stop", "Stopped")):
        out[level] = []
        for _ in range(wakes):
            set_level(cluster, ns, "m", level)
            eventually(
                functools.partial(settled, cluster, ns, level, phase), timeout=60, what=f"{level} {phase}"
            )
            started = time.perf_counter()
            response = client.post(f"{gateway}/v1/completions", json=body)
            out[level].append(time.perf_counter() - started)
            response.raise_for_status()
            eventually(lambda: settled(cluster, ns, "Awake", "Awake"), timeout=60, what="Awake")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path for the latency")
    parser.add_argument("--wakes", type=int, default=5, help="wakes per level for the hold times")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    print(f"starting a control plane in {work} …", file=sys.stderr)
    with operator_on_control_plane(work) as cluster:
        ns = new_namespace(cluster)
        port = free_port()
        with (
            AgentStandin(cluster, ns, work) as standin,
            start_gateway(cluster, ns, work, "--activity-interval", "10") as gw,
            httpx.Client(timeout=120) as client,
        ):
            standin.serve("m", MODEL, port)
            apply_model(cluster, ns, "m", MODEL, port)
            eventually(lambda: settled(cluster, ns, "Awake", "Awake"), timeout=60, what="Awake")
            print(f"latency: {args.requests} requests per path …", file=sys.stderr)
            lat = latency(client, standin.engine_url("m"), gw.url, args.requests)
            print(f"hold times: {args.wakes} wakes per level …", file=sys.stderr)
            holds = hold_times(cluster, ns, client, gw.url, args.wakes)

    info = machine()
    direct, through = lat["direct"], lat["gateway"]
    rows = [
        ("direct to the engine", percentile(direct, 50), percentile(direct, 99)),
        ("through the gateway", percentile(through, 50), percentile(through, 99)),
    ]
    added50 = percentile(through, 50) - percentile(direct, 50)
    added99 = percentile(through, 99) - percentile(direct, 99)
    lines = [
        f"## Gateway — {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Machine: `{info['uname']}`; CPU {info['cpu']}, {info['cores']} cores; Python {info['python']}.",
        f"Command: `.venv/bin/python bench/gateway.py --requests {args.requests} --wakes {args.wakes}`",
        "",
        f"Added latency on an awake model (fake engine, loopback, max_tokens 1, {args.requests} sequential "
        "requests per path, interleaved, keep-alive client):",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *(f"| {name} | {p50:.2f} | {p99:.2f} |" for name, p50, p99 in rows),
        f"| **added by the gateway** | **{added50:.2f}** | **{added99:.2f}** |",
        "",
        f"Hold time of a request to a sleeping model, request to answer ({args.wakes} wakes per level; "
        "agent stand-in polling every 100 ms, fake engine; CudaSuspend is level 1 for the fake, Stop a "
        "cold start of the fake engine):",
        "",
        "| woken from | median s | min s | max s |",
        "|---|---:|---:|---:|",
        *(
            f"| {level} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |"
            for level, v in holds.items()
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(RESULTS, "bench:gateway", text)
        print(f"wrote its section of {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
