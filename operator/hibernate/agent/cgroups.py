"""The node's cgroup hierarchies as the agent has them mounted, and a container's cgroup on them.

What /proc/<pid>/cgroup names is relative to the cgroup namespace of the process that reads it:
the agent's, never the pod's. The agent checks that view against the host's own tree: the
directory of each hierarchy the agent mounts (read from the agent's /proc/self/mountinfo, not from
anything under /proc/<pid>/root, which is the pod's view and the pod's to fake) must list the
process in its cgroup.procs. Where /proc shows a pod nothing (an agent in a cgroup namespace of its
own sees paths outside it only relatively, or not at all), `find_pod_dirs` looks for the pod's
directory in that tree instead.

Filesystem only; the naming of pod and container cgroups is discovery's and layout's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

DEFAULT_PROC_ROOT: Final = "/proc"
# How deep below a hierarchy's root a pod's cgroup may sit: /kubepods/burstable/pod<uid> is 3,
# /kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/…-pod<uid>.slice is 4.
_POD_DEPTH: Final = 5
# Options of a v1 cgroup mount that name no controller.
_NOT_CONTROLLERS: Final = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods"}
)


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy mounted in the agent's mount namespace."""

    # v1: the mount's options, its controllers among them ("cpu", "cpuacct", "name=systemd");
    # v2: empty (the unified hierarchy, line `0::` of /proc/<pid>/cgroup).
    options: frozenset[str]
    mount: Path
    # The hierarchy's path shown at the mount point (mountinfo's 4th field): "/" for a full
    # view; a container's path where the mount is a namespaced or bind-mounted part of the tree.
    root: str
    unified: bool = False

    @property
    def v2(self) -> bool:
        return self.unified

    def holds(self, controllers: str) -> bool:
        """Whether this is the hierarchy of a /proc/<pid>/cgroup line's controllers field ("" for v2)."""
        if not controllers:
            return self.unified
        return not self.unified and set(controllers.split(",")) <= self.options

    @property
    def name(self) -> str:
        return (
            "cgroup2"
            if self.unified
            else ",".join(sorted(o for o in self.options if o not in _NOT_CONTROLLERS))
        )

    def directory(self, path: str) -> Path | None:
        """The directory of cgroup `path` under this mount, or None where the mount does not show it
        (a relative path from another cgroup namespace, or one outside the mount's root)."""
        if not path.startswith("/") or "/../" in f"{path}/":
            return None
        pure, root = PurePosixPath(path), PurePosixPath(self.root)
        if pure != root and root not in pure.parents:
            return None
        return self.mount.joinpath(*pure.relative_to(root).parts)


def parse_mountinfo(text: str) -> list[Hierarchy]:
    """The cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo, first mount of each hierarchy only."""
    found: list[Hierarchy] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, mount = _unescape(fields[3]), Path(_unescape(fields[4]))
        unified = tail[0] == "cgroup2"
        options = frozenset() if unified else frozenset(tail[2].split(","))
        if not any(h.unified == unified and h.options == options for h in found):
            found.append(Hierarchy(options, mount, root, unified))
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def hierarchies(proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT) -> list[Hierarchy]:
    """The cgroup hierarchies as the host has them, through the agent's own mounts where those show
    the whole tree; empty when unreadable.

    A container's cgroup mounts show only its own part of the tree on cgroup v1 (runc bind-mounts the
    container's cgroup at each /sys/fs/cgroup/<controller>, and mounts no cgroup2), even a privileged
    one. A hostPID agent then reads the host's: the mounts of PID 1 (the node's init, never a pod's
    process), through /proc/1/root. Only whole-tree mounts (root "/") are taken from there; without
    hostPID PID 1 is the agent's own init, whose mounts are the agent's, and its own are kept."""
    mine = _parse_file(Path(proc_root, "self", "mountinfo"))
    if all(h.root == "/" for h in mine):
        return mine
    init = Path(proc_root, "1")
    host = [
        Hierarchy(h.options, Path(init, "root", *h.mount.parts[1:]), h.root, h.unified)
        for h in _parse_file(init / "mountinfo")
        if h.root == "/"
    ]
    # /proc/1/root needs ptrace rights over PID 1, which a container with fewer capabilities than
    # the node's init lacks on some kernels (EACCES): then the agent's own view it is.
    if not host or not _readable(host[0].mount):
        return mine
    return host


def _readable(directory: Path) -> bool:
    try:
        os.listdir(directory)
    except OSError:
        return False
    return True


def _parse_file(path: Path) -> list[Hierarchy]:
    try:
        return parse_mountinfo(path.read_text(errors="replace"))
    except OSError:
        return []


def version(found: Sequence[Hierarchy]) -> str:
    """`v2` (only the unified hierarchy), `v1` (controllers only), `hybrid` (v1 controllers and a
    cgroup2 mount beside them, as systemd's hybrid mode and this project's CI machine have), or
    `none`."""
    v1 = any(not h.v2 for h in found)
    v2 = any(h.v2 for h in found)
    if v1 and v2:
        return "hybrid"
    return "v1" if v1 else "v2" if v2 else "none"


def _hierarchy_of(controllers: str, found: Sequence[Hierarchy]) -> Hierarchy | None:
    return next((h for h in found if h.holds(controllers)), None)


@dataclass(frozen=True)
class HostCheck:
    """Where the host's tree shows a process: the cgroup directories that list it, and every one
    that was looked at (with why not, where it does not)."""

    listed: tuple[str, ...]
    looked: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return bool(self.listed)


def host_check(pid: int, cgroup_text: str, found: Sequence[Hierarchy]) -> HostCheck:
    """Which of the cgroup directories that /proc/<pid>/cgroup (`cgroup_text`) names list `pid` in
    their cgroup.procs, through the agent's own mounts (`found`)."""
    listed: list[str] = []
    looked: list[str] = []
    for line in cgroup_text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        h = _hierarchy_of(controllers, found) if controllers or fields[0] == "0" else None
        if h is None:
            looked.append(f"{controllers or 'cgroup2'}:{path} (that hierarchy is not mounted in the agent)")
            continue
        directory = h.directory(path)
        if directory is None:
            looked.append(f"{path} (not under the agent's mount {h.mount} of {h.root})")
            continue
        procs = directory / "cgroup.procs"
        try:
            text = procs.read_text()
        except FileNotFoundError:
            looked.append(f"{procs} (missing)")
            continue
        except OSError as e:
            looked.append(f"{procs} (unreadable: {e.strerror})")
            continue
        if str(pid) in text.split():
            listed.append(str(procs))
        else:
            looked.append(f"{procs} (does not list pid {pid})")
    return HostCheck(tuple(listed), tuple(looked))


def _pids(procs: Path) -> set[int]:
    try:
        return {int(x) for x in procs.read_text().split()}
    except (OSError, ValueError):
        return set()


def find_pod_dirs(
    found: Sequence[Hierarchy], is_pod: Callable[[str], bool], depth: int = _POD_DEPTH
) -> Iterator[tuple[Hierarchy, Path]]:
    """Every directory named like the pod (`is_pod(name)`) in the agent's mounts, looking only into
    kubepods/kubelet directories, `depth` levels at most (the tree of a node is large)."""
    for h in found:
        yield from ((h, d) for d in _walk(h.mount, is_pod, depth))


def _walk(directory: Path, is_pod: Callable[[str], bool], depth: int) -> Iterator[Path]:
    if depth <= 0:
        return
    try:
        entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        if is_pod(entry.name):
            yield Path(entry.path)
        elif "kubepods" in entry.name or "kubelet" in entry.name or entry.name in ("besteffort", "burstable"):
            yield from _walk(Path(entry.path), is_pod, depth - 1)


def processes_below(
    h: Hierarchy, pod_dir: Path, proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT
) -> dict[int, str]:
    """pid → its cgroup path (as the hierarchy names it) for every process in `pod_dir` and the
    cgroups under it, read from their cgroup.procs; pids not in the agent's pid namespace (0) left out."""
    result: dict[int, str] = {}
    for directory, _, _ in os.walk(pod_dir):
        rel = Path(directory).relative_to(h.mount)
        path = str(PurePosixPath(h.root).joinpath(*rel.parts))
        for pid in _pids(Path(directory, "cgroup.procs")):
            if pid > 0 and Path(proc_root, str(pid)).exists():
                result.setdefault(pid, path)
    return result


def same_namespace(
    pid: int, other: int | str = "self", proc_root: str | os.PathLike[str] = DEFAULT_PROC_ROOT
) -> bool | None:
    """Whether `pid` is in the cgroup namespace of `other` (the agent itself by default); None when
    either cannot be read."""
    try:
        a = os.stat(Path(proc_root, str(pid), "ns", "cgroup")).st_ino
        b = os.stat(Path(proc_root, str(other), "ns", "cgroup")).st_ino
    except OSError:
        return None
    return a == b
