"""A real Prometheus beside the end-to-end walk of hack/e2e-real-node.sh, and what it must have seen.

    prometheus_check.py start --dir DIR --kubectl "KUBECTL --kubeconfig KC" --namespace NS --release R [--helm HELM]
    prometheus_check.py check --dir DIR --walk-summary WALK.json
    prometheus_check.py stop --dir DIR

`start` runs Debian's `prometheus` (installed with apt-get when missing) on a free loopback port,
with a generated config that scrapes the ready endpoints of the chart's Services the way the chart's
ServiceMonitors do: the operator's and the agent's `metrics` port, the gateway's `http` port, job =
the Service's name, `node` on the agent's series. Debian builds Prometheus without
kubernetes_sd_configs, so the endpoints are read with kubectl into a file_sd file. With --helm it
loads the chart's PrometheusRule too. It waits until the three components' targets are up.

`check`, after the walk: for every level the walk woke from, a query of the agent's wake seconds
(`hibernate_agent_operation_seconds{action="wake", level=...}`) must return the one wake the walk
made, taking no longer than the walk saw; the operator's transitions to Awake (every wake, Stop's
cold start included, and the first start) must number and last as the walk's. The chart's rules must
evaluate without error, none firing. Then it stops Prometheus.

Where Prometheus cannot be installed, `start` and `check` print `SKIP prometheus: <why>` and succeed,
unless CI=true. Runs with the project's venv python (PyYAML for the chart's rules).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

COMPONENTS = ("operator-metrics", "agent-metrics", "gateway")  # the chart's Services, by suffix
SCRAPE = "2s"


class CheckError(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def skip_or_fail(workdir: Path, why: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "skipped").write_text(why + "\n")
    say(f"SKIP prometheus: {why}")
    if os.environ.get("CI") == "true":
        say("prometheus: CI=true, so a missing Prometheus fails the run (hack/setup.sh installs it)")
        return 1
    return 0


# ---- the binary ----------------------------------------------------------------------------------


def find_or_install() -> tuple[str | None, str]:
    """The prometheus binary, installed from Debian's package when missing; else (None, why)."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, "no prometheus binary and no apt-get to install Debian's prometheus package"
    if os.geteuid() != 0:
        return None, "no prometheus binary, and installing Debian's prometheus package needs root"
    say("prometheus: apt-get install prometheus")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    found = shutil.which("prometheus")
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"apt-get install prometheus failed: {tail[0]}"
    return found, ""


# ---- the config ----------------------------------------------------------------------------------


def endpoint_targets(kubectl: list[str], namespace: str, release: str) -> list[dict[str, Any]]:
    """file_sd target groups: the ready endpoints of the chart's metrics Services, labelled as the
    chart's ServiceMonitors label them (job = the Service's name, namespace, pod, and node on the agent's)."""
    selector = f"app.kubernetes.io/part-of=hibernate,app.kubernetes.io/instance={release}"
    services = json.loads(
        subprocess.run(
            [*kubectl, "get", "services", "-n", namespace, "-l", selector, "-o", "json"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )["items"]  # fmt: skip
    groups = []
    for svc in services:
        name = svc["metadata"]["name"]
        port = next((c for c in COMPONENTS if name.endswith(f"-{c}")), None)
        if port is None:
            continue
        port_name = "http" if port == "gateway" else "metrics"
        result = subprocess.run(
            [*kubectl, "get", "endpoints", name, "-n", namespace, "-o", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            continue
        for subset in json.loads(result.stdout).get("subsets") or []:
            ports = [p["port"] for p in subset.get("ports") or [] if p.get("name") == port_name]
            for address in subset.get("addresses") or []:
                for number in ports:
                    labels = {"job": name, "service": name, "namespace": namespace}
                    if (address.get("targetRef") or {}).get("kind") == "Pod":
                        labels["pod"] = address["targetRef"]["name"]
                    if port == "agent-metrics" and address.get("nodeName"):
                        labels["node"] = address["nodeName"]
                    groups.append({"targets": [f"{address['ip']}:{number}"], "labels": labels})
    return groups


def scrape_config(targets_file: Path) -> dict[str, Any]:
    """The chart's three ServiceMonitors as one scrape job over the Services' endpoints.

    Debian's prometheus is built without kubernetes_sd_configs, so the endpoints are read here
    (kubectl get endpoints) into a file_sd file, which Prometheus watches.
    """
    return {"job_name": "hibernate", "file_sd_configs": [{"files": [str(targets_file)]}]}


def write_targets(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    groups = endpoint_targets(shlex.split(args.kubectl), args.namespace, args.release)
    tmp = workdir / "targets.json.tmp"
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(workdir / "targets.json")  # file_sd reads whole files only
    return groups


def chart_rules(helm: str, chart: str, release: str, namespace: str, out: Path) -> int:
    """The chart's PrometheusRule groups, as a rule file; the number of alerts in it."""
    import yaml  # the venv's PyYAML

    text = subprocess.run(
        [helm, "template", release, chart, "-n", namespace, "--set", "monitoring.prometheusRule.enabled=true",
         "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    groups = yaml.safe_load(text)["spec"]["groups"]
    out.write_text(json.dumps({"groups": groups}, indent=1))
    return sum(1 for g in groups for r in g["rules"] if "alert" in r)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- talking to it -------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{(workdir / 'port').read_text().strip()}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read().decode())
        if body.get("status") != "success":
            raise CheckError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=promql)["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.get("/api/v1/targets", state="active")["activeTargets"]
        return active


def wait_until(what: str, test: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = test()
            if result:
                return result
        except (OSError, CheckError, ValueError, KeyError) as e:
            last = e
        time.sleep(1)
    raise CheckError(f"{what}: not after {timeout:.0f} s" + (f" ({last})" if last else ""))


def show_targets(prom: Prometheus) -> None:
    say(f"{'job':<28} {'instance':<22} {'node':<14} health  last error")
    for t in sorted(prom.targets(), key=lambda t: t["labels"].get("job", "")):
        labels = t["labels"]
        say(
            f"{labels.get('job', ''):<28} {labels.get('instance', ''):<22} {labels.get('node', '-'):<14} "
            f"{t['health']:<7} {t.get('lastError') or ''}"
        )


# ---- start, check, stop --------------------------------------------------------------------------


def start(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    binary, why = find_or_install()
    if binary is None:
        return skip_or_fail(workdir, why)
    workdir.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()
    config: dict[str, Any] = {
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE, "evaluation_interval": SCRAPE},
        "scrape_configs": [scrape_config(workdir / "targets.json")],
    }
    groups = write_targets(args, workdir)
    say(f"prometheus: {len(groups)} endpoint(s) of the chart's Services: {[g['targets'][0] for g in groups]}")
    if args.helm:
        alerts = chart_rules(args.helm, args.chart, args.release, args.namespace, workdir / "rules.json")
        config["rule_files"] = [str(workdir / "rules.json")]
        say(f"prometheus: the chart's PrometheusRule loaded as rules ({alerts} alerts)")
    (workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    port = free_port()
    (workdir / "port").write_text(f"{port}\n")
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    (workdir / "pid").write_text(f"{proc.pid}\n")
    say(f"prometheus: {version[0] if version else binary} on 127.0.0.1:{port}, pid {proc.pid}, in {workdir}")
    prom = Prometheus(workdir)
    try:
        wait_until("Prometheus ready", lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5), 60)

        def all_up() -> bool:
            up = {r["metric"].get("job", ""): r["value"][1] for r in prom.query("up")}
            return all(any(j.endswith(f"-{c}") and v == "1" for j, v in up.items()) for c in COMPONENTS)

        wait_until("the operator's, the agent's and the gateway's targets up", all_up, 90)
    except CheckError as e:
        if proc.poll() is None:
            show_targets(prom)
        say(f"FAILED prometheus: {e}; its log: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        stop_process(workdir)
        return 1
    show_targets(prom)
    return 0


def expectations(summary: dict[str, Any]) -> list[tuple[str, str, int, float, str]]:
    """(label, the query's selector, wakes expected, seconds at most, note) for each level walked."""
    rows = summary["rows"]
    out = []
    slack = 0.2
    for row in rows:
        if row["level"] != "Stop":
            selector = f'hibernate_agent_operation_seconds{{action="wake", level="{row["level"]}"}}'
            out.append((row["level"], selector, 1, row["wake"] + slack, "the agent's wake"))
    # The operator sees every transition to Awake: the first start, then one wake per level walked;
    # Stop's wake (a cold start) is only there, the agent has no part in it.
    total = summary["apply_seconds"] + sum(r["wake"] for r in rows)
    out.append(
        ("Awake (operator)", 'hibernate_operator_transition_seconds{level="Awake"}', 1 + len(rows),
         total + slack * (1 + len(rows)), "first start + every wake, Stop's cold start included"),
    )  # fmt: skip
    return out


def measured(prom: Prometheus, selector: str) -> tuple[int, float]:
    name, _, matchers = selector.partition("{")
    count = prom.value(f"sum({name}_count{{{matchers})")
    seconds = prom.value(f"sum({name}_sum{{{matchers})")
    return int(count or 0), float(seconds or 0.0)


def check(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if (workdir / "skipped").exists():
        return skip_or_fail(workdir, (workdir / "skipped").read_text().strip())
    try:
        return _check(workdir, Path(args.walk_summary))
    finally:
        stop_process(workdir)


def _check(workdir: Path, summary_file: Path) -> int:
    if not (workdir / "port").exists():
        say("FAILED prometheus: it was not started (see its start step above)")
        return 1
    if not summary_file.exists():
        say(f"FAILED prometheus: no walk summary at {summary_file}: the walk did not finish")
        return 1
    summary = json.loads(summary_file.read_text())
    prom = Prometheus(workdir)
    wanted = expectations(summary)
    walk_wake = {r["level"]: r["wake"] for r in summary["rows"]}

    def matches() -> bool:
        return all(measured(prom, sel)[0] == n for _, sel, n, _, _ in wanted)

    try:
        wait_until("every wake of the walk in Prometheus", matches, 30)
    except CheckError as e:
        say(f"   ({e})")
    say(f"{'level':<18} {'walk wake s':>11} {'wakes':>6} {'Prom. wake s':>12}  query")
    failures = []
    for label, selector, n, at_most, note in wanted:
        count, seconds = measured(prom, selector)
        walk = walk_wake.get(label)
        walk_text = f"{walk:.2f}" if walk is not None else f"{at_most:.2f} (all)"
        name, _, matchers = selector.partition("{")
        say(
            f"{label:<18} {walk_text:>11} {count:>6} {seconds:>12.2f}  {name}_{{count,sum}}{{{matchers}: {note}"
        )
        if count != n:
            failures.append(f"{label}: {count} wake(s) in Prometheus, the walk made {n}")
        elif not 0 < seconds <= at_most:
            failures.append(f"{label}: {seconds:.2f} s in Prometheus, the walk saw at most {at_most:.2f} s")
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r.get("health") not in ("ok", "unknown")]
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    if rules:
        say(f"the chart's rules: {len(rules)} evaluated, {len(bad)} with errors, firing: {firing or 'none'}")
    failures += [f"rule {b}" for b in bad] + [f"alert {f} fires after a clean walk" for f in firing]
    if failures:
        say("FAILED prometheus checks:\n" + "\n".join(f"  - {f}" for f in failures))
        show_targets(prom)
        return 1
    say("prometheus: every wake the walk made is in Prometheus, as long as the walk saw it or shorter")
    return 0


def stop_process(workdir: Path) -> None:
    pid_file = workdir / "pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child (started by `start`): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def stop(args: argparse.Namespace) -> int:
    stop_process(Path(args.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start Prometheus and wait for the three components' targets")
    p.add_argument("--dir", required=True, help="its config, data, log and pid")
    p.add_argument(
        "--kubectl", required=True, help="kubectl command line (with --kubeconfig), for the endpoints"
    )
    p.add_argument("--namespace", default="hibernate-system", help="the chart's namespace")
    p.add_argument("--release", default="hibernate", help="the chart's release")
    p.add_argument("--helm", default="", help="helm, to load the chart's PrometheusRule as rules")
    p.add_argument("--chart", default=str(Path(__file__).resolve().parents[2] / "helm" / "hibernate"))
    p.set_defaults(func=start)
    p = sub.add_parser("check", help="compare the walk's wakes with Prometheus, then stop it")
    p.add_argument("--dir", required=True)
    p.add_argument("--walk-summary", required=True, help="walk.py --summary-json")
    p.set_defaults(func=check)
    p = sub.add_parser("stop", help="stop Prometheus (idempotent)")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=stop)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except (CheckError, OSError, subprocess.CalledProcessError) as e:
        say(f"FAILED prometheus: {e}")
        if args.command != "stop":
            stop_process(Path(args.dir))
        return 1


if __name__ == "__main__":
    sys.exit(main())
