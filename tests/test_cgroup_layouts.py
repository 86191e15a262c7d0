"""Process discovery, layout detection and the in-place restore on the cgroup layouts users run (issue 18).

Two kinds of trees:

- Generated, under tmp_path: a node's /proc (each process's cgroup file as the agent reads it, its
  cgroup namespace) and /sys/fs/cgroup (the directories with their cgroup.procs files) laid out as
  the kubelet and each runtime make them: docker, containerd and CRI-O; the cgroupfs and systemd
  drivers; cgroup v1, v2 and hybrid; the container in the host's or its own cgroup namespace; and the
  agent's own mountinfo naming the mounts. This machine runs cgroup v1 (hybrid) without systemd, so a
  v2-only node and a systemd-made tree exist here only this way (docs/e2e.md).
- Real, on this machine (root): simulated pods (hibernate.localnode.simpod) in real cgroups named as
  each runtime names them, with and without a cgroup namespace of their own, found by the agent's
  discovery, their layout told from the real mounts, and checkpointed and restored in place by real
  CRIU into the same cgroups and the same cgroup namespace.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hibernate.agent import cgroups, criu, discovery, layout
from hibernate.localnode.simpod import SimPod

UID = "8f2b6c1e-3d4a-4b5c-9e7f-0a1b2c3d4e5f"
ENGINE = "a" * 64
PAUSE = "b" * 64
V1 = ("cpu,cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "net_cls,net_prio", "hugetlb")
RUNTIMES = ("docker", "containerd", "cri-o")
SCHEME = {"docker": "docker://", "containerd": "containerd://", "cri-o": "cri-o://"}
DRIVERS = ("cgroupfs", "systemd")
VERSIONS = ("v1", "v2", "hybrid")
QOS = ("BestEffort", "Burstable", "Guaranteed")


def pod_cgroup(driver: str, qos: str, uid: str = UID) -> str:
    """The pod's cgroup as the kubelet names it."""
    if driver == "cgroupfs":
        return "/kubepods" + ("" if qos == "Guaranteed" else f"/{qos.lower()}") + f"/pod{uid}"
    u = uid.replace("-", "_")
    if qos == "Guaranteed":
        return f"/kubepods.slice/kubepods-pod{u}.slice"
    q = qos.lower()
    return f"/kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice"


def leaf(runtime: str, driver: str, cid: str) -> str:
    """The container's cgroup below the pod's, as the runtime names it."""
    if driver == "cgroupfs":
        return f"crio-{cid}" if runtime == "cri-o" else cid
    return {
        "docker": f"docker-{cid}.scope",
        "containerd": f"cri-containerd-{cid}.scope",
        "cri-o": f"crio-{cid}.scope",
    }[runtime]


class Node:
    """A node's /proc and /sys/fs/cgroup under a temporary directory, for the agent's eyes."""

    def __init__(self, root: Path, version: str) -> None:
        self.proc = root / "proc"
        self.cg = root / "sys" / "fs" / "cgroup"
        self.version = version
        # (controllers as /proc/<pid>/cgroup lists them, mount point, mount options)
        self.hierarchies: list[tuple[str, Path, str]] = []
        if version in ("v1", "hybrid"):
            self.hierarchies += [(c, self.cg / c, f"rw,{c}") for c in V1]
            self.hierarchies.append(("name=systemd", self.cg / "systemd", "rw,xattr,name=systemd"))
        if version == "v2":
            self.hierarchies.append(("", self.cg, "rw,nsdelegate,memory_recursiveprot"))
        if version == "hybrid":
            self.hierarchies.append(("", self.cg / "unified", "rw,nsdelegate"))
        lines = []
        for n, (controllers, mount, options) in enumerate(self.hierarchies):
            fstype = "cgroup2" if not controllers else "cgroup"
            lines.append(
                f"{30 + n} 25 0:{40 + n} / {mount} rw,nosuid,nodev,noexec shared:{n} - {fstype} cgroup {options}"
            )
            mount.mkdir(parents=True, exist_ok=True)
        (self.proc / "self" / "ns").mkdir(parents=True)
        (self.proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")
        (root / "cgns-host").write_text("")
        (self.proc / "self" / "ns" / "cgroup").symlink_to(root / "cgns-host")
        self.root = root

    def add(
        self,
        pid: int,
        path: str,
        *,
        ppid: int = 1,
        comm: str = "python3",
        cmdline: tuple[str, ...] = ("python3",),
        nspid: tuple[int, ...] | None = None,
        own_cgroupns: bool = False,
        seen_as: str | None = None,
    ) -> None:
        """A process in cgroup `path` of every hierarchy; /proc/<pid>/cgroup shows `seen_as` instead
        where the agent's own cgroup namespace makes it look different."""
        for _, mount, _ in self.hierarchies:
            d = mount.joinpath(*[p for p in path.split("/") if p])
            d.mkdir(parents=True, exist_ok=True)
            with (d / "cgroup.procs").open("a") as f:
                f.write(f"{pid}\n")
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0\n")
        ns = " ".join(str(n) for n in (nspid or (pid,)))
        (d / "status").write_text(f"Name:\t{comm}\nPid:\t{pid}\nNSpid:\t{ns}\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        shown = seen_as if seen_as is not None else path
        lines = [f"{i}:{c}:{shown}" for i, (c, _, _) in enumerate(self.hierarchies, start=1) if c]
        if any(not c for c, _, _ in self.hierarchies):
            lines.append(f"0::{shown}")
        (d / "cgroup").write_text("\n".join(lines) + "\n")
        if own_cgroupns:
            (self.root / f"cgns-{pid}").write_text("")
            (d / "ns" / "cgroup").symlink_to(self.root / f"cgns-{pid}")
        else:
            (d / "ns" / "cgroup").symlink_to(self.root / "cgns-host")

    def pod(
        self, runtime: str, driver: str, qos: str, own_cgroupns: bool = False, seen_from: str | None = None
    ) -> str:
        """A pod as the runtime runs it: the sandbox (pause), the engine container (the hibernate init,
        the engine, its worker), CRI-O's conmon beside them; returns the engine container's cgroup."""
        pod = pod_cgroup(driver, qos)
        engine = f"{pod}/{leaf(runtime, driver, ENGINE)}"

        def seen(path: str) -> str | None:
            return None if seen_from is None else seen_from + path

        self.add(
            90,
            f"{pod}/{leaf(runtime, driver, PAUSE)}",
            comm="pause",
            cmdline=("/pause",),
            nspid=(90, 1),
            own_cgroupns=own_cgroupns,
            seen_as=seen(f"{pod}/{leaf(runtime, driver, PAUSE)}"),
        )
        init = ("python3", "-m", "hibernate.podinit")
        for pid, ppid, comm, cmd, ns in (
            (100, 60, "python3", init, 1),
            (101, 100, "vllm", ("vllm", "serve"), 7),
            (102, 101, "EngineCore", ("python3",), 9),
        ):
            self.add(
                pid,
                engine,
                ppid=ppid,
                comm=comm,
                cmdline=cmd,
                nspid=(pid, ns),
                own_cgroupns=own_cgroupns,
                seen_as=seen(engine),
            )
        if runtime == "cri-o":
            conmon = f"crio-conmon-{ENGINE}.scope" if driver == "systemd" else f"crio-conmon-{ENGINE}"
            self.add(
                60, f"{pod}/{conmon}", comm="conmon", cmdline=("conmon",), seen_as=seen(f"{pod}/{conmon}")
            )
        self.add(7, "/system.slice/containerd.service", comm="containerd", cmdline=("containerd",))
        return engine


def combos() -> Iterator[tuple[str, str, str, str, bool]]:
    qos = itertools.cycle(QOS)
    for runtime, driver, version, own in itertools.product(RUNTIMES, DRIVERS, VERSIONS, (False, True)):
        yield runtime, driver, version, next(qos), own


@pytest.mark.parametrize(("runtime", "driver", "version", "qos", "own_ns"), list(combos()))
def test_every_layout_found_and_named(
    tmp_path: Path, runtime: str, driver: str, version: str, qos: str, own_ns: bool
) -> None:
    node = Node(tmp_path, version)
    path = node.pod(runtime, driver, qos, own_cgroupns=own_ns)
    cid = SCHEME[runtime] + ENGINE
    procs = discovery.container_processes(UID, cid, node.proc)
    assert [p.pid for p in procs] == [100, 101, 102]
    root = discovery.engine_root(procs)
    assert root.init.pid == 100 and root.root.pid == 101
    # conmon is CRI-O's monitor, not the pod's; the pause container is the pod's, not the engine's.
    assert [p.pid for p in discovery.pod_processes(UID, node.proc)] == [90, 100, 101, 102]

    found = layout.detect(root.root, cid, node.proc)
    assert (found.version, found.driver, found.runtime, found.qos) == (version, driver, runtime, qos)
    assert found.naming == leaf(runtime, driver, "<id>") and found.path == path
    assert found.namespace == ("own" if own_ns else "host") and found.view == "proc"
    # The host's tree lists the engine in every hierarchy the agent mounts.
    assert len(found.listed) == len(node.hierarchies) and found.looked == ()
    assert all(p.startswith(str(node.cg)) and p.endswith("/cgroup.procs") for p in found.listed)
    words = found.describe()
    assert f"cgroup {version}, {driver} driver, {runtime} ({found.naming}), {qos} pod" in words
    assert found.report() == {
        "version": version,
        "driver": driver,
        "runtime": runtime,
        "qos": qos,
        "namespace": found.namespace,
        "path": path,
        "host": f"{len(node.hierarchies)}/{len(node.hierarchies)}",
    }


def test_a_bare_id_is_docker_or_containerd_by_the_scheme(tmp_path: Path) -> None:
    node = Node(tmp_path, "v1")
    node.pod("containerd", "cgroupfs", "Burstable")
    engine = discovery.container_processes(UID, ENGINE, node.proc)[1]
    assert layout.detect(engine, "containerd://" + ENGINE, node.proc).runtime == "containerd"
    assert layout.detect(engine, "docker://" + ENGINE, node.proc).runtime == "docker"
    assert layout.detect(engine, None, node.proc).runtime == "docker or containerd"


def test_the_node_mounts_read_from_mountinfo(tmp_path: Path) -> None:
    for version, count in (("v1", 10), ("v2", 1), ("hybrid", 11)):
        node = Node(tmp_path / version, version)
        found = cgroups.hierarchies(node.proc)
        assert len(found) == count and cgroups.version(found) == version
    text = "36 25 0:31 /kubepods/pod1/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    (h,) = cgroups.parse_mountinfo(text)
    assert h.v2 and h.root == "/kubepods/pod1/abc"
    # A namespaced mount shows only its part of the tree.
    assert h.directory("/kubepods/pod1/abc/x") == Path("/sys/fs/cgroup/x")
    assert h.directory("/kubepods/pod2") is None and h.directory("/../../kubepods/pod1") is None
    assert cgroups.version([]) == "none"


def test_agent_in_its_own_cgroup_namespace_sees_relative_paths(tmp_path: Path) -> None:
    """An agent whose cgroup namespace is rooted elsewhere reads `/../../kubepods.slice/...`: the pod
    is found, the layout named, and the host check says why it could not look (not a refusal)."""
    node = Node(tmp_path, "v2")
    node.pod("containerd", "systemd", "Burstable", own_cgroupns=True, seen_from="/../..")
    procs = discovery.container_processes(UID, "containerd://" + ENGINE, node.proc)
    assert [p.pid for p in procs] == [100, 101, 102]
    found = layout.detect(procs[1], "containerd://" + ENGINE, node.proc)
    assert (found.driver, found.runtime, found.view) == ("systemd", "containerd", "relative")
    assert found.listed == () and "not under the agent's mount" in found.looked[0]
    assert "relative to the agent's own cgroup namespace" in found.describe()


def test_proc_showing_slash_is_not_trusted_the_host_tree_is_read(tmp_path: Path) -> None:
    """Where /proc/<pid>/cgroup says just "/" (a reader inside the container's own cgroup namespace),
    the pod's processes are read from the host's tree through the agent's mounts."""
    node = Node(tmp_path, "v2")
    path = node.pod("containerd", "systemd", "BestEffort", own_cgroupns=True, seen_from="")
    for pid in (90, 100, 101, 102):  # every line "0::/"
        (node.proc / str(pid) / "cgroup").write_text("0::/\n")
    procs = discovery.container_processes(UID, "containerd://" + ENGINE, node.proc)
    assert [p.pid for p in procs] == [100, 101, 102] and procs[0].cgroup == path
    found = layout.detect(procs[1], "containerd://" + ENGINE, node.proc)
    assert (found.path, found.view, found.listed) == (
        path,
        "tree",
        (str(node.cg.joinpath(*path.split("/")[1:], "cgroup.procs")),),
    )


def test_agent_in_a_v1_container_reads_the_host_tree_through_pid_1(tmp_path: Path) -> None:
    """On cgroup v1 a container's /sys/fs/cgroup/<controller> shows only its own cgroup (runc's bind
    mounts; no cgroup2 at all), privileged or not: what a containerd or docker agent pod has. The
    host's tree is read through the node's init instead (hostPID: /proc/1/root, /proc/1/mountinfo)."""
    node = Node(tmp_path, "hybrid")
    path = node.pod("containerd", "cgroupfs", "Burstable")
    agent_cg = "/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/" + "c" * 64
    mine = [
        f"{40 + n} 30 0:{50 + n} {agent_cg} /sys/fs/cgroup/{c} ro,nosuid - cgroup cgroup {o}"
        for n, (c, _, o) in enumerate(node.hierarchies)
        if c
    ]
    host = (node.proc / "self" / "mountinfo").read_text().replace(str(node.root), "")
    (node.proc / "self" / "mountinfo").write_text("\n".join(mine) + "\n")
    (node.proc / "1").mkdir()
    (node.proc / "1" / "mountinfo").write_text(host)
    (node.proc / "1" / "root").symlink_to(node.root)
    found = cgroups.hierarchies(node.proc)
    assert cgroups.version(found) == "hybrid" and len(found) == len(node.hierarchies)
    assert all(
        str(h.mount).startswith(str(node.proc / "1" / "root" / "sys" / "fs" / "cgroup")) for h in found
    )
    engine = discovery.container_processes(UID, "containerd://" + ENGINE, node.proc)[1]
    layout_found = layout.detect(engine, "containerd://" + ENGINE, node.proc)
    assert layout_found.version == "hybrid" and len(layout_found.listed) == len(node.hierarchies)
    assert layout_found.path == path
    # PID 1's root unreadable (EACCES: ptrace rights over the node's init, which a container with
    # fewer capabilities lacks on some kernels; here: gone), or without PID 1's mounts (no hostPID):
    # the agent keeps its own view, and says what it could not see.
    (node.proc / "1" / "root").unlink()
    (node.proc / "1" / "root").symlink_to(tmp_path / "not-there")
    assert cgroups.hierarchies(node.proc)[0].mount == Path("/sys/fs/cgroup") / node.hierarchies[0][0]
    (node.proc / "1" / "mountinfo").write_text("")
    layout_found = layout.detect(engine, "containerd://" + ENGINE, node.proc)
    assert layout_found.listed == () and "not under the agent's mount" in layout_found.looked[0]


def test_hybrid_v1_agent_reads_the_same_pod_through_any_hierarchy(tmp_path: Path) -> None:
    node = Node(tmp_path, "hybrid")
    node.pod("cri-o", "cgroupfs", "Guaranteed")
    for pid in (90, 100, 101, 102):
        (node.proc / str(pid) / "cgroup").write_text("".join(f"{i}:{c}:/\n" for i, c in enumerate(V1, 1)))
    procs = discovery.container_processes(UID, "cri-o://" + ENGINE, node.proc)
    assert [p.pid for p in procs] == [100, 101, 102]
    assert layout.detect(procs[0], "cri-o://" + ENGINE, node.proc).naming == "crio-<id>"


@pytest.mark.parametrize("component", ["kata-" + ENGINE, "runsc-" + ENGINE + ".scope", "engine"])
def test_an_unknown_container_naming_is_refused_with_its_path(tmp_path: Path, component: str) -> None:
    node = Node(tmp_path, "v2")
    pod = pod_cgroup("systemd", "Burstable")
    node.add(101, f"{pod}/{component}", comm="vllm", nspid=(101, 1))
    (proc,) = discovery.pod_processes(UID, node.proc)
    with pytest.raises(layout.LayoutError) as e:
        layout.detect(proc, "containerd://" + ENGINE, node.proc)
    message = str(e.value)
    assert f"unknown container cgroup {component!r}" in message and f"{pod}/{component}" in message
    assert "cri-containerd-<id>.scope" in message and "crio-<id>" in message
    # discovery by the pod status's id finds nothing, and says everywhere it looked
    assert discovery.container_processes(UID, "containerd://" + ENGINE, node.proc) == []
    why = layout.explain_missing(UID, "containerd://" + ENGINE, node.proc)
    assert f"container {ENGINE}" in why and f"{pod}/{component}" in why and "processes read" in why
    assert str(node.cg / pod.strip("/")) in why


def test_a_process_in_the_pod_cgroup_itself_is_refused(tmp_path: Path) -> None:
    node = Node(tmp_path, "v1")
    pod = pod_cgroup("cgroupfs", "BestEffort")
    node.add(101, pod, comm="vllm")
    (proc,) = discovery.pod_processes(UID, node.proc)
    with pytest.raises(layout.LayoutError, match="not in a container's cgroup below the pod's"):
        layout.detect(proc, None, node.proc)


def test_proc_contradicted_by_the_host_tree_is_refused(tmp_path: Path) -> None:
    node = Node(tmp_path, "v2")
    path = node.pod("containerd", "cgroupfs", "Burstable")
    procs_file = node.cg.joinpath(*path.split("/")[1:], "cgroup.procs")
    procs_file.write_text("100\n102\n")  # the tree does not have 101 where /proc says it is
    engine = discovery.container_processes(UID, ENGINE, node.proc)[1]
    with pytest.raises(layout.LayoutError, match=f"does not have pid 101 there: {procs_file}"):
        layout.detect(engine, "containerd://" + ENGINE, node.proc)


def test_a_pod_with_no_process_is_explained(tmp_path: Path) -> None:
    node = Node(tmp_path, "hybrid")
    node.add(7, "/system.slice/containerd.service", comm="containerd")
    why = layout.explain_missing(UID, "containerd://" + ENGINE, node.proc)
    assert why.startswith(f"no process of pod {UID} (container {ENGINE}) on this node")
    assert "/proc/*/cgroup of 1 processes read, none names pod" in why
    assert "no directory of the pod below kubepods in the agent's cgroup mounts" in why
    assert str(node.cg / "memory") in why and str(node.cg / "unified") in why


# -- real cgroups of this machine ------------------------------------------------------------------

REAL = [
    ("containerd", "cgroupfs", "kubepods/burstable/pod{uid}/{id}", False),
    ("cri-o", "cgroupfs", "kubepods/besteffort/pod{uid}/crio-{id}", False),
    (
        "containerd",
        "systemd",
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope",
        True,
    ),
    ("cri-o", "systemd", "kubepods.slice/kubepods-pod{uid_}.slice/crio-{id}.scope", True),
    (
        "docker",
        "systemd",
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{id}.scope",
        False,
    ),
]
SLEEPER = "import time\nwhile True: time.sleep(1)\n"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups, namespaces)")
    if not cgroups.hierarchies():
        pytest.skip("no cgroup hierarchy mounted")


@pytest.mark.parametrize(("runtime", "driver", "template", "own_ns"), REAL)
def test_real_pod_in_each_layout(runtime: str, driver: str, template: str, own_ns: bool) -> None:
    need_root()
    uid = str(uuid.uuid4())
    cmd = [sys.executable, "/.hibernate/sleeper.py"]
    with SimPod.start(
        cmd, files={"sleeper.py": SLEEPER}, uid=uid, ready_path=None, cgroup_path=template, cgroupns=own_ns
    ) as pod:
        cid = SCHEME[runtime] + pod.container_id
        procs = discovery.container_processes(uid, cid)
        root = discovery.engine_root(procs)
        assert root.init.pid == pod.init_pid and root.root.pid == pod.engine_host_pid()
        found = layout.detect(root.root, cid)
        mounts = cgroups.hierarchies()
        assert (found.version, found.driver, found.runtime) == (cgroups.version(mounts), driver, runtime)
        assert found.namespace == ("own" if own_ns else "host") and found.view == "proc"
        assert len(found.listed) == len(mounts), found.looked
        # What the engine itself sees: "/" with a namespace of its own, the full path without. (Read by
        # a process in its cgroup namespace: /proc/<pid>/cgroup is relative to the reader's.)
        inside = subprocess.run(
            ["nsenter", "-t", str(root.root.pid), "-C", "cat", f"/proc/{root.root.pid}/cgroup"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert inside.endswith("::/\n") == own_ns, inside
        assert (found.path in inside) != own_ns, inside


@pytest.fixture
def bundle() -> criu.Bundle:
    need_root()
    try:
        b = criu.locate()
        criu.version(b)
    except criu.CriuError as e:
        pytest.skip(f"no usable CRIU bundle: {e}")
    if b.nsjoin is None:
        pytest.skip("the CRIU bundle has no hibernate-nsjoin.so (hack/build-criu.sh)")
    return b


@pytest.mark.criu
@pytest.mark.parametrize(("runtime", "driver", "template", "own_ns"), [REAL[0], REAL[2], REAL[3]])
def test_real_restore_in_place_keeps_cgroups_and_cgroup_namespace(
    bundle: criu.Bundle, tmp_path: Path, runtime: str, driver: str, template: str, own_ns: bool
) -> None:
    uid = str(uuid.uuid4())
    cmd = [sys.executable, "/.hibernate/sleeper.py"]
    with SimPod.start(
        cmd, files={"sleeper.py": SLEEPER}, uid=uid, ready_path=None, cgroup_path=template, cgroupns=own_ns
    ) as pod:
        cid = SCHEME[runtime] + pod.container_id
        engine = pod.engine_host_pid()
        assert engine is not None
        before = Path(f"/proc/{engine}/cgroup").read_text()
        image = criu.image_dir(tmp_path / "ckpt", "default", "pod", "engine")
        criu.dump(
            image,
            pod.engine_ns_pid(),
            criu.Pod(pod.init_pid),
            checkpoint_root=tmp_path / "ckpt",
            tcp_established=False,
        )
        assert pod.engine_host_pid() is None
        restored = criu.restore(image, criu.Pod(pod.init_pid), tcp_established=False)
        assert restored.host_pid == pod.engine_host_pid() is not None
        after = Path(f"/proc/{restored.host_pid}/cgroup").read_text()
        assert after == before, "restored into the cgroups it was dumped from"
        # The same cgroup namespace as the pod's init: criu joined it (nsjoin), no new one was made.
        init_ns = os.stat(f"/proc/{pod.init_pid}/ns/cgroup").st_ino
        assert os.stat(f"/proc/{restored.host_pid}/ns/cgroup").st_ino == init_ns
        assert (init_ns != os.stat("/proc/self/ns/cgroup").st_ino) == own_ns
        procs = discovery.container_processes(uid, cid)
        report = layout.restored("default/pod", procs, restored.host_pid, cid)
        assert report["cgroup"]["driver"] == driver and report["cgroup"]["runtime"] == runtime
        assert report["cgroup"]["namespace"] == ("own" if own_ns else "host")
