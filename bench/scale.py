"""Scale benchmark of the operator and the node agent against a real control plane on this machine.

1. 500 ModelDeployments with 2 replicas each (1000 pods, left unscheduled: no node takes them) are
   created with the operator running; the time until every status is current, and until every pod
   carries its level;
2. one spec change reflected in status: `spec.sleepLevel` of one model changed, then the time until
   its status has `observedGeneration` of the change and `lastTransition.to` the new level (p50/p99
   over 50 changes, one at a time);
3. a full reconcile after an operator restart: the operator is stopped, every model's level is
   changed, the operator is started; the time until every status is current again;
4. the operator's memory (RSS, sampled from /proc) and CPU (user+system time) in each phase, and
   its CPU while idle for one resync period;
5. the agent's reaction: a pod annotation change until the agent starts its work, p50/p99, read two
   ways: the agent's own `hibernate_agent_reaction_seconds` histogram (the change seen in its watch
   → work started) and, end to end, the patch until the agent's `Sleeping`/`Waking` report arrives in
   this benchmark's watch (two API round trips and two watch deliveries included). The agent runs as
   a real process on a node of its own with one fake engine pod, while the 1000 pods exist.

Goals: status p99 under 2 s, operator RSS under 300 MB, agent reaction p50 under 50 ms.

    .venv/bin/python bench/scale.py [--models 500] [--replicas 2] [--changes 50] [--no-write]

It starts its own throwaway control plane (hack/start-control-plane.sh --controllers), prints a table
and writes its section of bench/RESULTS.md, naming the machine. About 6-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from kubernetes import watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from tests.cluster import (  # noqa: E402
    Cluster,
    Process,
    eventually,
    hibernate_process,
    install_crd,
    running,
    start_cluster,
    stop_cluster,
)
from tests.engine_fixtures import free_port, start_fake_engine  # noqa: E402
from tests.faultkit import ApiServer  # noqa: E402
from tests.modeldeployments import manifest  # noqa: E402
from tests.pods import create_engine_pod, ensure_node, start_pod  # noqa: E402

from hibernate.api import constants as c  # noqa: E402
from reporting import machine, percentile, write_section  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
NAMESPACE = "scale"
AGENT_NODE = "scale-agent-node"
LEVELS = ("L1", "L2", "CudaSuspend", "Checkpoint", "Awake")


def say(text: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [Path(a.decode()).name for a in argv if a]
    if "hibernate" in words:  # python -m hibernate operator|agent
        return f"hibernate {words[words.index('hibernate') + 1]}" if words[-1] != "hibernate" else "hibernate"
    return words[0] if words else str(pid)


def control_plane_pids(cluster: Cluster) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(p) for p in (cluster.dir / "pids").read_text().split()]
    return []


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def settle(quiet: float = 0.3, window: float = 3.0, limit: float = 120.0) -> float:
    """Wait until the machine is less than `quiet` busy over `window` seconds (at most `limit`);
    returns the seconds waited. A measure of reaction time taken while the control plane is still
    working off a burst measures the burst."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        b0 = machine_busy()
        time.sleep(window)
        b1 = machine_busy()
        if (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]) < quiet:
            break
    return time.monotonic() - started


# -- the operator process: memory and CPU --------------------------------------------------------------


@dataclass
class Sampler:
    """Samples one process's RSS and CPU time every 0.25 s; phases mark what the samples belong to."""

    pid: int
    phase: str = "start"
    rss: dict[str, list[int]] = field(default_factory=dict)
    cpu_at: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (cpu s, wall s) at start
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (cpu s, wall s) spent
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self.mark("start")
        self.thread.start()
        return self

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def mark(self, phase: str) -> None:
        now = (self.cpu_seconds(), time.monotonic())
        if self.phase in self.cpu_at:
            cpu0, wall0 = self.cpu_at.pop(self.phase)
            spent = self.cpu.get(self.phase, (0.0, 0.0))
            self.cpu[self.phase] = (spent[0] + now[0] - cpu0, spent[1] + now[1] - wall0)
        self.phase = phase
        self.cpu_at[phase] = now

    def _run(self) -> None:
        while not self.stopping.wait(0.25):
            value = self.rss_bytes()
            if value:
                self.rss.setdefault(self.phase, []).append(value)

    def stop(self) -> None:
        self.mark("end")
        self.stopping.set()
        self.thread.join(2)


# -- the ModelDeployments, watched ---------------------------------------------------------------------


class StatusWatch:
    """Every ModelDeployment of the namespace as last seen, and when each generation's status arrived."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.current: dict[str, tuple[int, int | None, str | None]] = {}  # name -> (generation, observed, to)
        self.caught_up: dict[tuple[str, int, str | None], float] = {}  # (name, generation, to) -> when
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                for event in watch.Watch().stream(
                    self.cluster.custom.list_namespaced_custom_object,
                    c.GROUP,
                    c.VERSION,
                    NAMESPACE,
                    c.PLURAL,
                    timeout_seconds=120,
                ):
                    obj = event["object"]
                    now = time.monotonic()
                    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
                    name, gen = meta.get("name"), int(meta.get("generation") or 0)
                    observed = status.get("observedGeneration")
                    to = (status.get("lastTransition") or {}).get("to")
                    with self.changed:
                        self.current[name] = (gen, observed, to)
                        if observed == gen:
                            self.caught_up.setdefault((name, gen, to), now)
                        self.changed.notify_all()
            time.sleep(0.2)

    def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    def all_current(self, names: list[str], level: str | None = None) -> bool:
        for name in names:
            gen, observed, to = self.current.get(name, (0, None, None))
            if not gen or observed != gen or (level is not None and to != level):
                return False
        return True


def widen_service_range(cluster: Cluster) -> None:
    """hack/start-control-plane.sh gives Services a /24 (254 addresses): too few for 500 models, whose
    Services would fail "range is full" and be retried for ever. Restart its kube-apiserver with a /16."""
    api = ApiServer(cluster)
    api.stop()
    flag = api.argv.index("--service-cluster-ip-range")
    api.argv[flag + 1] = "10.0.0.0/16"  # the same first address (10.0.0.1, in the serving certificate)
    api.start()


def patch_level(cluster: Cluster, name: str, level: str) -> int:
    obj = cluster.custom.patch_namespaced_custom_object(
        c.GROUP, c.VERSION, NAMESPACE, c.PLURAL, name, {"spec": {"sleepLevel": level}}
    )
    return int(obj["metadata"]["generation"])


def pods_annotated(cluster: Cluster, expected: int, level: str) -> bool:
    items = cluster.core.list_namespaced_pod(NAMESPACE, label_selector=c.LABEL_MANAGED).items
    live = [p for p in items if p.metadata.deletion_timestamp is None]
    return len(live) == expected and all(
        (p.metadata.annotations or {}).get(c.ANN_SLEEP_LEVEL) == level for p in live
    )


# -- the agent -------------------------------------------------------------------------------------------


def histogram(metrics: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram in /metrics text."""
    out = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', metrics, re.MULTILINE):
        out.append((float(m[1]), float(m[2])))
    return out


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> tuple[float, float]:
    """The bucket (lower, upper] in which quantile q falls."""
    total = buckets[-1][1] if buckets else 0
    lower = 0.0
    for upper, count in buckets:
        if total and count >= q * total:
            return lower, upper
        lower = upper
    return lower, float("inf")


def agent_reaction(cluster: Cluster, work: Path, flips: int, others: list[int]) -> dict[str, Any]:
    """One pod on a node of its own, its annotation flipped between L1 and Awake `flips` times.

    This benchmark watches the pod with the agent's own field selector (`spec.nodeName`), so one
    watch times both the delivery of each change to a watcher like the agent (the control plane's
    share of the reaction) and the agent's Sleeping/Waking report (its whole reaction, plus one
    write and a second delivery); the agent's histogram times its own share."""
    ensure_node(cluster, AGENT_NODE)
    port = free_port()
    agent = hibernate_process(
        cluster, work / "agent.log", "agent", "--node-name", AGENT_NODE, "--metrics-port", str(port)
    )
    events: list[tuple[float, str | None, str | None]] = []  # (when, sleep-level, state)
    lock = threading.Lock()
    stop = threading.Event()

    def watch_node() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                for event in watch.Watch().stream(
                    cluster.core.list_namespaced_pod,
                    NAMESPACE,
                    field_selector=f"spec.nodeName={AGENT_NODE}",
                    timeout_seconds=60,
                    _request_timeout=70,
                ):
                    now = time.monotonic()
                    ann = event["object"].metadata.annotations or {}
                    with lock:
                        events.append((now, ann.get(c.ANN_SLEEP_LEVEL), ann.get(c.ANN_STATE)))
                    if stop.is_set():
                        return

    def first(after: float, match: Callable[[str | None, str | None], bool]) -> float | None:
        with lock:
            return next((t for t, level, state in events if t >= after and match(level, state)), None)

    def wait_for(after: float, level: str | None = None, state: str | None = None) -> float:
        """When the watch first saw the pod at `level` or in `state` after `after`."""
        when: float = eventually(
            lambda: first(after, lambda lv, st: lv == level if level else st == state), timeout=30
        )
        return when

    with running(agent), start_fake_engine(weights_mib=16, kv_mib=4) as engine:
        engine_port = int(engine.url.rsplit(":", 1)[1])
        pod = create_engine_pod(cluster, NAMESPACE, AGENT_NODE, engine_port, name="reaction", level="Awake")
        start_pod(cluster, NAMESPACE, pod["name"])
        threading.Thread(target=watch_node, daemon=True).start()
        wait_for(0, state="Awake")
        delivered: list[float] = []
        reported: list[float] = []
        assert agent.popen is not None
        watched = [*others, agent.popen.pid, os.getpid()]
        names = {pid: process_name(pid) for pid in watched}
        before_settle = machine_busy(), {pid: cpu_seconds(pid) for pid in watched}
        settled_s = settle()
        busy0, cpu0 = machine_busy(), {pid: cpu_seconds(pid) for pid in watched}
        for i in range(flips):
            level, going, settled = (
                ("L1", "Sleeping", "Asleep") if i % 2 == 0 else ("Awake", "Waking", "Awake")
            )
            time.sleep(0.2)
            started = time.monotonic()
            cluster.core.patch_namespaced_pod(
                pod["name"], NAMESPACE, {"metadata": {"annotations": {c.ANN_SLEEP_LEVEL: level}}}
            )
            seen = wait_for(started, level=level)
            report = wait_for(started, state=going)
            wait_for(started, state=settled)
            delivered.append(seen - started)
            reported.append(report - started)
        busy1, cpu1 = machine_busy(), {pid: cpu_seconds(pid) for pid in watched}

        def busiest(
            start: tuple[tuple[float, float], dict[int, float]],
            end: tuple[tuple[float, float], dict[int, float]],
        ) -> list[tuple[str, float]]:
            """The four processes that used the most CPU between two snapshots (share of one core)."""
            wall = (end[0][1] - start[0][1]) / os.sysconf("SC_CLK_TCK") / (os.cpu_count() or 1)
            shares = ((names[pid], (end[1][pid] - start[1][pid]) / max(wall, 1e-9)) for pid in watched)
            return sorted(shares, key=lambda x: -x[1])[:4]

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        stop.set()
    buckets = histogram(metrics, "hibernate_agent_reaction_seconds")
    count = buckets[-1][1] if buckets else 0
    found = re.search(r"^hibernate_agent_reaction_seconds_sum ([0-9.e+-]+)$", metrics, re.MULTILINE)
    total = float(found[1]) if found else float("nan")
    return {
        "flips": flips,
        "delivered": delivered,
        "reported": reported,
        "machine_busy": (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]),
        "settled_s": settled_s,
        "busiest": busiest((busy0, cpu0), (busy1, cpu1)),
        "busiest_settling": busiest(before_settle, (busy0, cpu0)),
        "hist_count": count,
        "hist_mean": total / count if count else float("nan"),
        "hist_p50": histogram_quantile(buckets, 0.5),
        "hist_p99": histogram_quantile(buckets, 0.99),
    }


# -- the run ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--changes", type=int, default=50, help="spec changes timed one at a time")
    parser.add_argument("--flips", type=int, default=50, help="pod annotation changes for the agent")
    parser.add_argument(
        "--idle", type=float, default=35.0, help="seconds of idle CPU measured (>= one resync)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="leave the control plane running")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    say(f"starting a control plane in {work}")
    cluster = start_cluster(work / "k8s")
    # SIGTERM (a CI timeout) still stops the control plane and the operator below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [f"m{i:04d}" for i in range(args.models)]
    results: dict[str, Any] = {}
    operator: Process | None = None
    sampler: Sampler | None = None
    t_all = time.monotonic()
    try:
        widen_service_range(cluster)
        install_crd(cluster)
        cluster.core.create_namespace({"metadata": {"name": NAMESPACE}})
        # The agent's node now: a new node makes the scheduler retry every pending pod.
        ensure_node(cluster, AGENT_NODE)
        eventually(
            lambda: cluster.core.read_namespaced_service_account("default", NAMESPACE).secrets, timeout=60
        )
        statuses = StatusWatch(cluster)
        operator = hibernate_process(cluster, work / "operator-1.log", "operator").start()
        assert operator.popen is not None
        sampler = Sampler(operator.popen.pid).start()
        time.sleep(3)  # the operator's start-up, before anything to do

        # 1. create
        sampler.mark("create")
        say(f"creating {args.models} ModelDeployments with {args.replicas} replicas each")
        started = time.monotonic()

        def create(name: str) -> None:
            for _ in range(20):
                try:
                    cluster.custom.create_namespaced_custom_object(
                        c.GROUP, c.VERSION, NAMESPACE, c.PLURAL, manifest(name, replicas=args.replicas)
                    )
                    return
                except ApiException as e:
                    if e.status == 409:
                        return
                    time.sleep(0.5)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names))
        results["create_s"] = time.monotonic() - started
        ok = statuses.wait(lambda: statuses.all_current(names), timeout=600)
        results["all_status_s"] = time.monotonic() - started if ok else float("nan")
        say(f"every status current after {results['all_status_s']:.1f} s")
        expected_pods = args.models * args.replicas
        eventually(lambda: pods_annotated(cluster, expected_pods, "Awake"), timeout=600, interval=2)
        results["all_pods_s"] = time.monotonic() - started
        say(f"{expected_pods} pods carry their level after {results['all_pods_s']:.1f} s")

        # 2. idle
        sampler.mark("idle")
        say(f"idle for {args.idle:.0f} s")
        time.sleep(args.idle)

        # 3. one spec change at a time
        sampler.mark("changes")
        say(f"{args.changes} spec changes, one at a time")
        latencies = []
        for i in range(args.changes):
            name = names[(i * 37) % len(names)]
            level = LEVELS[i % len(LEVELS)]
            started = time.monotonic()
            gen = patch_level(cluster, name, level)
            if not statuses.wait(
                lambda name=name, gen=gen, level=level: (name, gen, level) in statuses.caught_up, 60
            ):
                raise RuntimeError(f"{name} generation {gen} never reflected in status")
            latencies.append(statuses.caught_up[(name, gen, level)] - started)
            time.sleep(0.1)
        results["change_s"] = latencies
        say(f"status p50 {percentile(latencies, 50):.3f} s, p99 {percentile(latencies, 99):.3f} s")

        # 4. restart: every model changed while no operator runs
        sampler.mark("stopping")
        results["rss_before_restart"] = sampler.rss_bytes()
        operator.stop()
        sampler.stop()
        say("operator stopped; changing every model's level")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: patch_level(cluster, n, "L2"), names))
        started = time.monotonic()
        operator = hibernate_process(cluster, work / "operator-2.log", "operator").start()
        assert operator.popen is not None
        sampler2 = Sampler(operator.popen.pid).start()
        sampler2.mark("restart")
        ok = statuses.wait(lambda: statuses.all_current(names, "L2"), timeout=600)
        results["restart_status_s"] = time.monotonic() - started if ok else float("nan")
        say(f"every status current {results['restart_status_s']:.1f} s after the restart")
        eventually(lambda: pods_annotated(cluster, expected_pods, "L2"), timeout=600, interval=2)
        results["restart_pods_s"] = time.monotonic() - started
        say(f"every pod at L2 {results['restart_pods_s']:.1f} s after the restart")
        sampler2.mark("after-restart")

        # 5. the agent
        say(f"agent reaction over {args.flips} annotation changes")
        results["agent"] = agent_reaction(
            cluster, work, args.flips, [*control_plane_pids(cluster), operator.popen.pid]
        )
        sampler2.stop()
        results["sampler"] = sampler
        results["sampler2"] = sampler2
        results["total_s"] = time.monotonic() - t_all
    finally:
        if operator is not None:
            operator.stop()
        if not args.keep:
            stop_cluster(cluster)
        else:
            say(f"control plane kept: KUBECONFIG={cluster.kubeconfig}")

    text = report(args, results)
    print(text)
    if not args.no_write:
        write_section(RESULTS, "bench:scale", text)
        say(f"wrote its section of {RESULTS}")
    return 0


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    m = machine()
    first: Sampler = r["sampler"]
    second: Sampler = r["sampler2"]
    mib = 2**20

    def rss(s: Sampler, phase: str) -> str:
        values = s.rss.get(phase) or [0]
        return f"{max(values) / mib:.0f}"

    def cpu(s: Sampler, phase: str) -> str:
        spent, wall = s.cpu.get(phase, (0.0, 0.0))
        return f"{spent:.1f} s in {wall:.0f} s ({spent / wall * 100 if wall else 0:.0f}% of a core)"

    change = r["change_s"]
    agent = r["agent"]
    seen, e2e = agent["delivered"], agent["reported"]
    reaction = percentile(seen, 50) + agent["hist_mean"]
    peak = max(max(v) for s in (first, second) for v in s.rss.values() if v) / mib
    lines = [
        f"## Scale — {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC",
        "",
        f"Machine: `{m['uname']}`; CPU {m['cpu']}, {m['cores']} cores, {m['memory']} RAM; Python {m['python']}. "
        "Control plane (etcd, kube-apiserver, controller-manager, scheduler), operator, agent and this "
        "benchmark all share those cores.",
        f"Command: `.venv/bin/python bench/scale.py --models {args.models} --replicas {args.replicas} "
        f"--changes {args.changes} --flips {args.flips}` ({r['total_s'] / 60:.1f} min in all).",
        "",
        f"{args.models} ModelDeployments x {args.replicas} replicas = {args.models * args.replicas} pods "
        "(unscheduled: no node takes them).",
        "",
        "| measure | result | goal |",
        "|---|---:|---|",
        f"| create {args.models} (8 clients) | {r['create_s']:.1f} s | |",
        f"| … until every status is current | {r['all_status_s']:.1f} s | |",
        f"| … until every pod carries its level | {r['all_pods_s']:.1f} s | |",
        f"| one spec change → status, p50 ({len(change)} changes) | {percentile(change, 50) * 1000:.0f} ms | |",
        f"| one spec change → status, p99 | {percentile(change, 99) * 1000:.0f} ms "
        f"| < 2 s: {'met' if percentile(change, 99) < 2 else 'MISSED'} |",
        f"| full reconcile after a restart (every level changed while down) → every status current "
        f"| {r['restart_status_s']:.1f} s | |",
        f"| … → every pod carries the new level | {r['restart_pods_s']:.1f} s | |",
        f"| operator RSS, peak | {peak:.0f} MiB | < 300 MB: {'met' if peak * mib < 300e6 else 'MISSED'} |",
        f"| operator RSS after the changes / after the restart's reconcile | {r['rss_before_restart'] / mib:.0f} / "
        f"{rss(second, 'after-restart')} MiB | |",
        f"| operator CPU while creating | {cpu(first, 'create')} | |",
        f"| operator CPU idle (resync timers only) | {cpu(first, 'idle')} | |",
        f"| operator CPU during the changes | {cpu(first, 'changes')} | |",
        f"| operator CPU, restart's full reconcile | {cpu(second, 'restart')} | |",
        f"| agent reaction, the control plane's share: annotation patch → delivered to a watch like the "
        f"agent's, p50 / p99 | {percentile(seen, 50) * 1000:.0f} / {percentile(seen, 99) * 1000:.0f} ms | |",
        f"| agent reaction, its own share (its histogram: change seen → work started), p50 / p99 "
        f"| {_bucket(agent['hist_p50'])} / {_bucket(agent['hist_p99'])} (mean {agent['hist_mean'] * 1000:.1f} ms) | |",
        f"| agent reaction: patch → work started (delivery p50 + the agent's mean) | {reaction * 1000:.0f} ms "
        f"| p50 < 50 ms: {'met' if reaction < 0.05 else 'MISSED'} |",
        f"| patch → the agent's Sleeping/Waking report seen (+ its write and a second delivery), p50 / p99 "
        f"| {percentile(e2e, 50) * 1000:.0f} / {percentile(e2e, 99) * 1000:.0f} ms | |",
        f"| before the agent was timed: time for the machine to fall quiet after the restart's reconcile "
        f"| {agent['settled_s']:.0f} s: {_shares(agent['busiest_settling'])} | |",
        f"| machine CPU busy while the agent was timed ({len(e2e)} changes) "
        f"| {agent['machine_busy'] * 100:.0f}%: {_shares(agent['busiest'])} | |",
    ]
    return "\n".join(lines) + "\n"


def _shares(busiest: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {share * 100:.0f}%" for name, share in busiest) + " of a core"


def _bucket(bounds: tuple[float, float]) -> str:
    lower, upper = bounds
    return f"{lower * 1000:g}-{upper * 1000:g} ms"


if __name__ == "__main__":
    sys.exit(main())
