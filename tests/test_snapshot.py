"""Stop that wakes in seconds (issue 19): an engine's snapshot restored into a NEW pod.

One simulated pod (tests use SimPod: real namespaces, real criu) serves and is snapshotted; it
goes, as a Stop takes it. Then a new pod, another UID, network namespace and cgroup, starts with its
init waiting for the restore (podinit --restore-wait). The agent's side (agent/snapshot.py) restores
the engine into it, the same process state serving the same answers, or, whatever goes wrong,
lets the init start the engine cold with the reason. The init's own side of the protocol is tested
without criu at the end.

CRIU tests need root and the bundle from hack/build-criu.sh; they are skipped otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from hibernate import podinit
from hibernate.agent import criu, kube
from hibernate.agent import snapshot as agent_snapshot
from hibernate.agent.criu import nsexec, snapshot
from hibernate.agent.criu.images import make_private_dirs, write_private
from hibernate.agent.ownership import Ownership
from hibernate.agent.sweep import Sweeper
from hibernate.api import constants as c
from hibernate.localnode.simpod import SimPod
from tests.cluster import Cluster
from tests.pods import create_model
from tests.test_criu import ENGINE

ENGINE_MIB = 16
COMMAND = [sys.executable, "/.hibernate/engine.py", "8000", str(ENGINE_MIB)]
FILES = {"engine.py": ENGINE}
SPEC = "spec-1f2e3d"  # the operator's hash of the engine's image, args and model
PODINIT = Path(podinit.__file__)


class WaitingPod(SimPod):
    """A new pod of the model, woken from a snapshot: its init waits for the agent's restore and
    starts nothing (ready as soon as it waits)."""

    @classmethod
    def waiting(cls, seconds: float = 30, cgroupns: bool = False) -> WaitingPod:
        pod = cls.start(
            COMMAND,
            files=FILES,
            env={"HIBERNATE_RESTORE_WAIT": str(seconds)},
            ready_path=None,
            cgroupns=cgroupns,
        )
        assert isinstance(pod, WaitingPod)
        return pod

    def __enter__(self) -> WaitingPod:
        return self

    def _wait_ready(self, ready_path: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pod exited with {self.proc.returncode}:\n{self.log()}")
            kids = [int(k) for k in children.read_text().split()]
            self.init_pid = self.init_pid or (kids[0] if kids else 0)
            if self.init_pid and (self.emptydir / podinit.RESTORE_WAIT).exists():
                return
            time.sleep(0.02)
        raise TimeoutError(f"the pod's init did not wait for a restore:\n{self.log()}")

    def agent_pod(self) -> criu.Pod:
        """The pod as the agent's criu sees it; no checkpoint marker (nothing was dumped here)."""
        return criu.Pod(self.init_pid, marker=None)

    def serving(self, timeout: float = 20) -> dict[str, Any]:
        """The engine's /state once it answers (restored, or started cold by the init)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.get_json("/state", timeout=1)
                assert isinstance(data, dict)
                return data
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"the engine does not answer:\n{self.log()}")


@pytest.fixture(scope="module")
def bundle() -> criu.Bundle:
    if os.geteuid() != 0:
        pytest.skip("CRIU tests need root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    try:
        b = criu.locate()
        criu.version(b)
    except criu.CriuError as e:
        pytest.skip(f"no usable CRIU bundle: {e}")
    if b.nsjoin is None:
        pytest.skip(f"{b.criu} is not a bundle with hibernate-nsjoin.so; build one with hack/build-criu.sh")
    return b


@pytest.fixture(scope="module")
def taken(bundle: criu.Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A snapshot of a serving engine, whose pod is then gone: the image, and what the engine said."""
    root = tmp_path_factory.mktemp("checkpoints")
    image = snapshot.snapshot_dir(root, "default", "llama")
    with SimPod.start(COMMAND, files=FILES) as old:
        conn = old.http_connection()  # a client connected while the snapshot is taken
        conn.request("GET", "/state")
        before = json.loads(conn.getresponse().read())
        result = snapshot.take(
            image, old.engine_ns_pid(), criu.Pod(old.init_pid), spec_hash=SPEC, checkpoint_root=root
        )
        assert old.engine_host_pid() is None, "the dump ends the engine"
        conn.close()
        old_uid = old.uid
    yield {"image": image, "root": root, "before": before, "meta": result.metadata, "old_uid": old_uid}


# -- a snapshot into a new pod --------------------------------------------------------------------


@pytest.mark.criu
def test_a_snapshot_lists_the_engine_pids_and_its_spec(taken: dict[str, Any]) -> None:
    meta, before = taken["meta"], taken["before"]
    assert meta.spec_hash == SPEC
    assert before["pid"] in meta.pids and len(meta.pids) >= 2  # the engine and its worker, threads too
    assert taken["image"] == taken["root"] / ".snapshots" / "default" / "llama"
    assert criu.check_image(taken["image"]) == [] and criu.check_private(taken["image"], taken["root"]) == []
    with pytest.raises(ValueError):
        snapshot.snapshot_dir(taken["root"], "default", "../other")


@pytest.mark.criu
def test_a_new_pod_wakes_from_the_snapshot_with_the_same_engine(taken: dict[str, Any]) -> None:
    before = taken["before"]
    seen: list[dict[str, Any]] = []

    def answers_as_before(result: criu.RestoreResult) -> None:
        seen.append(pod.serving())
        assert seen[-1]["digest"] == before["digest"]

    with WaitingPod.waiting() as pod:
        assert pod.uid != taken["old_uid"] and pod.engine_host_pid() is None  # nothing started
        outcome = agent_snapshot.wake_from_snapshot(
            taken["image"],
            pod.agent_pod(),
            spec_hash=SPEC,
            check=answers_as_before,
            checkpoint_root=taken["root"],
        )
        assert outcome.restored, outcome.reason
        print(f"\n[snapshot] restored into a new pod in {outcome.seconds:.2f} s")
        # The engine is the one that was dumped: same pid, same memory, its counter and worker go on.
        after = pod.serving()
        assert after["pid"] == before["pid"] == outcome.pid
        assert after["digest"] == before["digest"]
        assert after["count"] == before["count"] + 2  # the check's request, then this one
        assert after["worker_alive"] is True
        assert pod.get_json("/hash")["hash"] == before["digest"]  # type: ignore[index]
        # ... now in the new pod: a child of its init, charged to its container's cgroup.
        host_pid = pod.engine_host_pid()
        assert outcome.restore is not None and host_pid == outcome.restore.host_pid
        assert f"PPid:\t{pod.init_pid}\n" in Path(f"/proc/{host_pid}/status").read_text()
        assert pod.container_id in Path(f"/proc/{host_pid}/cgroup").read_text()
        assert "engine restored from a snapshot by the agent" in eventually_logged(pod, "restored")
        # The snapshot stays for the next wake (another replica, the next Stop).
        assert criu.check_image(taken["image"]) == []


@pytest.mark.criu
def test_a_pod_with_a_cgroup_namespace_wakes_from_a_snapshot_taken_in_another(tmp_path: Path) -> None:
    """containerd and CRI-O on cgroup v2 give each container a cgroup namespace of its own: the
    restored engine shares the new one, rooted at its new container's cgroup."""
    root = tmp_path / "checkpoints"
    image = snapshot.snapshot_dir(root, "default", "llama")
    with SimPod.start(COMMAND, files=FILES, cgroupns=True) as old:
        digest = old.get_json("/state")["digest"]  # type: ignore[index]
        snapshot.take(
            image, old.engine_ns_pid(), criu.Pod(old.init_pid), spec_hash=SPEC, checkpoint_root=root
        )
    with WaitingPod.waiting(cgroupns=True) as pod:
        outcome = agent_snapshot.wake_from_snapshot(
            image, pod.agent_pod(), spec_hash=SPEC, checkpoint_root=root
        )
        assert outcome.restored, outcome.reason
        assert pod.serving()["digest"] == digest
        engine = pod.engine_host_pid()
        assert (
            os.stat(f"/proc/{engine}/ns/cgroup").st_ino == os.stat(f"/proc/{pod.init_pid}/ns/cgroup").st_ino
        )
        assert pod.container_id in Path(f"/proc/{engine}/cgroup").read_text()  # the host's view


def eventually_logged(pod: SimPod, word: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while word not in pod.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pod.log()


# -- every failure is a cold start, with the reason -------------------------------------------------


def _cut_pages(image: Path) -> None:
    pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)


def _taken_on_an_a100(image: Path) -> None:
    """As if dumped on another node: no GPU, or another model and driver, here."""
    meta = json.loads((image / criu.METADATA).read_text())
    (image / criu.METADATA).write_text(
        json.dumps({**meta, "gpu_model": "NVIDIA A100-SXM4-80GB", "driver_version": "570.86.15"})
    )


FALLBACKS: list[tuple[str, dict[str, Any], Callable[[Path], None] | None, str]] = [
    ("another spec", {"spec_hash": "spec-changed"}, None, "taken from another engine spec"),
    ("another GPU", {}, _taken_on_an_a100, "only valid on the same GPU model and driver"),
    ("a damaged image", {}, _cut_pages, r"is damaged: pages-\d+\.img has"),
    ("no image on this node", {"image": "missing"}, None, "does not exist"),
]


@pytest.mark.criu
@pytest.mark.parametrize(("case", "args", "tamper", "says"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_a_refused_snapshot_is_a_cold_start_with_the_reason(
    taken: dict[str, Any],
    tmp_path: Path,
    case: str,
    args: dict[str, Any],
    tamper: Callable[[Path], None] | None,
    says: str,
) -> None:
    image, root, args = taken["image"], taken["root"], dict(args)
    if tamper is not None:  # a copy, root-only as the agent writes it
        root = tmp_path / "copy"
        root.mkdir(mode=0o700)
        image = shutil.copytree(taken["image"], root / "llama")
        tamper(image)
    if args.pop("image", None):
        image = root / "missing"
    kwargs = {"spec_hash": SPEC, "checkpoint_root": root, **args}
    with WaitingPod.waiting() as pod:
        started = time.monotonic()
        outcome = agent_snapshot.wake_from_snapshot(image, pod.agent_pod(), **kwargs)
        assert not outcome.restored
        assert re.search(says, outcome.reason), outcome.reason
        # The init starts the engine itself: a fresh process (new memory), serving.
        assert "starting the engine cold" in eventually_logged(pod, "starting the engine cold")
        cold = pod.serving()
        print(f"\n[snapshot] {case}: cold start after {time.monotonic() - started:.2f} s: {outcome.reason}")
        assert cold["count"] == 1 and cold["digest"] != taken["before"]["digest"]


@pytest.mark.criu
def test_an_engine_that_fails_its_check_is_ended_and_started_cold(taken: dict[str, Any]) -> None:
    """The restored replica serves only after its check (the canary): a wrong answer ends it."""

    def wrong_answer(result: criu.RestoreResult) -> None:
        raise RuntimeError("canary: the restored engine answered 'b c d', expected 'a b c'")

    with WaitingPod.waiting() as pod:
        outcome = agent_snapshot.wake_from_snapshot(
            taken["image"], pod.agent_pod(), spec_hash=SPEC, check=wrong_answer, checkpoint_root=taken["root"]
        )
        assert not outcome.restored and outcome.reason.startswith("canary: the restored engine answered")
        assert "starting the engine cold" in eventually_logged(pod, "starting the engine cold")
        cold = pod.serving()
        assert cold["count"] == 1 and cold["digest"] != taken["before"]["digest"]
        assert cold["worker_alive"] is True


@pytest.mark.criu
def test_a_pod_whose_wait_ran_out_is_not_restored_into(taken: dict[str, Any]) -> None:
    with WaitingPod.waiting(seconds=0.5) as pod:
        cold = pod.serving()  # nobody came: the init started the engine itself
        assert cold["count"] == 1
        assert "no restore within 0.5 s: starting the engine cold" in pod.log()
        outcome = agent_snapshot.wake_from_snapshot(
            taken["image"], pod.agent_pod(), spec_hash=SPEC, checkpoint_root=taken["root"]
        )
        assert not outcome.restored and outcome.reason == "the pod's init was not waiting for a restore"
        assert pod.serving()["count"] == 2  # the cold engine, untouched


@pytest.mark.criu
def test_a_pod_that_runs_its_engine_is_neither_restored_into_nor_touched(taken: dict[str, Any]) -> None:
    """The image's pids must be free in the pod; a pod whose engine runs (and that plants a wait file
    of its own) keeps its engine, and the agent says why it did not restore."""
    with SimPod.start(COMMAND, files=FILES) as pod:
        engine, count = pod.engine_host_pid(), pod.get_json("/state")["count"]  # type: ignore[index]
        (pod.emptydir / podinit.RESTORE_WAIT).write_text("0\n")
        outcome = agent_snapshot.wake_from_snapshot(
            taken["image"], criu.Pod(pod.init_pid, marker=None), spec_hash=SPEC, checkpoint_root=taken["root"]
        )
        assert not outcome.restored
        assert re.search(r"pids \[2, .*\] of its engine are in use in the pod", outcome.reason), (
            outcome.reason
        )
        assert pod.engine_host_pid() == engine
        assert pod.get_json("/state")["count"] == count + 1  # type: ignore[index]


# -- the agent dies mid-restore: the next one takes the claim over --------------------------------


def descendants(pid: int) -> list[int]:
    return list(nsexec.descendants(pid))


# Where the agent is SIGKILLed (hibernate.faults): the claim made, nothing restored; criu restoring
# (it goes on without the agent); the engine restored, the init not told. tests/test_faults.py counts
# these as armed.
AGENT_RESTART_POINTS = (
    "agent.snapshot-after-claim",
    "agent.criu-restore-running",
    "agent.snapshot-before-tell",
)

# The agent that dies: wake_from_snapshot in a process of its own, with one fault point armed.
_DYING_AGENT = """
import sys
from pathlib import Path
from hibernate.agent import criu, snapshot
image, init_pid, spec, root = sys.argv[1:]
snapshot.wake_from_snapshot(Path(image), criu.Pod(int(init_pid), marker=None), spec_hash=spec,
                            checkpoint_root=Path(root))
print("the fault point did not fire")
"""


def agent_killed_at(point: str, taken: dict[str, Any], pod: WaitingPod) -> subprocess.CompletedProcess[str]:
    args = [str(taken["image"]), str(pod.init_pid), SPEC, str(taken["root"])]
    return subprocess.run(
        [sys.executable, "-c", _DYING_AGENT, *args],
        env={**os.environ, "HIBERNATE_FAULTS": point},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.criu
@pytest.mark.parametrize("point", AGENT_RESTART_POINTS)
def test_a_restore_whose_agent_died_is_taken_over_and_ends_restored_with_one_engine(
    taken: dict[str, Any], point: str
) -> None:
    """The agent is SIGKILLed mid-restore. Its claim names it, so the next agent knows nobody will
    tell the init (which would otherwise wait out its claim limit, 900 s): it ends what the dead
    agent's restore left (a criu still running, an engine restored but never checked), restores
    again, and the pod serves the snapshot's engine, one engine and no orphan."""
    before = taken["before"]
    with WaitingPod.waiting(seconds=30) as pod:
        dead = agent_killed_at(point, taken, pod)
        assert dead.returncode == -signal.SIGKILL and f"fault point {point} armed" in dead.stderr, dead
        state = agent_snapshot.handshake(pod.agent_pod())
        assert state.claimed and not state.waiting and state.verdict is None
        assert state.claimer is not None and not state.claimer.alive() and state.orphaned
        time.sleep(0.5)  # whatever criu the dead agent left gets on with it
        left = set(agent_snapshot.pod_processes(pod.init_pid))
        if point == "agent.snapshot-before-tell":
            assert left, "the dead agent's restored engine runs, unchecked"
        assert "starting the engine cold" not in pod.log()  # the init still waits for its verdict

        outcome = agent_snapshot.take_over(
            taken["image"], pod.agent_pod(), spec_hash=SPEC, checkpoint_root=taken["root"]
        )
        assert outcome.restored and outcome.taken_over, outcome.reason
        print(
            f"\n[snapshot] {point}: taken over, restored in {outcome.seconds:.2f} s (leftovers {sorted(left)})"
        )
        after = pod.serving()
        assert after["pid"] == before["pid"] and after["digest"] == before["digest"]
        assert after["count"] == before["count"] + 1  # this request only: the engine is the snapshot's
        assert outcome.restore is not None
        engine = outcome.restore.host_pid
        now = set(agent_snapshot.pod_processes(pod.init_pid))
        assert now == {engine, *descendants(engine)}, "the restored tree only"
        assert not now & left, f"what the dead agent left ({sorted(left)}) was ended"
        assert "engine restored from a snapshot by the agent" in eventually_logged(pod, "restored")
        assert agent_snapshot.handshake(pod.agent_pod()).verdict == {"restored": before["pid"]}


@pytest.mark.criu
def test_a_taken_over_restore_that_fails_is_a_cold_start_with_both_reasons(taken: dict[str, Any]) -> None:
    with WaitingPod.waiting(seconds=30) as pod:
        dead = agent_killed_at("agent.snapshot-before-tell", taken, pod)
        assert dead.returncode == -signal.SIGKILL
        outcome = agent_snapshot.take_over(
            taken["image"], pod.agent_pod(), spec_hash="spec-changed", checkpoint_root=taken["root"]
        )
        assert not outcome.restored and outcome.taken_over
        assert "taken from another engine spec" in outcome.reason, outcome.reason
        assert "starting the engine cold" in eventually_logged(pod, "starting the engine cold")
        cold = pod.serving()
        assert cold["count"] == 1 and cold["digest"] != taken["before"]["digest"]
        engines = agent_snapshot.pod_processes(pod.init_pid)
        assert pod.engine_host_pid() in engines and len(engines) == 1 + len(
            descendants(pod.engine_host_pid() or 0)
        ), "one engine: the cold one"


def test_a_claim_names_a_living_agent_or_none() -> None:
    me = agent_snapshot.Claimer.me()
    assert me.alive() and agent_snapshot.Claimer.parse(me.text()) == me
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert not agent_snapshot.Claimer(int(gone.stdout), me.started).alive()
    assert not agent_snapshot.Claimer(me.pid, me.started + 1).alive()  # the pid used again
    assert agent_snapshot.Claimer.parse("1717171717\n") is None  # the init's deadline: unsigned
    unsigned = agent_snapshot.Handshake(waiting=False, claimed=True, claimer=None, verdict=None)
    assert unsigned.orphaned
    told = agent_snapshot.Handshake(waiting=False, claimed=True, claimer=None, verdict={"cold": "x"})
    assert not told.orphaned
    assert not agent_snapshot.Handshake(False, True, me, None).orphaned


# -- a snapshot goes with its ModelDeployment ------------------------------------------------------


def sealed_snapshot(image: Path, root: Path) -> Path:
    """A directory laid out and sealed as the agent writes a snapshot; nothing was dumped into it."""
    make_private_dirs(image, root)
    write_private(image / criu.METADATA, b'{"format": 1}')
    write_private(image / "pages-1.img", b"\0" * 4096)
    return image


def test_the_sweep_removes_a_snapshot_once_its_model_deployment_is_gone(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("snapshots are root-only")
    root = tmp_path / "checkpoints"
    create_model(cluster, namespace, "kept")
    kept = sealed_snapshot(snapshot.snapshot_dir(root, namespace, "kept"), root)
    gone = sealed_snapshot(snapshot.snapshot_dir(root / "team-a", namespace, "gone"), root)  # a dir below
    partial = gone.with_name(".gone.partial-0123abcd")  # what a dump left when its agent died
    partial.mkdir(mode=0o700)
    restore_log = Path(f"{gone}.{criu.RESTORE_LOG}")
    write_private(restore_log, b"criu's log of the last restore")
    foreign = sealed_snapshot(snapshot.snapshot_dir(root, namespace, "foreign"), root)
    foreign.chmod(0o755)  # not as the agent writes them: left alone

    def sweeper(api: kubernetes.client.ApiClient) -> Sweeper:
        lookup = functools.partial(kube.read_owner, api=api)
        return Sweeper((root,), "snapshot-node", Ownership(lookup))

    live = sweeper(cluster.api)
    assert sorted(live.sweep()) == sorted([str(gone), str(partial)])
    assert not restore_log.exists()
    assert kept.exists() and foreign.exists()

    cluster.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, "kept")
    unreachable = kubernetes.client.Configuration()
    unreachable.host = "https://127.0.0.1:1"  # nothing listens: the API server cannot be asked
    assert sweeper(kubernetes.client.ApiClient(unreachable)).sweep() == [] and kept.exists()
    assert live.sweep() == [str(kept)] and not kept.exists() and foreign.exists()


# -- the init's side, without criu ----------------------------------------------------------------


def start_init(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """podinit in restore-wait mode, its files in tmp_path, the engine a shell that says it started."""
    return subprocess.Popen(
        [
            sys.executable,
            str(PODINIT),
            "--log",
            str(tmp_path / "engine.log"),
            "--marker",
            str(tmp_path / "checkpointed"),
            *args,
            "--",
            "sh",
            "-c",
            "echo engine started; exec sleep 30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), path


def started_cold(tmp_path: Path) -> bool:
    wait_for(tmp_path / "engine.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "engine started" in (tmp_path / "engine.log").read_text():
            return True
        time.sleep(0.02)
    return False


def stop(init: subprocess.Popen[str]) -> str:
    init.send_signal(signal.SIGTERM)
    _, err = init.communicate(timeout=10)
    return err


def test_podinit_waits_then_starts_the_engine_cold_when_nobody_restores(tmp_path: Path) -> None:
    init = start_init(tmp_path, "--restore-wait", "0.3")
    wait_for(tmp_path / podinit.RESTORE_WAIT)
    assert (tmp_path / "engine.log").exists()  # made for criu, which reopens it by path
    assert started_cold(tmp_path)
    assert (tmp_path / podinit.RESTORE_EXPIRED).exists() and not (tmp_path / podinit.RESTORE_WAIT).exists()
    assert "no restore within 0.3 s: starting the engine cold" in stop(init)


def test_podinit_starts_cold_on_the_agents_verdict(tmp_path: Path) -> None:
    init = start_init(tmp_path, "--restore-wait", "30")
    wait_for(tmp_path / podinit.RESTORE_WAIT)
    os.rename(tmp_path / podinit.RESTORE_WAIT, tmp_path / podinit.RESTORE_CLAIMED)  # as the agent claims
    time.sleep(0.3)
    assert "engine started" not in (tmp_path / "engine.log").read_text()  # a claimed restore is waited for
    (tmp_path / podinit.RESTORE_RESULT).write_text(json.dumps({"cold": "snapshot taken on another GPU"}))
    assert started_cold(tmp_path)
    assert "no restore (snapshot taken on another GPU): starting the engine cold" in stop(init)


def test_podinit_ignores_what_an_earlier_run_left(tmp_path: Path) -> None:
    """A restarted container finds its emptyDir as the last run left it: an old verdict is not this
    wait's."""
    (tmp_path / podinit.RESTORE_RESULT).write_text(json.dumps({"cold": "an earlier run's verdict"}))
    (tmp_path / podinit.RESTORE_CLAIMED).write_text("")
    init = start_init(tmp_path, "--restore-wait", "30")
    wait_for(tmp_path / podinit.RESTORE_WAIT)
    time.sleep(0.3)
    assert "engine started" not in (tmp_path / "engine.log").read_text()
    assert (
        not (tmp_path / podinit.RESTORE_RESULT).exists() and not (tmp_path / podinit.RESTORE_CLAIMED).exists()
    )
    assert "an earlier run's verdict" not in stop(init)


def test_podinit_refuses_a_restored_pid_that_is_not_its_child(tmp_path: Path) -> None:
    init = start_init(tmp_path, "--restore-wait", "30")
    wait_for(tmp_path / podinit.RESTORE_WAIT)
    os.rename(tmp_path / podinit.RESTORE_WAIT, tmp_path / podinit.RESTORE_CLAIMED)
    (tmp_path / podinit.RESTORE_RESULT).write_text(json.dumps({"restored": os.getpid()}))
    assert started_cold(tmp_path)
    assert f"the restored engine (pid {os.getpid()}) is not running" in stop(init)


def test_podinit_gives_up_on_a_claimed_restore_without_a_result(tmp_path: Path) -> None:
    init = start_init(tmp_path, "--restore-wait", "0.2", "--restore-claim-limit", "0.5")
    wait_for(tmp_path / podinit.RESTORE_WAIT)
    os.rename(tmp_path / podinit.RESTORE_WAIT, tmp_path / podinit.RESTORE_CLAIMED)  # an agent that then died
    assert started_cold(tmp_path)
    assert "a restore claimed 0.5 s ago gave no result: starting the engine cold" in stop(init)


@pytest.mark.criu
def test_a_cgroup_hierarchy_the_agent_sees_only_in_part_is_mounted_afresh_at_its_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent in a docker container on cgroup v1 has its hierarchies mounted at its own container's
    cgroup, where a new pod's cgroup is out of sight: the restore mounts the whole hierarchy afresh (as
    criu does for itself), where the new container's cgroup.procs is reached by its full path."""
    import ctypes

    if os.geteuid() != 0:
        pytest.skip("mounting a cgroup hierarchy needs root")
    monkeypatch.setattr(snapshot, "_fresh", {})
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        tail = line.partition(" - ")[2].split()
        if tail and tail[0] in ("cgroup", "cgroup2"):
            mounts[tail[0]] = mounts.get(tail[0]) or set(tail[2].split(","))
    memory_v1 = next(
        (set(t.partition(" - ")[2].split()[2].split(",")) for t in Path("/proc/self/mountinfo").read_text().splitlines()
         if t.partition(" - ")[2].startswith("cgroup ") and "memory" in t.partition(" - ")[2].split()[2].split(",")),
        None,
    )  # fmt: skip
    if memory_v1 is not None:
        options, v2, mine = memory_v1, False, _own_cgroup(lambda ctl: "memory" in ctl.split(","))
    elif "cgroup2" in mounts:
        options, v2, mine = mounts["cgroup2"], True, _own_cgroup(lambda ctl: ctl == "")
    else:
        pytest.skip("no cgroup hierarchy mounted here")
    fresh = snapshot.fresh_hierarchy(options, v2, base=tmp_path)
    try:
        assert snapshot.fresh_hierarchy(options, v2, base=tmp_path) == fresh, "mounted once"
        procs = fresh.joinpath(*Path(mine).parts[1:]) / "cgroup.procs"
        assert str(os.getpid()) in procs.read_text().split(), "this process, found by its full cgroup path"
    finally:
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(fresh), 2)  # MNT_DETACH


def _own_cgroup(hierarchy: Any) -> str:
    """This process's cgroup path in the hierarchy whose controller list `hierarchy` accepts."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if hierarchy(controllers):
            return path
    raise AssertionError("not in that hierarchy")
