"""The GPU side of a GpuGroup switch (issue 20): two reference engines on one GPU take turns, each
switch puts the awake one to sleep at the level under test with the agent's own Levels, wakes the
other and waits for its first correct token. This is the part of a switch that the GPU costs;
bench/switch.py measures the whole switch through the gateway and the operator (on the CPU with
fake engines, since the GPU machine has no Kubernetes control plane), and the two add up to what a
client sees (docs/gpu-sharing.md).

    sudo python3 bench/switch_gpu.py [--size-gib 16] [--levels 1 3] [--rounds 3] \
        [--results bench/RESULTS.md] [--json switch-gpu.json] [--engine-arg ...]

Root and a GPU: CudaSuspend (3) checkpoints the engine's CUDA context through the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wake  # the engine process, its target and the agent's Levels on a bare engine
from reporting import write_section

LEVEL_NAMES = {1: "L1", 2: "L2", 3: "CudaSuspend"}


async def one_switch(
    sleeper: wake.AgentLevels, waker: wake.AgentLevels, level: int, answer: str
) -> dict[str, float]:
    started = time.monotonic()
    await sleeper.sleep(level)
    slept = time.monotonic()
    await waker.wake(level)
    woke = time.monotonic()
    first = waker.t.engine.complete(1)
    done = time.monotonic()
    if not answer.startswith(first):
        raise RuntimeError(f"the woken engine answered {first!r}, not the start of {answer!r}")
    return {"sleep_s": slept - started, "wake_s": woke - slept, "switch_s": done - started}


async def one_level(
    engines: list[wake.AgentLevels], level: int, rounds: int, answers: list[str]
) -> dict[str, Any]:
    # Engine 0 awake, engine 1 asleep at `level`; then 2 * rounds switches, alternating.
    await engines[1].sleep(level)
    switches = []
    for i in range(rounds * 2):
        awake, asleep = i % 2, (i + 1) % 2
        switches.append(await one_switch(engines[awake], engines[asleep], level, answers[asleep]))
    # An even number of switches leaves engine 1 asleep again: wake it for the next level.
    await engines[1].wake(level)
    return {
        "level": LEVEL_NAMES[level],
        "switches": len(switches),
        "rows": switches,
        **{
            f"{key}_p50": statistics.median(s[key] for s in switches)
            for key in ("sleep_s", "wake_s", "switch_s")
        },
        "switch_s_max": max(s["switch_s"] for s in switches),
    }


def table(results: list[dict[str, Any]], size_gib: float, gpu: str) -> str:
    lines = [
        f"Two reference engines of {size_gib:g} GiB on one {gpu}; each switch: the agent's Levels put the "
        "awake engine to sleep, wake the other, then its first correct token. Medians over the switches.",
        "",
        "| level | switches | sleep s | wake s | switch to first token s (p50) | max s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['level']} | {r['switches']} | {r['sleep_s_p50']:.3f} | {r['wake_s_p50']:.3f} | "
            f"{r['switch_s_p50']:.3f} | {r['switch_s_max']:.3f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="switch-gpu-"))
    procs = []
    try:
        for name in ("a", "b"):
            spec = wake.EngineSpec(
                size_gib=args.size_gib,
                kv_gib=args.kv_gib,
                device="cuda:0",
                weights_dir=None,
                readers=8,
                pinned_prealloc=True,
                release_staging=False,
                log=Path(args.log_dir) / f"switch-engine-{name}.log",
                extra=tuple(args.engine_arg or ()),
            )
            proc = wake.EngineProc(spec)
            proc.start(timeout=600)
            procs.append(proc)
        engines = [
            wake.AgentLevels(wake.Target(engine=p, image_dir=work / f"img-{i}")) for i, p in enumerate(procs)
        ]
        answers = [p.complete(wake.MAX_TOKENS) for p in procs]
        results = []
        for level in args.levels:
            results.append(await one_level(engines, level, args.rounds, answers))
            print(table(results, args.size_gib, args.gpu), flush=True)
        return results
    finally:
        for p in procs:
            p.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=16.0)
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 3], choices=sorted(LEVEL_NAMES))
    p.add_argument("--rounds", type=int, default=3, help="switches each way per level")
    p.add_argument("--log-dir", default="/var/tmp/hibernate-bench/logs")
    p.add_argument("--results", default="")
    p.add_argument("--section", default="gpu-switch")
    p.add_argument("--json", default="")
    p.add_argument("--engine-arg", action="append", help="extra argument for both engines (repeatable)")
    args = p.parse_args(argv)
    args.gpu = wake.gpu_identity().get("name", "GPU")
    results = asyncio.run(run(args))
    text = table(results, args.size_gib, args.gpu)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.results:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_section(
            Path(args.results), args.section, f"## GPU switch, engines only: {args.gpu} ({when})\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
