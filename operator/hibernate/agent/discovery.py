"""Pod UID → host processes, read from /proc (design.md, "Components": node agent).

The agent runs privileged with hostPID, so /proc shows every process of the node. A pod's
processes are found by the cgroup that the kubelet makes for the pod UID. The cgroup's name
depends on the cgroup driver (cgroupfs or systemd), the cgroup version and the runtime
(docker, containerd, CRI-O), so every naming is parsed here:

    cgroupfs: /kubepods[/besteffort|/burstable]/pod<uid>/<container>
    systemd:  /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<container>
    container: <id> | docker-<id>.scope | cri-containerd-<id>.scope | crio-<id>.scope | libpod-<id>.scope
    CRI-O's conmon (crio-conmon-<id>) is the runtime's monitor, not part of the pod, and is left out.

Paths are matched by their components anywhere in the line, so the relative paths a
process in another cgroup namespace sees (`0::/../../kubepods-...slice/...`) match too. Where
/proc shows no cgroup of the pod at all (an agent inside a cgroup namespace of its own sees "/"), the
pod's directory is looked for in the host's cgroup tree through the agent's own mounts
(agent/cgroups.py), never through the pod's. agent/layout.py names the layout in words.
Everything here only reads /proc and /sys/fs/cgroup; `proc_root` lets tests point it at a synthetic
tree (whose self/mountinfo names the cgroup mounts).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hibernate.agent import cgroups

DEFAULT_PROC_ROOT: Final = "/proc"

# The pod component: cgroupfs keeps the UID's dashes, systemd slices turn them into underscores
# because a dash is systemd's slice separator.
_CGROUPFS_POD: Final = re.compile(r"^pod(?P<uid>[0-9a-fA-F-]+)$")
_SYSTEMD_POD: Final = re.compile(
    r"^(?:.*-)?kubepods(?:-besteffort|-burstable|-guaranteed)?-pod(?P<uid>[0-9a-fA-F_]+)\.slice$"
)
_CONMON: Final = re.compile(r"^crio-conmon-")
# Runtime prefixes of the container component; what is left after prefix and ".scope" is the id.
_CONTAINER_PREFIXES: Final = ("cri-containerd-", "containerd-", "docker-", "crio-", "cri-o-", "libpod-")
# Schemes of `status.containerStatuses[].containerID`.
_ID_SCHEMES: Final = ("docker://", "containerd://", "cri-o://", "crio://")

# Process names of the small inits a container may run as PID 1 in front of the engine. The
# operator's own init (design.md, level 4) is matched by the "hibernate" + "init" rule below.
KNOWN_INITS: Final = frozenset({"tini", "tini-static", "dumb-init", "catatonit", "hibernate-init"})


@dataclass(frozen=True)
class ProcessInfo:
    """One process of a pod as the agent sees it (host pid namespace)."""

    pid: int
    ppid: int
    comm: str
    cmdline: tuple[str, ...]
    pod_uid: str
    # None for a process directly in the pod's cgroup (no container component).
    container_id: str | None
    # Pids from the agent's pid namespace inwards (/proc/<pid>/status NSpid): the first is the
    # host pid, the last is the pid inside the container, which CRIU's `-t` wants.
    nspid: tuple[int, ...]
    cgroup: str

    @property
    def ns_pid(self) -> int:
        """The pid inside the process's own (innermost) pid namespace."""
        return self.nspid[-1] if self.nspid else self.pid


@dataclass(frozen=True)
class CgroupMatch:
    pod_uid: str
    container_id: str | None
    conmon: bool
    path: str


@dataclass(frozen=True)
class EngineRoot:
    """The engine part of one container's process tree."""

    # The container's top process: its PID 1 in its own pid namespace.
    init: ProcessInfo
    # True when PID 1 is the engine itself (no init in front of it).
    init_is_engine: bool
    # The roots of the engine: the init's children, or (init,) when init_is_engine.
    roots: tuple[ProcessInfo, ...]
    # Every process of the engine: the roots and all their descendants, parents first.
    processes: tuple[ProcessInfo, ...]

    @property
    def root(self) -> ProcessInfo:
        """The single engine root (what CRIU dumps); an error when the init has several children."""
        if len(self.roots) != 1:
            pids = [p.pid for p in self.roots]
            raise LookupError(f"expected one engine process under init {self.init.pid}, found {pids}")
        return self.roots[0]


def normalize_pod_uid(uid: str) -> str:
    """Lower case with dashes, whichever form (systemd underscores) it came in."""
    return uid.strip().lower().replace("_", "-")


def normalize_container_id(container_id: str) -> str:
    """Strip the `docker://` / `containerd://` / `cri-o://` scheme of the pod status, if any."""
    text = container_id.strip()
    for scheme in _ID_SCHEMES:
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    return text.lower()


def parse_cgroup_path(path: str) -> CgroupMatch | None:
    """The pod UID and container id named by one cgroup path, or None for a non-pod cgroup."""
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate(parts):
        found = _SYSTEMD_POD.match(part)
        # A bare `pod<uid>` counts only below a kubepods cgroup (`/kubepods`, or `/kubelet/kubepods`
        # with a kubelet --cgroup-root), so that no unrelated cgroup named pod... is taken for a pod.
        # Seen from inside another cgroup namespace the path is relative (`/../../pod<uid>/<id>`).
        if found is None and any("kubepods" in p or p == ".." for p in parts[:index]):
            found = _CGROUPFS_POD.match(part)
        if found is None:
            continue
        uid = normalize_pod_uid(found.group("uid"))
        if index + 1 >= len(parts):
            return CgroupMatch(uid, None, conmon=False, path=path)
        child = parts[index + 1]
        if _CONMON.match(child):
            return CgroupMatch(uid, None, conmon=True, path=path)
        return CgroupMatch(uid, _container_id_of(child), conmon=False, path=path)
    return None


def _container_id_of(component: str) -> str:
    name = component.removesuffix(".scope")
    for prefix in _CONTAINER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].lower()
    return name.lower()


def parse_cgroup_file(text: str) -> CgroupMatch | None:
    """The pod match of a whole /proc/<pid>/cgroup file.

    cgroup v1 lists one line per hierarchy and v2 one `0::` line; the kubelet makes the pod's
    cgroup in every hierarchy, so the first line naming a pod decides, but a line that also names
    the container is preferred (a v1 hierarchy the runtime did not place the container in, such as
    name=systemd on some hosts, shows only the pod).
    """
    best: CgroupMatch | None = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        match = parse_cgroup_path(fields[2])
        if match is None:
            continue
        if match.conmon or match.container_id is not None:
            return match
        if best is None:
            best = match
    return best


def pod_processes(pod_uid: str, proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT) -> list[ProcessInfo]:
    """Every process in the pod's cgroup (the sandbox/pause container included, conmon not), by pid."""
    uid = normalize_pod_uid(pod_uid)
    # A cheap substring test before parsing: /proc holds hundreds of processes, few of them ours.
    needles = (uid, uid.replace("-", "_"))
    result: list[ProcessInfo] = []
    for pid_dir in _pid_dirs(Path(proc_root)):
        text = _read_text(pid_dir / "cgroup")
        if text is None or not any(n in text.lower() for n in needles):
            continue
        match = parse_cgroup_file(text)
        if match is None or match.conmon or match.pod_uid != uid:
            continue
        info = _read_process(pid_dir, match)
        if info is not None:
            result.append(info)
    if not result:
        result = _from_host_tree(uid, Path(proc_root))
    return sorted(result, key=lambda p: p.pid)


def _from_host_tree(uid: str, proc_root: Path) -> list[ProcessInfo]:
    """The pod's processes read from the host's cgroup tree (its cgroup.procs files, through the
    agent's own mounts), for when /proc/<pid>/cgroup names no cgroup of the pod: what an agent in a
    cgroup namespace of its own sees there is relative to that namespace, or just "/"."""

    def is_pod(name: str) -> bool:
        match = parse_cgroup_path(f"/kubepods/{name}")
        return match is not None and match.pod_uid == uid and match.container_id is None

    result: list[ProcessInfo] = []
    for hierarchy, pod_dir in cgroups.find_pod_dirs(cgroups.hierarchies(proc_root), is_pod):
        for pid, path in cgroups.processes_below(hierarchy, pod_dir, proc_root).items():
            match = parse_cgroup_path(path)
            if match is None or match.conmon or any(p.pid == pid for p in result):
                continue
            info = _read_process(proc_root / str(pid), CgroupMatch(uid, match.container_id, False, path))
            if info is not None:
                result.append(info)
        if result:  # one hierarchy that has them is enough (v1 lists them in every one)
            break
    return result


def container_processes(
    pod_uid: str, container_id: str, proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT
) -> list[ProcessInfo]:
    """The processes of one container of the pod; `container_id` with or without its scheme."""
    wanted = normalize_container_id(container_id)
    return [p for p in pod_processes(pod_uid, proc_root) if p.container_id == wanted]


def process_tree(root_pid: int, procs: Iterable[ProcessInfo]) -> list[ProcessInfo]:
    """`root_pid` and all its descendants among `procs`, parents before children.

    Empty when root_pid is not among procs (it may have exited since the scan).
    """
    by_pid = {p.pid: p for p in procs}
    if root_pid not in by_pid:
        return []
    children = _children_index(by_pid.values())
    result: list[ProcessInfo] = []
    queue = [by_pid[root_pid]]
    seen: set[int] = set()
    while queue:
        proc = queue.pop(0)
        if proc.pid in seen:  # pid reuse between reads could make a cycle
            continue
        seen.add(proc.pid)
        result.append(proc)
        queue.extend(children.get(proc.pid, []))
    return result


def looks_like_init(proc: ProcessInfo) -> bool:
    """Whether a container's PID 1 is a small init in front of the engine rather than the engine."""
    names = {proc.comm}
    if proc.cmdline:
        names.add(os.path.basename(proc.cmdline[0]))
    if names & KNOWN_INITS:
        return True
    # The operator's python init (`python -m hibernate.<...>init` or a hibernate-init script).
    return any("hibernate" in arg and "init" in arg for arg in proc.cmdline[:3])


def engine_root(
    procs: Sequence[ProcessInfo], is_init: Callable[[ProcessInfo], bool] = looks_like_init
) -> EngineRoot:
    """Split one container's processes into its init and the engine tree under it.

    The container's init is its PID 1 in its own pid namespace; where the pod shares one pid
    namespace (the pause container is PID 1), it is the container's topmost process instead.
    If the init is a known init (`is_init`), its children are the engine; otherwise the init is
    the engine. Processes from several containers are refused: pass container_processes().
    """
    containers = {p.container_id for p in procs}
    if len(containers) > 1:
        names = sorted(map(str, containers))
        raise ValueError(f"processes of several containers {names}: pass one container's processes")
    if not procs:
        raise LookupError("no processes: the container is not running")
    pids = {p.pid for p in procs}
    # Processes started by `kubectl exec` also have a parent outside the container (the shim);
    # PID 1 in the namespace wins, then the oldest (lowest pid, pids rarely wrap on a node).
    tops = sorted((p for p in procs if p.ppid not in pids), key=lambda p: (p.ns_pid != 1, p.pid))
    init = tops[0] if tops else min(procs, key=lambda p: p.pid)
    tree = process_tree(init.pid, procs)
    if not is_init(init):
        return EngineRoot(init=init, init_is_engine=True, roots=(init,), processes=tuple(tree))
    roots = tuple(sorted((p for p in procs if p.ppid == init.pid), key=lambda p: p.pid))
    engine = tuple(p for p in tree if p.pid != init.pid)
    return EngineRoot(init=init, init_is_engine=False, roots=roots, processes=engine)


def cuda_pids(pids: Iterable[int], proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT) -> list[int]:
    """The pids (in the given order) that hold a /dev/nvidia* device open.

    Every CUDA process holds /dev/nvidiactl and /dev/nvidia-uvm, and /dev/nvidia<N> for its GPUs.
    An NVML-only process (nvidia-smi, a monitoring thread) holds /dev/nvidiactl too without a CUDA
    context, so callers that need a context can check the driver's state of each pid as well.
    Processes that end, or whose fds we may not read, count as not holding the GPU.
    """
    root = Path(proc_root)
    result: list[int] = []
    seen: set[int] = set()
    for pid in pids:
        if pid in seen:
            continue
        seen.add(pid)
        if _holds_nvidia_device(root / str(pid) / "fd"):
            result.append(pid)
    return result


def _holds_nvidia_device(fd_dir: Path) -> bool:
    try:
        entries = list(os.scandir(fd_dir))
    except OSError:  # vanished, not a process, or no permission
        return False
    for entry in entries:
        try:
            target = os.readlink(entry.path)
        except OSError:  # the fd closed since the listing, or permission denied
            continue
        if target.startswith("/dev/nvidia"):
            return True
    return False


def _pid_dirs(proc_root: Path) -> Iterator[Path]:
    try:
        names = os.listdir(proc_root)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield proc_root / name


def _read_text(path: Path) -> str | None:
    # /proc files vanish with their process and some are unreadable; either way: skip it.
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, ppid) from /proc/<pid>/stat; comm may hold spaces and parentheses, so split at the last ')'."""
    start = text.index("(")
    end = text.rindex(")")
    comm = text[start + 1 : end]
    fields = text[end + 1 :].split()
    # fields[0] is the state, fields[1] the ppid.
    return comm, int(fields[1])


def parse_nspid(status_text: str) -> tuple[int, ...]:
    """The NSpid line of /proc/<pid>/status (older kernels lack it: empty)."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            return tuple(int(x) for x in line.split()[1:])
    return ()


def _read_process(pid_dir: Path, match: CgroupMatch) -> ProcessInfo | None:
    stat = _read_text(pid_dir / "stat")
    if stat is None:
        return None
    try:
        comm, ppid = parse_stat(stat)
    except (ValueError, IndexError):
        return None
    raw_cmdline = _read_bytes(pid_dir / "cmdline") or b""
    cmdline = tuple(a.decode("utf-8", "replace") for a in raw_cmdline.split(b"\0") if a)
    status = _read_text(pid_dir / "status") or ""
    pid = int(pid_dir.name)
    return ProcessInfo(
        pid=pid,
        ppid=ppid,
        comm=comm,
        cmdline=cmdline,
        pod_uid=match.pod_uid,
        container_id=match.container_id,
        nspid=parse_nspid(status) or (pid,),
        cgroup=match.path,
    )


def _children_index(procs: Iterable[ProcessInfo]) -> dict[int, list[ProcessInfo]]:
    children: dict[int, list[ProcessInfo]] = {}
    for proc in sorted(procs, key=lambda p: p.pid):
        children.setdefault(proc.ppid, []).append(proc)
    return children
