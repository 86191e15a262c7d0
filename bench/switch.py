"""Benchmark of a GPU switch through the gateway: two models of one GpuGroup (maxAwake 1) take turns,
each request for the sleeping one puts the other to sleep at the level under test, then wakes the one
asked for. Per level: the request's time (the whole switch, as a client sees it) and the gateway's own
hibernate_gateway_gpu_switch_seconds.

It starts its own throwaway control plane, the operator, the gateway and the agent stand-in of the
tests with two engines on loopback (docs/gpu-sharing.md has the switch step by step):

    .venv/bin/python bench/switch.py [--levels L1,CudaSuspend] [--rounds 5] [--size 512] \
        [--device cpu] [--results bench/RESULTS.md] [--json switch.json]

--device cpu runs the fake engine (weights of --size MiB in host memory); --device cuda runs the
reference engine on the GPU with --size MiB of weights (the GPU machine; generated in place from the
seed, `--weights-dir none`, and its level-1 host copy pinned at start, `--pinned-prealloc`).

Who performs the levels (`--standin`): `engine-api` (the default on the CPU) is the tests' stand-in,
which calls the engine's sleep API only (CudaSuspend and Checkpoint are the engine's level 1 there);
`agent` (the default on a GPU) moves each engine with the agent's own `Levels` (bench/level_adapters.py's
AgentLevels: HTTP to the engine with the agent's hints, and for CudaSuspend the CUDA driver's
checkpoint of the engine process: root and driver >= 570), so a CudaSuspend row there is a real one.
Checkpoint (CRIU in a pod) is measured by bench/wake.py's pod rows, not here.

bench/gpu_switch_run.sh runs it on the GPU machine (bench/README.md): the Kubernetes binaries and
the Python packages travel in `.carry/switch` (bench/pack_carry.sh). Engine pids go to
`--pids-file`, for a clean-up that no interruption can skip; results are written after each level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tests.agent_standin import AgentStandin, _Model  # noqa: E402
from tests.cluster import Cluster, eventually, new_namespace  # noqa: E402
from tests.engine_fixtures import FakeEngine, _spawn, _wait_healthy, free_port  # noqa: E402
from tests.gateway_helpers import GatewayProcess, model_manifest, settled, start_gateway  # noqa: E402
from tests.modeldeployments import apply, get  # noqa: E402

from harness import operator_on_control_plane  # noqa: E402
from reporting import machine, percentile, write_section  # noqa: E402

MEMBERS = ("sw-a", "sw-b")
LEVELS = ("L1", "L2", "CudaSuspend")


def engine_command(device: str, size: int, kv_gib: float = 4.0) -> Callable[[str, int], list[str]] | None:
    """The engine each member runs: None (the stand-in's fake engine) on the CPU, the reference
    engine with `size` MiB of weights on a GPU (generated in place, host copy pinned at start)."""
    if device == "cpu":
        return None
    # The engine calls torch.cuda.set_device, which wants an index: "cuda" alone is refused.
    torch_device = "cuda:0" if device == "cuda" else device

    def reference(model: str, port: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "hibernate.engine.reference", "--model", model, "--host", "127.0.0.1"),
            *("--port", str(port), "--device", torch_device, "--weights-gib", f"{size / 1024:g}"),
            *("--kv-gib", f"{kv_gib:g}", "--weights-dir", "none", "--pinned-prealloc"),
            "--enable-sleep-mode",
        ]

    return reference


def fake_engine_command(model: str, port: int, weights_mib: int) -> list[str]:
    """The stand-in's own fake engine (tests/agent_standin.py), for `--standin agent` on the CPU."""
    return [
        sys.executable,
        *("-m", "hibernate.engine.fake", "--model", model, "--host", "127.0.0.1", "--port", str(port)),
        *("--weights-mib", str(weights_mib), "--kv-mib", "4", "--enable-sleep-mode"),
    ]


@dataclass
class _EngineRef:
    """What bench/level_adapters.py's AgentLevels reads of an engine: its URL, port, pid and command line."""

    url: str
    port: int
    pid: int
    command: list[str]

    def argv(self) -> list[str]:
        return self.command


class AgentLevelsStandin(AgentStandin):
    """The tests' stand-in (the kubelet's part, the reports) whose agent part moves each engine with
    the agent's own `Levels` (bench/level_adapters.py's AgentLevels on the bare engine process), so that
    CudaSuspend checkpoints the engine's CUDA context through the driver as the agent does.

    Engines get `startup_timeout` to answer /health (a 16 GiB reference engine pins its host copy at
    start), and each engine's pid is appended to `pids_file` for the runner's clean-up."""

    def __init__(
        self, *args: Any, startup_timeout: float = 600.0, pids_file: Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.startup_timeout = startup_timeout
        self.pids_file = pids_file
        self._moves: dict[str, tuple[int, int]] = {}  # model name -> (pod level from, pod level to)
        self._levels: dict[str, Any] = {}  # model name -> wake.AgentLevels of its engine

    def _transition(self, slot: _Model, pod: str, uid: str, raw: str, current: int, desired: int) -> None:
        # The base class hands _engine_to the engine's levels (3 -> 1); keep the pod's for the agent.
        self._moves[slot.name] = (current, desired)
        super()._transition(slot, pod, uid, raw, current, desired)

    def _engine_to(self, slot: _Model, current: int, target: int) -> None:
        current, target = self._moves.pop(slot.name, (current, target))
        levels = self._levels.get(slot.name)
        if levels is None:
            raise RuntimeError("no engine runs for this pod")
        try:
            if current:
                asyncio.run(levels.wake(current))
            if target:
                asyncio.run(levels.sleep(target))
        except Exception as e:  # the agent's LevelError and the like: a failed transition, reported
            raise RuntimeError(f"{type(e).__name__}: {e}") from e

    def _start_engine(self, slot: _Model) -> FakeEngine:
        import level_adapters  # the agent's Levels on a bare engine process

        command = [
            *(
                self.engine_command(slot.model, slot.port)
                if self.engine_command is not None
                else fake_engine_command(slot.model, slot.port, self.weights_mib)
            ),
            *slot.engine_args,
        ]
        engine = _spawn(command, self.workdir / f"engine-{slot.name}.log", None)
        if self.pids_file is not None:
            with self.pids_file.open("a") as pids:
                pids.write(f"{engine.pid}\n")
        try:
            if not _wait_healthy(engine, self.startup_timeout):
                raise RuntimeError(f"port {slot.port} taken:\n{engine.log()[-2000:]}")
        except BaseException:
            self._kill(engine)
            raise
        slot.engine_starts += 1
        ref = _EngineRef(engine.url, slot.port, engine.pid, command)
        self._levels[slot.name] = level_adapters.AgentLevels(
            level_adapters.Target(engine=ref, image_dir=self.workdir / slot.name)
        )
        return engine

    def _stop_engine(self, slot: _Model) -> None:
        if slot.engine is not None:
            self._kill(slot.engine)
        self._levels.pop(slot.name, None)
        super()._stop_engine(slot)

    @staticmethod
    def _kill(engine: FakeEngine) -> None:
        """A CUDA-suspended engine does not act on SIGTERM: give its context back to it first."""
        if engine.process.poll() is None:
            from hibernate.agent import cuda

            with contextlib.suppress(cuda.CudaError, OSError):
                cuda.resume_all([engine.pid])
            engine.process.terminate()
            try:
                engine.process.wait(20)
            except Exception:
                engine.process.kill()
                engine.process.wait(10)


def one_level(
    cluster: Cluster,
    workdir: Path,
    level: str,
    rounds: int,
    device: str,
    size: int,
    standin_kind: str = "engine-api",
    kv_gib: float = 4.0,
    pids_file: Path | None = None,
    max_tokens: int = 1,
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
    command = engine_command(device, size, kv_gib)
    agent: AgentStandin = (
        AgentLevelsStandin(
            cluster, ns, workdir / level, weights_mib=size, engine_command=command, pids_file=pids_file
        )
        if standin_kind == "agent"
        else AgentStandin(cluster, ns, workdir / level, weights_mib=size, engine_command=command)
    )
    with (
        agent as standin,
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

        def ask(member: str) -> str:
            answer = client.post(
                f"{gw.url}/v1/completions",
                json={"model": f"bench/{member}", "prompt": "hi", "max_tokens": max_tokens},
            )
            if answer.status_code != 200:
                raise RuntimeError(f"{member}: {answer.status_code} {answer.text[:300]}")
            text: str = answer.json()["choices"][0]["text"]
            return text

        # Each member must give the same answer after every wake as the first time (the awake one's
        # answer is taken now, with no switch; the sleeping one's at its first wake): a correct first
        # token, not only a 200.
        answers = {MEMBERS[0]: ask(MEMBERS[0])}
        seconds = []
        for i in range(rounds * 2):
            asked = MEMBERS[(i + 1) % 2]
            other = MEMBERS[i % 2]
            started = time.monotonic()
            text = ask(asked)
            seconds.append(time.monotonic() - started)
            if answers.setdefault(asked, text) != text:
                raise RuntimeError(f"{asked} answered {text!r} after a switch, {answers[asked]!r} before")
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


def table(
    rows: list[dict[str, Any]], device: str, size: int, standin: str = "engine-api", max_tokens: int = 1
) -> str:
    engine = "the fake engine" if device == "cpu" else "the reference engine"
    mover = (
        "the agent's own Levels (CudaSuspend: the CUDA driver's checkpoint)"
        if standin == "agent"
        else "the engine's sleep API only (CudaSuspend and Checkpoint are its level 1)"
    )
    lines = [
        f"Two models of one GpuGroup (maxAwake 1) alternating through the gateway; {engine} on {device}, "
        f"{size} MiB of weights each; the levels performed by {mover}. Request s: from the request for "
        f"the sleeping model to its answer ({max_tokens} token{'s' if max_tokens > 1 else ''}: the first token), "
        "through the gateway, the operator and the agent's part.",
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
    parser.add_argument("--kv-gib", type=float, default=4.0, help="the reference engine's KV cache (cuda)")
    parser.add_argument(
        "--levels", default=",".join(LEVELS), help="makeRoomLevels to measure, comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=5, help="switches each way per level")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens each request asks for")
    parser.add_argument(
        "--standin",
        choices=["agent", "engine-api"],
        default=None,
        help="who performs the levels: the agent's Levels (default on cuda) or the engine's API only",
    )
    parser.add_argument("--results", default="", help="write this section into that markdown file")
    parser.add_argument("--section", default="switch", help="the section of --results")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument(
        "--work-dir", default="", help="keep the control plane's, components' and engines' logs here"
    )
    parser.add_argument("--pids-file", default="", help="append each engine's pid here")
    args = parser.parse_args(argv)
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    standin = args.standin or ("agent" if args.device == "cuda" else "engine-api")
    pids_file = Path(args.pids_file) if args.pids_file else None
    rows: list[dict[str, Any]] = []

    def write() -> str:
        text = table(rows, args.device, args.size, standin, args.max_tokens)
        if args.json:
            payload = {
                "machine": machine(),
                "at": datetime.now(UTC).isoformat(),
                "standin": standin,
                "rows": rows,
            }
            Path(args.json).write_text(json.dumps(payload, indent=1))
        if args.results:
            when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            title = f"## Switches through the gateway (bench/switch.py, {args.device}, {when})"
            write_section(Path(args.results), args.section, f"{title}\n\n{text}")
        return text

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        # No scheduler: the stand-in plays the kubelet for pods that no node takes (one binary
        # less for the GPU machine to carry).
        cluster = stack.enter_context(operator_on_control_plane(work, gpu_groups=True, scheduler=False))
        for level in levels:
            row = one_level(
                cluster,
                work,
                level,
                args.rounds,
                args.device,
                args.size,
                standin,
                args.kv_gib,
                pids_file,
                args.max_tokens,
            )
            rows.append(row)
            print(
                f"{level:<12} {row['switches']} switches  p50 {row['p50']:.3f} s  p90 {row['p90']:.3f} s",
                flush=True,
            )
            write()  # a run cut short keeps the levels done
    print("\n" + write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
