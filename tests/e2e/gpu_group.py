"""Two models take turns on one GPU (a GpuGroup), on the real node (hack/e2e-real-node.sh), through kubectl
and the chart's gateway. The GPU is pretend (fake engines on a CPU node: placement without a GPU
resource), the rest is real: the chart's operator, agent and gateway, a kubelet, two pods.

A GpuGroup of maxAwake 1 and two ModelDeployments of the fake engine, `gg-a` (Awake) and `gg-b`
(L1). Passes only when:

- both pods run on the same node, each with the group's label and pod affinity;
- the group's status names gg-a as the holder, `kubectl get md` says Holding / Released;
- a request through the gateway for gg-b is answered 200 with gg-b's own answer, after gg-a was put
  to L1 (its engine really sleeps: `/is_sleeping`) by an automatic level of source gpu-group, its
  spec untouched; then gg-b holds the GPU, and the group's lastSwitch says gg-a -> gg-b;
- a request for gg-a switches back the same way; the gateway counts two ok switches
  (hibernate_gateway_gpu_switch_total) and their seconds;
- never both engines awake at once (sampled all along from the engines themselves).

    python3 tests/e2e/gpu_group.py --kubectl "kubectl --kubeconfig …" --engine-image local/hibernate:dev \
        --release-namespace hibernate-system --release hibernate
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import walk

GROUP = "gg-e2e"
MEMBERS = ("gg-a", "gg-b")
SOURCE = "gpu-group"


class GroupWalk(walk.Walk):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.release = args.release
        self.most_awake = 0
        self.rows: list[tuple[str, float]] = []

    # -- reads -----------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.kubectl("get", kind, name, "-n", self.ns, "-o", "json"))
        return obj

    def member_pod(self, name: str) -> dict[str, Any]:
        out = self.kubectl("get", "pods", "-n", self.ns, "-l", f"hibernate.dev/model={name}", "-o", "json")
        pods = [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]
        if len(pods) != 1:
            raise walk.WalkError(f"expected one pod of {name}, found {len(pods)}")
        return pods[0]

    def settled(self, name: str, level: str, phase: str) -> bool:
        md = self.get("md", name)
        status = md.get("status") or {}
        return bool(
            status.get("effectiveLevel") == level
            and status.get("phase") == phase
            and status.get("sleepLevel") == level
            and status.get("observedGeneration") == md["metadata"]["generation"]
        )

    def sleeping(self, name: str) -> bool:
        ip = self.member_pod(name)["status"]["podIP"]
        return bool(json.loads(self.http(ip, "/is_sleeping", timeout=5))["is_sleeping"])

    def metrics(self, gateway: str) -> dict[str, float]:
        with urllib.request.urlopen(gateway + "/metrics", timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("hibernate_gateway_gpu_switch"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def show_group(self, title: str) -> None:
        self.say(f"--- {title} (t={time.monotonic() - self.t0:.1f}s)")
        self.show("get", "gg", "-n", self.ns)
        self.show("get", "md", "-n", self.ns)

    # -- the run ---------------------------------------------------------------------------------

    def manifests(self) -> list[dict[str, Any]]:
        group = {
            "apiVersion": "hibernate.dev/v1alpha1",
            "kind": "GpuGroup",
            "metadata": {"name": GROUP, "namespace": self.ns},
            "spec": {
                "maxAwake": 1,
                "makeRoomLevel": "L1",
                "minAwakeSeconds": 0,
                "switchTimeoutSeconds": 60,
                # No GPU on this node: no GPU resource asked; the members are still kept together.
                "placement": {"mode": "SameNode"},
            },
        }
        out = [group]
        for name, level in zip(MEMBERS, ("Awake", "L1"), strict=True):
            walk.NAME = name
            md = self.manifest()
            md["spec"]["model"] = f"e2e/{name}"
            md["spec"]["sleepLevel"] = level
            md["spec"]["gpuGroup"] = {"name": GROUP}
            out.append(md)
        return out

    def sample(self, stop: threading.Event) -> None:
        """The engines themselves, all along: how many are awake at once."""
        while not stop.is_set():
            try:
                awake = sum(1 for name in MEMBERS if not self.sleeping(name))
                self.most_awake = max(self.most_awake, awake)
            except (walk.WalkError, OSError, ValueError, KeyError):
                pass  # a pod between states; the next sample sees it
            stop.wait(0.2)

    def switch_to(self, gateway: str, asked: str, other: str) -> None:
        self.say(f"\n== a request through the gateway for {asked} (asleep): {other} makes room ==")
        body = {"model": f"e2e/{asked}", "prompt": walk.PROMPT, "max_tokens": 8, "temperature": 0}
        started = time.monotonic()
        status, text = walk.post(gateway + "/v1/completions", body, 120)
        seconds = time.monotonic() - started
        self.rows.append((f"{other} -> {asked}", seconds))
        answered = status == 200 and bool(json.loads(text)["choices"][0]["text"])
        self.check(answered, f"{asked} answered {status} after {seconds:.2f} s: {text[:120]}")
        md = self.get("md", other)
        annotations = md["metadata"].get("annotations") or {}
        self.check(
            annotations.get("hibernate.dev/auto-sleep-level") == "L1"
            and annotations.get("hibernate.dev/auto-sleep-level-source") == SOURCE
            and md["spec"]["sleepLevel"] == ("Awake" if other == MEMBERS[0] else "L1"),
            f"{other} got the automatic level L1 from {annotations.get('hibernate.dev/auto-sleep-level-source')}"
            f" ({annotations.get('hibernate.dev/auto-sleep-level-reason')}); its spec says "
            f"{md['spec']['sleepLevel']}",
        )
        self.wait_for(f"{other} Asleep at L1", lambda: self.settled(other, "L1", "Asleep"))
        self.check(self.sleeping(other), f"{other}'s engine sleeps (/is_sleeping)")
        self.check(not self.sleeping(asked), f"{asked}'s engine is awake")
        self.wait_for(
            f"the group says {asked} holds the GPU",
            lambda: (
                [h["name"] for h in self.get("gg", GROUP).get("status", {}).get("holders", [])] == [asked]
            ),
        )
        last = self.get("gg", GROUP)["status"].get("lastSwitch") or {}
        self.check(
            (last.get("from"), last.get("to"), last.get("result")) == (other, asked, "ok"),
            f"lastSwitch: {last}",
        )
        self.show_group(f"{asked} holds the GPU")

    def run_group(self) -> int:
        self.say(f"== kubectl apply: GpuGroup {GROUP} (maxAwake 1), {MEMBERS[0]} Awake, {MEMBERS[1]} L1 ==")
        items = {"apiVersion": "v1", "kind": "List", "items": self.manifests()}
        self.say(self.kubectl("apply", "-f", "-", stdin=json.dumps(items)).rstrip())
        self.wait_for(f"{MEMBERS[0]} Awake", lambda: self.settled(MEMBERS[0], "Awake", "Awake"))
        self.wait_for(f"{MEMBERS[1]} Asleep at L1", lambda: self.settled(MEMBERS[1], "L1", "Asleep"))
        pods = {name: self.member_pod(name) for name in MEMBERS}
        nodes = {name: pod["spec"].get("nodeName") for name, pod in pods.items()}
        self.check(len(set(nodes.values())) == 1, f"both members on one node: {nodes}")
        for name, pod in pods.items():
            labels = pod["metadata"].get("labels") or {}
            terms = ((pod["spec"].get("affinity") or {}).get("podAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution"
            ) or []
            self.check(
                labels.get("hibernate.dev/gpu-group") == GROUP
                and any(t.get("topologyKey") == "kubernetes.io/hostname" for t in terms),
                f"{name}: label hibernate.dev/gpu-group={labels.get('hibernate.dev/gpu-group')}, "
                f"pod affinity {terms}",
            )
        self.wait_for(
            f"the group says {MEMBERS[0]} holds the GPU",
            lambda: (self.get("gg", GROUP).get("status") or {}).get("holding") == MEMBERS[0],
        )
        columns = {n: (self.get("md", n).get("status") or {}).get("gpu") for n in MEMBERS}
        self.check(columns == {MEMBERS[0]: "Holding", MEMBERS[1]: "Released"}, f"status.gpu: {columns}")
        self.show_group("the group applied")

        gateway = self.gateway()
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop,), daemon=True)
        sampler.start()
        before = self.metrics(gateway)
        try:
            self.switch_to(gateway, MEMBERS[1], MEMBERS[0])
            self.switch_to(gateway, MEMBERS[0], MEMBERS[1])
        finally:
            stop.set()
            sampler.join(10)
        after = self.metrics(gateway)
        ok = 'hibernate_gateway_gpu_switch_total{result="ok"}'
        count = "hibernate_gateway_gpu_switch_seconds_count"
        self.check(
            after.get(ok, 0) - before.get(ok, 0) == 2 and after.get(count, 0) - before.get(count, 0) == 2,
            f"the gateway counted {after.get(ok, 0) - before.get(ok, 0):g} ok switches and "
            f"{after.get(count, 0) - before.get(count, 0):g} switch durations",
        )
        self.check(self.most_awake == 1, f"at most one engine awake at once (sampled: {self.most_awake})")

        self.say("\n== kubectl delete md, gg ==")
        self.say(
            self.kubectl("delete", "md", *MEMBERS, "-n", self.ns, "--wait=true", "--timeout=120s").rstrip()
        )
        self.say(self.kubectl("delete", "gg", GROUP, "-n", self.ns, "--wait=true", "--timeout=60s").rstrip())
        self.say(f"\n{'switch':<16} {'request s':>9}")
        for what, seconds in self.rows:
            self.say(f"{what:<16} {seconds:>9.2f}")
        return self.verdict("GpuGroup checks")


def main(argv: list[str] | None = None) -> int:
    return walk.gateway_walk_main(__doc__, lambda args: GroupWalk(args).run_group(), argv)


if __name__ == "__main__":
    sys.exit(main())
