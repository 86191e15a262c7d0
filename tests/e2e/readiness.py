"""No request reaches a replica that is asleep, on the real node (hack/e2e-real-node.sh), through kubectl.

A ModelDeployment of two replicas (the fake engine), spec Awake; one pod is put to sleep by a person
(`kubectl annotate pod … hibernate.dev/sleep-level=L1`). Passes only when:

- the sleeping pod's `hibernate.dev/awake` condition and Ready are False, and the Service's Endpoints
  list it under notReadyAddresses only; its engine really sleeps (`/is_sleeping`), so a request sent
  there would hang;
- the status is honest: phase Awake, Ready True, the message names the pod at L1;
- 100 completions sent round robin to the ready addresses of the Service's Endpoints (what kube-proxy
  would do; this node has none) and 100 through the chart's gateway (its pod IP) all answer 200 with
  the awake answer, none hangs (10 s and 30 s client timeouts);
- with both pods asleep, a request to the gateway is held (no ready endpoint: no answer, no error),
  and answered once a person wakes one pod again;
- a pod annotated Stop gets one `StopOnPod` Warning and the model reads Failed (Degraded says why),
  not Progressing; the engine is left serving.

    python3 tests/e2e/readiness.py --kubectl "kubectl --kubeconfig …" --engine-image local/hibernate-engine:dev
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import walk

NAME = "ready2"
AWAKE = "hibernate.dev/awake"
REQUESTS = 100


class Readiness(walk.Walk):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.release = args.release
        self.rows: list[tuple[str, int, int, int, float]] = []  # (path, ok, failed, hung, max s)

    # -- helpers ---------------------------------------------------------------------------------

    def endpoints(self) -> tuple[list[str], list[str]]:
        """(ready, not ready) addresses of the model's Service, as the endpoints controller lists them."""
        obj = json.loads(self.kubectl("get", "endpoints", NAME, "-n", self.ns, "-o", "json"))
        subsets = obj.get("subsets") or []
        ready = [a["ip"] for s in subsets for a in s.get("addresses") or []]
        not_ready = [a["ip"] for s in subsets for a in s.get("notReadyAddresses") or []]
        return sorted(ready), sorted(not_ready)

    def named(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.kubectl("get", "pod", name, "-n", self.ns, "-o", "json"))
        return obj

    @staticmethod
    def condition(pod: dict[str, Any], ctype: str) -> str | None:
        return next(
            (
                x.get("status")
                for x in (pod.get("status") or {}).get("conditions") or []
                if x["type"] == ctype
            ),
            None,
        )

    def annotate(self, pod: str, level: str) -> None:
        self.say(f"$ kubectl annotate pod {pod} hibernate.dev/sleep-level={level} --overwrite")
        self.kubectl(
            "annotate", "pod", pod, "-n", self.ns, f"hibernate.dev/sleep-level={level}", "--overwrite"
        )

    def at(self, pod: str, state: str, level: int) -> bool:
        ann = self.named(pod)["metadata"].get("annotations") or {}
        return bool(
            ann.get("hibernate.dev/state") == state
            and ann.get("hibernate.dev/observed-sleep-level") == str(level)
        )

    def condition_of(self, ctype: str) -> dict[str, Any]:
        status = self.md().get("status") or {}
        return next((x for x in status.get("conditions") or [] if x["type"] == ctype), {})

    def burst(self, what: str, urls: list[str], timeout: float, expected: str) -> None:
        """REQUESTS completions, ten at a time, to `urls` in turn; counted as ok, failed or hung."""
        body = {"model": walk.MODEL, "prompt": walk.PROMPT, "max_tokens": 8, "temperature": 0}

        def one(i: int) -> tuple[str, float]:
            started = time.monotonic()
            try:
                status, text = walk.post(urls[i % len(urls)] + "/v1/completions", body, timeout)
            except TimeoutError:
                return "hung", time.monotonic() - started
            except OSError as e:
                if "timed out" in str(e):
                    return "hung", time.monotonic() - started
                return "failed", time.monotonic() - started
            try:
                ok = status == 200 and json.loads(text)["choices"][0]["text"] == expected
            except (ValueError, KeyError, IndexError):
                ok = False
            return ("ok" if ok else "failed"), time.monotonic() - started

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        counts = {k: sum(1 for r, _ in results if r == k) for k in ("ok", "failed", "hung")}
        slowest = max(s for _, s in results)
        self.rows.append((what, counts["ok"], counts["failed"], counts["hung"], slowest))
        self.check(
            counts["ok"] == REQUESTS,
            f"{what}: {counts['ok']}/{REQUESTS} answered right, {counts['failed']} failed, "
            f"{counts['hung']} hung (slowest {slowest:.2f} s)",
        )

    # -- the run ---------------------------------------------------------------------------------

    def apply_two(self) -> None:
        self.say(f"== kubectl apply: ModelDeployment {NAME}, two replicas of the fake engine ==")
        manifest = self.manifest(replicas=2)
        self.say(self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest)).rstrip())
        seconds = self.wait_for("Awake", self.reached("Awake", "Awake"))
        self.wait_for("both pods in the Service's ready endpoints", lambda: len(self.endpoints()[0]) == 2)
        self.say(f"   Awake after {seconds:.1f} s")

    def run_readiness(self) -> int:
        self.apply_two()
        a, b = sorted(self.pods(), key=lambda p: p["metadata"]["name"])
        name_a, name_b = a["metadata"]["name"], b["metadata"]["name"]
        ip_a, ip_b = a["status"]["podIP"], b["status"]["podIP"]
        for pod in (a, b):
            gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
            self.check(gates == [AWAKE], f"pod {pod['metadata']['name']} has the readiness gate {gates}")
        baseline = self.complete(ip_a)
        self.say(f"   answer: {baseline!r}")
        self.show_state("two replicas Awake")

        self.say(f"\n== one replica asleep: {name_b} at L1, the spec still Awake ==")
        self.annotate(name_b, "L1")
        self.wait_for(f"{name_b} Asleep at L1", lambda: self.at(name_b, "Asleep", 1))
        self.wait_for(f"{name_b} out of the ready endpoints", lambda: self.endpoints() == ([ip_a], [ip_b]))
        self.show_state(f"{name_b} asleep")
        pod_b = self.named(name_b)
        self.check(
            (self.condition(pod_b, AWAKE), self.condition(pod_b, "Ready")) == ("False", "False"),
            f"{name_b}: {AWAKE}={self.condition(pod_b, AWAKE)}, Ready={self.condition(pod_b, 'Ready')}",
        )
        self.check(
            json.loads(self.http(ip_b, "/is_sleeping"))["is_sleeping"] is True,
            f"{name_b}'s engine sleeps: a request sent to {ip_b} would hang",
        )
        self.check(self.endpoints() == ([ip_a], [ip_b]), f"Endpoints: ready [{ip_a}], not ready [{ip_b}]")
        self.wait_for(
            "the status says it",
            lambda: f"pod {name_b} is at L1" in self.condition_of("Ready").get("message", ""),
        )
        status, ready = self.md()["status"], self.condition_of("Ready")
        self.check(
            status["phase"] == "Awake"
            and ready["status"] == "True"
            and f"pod {name_b} is at L1" in ready["message"],
            f"status: phase {status['phase']}, level {status.get('sleepLevel')}, Ready {ready['status']}: "
            f"{ready.get('message')}",
        )

        ready_ips, _ = self.endpoints()
        self.say(
            f"\n== {REQUESTS} requests to the Service's ready endpoints {ready_ips}, and through the gateway =="
        )
        self.burst("the Service's ready endpoints", [f"http://{ip}:8000" for ip in ready_ips], 10, baseline)
        gateway = self.gateway()
        self.burst(f"the gateway ({gateway})", [gateway], 30, baseline)
        self.check(self.endpoints() == ([ip_a], [ip_b]), "the Endpoints did not change meanwhile")

        self.say("\n== both replicas asleep: the gateway holds a request until one is ready again ==")
        self.annotate(name_a, "L1")
        self.wait_for(f"{name_a} Asleep at L1", lambda: self.at(name_a, "Asleep", 1))
        self.wait_for("no ready endpoint", lambda: self.endpoints()[0] == [])
        self.show_state("both asleep")
        status = self.md()["status"]
        self.check(
            status["phase"] == "Asleep" and self.condition_of("Ready")["status"] == "False",
            f"status: phase {status['phase']}, Ready {self.condition_of('Ready')['status']}",
        )
        answer: list[tuple[int, str]] = []
        body = {"model": walk.MODEL, "prompt": walk.PROMPT, "max_tokens": 8, "temperature": 0}
        held = threading.Thread(
            target=lambda: answer.append(walk.post(gateway + "/v1/completions", body, 120))
        )
        started = time.monotonic()
        held.start()
        time.sleep(3)
        self.check(not answer, f"no answer while no replica is ready (after 3 s: {answer})")
        self.annotate(name_b, "Awake")
        held.join(120)
        waited = time.monotonic() - started
        ok = (
            bool(answer)
            and answer[0][0] == 200
            and json.loads(answer[0][1])["choices"][0]["text"] == baseline
        )
        self.check(
            ok, f"the held request was answered right once {name_b} woke, after {waited:.1f} s: {answer}"
        )
        self.wait_for(f"{name_b} in the ready endpoints", lambda: self.endpoints()[0] == [ip_b])
        self.rows.append(("held until a replica woke", int(ok), int(not ok), 0, waited))

        self.say(f"\n== Stop on one pod ({name_b}): one Warning, the model Failed with the reason ==")
        self.annotate(name_b, "Stop")
        self.wait_for("phase Failed", lambda: (self.md().get("status") or {}).get("phase") == "Failed")
        time.sleep(5)  # more agent passes and operator folds: still one Warning
        events = json.loads(
            self.kubectl(
                "get",
                "events",
                "-n",
                self.ns,
                "--field-selector",
                f"involvedObject.name={name_b}",
                "-o",
                "json",
            )
        )["items"]
        stops = [e for e in events if e.get("reason") == "StopOnPod"]
        self.check(
            len(stops) == 1 and stops[0].get("count", 1) == 1 and stops[0]["type"] == "Warning",
            f"one StopOnPod Warning on {name_b}: {[e.get('message') for e in stops]}",
        )
        degraded, progressing = self.condition_of("Degraded"), self.condition_of("Progressing")
        self.check(
            degraded.get("status") == "True"
            and "Stop applies to a whole ModelDeployment" in degraded.get("message", "")
            and progressing.get("status") == "False",
            f"Degraded: {degraded.get('message')}; Progressing {progressing.get('status')}",
        )
        self.check(
            json.loads(self.http(ip_b, "/is_sleeping"))["is_sleeping"] is False, f"{name_b} is left serving"
        )
        self.show_state("Stop on one pod")

        self.say("\n== kubectl delete md ==")
        self.say(self.kubectl("delete", "md", NAME, "-n", self.ns, "--wait=true", "--timeout=120s").rstrip())
        self.wait_for("no engine pod", lambda: not self.pods())

        self.say(f"\n{'requests through':<44} {'ok':>4} {'failed':>6} {'hung':>4} {'slowest s':>9}")
        for what, ok_n, failed, hung, slowest in self.rows:
            self.say(f"{what:<44} {ok_n:>4} {failed:>6} {hung:>4} {slowest:>9.2f}")
        return self.verdict("readiness checks")


def main(argv: list[str] | None = None) -> int:
    walk.NAME = NAME  # the walk's helpers read the ModelDeployment's name from there
    return walk.gateway_walk_main(__doc__, lambda args: Readiness(args).run_readiness(), argv)


if __name__ == "__main__":
    sys.exit(main())
