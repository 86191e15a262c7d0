"""A hostile engine on the real node (hack/e2e-real-node.sh): the node agent gives it nothing.

The engine (tests/e2e/hostile_engine.py) replaces what it can reach in its container with
recorders (its dynamic loader, the python3 on its PATH, the CRIU bundle where an older agent copied
it, /etc/ld.so.preload, CRIU's plugin directory and config, an NSS module) and plants symlinks at
every path the agent touches, pointing at canary files on the host. Then a Checkpoint cycle and a
deletion of the ModelDeployment follow, through kubectl. Passes only when:

- no canary on the host changed (content, mtime, the directory's entries);
- every line a recorder left (in the container's root, or on the host) shows no more than the
  container's own capabilities (its CapBnd): nothing planted ran with the agent's rights;
- the agent either completed the cycle (Asleep at Checkpoint, then Awake in the same pod with the
  same answer) or reported Failed with a reason; and after the deletion no image is left.

    python3 tests/e2e/hostile.py --kubectl "kubectl --kubeconfig …" --engine-image local/hibernate-hostile-engine:dev

`--node-root` is where this script sees the node's root filesystem: `/` on a real node, and
`/proc/<pid of kind's node container>/root` on kind (hack/e2e-kind.sh), whose agent's host is the node
container: the canaries, the checkpoint root and the recorders' log on "the host" are the node's.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import walk

NAME = "hostile"
RAN_LOG = "hibernate-hostile-ran.log"  # tests/hostile/recorder.c
CHECKPOINTS = Path("/var/lib/hibernate/checkpoints")
NODE_ROOT = Path("/")  # --node-root


def on_node(path: Path) -> Path:
    """`path` of the node's filesystem, as this script reaches it."""
    return NODE_ROOT / path.relative_to("/")


def ran_logs() -> list[Path]:
    """Where a recorder that ran outside the container would write: the node's root (and this
    machine's, where that is another)."""
    return list(dict.fromkeys([on_node(Path("/") / RAN_LOG), Path("/") / RAN_LOG]))


def canaries(directory: Path) -> dict[str, object]:
    """What the host canaries look like now."""
    return {
        "file": (directory / "canary").read_text(),
        "file_mtime": (directory / "canary").stat().st_mtime_ns,
        "dir": sorted(p.name for p in (directory / "dir").iterdir()),
        "dir_mtime": (directory / "dir").stat().st_mtime_ns,
    }


def container_pid(pod: dict[str, object]) -> int:
    """Host pid of the engine container's PID 1, found by its cgroup as the agent finds it, whatever the
    runtime (docker, containerd)."""
    from hibernate.agent import discovery

    statuses = pod["status"]["containerStatuses"]  # type: ignore[index]
    cid = next(s["containerID"] for s in statuses if s["name"] == "engine")
    procs = discovery.container_processes(pod["metadata"]["uid"], cid)  # type: ignore[index]
    if not procs:
        raise LookupError(f"no process of container {cid} on this host")
    return next((p.pid for p in procs if p.ns_pid == 1), procs[0].pid)


def cap_bound(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise LookupError(f"no CapBnd for pid {pid}")


def recorded(pid: int | None) -> list[str]:
    lines = []
    for log in [*ran_logs(), *([Path(f"/proc/{pid}/root") / RAN_LOG] if pid else [])]:
        if log.exists():
            lines += log.read_text().splitlines()
    return lines


class Hostile(walk.Walk):
    def apply_hostile(self, canary_dir: Path) -> None:
        self.say(f"== kubectl apply: ModelDeployment {NAME}, a hostile engine from {self.image} ==")
        manifest = self.manifest(
            command=["python3", "/hostile/hostile_engine.py"],
            env=[{"name": "HOSTILE_CANARY", "value": str(canary_dir)}],
        )
        self.say(self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest)).rstrip())
        self.wait_for("Awake", self.reached("Awake", "Awake"))

    def settled(self, level: str) -> bool:
        """Asleep at `level`, or Failed (the agent gave up with a reason): either is an answer."""
        status = self.md().get("status") or {}
        return status.get("phase") == "Failed" or (
            status.get("phase") == "Asleep" and status.get("sleepLevel") == level
        )

    def last_operation(self) -> dict[str, object]:
        ann = self.pod()["metadata"].get("annotations", {})
        op: dict[str, object] = json.loads(ann.get("hibernate.dev/last-operation") or "{}")
        return op

    def run_hostile(self, canary_dir: Path) -> int:
        before = canaries(on_node(canary_dir))
        self.apply_hostile(canary_dir)
        pod = self.pod()
        ip, uid = pod["status"]["podIP"], pod["metadata"]["uid"]
        pid = container_pid(pod)
        baseline = self.complete(ip)
        self.wait_for(
            "the engine planted its traps", lambda: Path(f"/proc/{pid}/root/hostile/planted").exists()
        )
        self.say(f"   planted; answer before: {baseline!r}; container CapBnd {cap_bound(pid):#x}")

        self.say("\n== Checkpoint ==")
        self.patch("Checkpoint")
        self.wait_for("Asleep at Checkpoint, or Failed", lambda: self.settled("Checkpoint"))
        status = self.md().get("status") or {}
        op = self.last_operation()
        self.say(f"   phase {status.get('phase')}; agent's last-operation: {json.dumps(op)}")
        completed = status.get("phase") == "Asleep"
        if completed:
            mode = stat.S_IMODE(on_node(CHECKPOINTS).stat().st_mode)
            self.check(mode == 0o700, f"the checkpoint root {CHECKPOINTS} is root-only: {mode:04o}")
        if not completed:
            self.check(bool(op.get("error")), f"the agent reported Failed with a reason: {op.get('error')!r}")
        self.patch("Awake")
        self.wait_for("Awake", self.reached("Awake", "Awake"))
        after = self.pod()
        self.check(after["metadata"]["uid"] == uid, "the same pod after the cycle")
        answer = self.complete(after["status"]["podIP"])
        self.check(answer == baseline, f"answer after the cycle {answer!r} == before {baseline!r}")
        lines = recorded(container_pid(after))
        bound = cap_bound(container_pid(after))
        self.say(f"   recorder lines: {lines}")
        for line in lines:
            caps = int(line.split("capeff=")[1].split()[0], 16)
            self.check(
                caps & ~bound == 0, f"a planted program ran with no more than the container's rights: {line}"
            )
        self.check(not any(log.exists() for log in ran_logs()), "nothing planted ran on the host")

        self.say("\n== kubectl delete md ==")
        self.say(self.kubectl("delete", "md", NAME, "-n", self.ns, "--wait=true", "--timeout=120s").rstrip())
        self.wait_for("no engine pod", lambda: not self.pods())
        images = on_node(CHECKPOINTS) / self.ns
        left = list(images.glob(f"{NAME}-*")) if images.exists() else []
        self.wait_for("no image left", lambda: not any(p.exists() for p in left), timeout=60)
        after_canaries = canaries(on_node(canary_dir))
        self.check(after_canaries == before, f"host canaries unchanged: {after_canaries}")
        self.say(f"\nhostile engine: cycle {'completed' if completed else 'refused with a reason'}")
        return self.verdict("hostile-engine checks")


def main(argv: list[str] | None = None) -> int:
    parser = walk.common_parser(__doc__, "local/hibernate-hostile-engine:dev")
    parser.add_argument("--canary-dir", default="/var/lib/hibernate-e2e-canary", help="a path on the node")
    parser.add_argument("--node-root", default="/", help="the node's root filesystem as seen from here")
    args = parser.parse_args(argv)
    global NODE_ROOT
    NODE_ROOT = Path(args.node_root)
    walk.NAME = NAME  # the walk's helpers read the ModelDeployment's name from there
    canary_dir = Path(args.canary_dir)
    seen = on_node(canary_dir)
    (seen / "dir").mkdir(parents=True, exist_ok=True)
    (seen / "canary").write_text("host canary: the hostile engine must not change this\n")
    (seen / "dir" / "inside").write_text("host canary directory\n")
    for log in ran_logs():
        log.unlink(missing_ok=True)
    os.sync()
    try:
        return Hostile(args).run_hostile(canary_dir)
    except walk.WalkError as e:
        print(f"FAILED: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
