"""Pod UID → processes (hibernate.agent.discovery) on synthetic /proc trees and on one real cgroup."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hibernate.agent.discovery import (
    ProcessInfo,
    container_processes,
    cuda_pids,
    engine_root,
    normalize_container_id,
    parse_cgroup_path,
    parse_stat,
    pod_processes,
    process_tree,
)
from hibernate.localnode import simpod

UID = "8f2b6c1e-3d4a-4b5c-9e7f-0a1b2c3d4e5f"
OTHER_UID = "11111111-2222-3333-4444-555555555555"
ENGINE = "a" * 64
PAUSE = "b" * 64
SIDECAR = "c" * 64
V1_HIERARCHIES = (
    "cpu,cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "net_cls,net_prio",
    "perf_event",
    "hugetlb",
    "name=systemd",
)


def v1(path: str) -> str:
    """A cgroup v1 /proc/<pid>/cgroup: the same path in every hierarchy, plus the unified line."""
    lines = [f"{i}:{h}:{path}" for i, h in enumerate(V1_HIERARCHIES, start=1)]
    return "\n".join([*lines, f"0::{path}"]) + "\n"


def v2(path: str) -> str:
    return f"0::{path}\n"


def cgroupfs(uid: str, cid: str, qos: str = "besteffort") -> str:
    qos_part = "" if qos == "guaranteed" else f"/{qos}"
    return f"/kubepods{qos_part}/pod{uid}/{cid}"


def systemd(uid: str, leaf: str, qos: str = "besteffort") -> str:
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"/kubepods.slice/kubepods-pod{u}.slice/{leaf}"
    return f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/{leaf}"


class FakeProc:
    """Builds /proc/<pid>/{stat,status,cmdline,cgroup,fd/} under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self,
        pid: int,
        cgroup: str,
        *,
        ppid: int = 1,
        comm: str = "python3",
        cmdline: Sequence[str] = ("python3",),
        nspid: Sequence[int] | None = None,
        fds: Sequence[str] = (),
    ) -> None:
        d = self.root / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0\n")
        ns = " ".join(str(n) for n in (nspid or (pid,)))
        (d / "status").write_text(f"Name:\t{comm}\nState:\tS (sleeping)\nPid:\t{pid}\nNSpid:\t{ns}\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        (d / "cgroup").write_text(cgroup)
        (d / "fd").mkdir()
        for number, target in enumerate(fds):
            os.symlink(target, d / "fd" / str(number))


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def pids(procs: Sequence[ProcessInfo]) -> list[int]:
    return [p.pid for p in procs]


def add_pod(
    proc: FakeProc, make: str, init_cmd: Sequence[str] = ("python3", "-m", "hibernate.podinit")
) -> None:
    """A pod: pause (pid 90), the engine container (init 100, engine 101, its worker 102), a stranger."""
    proc.add(90, make.format(cid=PAUSE), ppid=50, comm="pause", cmdline=("/pause",), nspid=(90, 1))
    proc.add(100, make.format(cid=ENGINE), ppid=60, comm="python3", cmdline=init_cmd, nspid=(100, 1))
    proc.add(101, make.format(cid=ENGINE), ppid=100, comm="vllm", cmdline=("vllm", "serve"), nspid=(101, 7))
    proc.add(102, make.format(cid=ENGINE), ppid=101, comm="VLLM::EngineCore", nspid=(102, 9))
    proc.add(7, v1("/system.slice/containerd.service"), comm="containerd", cmdline=("containerd",))


@pytest.mark.parametrize("qos", ["besteffort", "burstable", "guaranteed"])
def test_cgroup_v1_cgroupfs_docker(proc: FakeProc, qos: str) -> None:
    add_pod(proc, v1(cgroupfs(UID, "{cid}", qos)))
    proc.add(200, v1(cgroupfs(OTHER_UID, ENGINE, qos)))  # another pod, same container id by chance

    assert pids(pod_processes(UID, proc.root)) == [90, 100, 101, 102]
    engine = container_processes(UID, f"docker://{ENGINE}", proc.root)
    assert pids(engine) == [100, 101, 102]  # the pause container has its own id
    assert all(p.pod_uid == UID and p.container_id == ENGINE for p in engine)
    assert pids(container_processes(UID, PAUSE, proc.root)) == [90]


@pytest.mark.parametrize("qos", ["besteffort", "burstable", "guaranteed"])
def test_cgroup_v2_systemd_containerd(proc: FakeProc, qos: str) -> None:
    add_pod(proc, v2(systemd(UID, "cri-containerd-{cid}.scope", qos)))

    assert pids(pod_processes(UID, proc.root)) == [90, 100, 101, 102]
    assert pids(container_processes(UID, f"containerd://{ENGINE}", proc.root)) == [100, 101, 102]
    assert container_processes(UID, f"containerd://{ENGINE}", proc.root)[0].cgroup.endswith(
        f"cri-containerd-{ENGINE}.scope"
    )


def test_systemd_docker_scope_v1(proc: FakeProc) -> None:
    add_pod(proc, v1(systemd(UID, "docker-{cid}.scope", "burstable")))
    assert pids(container_processes(UID, f"docker://{ENGINE}", proc.root)) == [100, 101, 102]


def test_crio_with_conmon_excluded(proc: FakeProc) -> None:
    add_pod(proc, v2(systemd(UID, "crio-{cid}.scope")))
    proc.add(95, v2(systemd(UID, f"crio-conmon-{ENGINE}.scope")), comm="conmon", cmdline=("/usr/bin/conmon",))
    # cgroupfs CRI-O names its cgroups the same way, without .scope.
    proc.add(96, v1(f"/kubepods/besteffort/pod{UID}/crio-conmon-{PAUSE}"), comm="conmon")

    assert pids(pod_processes(UID, proc.root)) == [90, 100, 101, 102]
    assert pids(container_processes(UID, f"cri-o://{ENGINE}", proc.root)) == [100, 101, 102]


def test_cgroup_namespace_relative_paths(proc: FakeProc) -> None:
    # What an agent in its own cgroup namespace reads for another pod's processes.
    u = UID.replace("-", "_")
    proc.add(100, v2(f"/../../kubepods-besteffort-pod{u}.slice/cri-containerd-{ENGINE}.scope"))
    proc.add(101, v2(f"/../../pod{UID}/{ENGINE}"), ppid=100)
    assert pids(container_processes(UID, ENGINE, proc.root)) == [100, 101]


def test_pod_like_names_outside_kubepods_are_ignored(proc: FakeProc) -> None:
    proc.add(100, v2(f"/user.slice/pod{UID}/{ENGINE}"))
    assert pod_processes(UID, proc.root) == []


def test_uid_accepted_in_either_form(proc: FakeProc) -> None:
    add_pod(proc, v2(systemd(UID, "cri-containerd-{cid}.scope")))
    assert pids(pod_processes(UID.replace("-", "_").upper(), proc.root)) == [90, 100, 101, 102]


def test_process_fields_and_nspid(proc: FakeProc) -> None:
    proc.add(
        4242,
        v1(cgroupfs(UID, ENGINE)),
        ppid=4200,
        comm="my (odd) name",
        cmdline=("python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"),
        nspid=(4242, 310, 8),
    )
    (info,) = pod_processes(UID, proc.root)
    assert info.pid == 4242 and info.ppid == 4200
    assert info.comm == "my (odd) name"
    assert info.cmdline == ("python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m")
    assert info.nspid == (4242, 310, 8) and info.ns_pid == 8
    assert info.container_id == ENGINE


def test_missing_nspid_and_vanished_processes(proc: FakeProc) -> None:
    proc.add(100, v1(cgroupfs(UID, ENGINE)))
    (proc.root / "100" / "status").write_text("Name:\tpython3\n")  # kernel without NSpid
    proc.add(101, v1(cgroupfs(UID, ENGINE)))
    (proc.root / "101" / "stat").unlink()  # ended between the cgroup read and the stat read
    (proc.root / "self").mkdir()  # non-numeric entries are not processes
    (info,) = pod_processes(UID, proc.root)
    assert info.nspid == (100,) and info.ns_pid == 100


def test_parse_helpers() -> None:
    assert parse_stat("12 (a) b) c) R 1 12 12 0") == ("a) b) c", 1)
    assert normalize_container_id(f"cri-o://{ENGINE.upper()}") == ENGINE
    assert normalize_container_id(f"  {ENGINE} ") == ENGINE
    match = parse_cgroup_path(systemd(UID, f"crio-conmon-{ENGINE}.scope"))
    assert match is not None and match.conmon and match.container_id is None
    pod_only = parse_cgroup_path(cgroupfs(UID, "").rstrip("/"))
    assert pod_only is not None and pod_only.container_id is None
    assert parse_cgroup_path("/system.slice/kubelet.service") is None


def test_process_tree_and_engine_root_with_init(proc: FakeProc) -> None:
    add_pod(proc, v1(cgroupfs(UID, "{cid}")))
    # `kubectl exec` into the engine container: a second top process (its parent is the shim).
    proc.add(150, v1(cgroupfs(UID, ENGINE)), ppid=60, comm="bash", cmdline=("bash",), nspid=(150, 30))
    engine = container_processes(UID, ENGINE, proc.root)

    assert pids(process_tree(100, engine)) == [100, 101, 102]
    assert pids(process_tree(101, engine)) == [101, 102]
    assert process_tree(999, engine) == []

    root = engine_root(engine)
    assert root.init.pid == 100 and not root.init_is_engine
    assert pids(root.roots) == [101] and root.root.pid == 101 and root.root.ns_pid == 7
    assert pids(root.processes) == [101, 102]


def test_engine_root_when_pid1_is_the_engine(proc: FakeProc) -> None:
    add_pod(proc, v2(systemd(UID, "cri-containerd-{cid}.scope")), init_cmd=("vllm", "serve", "m"))
    root = engine_root(container_processes(UID, ENGINE, proc.root))
    assert root.init_is_engine and root.init.pid == 100
    assert pids(root.roots) == [100] and pids(root.processes) == [100, 101, 102]


@pytest.mark.parametrize(
    "init_cmd", [("/sbin/tini", "--", "vllm"), ("python3", "/.hibernate/podinit.py", "--")]
)
def test_engine_root_recognises_inits(proc: FakeProc, init_cmd: tuple[str, ...]) -> None:
    add_pod(proc, v1(cgroupfs(UID, "{cid}")), init_cmd=init_cmd)
    assert not engine_root(container_processes(UID, ENGINE, proc.root)).init_is_engine


def test_engine_root_refuses_mixed_containers_and_ambiguous_roots(proc: FakeProc) -> None:
    add_pod(proc, v1(cgroupfs(UID, "{cid}")))
    with pytest.raises(ValueError, match="several containers"):
        engine_root(pod_processes(UID, proc.root))
    proc.add(103, v1(cgroupfs(UID, ENGINE)), ppid=100, comm="helper")
    root = engine_root(container_processes(UID, ENGINE, proc.root))
    assert pids(root.roots) == [101, 103]
    with pytest.raises(LookupError, match="one engine process"):
        _ = root.root
    with pytest.raises(LookupError):
        engine_root([])


def test_cuda_pids_counts_nvidia_devices(proc: FakeProc) -> None:
    cg = v1(cgroupfs(UID, ENGINE))
    proc.add(100, cg, fds=("/dev/null", "pipe:[1234]", "/dev/nvidiactl", "/dev/nvidia0", "socket:[99]"))
    proc.add(101, cg, fds=("/dev/null", "/dev/nvidia-uvm"))
    proc.add(102, cg, fds=("/dev/null", "/tmp/log", "anon_inode:[eventfd]"))
    proc.add(103, cg, fds=("/dev/nvidia-caps/nvidia-cap1",))
    proc.add(104, cg)
    (proc.root / "104" / "fd").rmdir()
    (proc.root / "104" / "fd").write_text("not a directory")  # unreadable fd listing: tolerated
    # 105 does not exist (ended); 100 is listed twice.
    assert cuda_pids([103, 100, 101, 102, 104, 105, 100], proc.root) == [103, 100, 101]


def test_cuda_pids_on_real_processes() -> None:
    # A fresh `sleep` holds no NVIDIA device. (Not our own process: on a GPU machine the CUDA
    # tests in the same run have loaded the driver here, which opens /dev/nvidiactl.)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert cuda_pids([child.pid]) == []
    finally:
        child.kill()
        child.wait()
    assert cuda_pids([2**22 + 12345]) == []  # above pid_max: cannot exist


# ---- a real cgroup and a real process ------------------------------------------------------


def _cgroup_base() -> Path | None:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # cgroup v2 mounted at the top
        return root
    for controller in ("pids", "memory", "cpu"):  # cgroup v1: any hierarchy will do
        if (root / controller / "cgroup.procs").exists():
            return root / controller
    return None


@pytest.fixture
def real_pod_cgroup() -> Iterator[tuple[str, str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a cgroup")
    base = _cgroup_base()
    if base is None:
        pytest.skip("no writable cgroup hierarchy found under /sys/fs/cgroup")
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    leaf = base / "kubepods" / "besteffort" / f"pod{uid}" / cid
    created: list[Path] = []
    try:
        # Made as a simulated pod makes its cgroup: another test session on the host (a pytest-xdist
        # worker) may make or remove the shared parents (kubepods, besteffort) meanwhile.
        simpod._make_cgroup(base, leaf.relative_to(base), created)
    except OSError as exc:
        _remove_cgroups(created)
        pytest.skip(f"cgroups are not writable here ({base}): {exc}")
    try:
        yield uid, cid, leaf
    finally:
        _remove_cgroups(created)


def _remove_cgroups(created: list[Path]) -> None:
    for directory in reversed(created):
        for _ in range(50):  # a just-reaped task can keep a cgroup busy for a moment
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if any(p.is_dir() for p in directory.iterdir()):
                    break  # a shared parent that another session's pods use now: theirs to remove
                time.sleep(0.05)


def test_real_process_in_a_real_pod_cgroup(real_pod_cgroup: tuple[str, str, Path]) -> None:
    uid, cid, leaf = real_pod_cgroup
    child = subprocess.Popen(["sleep", "60"])
    try:
        try:
            (leaf / "cgroup.procs").write_text(f"{child.pid}\n")
        except OSError as exc:
            pytest.skip(f"cannot move a process into {leaf}: {exc}")
        found = pod_processes(uid)
        assert pids(found) == [child.pid]
        (info,) = found
        assert info.comm == "sleep" and info.cmdline == ("sleep", "60")
        assert info.ppid == os.getpid() and info.nspid[0] == child.pid
        assert info.container_id == cid and info.pod_uid == uid
        assert pids(container_processes(uid, f"docker://{cid}")) == [child.pid]
        assert container_processes(uid, "containerd://" + "0" * 64) == []
        assert cuda_pids([child.pid]) == []
    finally:
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
    assert pod_processes(uid) == []
