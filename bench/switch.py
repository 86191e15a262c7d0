"""Benchmark of a GPU switch through the gateway: two models of one GpuGroup (maxAwake 1) take turns,
each request for the sleeping one puts the other to sleep at the level under test, then wakes the one
asked for. Per level: the request's time (the whole switch, as a client sees it) and the gateway's own
hibernate_gateway_gpu_switch_seconds.

It starts its own throwaway control plane, the operator, the gateway and the agent stand-in of the
tests with two engines on loopback (docs/gpu-sharing.md has the switch step by step):

    .venv/bin/python bench/switch.py [--levels L1,CudaSuspend] [--rounds 5] [--size 512] \
        [--device cpu] [--results bench/RESULTS.md] [--json switch.json]

--device cpu runs the fake engine (weights of --size MiB in host memory); --device cuda runs the
reference engine on the GPU with --size MiB of weights (the GPU machine). Either way the agent
stand-in performs the levels with the engine's sleep API only (CudaSuspend and Checkpoint are the
engine's level 1 there), so those rows measure the switch through the gateway, not the driver or
CRIU: bench/wake.py measures those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tests.agent_standin import AgentStandin  # noqa: E402
from tests.cluster import Cluster, eventually, new_namespace  # noqa: E402
from tests.engine_fixtures import free_port  # noqa: E402
from tests.gateway_helpers import GatewayProcess, model_manifest, settled, start_gateway  # noqa: E402
from tests.modeldeployments import apply, get  # noqa: E402

from harness import operator_on_control_plane  # noqa: E402
from reporting import machine, percentile, write_section  # noqa: E402

MEMBERS = ("sw-a", "sw-b")
LEVELS = ("L1", "L2", "CudaSuspend")


def engine_command(device: str, size: int) -> Callable[[str, int], list[str]] | None:
    """The engine each member runs: None (the stand-in's fake engine) on the CPU, the reference
    engine with `size` MiB of weights on a GPU."""
    if device == "cpu":
        return None

    def reference(model: str, port: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "hibernate.engine.reference", "--model", model, "--host", "127.0.0.1"),
            *("--port", str(port), "--device", device, "--weights-gib", f"{size / 1024:g}"),
            "--enable-sleep-mode",
        ]

    return reference


def one_level(
    cluster: Cluster, workdir: Path, level: str, rounds: int, device: str, size: int
) -> dict[str, Any]:
    ns = new_namespace(cluster)
    (workdir / level).mkdir(parents=True, exist_ok=True)
    group = {
        "apiVersion": "hibernate.dev/v1alpha1",
        "kind": "GpuGroup",
        "metadata": {"name": "bench"},
        "spec": {
            "maxAwake": 1,
            "makeRoomLevel": level,
            "minAwakeSeconds": 0,
            "switchTimeoutSeconds": 600,
            "placement": {"mode": "SameNode"},
        },
    }
    apply(cluster, ns, group)
    with (
        AgentStandin(
            cluster, ns, workdir / level, weights_mib=size, engine_command=engine_command(device, size)
        ) as standin,
        start_gateway(cluster, ns, workdir / level, hold_timeout=600) as gw,
        httpx.Client(timeout=700) as client,
    ):
        for name, start in zip(MEMBERS, ("Awake", level), strict=True):
            port = free_port()
            standin.serve(name, f"bench/{name}", port)
            body = model_manifest(name, f"bench/{name}", port, level=start)
            body["spec"]["gpuGroup"] = {"name": "bench"}
            apply(cluster, ns, body)
        eventually(lambda: settled(get(cluster, ns, MEMBERS[0]), "Awake", "Awake"), timeout=300)
        eventually(lambda: settled(get(cluster, ns, MEMBERS[1]), level, "Asleep"), timeout=300)
        seconds = []
        for i in range(rounds * 2):
            asked = MEMBERS[(i + 1) % 2]
            other = MEMBERS[i % 2]
            started = time.monotonic()
            answer = client.post(
                f"{gw.url}/v1/completions", json={"model": f"bench/{asked}", "prompt": "hi", "max_tokens": 4}
            )
            seconds.append(time.monotonic() - started)
            if answer.status_code != 200:
                raise RuntimeError(f"{asked}: {answer.status_code} {answer.text[:300]}")
            # The next switch starts from a settled group, as alternating clients would see it.
            eventually(lambda other=other: settled(get(cluster, ns, other), level, "Asleep"), timeout=300)
        gateway_seconds = _gateway_seconds(gw)
    cluster.core.delete_namespace(ns)
    return {
        "level": level,
        "switches": len(seconds),
        "request_seconds": seconds,
        "p50": statistics.median(seconds),
        "p90": percentile(seconds, 90),
        "gateway_switch_seconds_mean": gateway_seconds,
    }


def _gateway_seconds(gw: GatewayProcess) -> float | None:
    metrics = gw.metrics()
    count = metrics.get("hibernate_gateway_gpu_switch_seconds_count", 0.0)
    total = metrics.get("hibernate_gateway_gpu_switch_seconds_sum", 0.0)
    return total / count if count else None


def table(rows: list[dict[str, Any]], device: str, size: int) -> str:
    lines = [
        f"Two models of one GpuGroup (maxAwake 1) alternating through the gateway; device {device}, "
        f"{size} MiB of weights each.",
        "",
        "| makeRoomLevel | switches | request p50 s | request p90 s | gateway switch mean s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mean = r["gateway_switch_seconds_mean"]
        lines.append(
            f"| {r['level']} | {r['switches']} | {r['p50']:.3f} | {r['p90']:.3f} | "
            f"{'' if mean is None else f'{mean:.3f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=64, help="MiB of weights per model")
    parser.add_argument(
        "--levels", default=",".join(LEVELS), help="makeRoomLevels to measure, comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=5, help="switches each way per level")
    parser.add_argument("--results", default="", help="write this section into that markdown file")
    parser.add_argument("--json", default="", help="write the rows here")
    args = parser.parse_args(argv)
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        operator_on_control_plane(Path(tmp), gpu_groups=True) as cluster,
    ):
        for level in levels:
            row = one_level(cluster, Path(tmp), level, args.rounds, args.device, args.size)
            rows.append(row)
            print(
                f"{level:<12} {row['switches']} switches  p50 {row['p50']:.3f} s  p90 {row['p90']:.3f} s",
                flush=True,
            )
    text = table(rows, args.device, args.size)
    print("\n" + text)
    if args.json:
        payload = {"machine": machine(), "at": datetime.now(UTC).isoformat(), "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if args.results:
        write_section(
            Path(args.results), "switch", f"## GPU switches through the gateway (bench/switch.py)\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
