"""The end-to-end walk of hack/e2e-real-node.sh and hack/e2e-kind.sh, through kubectl only.

Applies a ModelDeployment served by the fake engine, then for each level: `kubectl patch` the
level, wait until `kubectl get md` shows it reached (Asleep, or Stopped for Stop), patch back to
Awake, wait for Awake, and send the same completion to the engine as before. Checks, and exits
non-zero when one fails:

- the answer after every wake is the one the engine gave before any sleep;
- for levels 1-4 the pod is the same pod afterwards (same UID, same IP) and the Service's
  Endpoints list that pod IP as ready; for Checkpoint, the engine answers nothing while asleep
  (its processes are gone) and comes back in place;
- the transitions were made by the agent (its `hibernate.dev/last-operation` annotation);
- with `--runtime docker|containerd`: the node runs that runtime, the engine's container is one of
  its containers (`containerID: <runtime>://...`), and the agent's Checkpoint dump and restore name
  the cgroup layout they found with that runtime (`cgroup` in last-operation);
- Stop takes a snapshot (docs/snapshots.md) and the wake's pod is a new pod (new UID and IP) that
  the agent restored from it, serving the same answers; with `--expect-restore` a cold start instead
  fails the walk (with the agent's reason), without it the reason is printed. A second Stop without a
  snapshot (`spec.stop.snapshot: false`) then wakes the same engine cold, and both wake times are
  printed side by side.

Prints `kubectl get md`, `kubectl get pods -o wide` and `kubectl get endpoints` at every step, so
the output can be pasted as it is. Standard library only: it runs with any python3 >= 3.11.

    python3 tests/e2e/walk.py --kubectl kubectl --engine-image local/hibernate:dev [--http-via CMD]

`--http-via` runs the HTTP calls to the pod IP through a command (`docker exec kind-control-plane`)
where the pod network is not reachable from here; the command must have curl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

NAME = "fake"
MODEL = "facebook/opt-125m"
PROMPT = "The capital of France is"
LEVELS = ("L1", "L2", "Checkpoint", "Stop")


class WalkError(Exception):
    pass


def post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, str]:
    """POST JSON from here (the gateway's pod IP is reachable on the real node): (status, text), an
    HTTP error status included."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Walk:
    def __init__(self, args: argparse.Namespace) -> None:
        self.kubectl_cmd = shlex.split(args.kubectl)
        self.ns = args.namespace
        self.release_ns = args.release_namespace
        self.image = args.engine_image
        self.pull_policy = args.pull_policy
        self.http_via = shlex.split(args.http_via) if args.http_via else []
        self.timeout = args.timeout
        self.failures: list[str] = []
        self.t0 = time.monotonic()
        self.summary_json = args.summary_json
        self.apply_seconds = 0.0
        self.runtime = args.runtime
        self.expect_restore = args.expect_restore

    # -- helpers -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [*self.kubectl_cmd, *args], input=stdin, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise WalkError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def show(self, *args: str) -> None:
        self.say(f"$ kubectl {' '.join(args)}")
        self.say(self.kubectl(*args, check=False).rstrip())

    def show_state(self, title: str) -> None:
        self.say(f"--- {title} (t={time.monotonic() - self.t0:.1f}s)")
        self.show("get", "md", "-n", self.ns)
        self.show("get", "pods", "-n", self.ns, "-o", "wide")
        self.show("get", "endpoints", NAME, "-n", self.ns)

    def check(self, ok: bool, what: str) -> None:
        self.say(f"   [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)

    def md(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.kubectl("get", "md", NAME, "-n", self.ns, "-o", "json"))
        return obj

    def pods(self) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-n", self.ns, "-l", f"hibernate.dev/model={NAME}", "-o", "json")
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def pod(self) -> dict[str, Any]:
        pods = self.pods()
        if len(pods) != 1:
            raise WalkError(f"expected one pod of {NAME}, found {[p['metadata']['name'] for p in pods]}")
        return pods[0]

    def ready_endpoints(self) -> list[str]:
        out = self.kubectl("get", "endpoints", NAME, "-n", self.ns, "-o", "json", check=False)
        if not out:
            return []
        subsets = json.loads(out).get("subsets") or []
        return [a["ip"] for s in subsets for a in s.get("addresses") or []]

    def gateway(self) -> str:
        """The URL of a ready pod of the chart's gateway (readiness.py, gpu_group.py)."""
        out = self.kubectl(
            "get", "pods", "-n", self.release_ns, "-l", "app.kubernetes.io/component=gateway", "-o", "json"
        )
        pods = [
            p
            for p in json.loads(out)["items"]
            if any(
                x["type"] == "Ready" and x["status"] == "True"
                for x in (p.get("status") or {}).get("conditions", [])
            )
        ]
        if not pods:
            raise WalkError("no ready gateway pod")
        port = next(
            p["containerPort"] for p in pods[0]["spec"]["containers"][0]["ports"] if p.get("name") == "http"
        )
        return f"http://{pods[0]['status']['podIP']}:{port}"

    def wait_for(self, what: str, test: Callable[[], bool], timeout: float | None = None) -> float:
        started = time.monotonic()
        limit = timeout or self.timeout
        while time.monotonic() - started < limit:
            try:
                if test():
                    return time.monotonic() - started
            except (WalkError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
                pass  # the API server or the engine may be briefly away; keep polling
            time.sleep(0.2)
        self.show_state(f"timeout waiting for {what}")
        raise WalkError(f"{what} not reached after {limit:.0f} s")

    def reached(self, phase: str, level: str) -> Callable[[], bool]:
        def test() -> bool:
            status = self.md().get("status") or {}
            if status.get("phase") == "Failed":
                raise SystemExit(self.fail_now(status))
            return bool(status.get("phase") == phase and status.get("sleepLevel") == level)

        return test

    def fail_now(self, status: dict[str, Any]) -> str:
        self.show_state("the ModelDeployment failed")
        for pod in self.pods():
            op = pod["metadata"].get("annotations", {}).get("hibernate.dev/last-operation", "")
            self.say(f"   last-operation of {pod['metadata']['name']}: {op}")
        return f"FAILED: phase Failed: {json.dumps(status.get('conditions'), indent=1)}"

    def http(self, ip: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> str:
        url = f"http://{ip}:8000{path}"
        data = json.dumps(body) if body is not None else None
        if self.http_via:
            cmd = [*self.http_via, "curl", "-sS", "--fail", "-m", str(int(timeout)), url]
            if data is not None:
                cmd += ["-H", "content-type: application/json", "-d", data]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
            if result.returncode != 0:
                raise ConnectionError(result.stderr.strip() or f"curl rc {result.returncode}")
            return result.stdout
        request = urllib.request.Request(
            url, data=data.encode() if data else None, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def complete(self, ip: str) -> str:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        text: str = json.loads(self.http(ip, "/v1/completions", body))["choices"][0]["text"]
        return text

    def answers(self, ip: str) -> bool:
        try:
            self.http(ip, "/health", timeout=3)
            return True
        except (OSError, ConnectionError, subprocess.TimeoutExpired):
            return False

    def patch(self, level: str, **spec: Any) -> None:
        body = json.dumps({"spec": {"sleepLevel": level, **spec}})
        self.say(f"$ kubectl patch md {NAME} --type merge -p '{body}'")
        self.say(self.kubectl("patch", "md", NAME, "-n", self.ns, "--type", "merge", "-p", body).rstrip())

    def manifest(
        self,
        *,
        replicas: int = 1,
        command: list[str] | None = None,
        args: list[str] | None = None,
        env: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """A ModelDeployment `NAME` served by the fake engine (or `command`) from the engine image."""
        engine: dict[str, Any] = {
            "image": self.image,
            "imagePullPolicy": self.pull_policy,
            "command": command or ["python3", "-m", "hibernate.engine.fake"],
            "args": args or ["--weights-mib", "64", "--kv-mib", "16"],
            "port": 8000,
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "startupSeconds": 120,
        }
        if env:
            engine["env"] = env
        return {
            "apiVersion": "hibernate.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME, "namespace": self.ns},
            "spec": {"model": MODEL, "replicas": replicas, "sleepLevel": "Awake", "engine": engine},
        }

    def verdict(self, what: str) -> int:
        """Prints the failed checks, or that all of `what` passed; the exit status."""
        if self.failures:
            self.say(f"\nFAILED checks ({len(self.failures)}):")
            for f in self.failures:
                self.say(f"  - {f}")
            return 1
        self.say(f"\nall {what} passed in {time.monotonic() - self.t0:.1f} s")
        return 0

    # -- the walk ------------------------------------------------------------------------------

    def agents(self) -> None:
        self.say("== the cluster: a real node, the chart's agent DaemonSet (hostPID, privileged) ==")
        self.show("get", "nodes", "-o", "wide")
        self.show("get", "pods", "-n", self.release_ns, "-o", "wide")
        ds = json.loads(
            self.kubectl("get", "daemonsets", "-n", self.release_ns, "-l",
                         "app.kubernetes.io/component=agent", "-o", "json")
        )["items"]  # fmt: skip
        self.check(len(ds) == 1, "the chart installed one agent DaemonSet")
        if ds:
            spec = ds[0]["spec"]["template"]["spec"]
            ctr = spec["containers"][0]
            self.check(
                spec.get("hostPID") is True and (ctr.get("securityContext") or {}).get("privileged") is True,
                f"DaemonSet {ds[0]['metadata']['name']}: hostPID {spec.get('hostPID')}, "
                f"privileged {(ctr.get('securityContext') or {}).get('privileged')}, image {ctr['image']}",
            )
            status = ds[0]["status"]
            self.check(
                status.get("numberReady", 0) >= 1,
                f"agent pods ready: {status.get('numberReady', 0)}/{status.get('desiredNumberScheduled')}",
            )
        if self.runtime:
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
            versions = [n["status"]["nodeInfo"]["containerRuntimeVersion"] for n in nodes]
            self.check(
                bool(versions) and all(v.startswith(f"{self.runtime}://") for v in versions),
                f"the node runs {self.runtime}: {', '.join(versions)}",
            )

    def apply(self) -> None:
        self.say(f"== kubectl apply: ModelDeployment {NAME}, the fake engine from {self.image} ==")
        manifest = self.manifest(args=["--weights-mib", "128", "--kv-mib", "32"])
        self.say(self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest)).rstrip())
        seconds = self.wait_for("Awake", self.reached("Awake", "Awake"))
        self.apply_seconds = seconds
        pod = self.pod()
        ip = pod["status"]["podIP"]
        self.wait_for("the pod IP in the Service's ready endpoints", lambda: ip in self.ready_endpoints())
        self.say(f"   Awake after {seconds:.1f} s (a cold start)")
        if self.runtime:
            ids = [s.get("containerID", "") for s in pod["status"].get("containerStatuses") or []]
            self.check(
                bool(ids) and all(i.startswith(f"{self.runtime}://") for i in ids),
                f"the engine runs in {self.runtime}: {', '.join(i[:26] + '…' for i in ids)}",
            )
        self.show_state("Awake")

    def cycle(self, level: str, baseline: str, **spec: Any) -> dict[str, Any]:
        self.say(f"\n== {level}{' ' + json.dumps(spec) if spec else ''} ==")
        before = self.pod()
        uid, ip, name = before["metadata"]["uid"], before["status"]["podIP"], before["metadata"]["name"]
        self.patch(level, **spec)
        target = "Stopped" if level == "Stop" else "Asleep"
        slept = self.wait_for(f"{target} at {level}", self.reached(target, level))
        self.say(f"   {target} at {level} after {slept:.2f} s")
        self.show_state(f"{target} ({level})")
        holder = ""
        if level == "Stop":
            self.wait_for("no engine pod", lambda: not self.pods())
            self.check(not self.pods(), "Stop: the Deployment is scaled to zero, no engine pod")
            if not spec:
                holder = self.hold_address(ip)
        op: dict[str, Any] = {}
        if level != "Stop":
            asleep = self.pod()
            ann = asleep["metadata"].get("annotations", {})
            op = json.loads(ann.get("hibernate.dev/last-operation") or "{}")
            self.say(f"   agent's last-operation: {json.dumps(op)}")
            self.check(
                ann.get("hibernate.dev/state") == "Asleep"
                and op.get("action") == "sleep"
                and not op.get("error"),
                f"the agent reports state {ann.get('hibernate.dev/state')}, "
                f"observed level {ann.get('hibernate.dev/observed-sleep-level')}",
            )
            if level == "Checkpoint":
                self.check(
                    not self.answers(ip),
                    f"Checkpoint: nothing answers at {ip}:8000 (the engine's processes are dumped)",
                )
        self.patch("Awake")
        woke = self.wait_for("Awake", self.reached("Awake", "Awake"))
        if holder:
            self.kubectl("delete", "pod", holder, "-n", self.ns, "--wait=false")
        after = self.pod()
        new_ip = after["status"]["podIP"]
        self.wait_for("the pod IP in the Service's ready endpoints", lambda: new_ip in self.ready_endpoints())
        answer = self.complete(new_ip)
        self.say(f"   Awake after {woke:.2f} s")
        if level == "Checkpoint":
            self.restored_layout(after, op)
        self.show_state(f"Awake again after {level}")
        same_answer = answer == baseline
        self.check(same_answer, f"answer after waking {answer!r} == before {baseline!r}")
        same_pod = after["metadata"]["uid"] == uid and new_ip == ip
        endpoints = self.ready_endpoints()
        row: dict[str, Any] = {
            "level": level,
            "sleep": slept,
            "wake": woke,
            "same": same_answer,
            "pod": same_pod,
        }
        row["label"] = f"{level} cold" if spec else level
        if level == "Stop":
            new_address = new_ip != ip or bool(spec)  # the cold start's address is not the point
            self.check(
                after["metadata"]["uid"] != uid and new_address,
                f"Stop: a new pod {after['metadata']['name']} (uid {after['metadata']['uid'][:8]}, {new_ip}; "
                f"before: {name}, uid {uid[:8]}, {ip}): new UID" + ("" if spec else " and IP"),
            )
            row["restored"] = self.snapshot_restore(after, woke) if not spec else self.cold_wake(after)
        else:
            self.check(
                same_pod,
                f"same pod {name} uid {uid[:8]} ip {ip} -> {after['metadata']['name']} "
                f"uid {after['metadata']['uid'][:8]} ip {new_ip}",
            )
            restarts = sum(s.get("restartCount", 0) for s in after["status"].get("containerStatuses") or [])
            self.check(restarts == 0, f"no container restarts (restartCount {restarts})")
        self.check(endpoints == [new_ip], f"Service endpoints {endpoints} == [{new_ip}]")
        return row

    def hold_address(self, ip: str) -> str:
        """While the model is stopped: a pod that takes the lowest free pod address, so that the wake's
        pod gets another one than the stopped pod had, as on a busy node (docker's IPAM hands out the
        lowest free address, which would be the stopped pod's again). Returns the pod's name."""
        name = f"{NAME}-address-holder"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "hold",
                        "image": self.image,
                        "imagePullPolicy": self.pull_policy,
                        "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                    }
                ],
            },
        }
        self.kubectl("apply", "-f", "-", stdin=json.dumps(pod))

        def address() -> str:
            got = json.loads(self.kubectl("get", "pod", name, "-n", self.ns, "-o", "json"))
            return str((got.get("status") or {}).get("podIP") or "")

        self.wait_for("the address holder's IP", lambda: bool(address()))
        self.say(f"   pod {name} holds {address()} meanwhile (the stopped pod had {ip})")
        return name

    def snapshot_restore(self, pod: dict[str, Any], woke: float) -> bool:
        """Stop took a snapshot of the engine (docs/snapshots.md, on by default with the chart), and the
        agent decided the new pod's wake: restored, or a cold start with the reason (a wake never fails
        because of its snapshot). With --expect-restore a cold start fails the walk, with the agent's
        reason; without, the reason is printed. Returns whether it was restored."""
        snap = (self.md().get("status") or {}).get("snapshot") or {}
        self.check(
            bool(snap.get("node")),
            f"Stop took a snapshot first: {snap.get('bytes', 0) / 2**20:.1f} MiB on node {snap.get('node')} "
            f"in {snap.get('seconds')} s",
        )
        ann = pod["metadata"].get("annotations", {})
        restore = json.loads(ann.get("hibernate.dev/restore") or "{}")
        how = "restored" if restore.get("restored") else f"a cold start ({restore.get('reason')})"
        self.say(
            f"   wake from Stop: {how}, decided by the agent in {restore.get('seconds')} s; the new pod Awake "
            f"after {woke:.2f} s; the first cold start took {self.apply_seconds:.2f} s"
        )
        restored = restore.get("restored") is True
        if self.expect_restore:
            self.check(
                restored,
                f"the agent restored the snapshot into the new pod, not a cold start (hibernate.dev/restore: "
                f"{json.dumps(restore)})",
            )
        else:
            self.check(
                restored or bool(restore.get("reason")),
                f"the agent restored the new pod, or said why not (hibernate.dev/restore: {json.dumps(restore)})",
            )
        return restored

    def cold_wake(self, pod: dict[str, Any]) -> bool:
        """The Stop without a snapshot: the new pod was not marked for a restore; its engine started cold."""
        ann = pod["metadata"].get("annotations", {})
        self.check(
            "hibernate.dev/restore-from" not in ann and "hibernate.dev/restore" not in ann,
            "spec.stop.snapshot: false: the new pod is not marked for a restore (a cold start)",
        )
        return False

    def restored_layout(self, pod: dict[str, Any], slept: dict[str, Any]) -> None:
        """The agent's restore said which cgroup layout it put the engine back into, the dump's."""
        ann = pod["metadata"].get("annotations", {})
        op = json.loads(ann.get("hibernate.dev/last-operation") or "{}")
        self.say(f"   agent's last-operation (the restore): {json.dumps(op)}")
        layout = op.get("cgroup") or {}
        self.check(
            op.get("action") == "wake" and bool(layout) and "cgroup_warning" not in op,
            f"the restore names the cgroup layout: {layout or op.get('cgroup_warning')}",
        )
        self.check(layout == slept.get("cgroup"), "the restore's cgroup layout is the dump's")
        if self.runtime:
            self.check(layout.get("runtime") == self.runtime, f"layout runtime {layout.get('runtime')}")

    def delete(self) -> None:
        self.say("\n== kubectl delete md: the owned Deployment, Service and pods go ==")
        self.say(self.kubectl("delete", "md", NAME, "-n", self.ns, "--wait=true", "--timeout=120s").rstrip())
        self.wait_for("no engine pod", lambda: not self.pods())
        self.show("get", "md,deploy,svc,pods", "-n", self.ns)

    def run(self, levels: list[str]) -> int:
        self.agents()
        self.apply()
        baseline = self.complete(self.pod()["status"]["podIP"])
        self.say(f"   answer before any sleep: {baseline!r}")
        rows = [self.cycle(level, baseline) for level in levels]
        if "Stop" in levels:
            # The same engine's cold start, for the comparison: a Stop without a snapshot, then a wake.
            rows.append(self.cycle("Stop", baseline, stop={"snapshot": False}))
            warm, cold = rows[levels.index("Stop")], rows[-1]
            how = "restored from its snapshot" if warm.get("restored") else "a cold start (no restore)"
            self.say(
                f"\n   wake from Stop: {warm['wake']:.2f} s {how}, vs {cold['wake']:.2f} s cold "
                f"(spec.stop.snapshot: false), the same engine on the same node; first start {self.apply_seconds:.2f} s"
            )
        if self.summary_json:  # what the walk measured, for tests/e2e/prometheus_check.py
            with open(self.summary_json, "w") as f:
                json.dump({"apply_seconds": self.apply_seconds, "rows": rows}, f, indent=1)
        self.delete()
        self.say("\nlevel         sleep s   wake s  same answer  same pod+IP")
        for r in rows:
            label, pod = r.get("label", r["level"]), "yes" if r["pod"] else "NO"
            if r["level"] == "Stop":
                pod = "new pod, " + ("restored" if r.get("restored") else "cold start")
            self.say(
                f"{label:<12} {r['sleep']:>8.2f} {r['wake']:>8.2f}  {'yes' if r['same'] else 'NO':<11}  {pod}"
            )
        return self.verdict("checks")


def common_parser(doc: str | None, engine_image: str) -> argparse.ArgumentParser:
    """The arguments every e2e script takes (walk.py, readiness.py, hostile.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubectl", default="kubectl", help="kubectl command line (with --kubeconfig)")
    parser.add_argument("--namespace", default="default", help="namespace of the ModelDeployment")
    parser.add_argument("--release-namespace", default="hibernate-system", help="namespace of the chart")
    parser.add_argument("--engine-image", default=engine_image)
    parser.add_argument("--pull-policy", default="Never", choices=["Never", "IfNotPresent", "Always"])
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for each state")
    parser.add_argument(
        "--runtime",
        default="",
        choices=["", "docker", "containerd", "cri-o"],
        help="the node's runtime, checked",
    )
    parser.set_defaults(http_via="", summary_json="", expect_restore=False)
    return parser


def gateway_walk_main(
    doc: str | None, run: Callable[[argparse.Namespace], int], argv: list[str] | None
) -> int:
    """main() of a walk through the chart's gateway (readiness.py, gpu_group.py): the common
    arguments and --release (the chart's release name); a WalkError fails it with its reason."""
    parser = common_parser(doc, "local/hibernate:dev")
    parser.add_argument("--release", default="hibernate")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except WalkError as e:
        print(f"FAILED: {e}", flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__, "local/hibernate:dev")
    parser.add_argument("--http-via", default="", help="command prefix for curl to the pod IP")
    parser.add_argument(
        "--levels", default=",".join(LEVELS), help="comma-separated, default L1,L2,Checkpoint,Stop"
    )
    parser.add_argument("--summary-json", default="", help="write the apply and per-level seconds here")
    parser.add_argument(
        "--expect-restore",
        action="store_true",
        help="fail when the wake from Stop is not restored from its snapshot (the real node)",
    )
    args = parser.parse_args(argv)
    walk = Walk(args)
    try:
        return walk.run([lv.strip() for lv in args.levels.split(",") if lv.strip()])
    except WalkError as e:
        print(f"FAILED: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
