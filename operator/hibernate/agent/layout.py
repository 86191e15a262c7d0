"""Which cgroup layout a pod's container is in, told in words, or refused with what was looked at.

The kubelet names the pod's cgroup after its cgroup driver and the pod's QoS class; the runtime names
the container's cgroup inside it:

| runtime    | driver   | the container's cgroup (cgroup v1: in every hierarchy; v2: the one)                  |
|------------|----------|--------------------------------------------------------------------------------------|
| docker     | cgroupfs | /kubepods/<qos>/pod<uid>/<id>                                                        |
| containerd | cgroupfs | /kubepods/<qos>/pod<uid>/<id>                                                        |
| CRI-O      | cgroupfs | /kubepods/<qos>/pod<uid>/crio-<id>                                                   |
| docker     | systemd  | /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/docker-<id>.scope |
| containerd | systemd  | /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope |
| CRI-O      | systemd  | /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/crio-<id>.scope   |

Guaranteed pods have no <qos> level; <uid_> is the UID with underscores for dashes (a dash is
systemd's separator); a kubelet --cgroup-root puts all of it below another cgroup (kind:
/kubelet.slice/kubelet-kubepods.slice/...). containerd and CRI-O give a container a cgroup namespace
of its own on cgroup v2, where it sees "/" as its cgroup; the agent reads every path from its own
side (agent/cgroups.py). A bare <id> is docker's or containerd's: the pod status's containerID scheme
says which.

`detect` names the layout of one process; the agent logs it and puts it in the last-operation of
every level-4 dump and restore (`cgroup`). A container whose cgroup is named otherwise is refused
(LayoutError, with the paths looked at): a tree could not be put back into cgroups the agent cannot
place.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hibernate.agent import cgroups, discovery

_ID: Final = r"(?P<id>[0-9a-f]{12,64})"
# (naming, runtime or None where the id alone does not say, driver the naming belongs to)
NAMINGS: Final = (
    (re.compile(rf"^cri-containerd-{_ID}\.scope$"), "containerd", "systemd", "cri-containerd-<id>.scope"),
    (re.compile(rf"^crio-{_ID}\.scope$"), "cri-o", "systemd", "crio-<id>.scope"),
    (re.compile(rf"^docker-{_ID}\.scope$"), "docker", "systemd", "docker-<id>.scope"),
    (re.compile(rf"^crio-{_ID}$"), "cri-o", "cgroupfs", "crio-<id>"),
    (re.compile(rf"^{_ID}$"), None, "cgroupfs", "<id>"),
)
_SCHEMES: Final = {"docker": "docker", "containerd": "containerd", "cri-o": "cri-o", "crio": "cri-o"}
KNOWN: Final = ", ".join(n[3] for n in NAMINGS)

log = logging.getLogger(__name__)


class LayoutError(LookupError):
    """A container whose cgroups the agent cannot place; the message names the paths looked at."""


@dataclass(frozen=True)
class Layout:
    version: str  # the node's cgroups: v1, v2, hybrid (v1 controllers + a cgroup2 mount)
    driver: str  # cgroupfs | systemd (the kubelet's cgroupDriver)
    runtime: str  # containerd | cri-o | docker
    qos: str  # BestEffort | Burstable | Guaranteed
    naming: str  # the container's component, e.g. cri-containerd-<id>.scope
    path: str  # the container's cgroup as the agent sees it
    namespace: str  # "own": a cgroup namespace of its own; "host": the agent's; "unknown"
    listed: tuple[str, ...]  # the host's cgroup.procs files that list the process
    looked: tuple[str, ...]  # the ones that do not, and why
    # How the agent saw it: "proc" (/proc/<pid>/cgroup, full paths), "relative" (/proc, relative to
    # the agent's own cgroup namespace), "tree" (/proc named no pod cgroup: found in the host's tree)
    view: str = "proc"

    def describe(self) -> str:
        ns = {"own": "its own cgroup namespace", "host": "the host's cgroup namespace"}.get(
            self.namespace, "cgroup namespace unknown"
        )
        host = f"listed in {len(self.listed)} of {len(self.listed) + len(self.looked)} hierarchies"
        seen = {
            "proc": "",
            "relative": ", seen relative to the agent's own cgroup namespace",
            "tree": ", found in the host's cgroup tree (/proc/<pid>/cgroup named no pod cgroup)",
        }[self.view]
        return (
            f"cgroup {self.version}, {self.driver} driver, {self.runtime} ({self.naming}), {self.qos} pod, "
            f"{ns}, {host}{seen}: {self.path}"
        )

    def report(self) -> dict[str, str]:
        """What the last-operation annotation carries."""
        return {
            "version": self.version,
            "driver": self.driver,
            "runtime": self.runtime,
            "qos": self.qos,
            "namespace": self.namespace,
            "path": self.path,
            "host": f"{len(self.listed)}/{len(self.listed) + len(self.looked)}",
        }


def detect(
    proc: discovery.ProcessInfo,
    container_id: str | None = None,
    proc_root: str | os.PathLike[str] = discovery.DEFAULT_PROC_ROOT,
    found: list[cgroups.Hierarchy] | None = None,
) -> Layout:
    """The layout of `proc`'s container (`container_id` with its scheme, as the pod status has it);
    LayoutError where its cgroup is named in no known way or the host's tree contradicts /proc."""
    text = _read(Path(proc_root, str(proc.pid), "cgroup"))
    if text is None:
        raise LayoutError(f"pid {proc.pid} is gone: {Path(proc_root, str(proc.pid), 'cgroup')} unreadable")
    found = cgroups.hierarchies(proc_root) if found is None else found
    path = proc.cgroup
    parts = [p for p in path.split("/") if p]
    pod_at = next(
        (i for i, p in enumerate(parts) if discovery.parse_cgroup_path("/".join(parts[: i + 1]))), None
    )
    if pod_at is None or pod_at + 1 >= len(parts):
        raise LayoutError(
            f"pid {proc.pid} of pod {proc.pod_uid} is in {path!r}, not in a container's cgroup below the "
            f"pod's (looked for one of: {KNOWN}); /proc/{proc.pid}/cgroup: {_oneline(text)}"
        )
    component = parts[pod_at + 1]
    naming = next((n for n in NAMINGS if n[0].match(component)), None)
    if naming is None:
        raise LayoutError(
            f"unknown container cgroup {component!r} of pod {proc.pod_uid} in {path!r}: the agent knows "
            f"{KNOWN} (docker, containerd and CRI-O with the cgroupfs or systemd driver)"
        )
    scheme = container_id.split("://", 1)[0] if container_id and "://" in container_id else None
    runtime = naming[1] or _SCHEMES.get(scheme or "", "docker or containerd")
    driver = "systemd" if parts[pod_at].endswith(".slice") else "cgroupfs"
    below = " ".join(parts[: pod_at + 1]).lower()
    qos = "Burstable" if "burstable" in below else "BestEffort" if "besteffort" in below else "Guaranteed"
    version = cgroups.version(found)
    if version == "none":  # the agent has no cgroup mounts: the lines of /proc/<pid>/cgroup tell
        version = "v2" if all(line.startswith("0::") for line in text.splitlines() if line) else "v1"
    same = cgroups.same_namespace(proc.pid, "self", proc_root)
    namespace = "unknown" if same is None else "host" if same else "own"
    named = any(discovery.parse_cgroup_path(line.split(":", 2)[-1]) for line in text.splitlines())
    view = "tree" if not named else "relative" if "/../" in f"{path}/" else "proc"
    if view == "tree":  # check the path the host's tree gave, in every hierarchy /proc lists
        text = "\n".join(f"{ln.rsplit(':', 1)[0]}:{path}" for ln in text.splitlines() if ln.count(":") >= 2)
    check = cgroups.host_check(proc.pid, text, found)
    contradicted = [x for x in check.looked if f"does not list pid {proc.pid}" in x]
    if contradicted and not check.listed:
        raise LayoutError(
            f"/proc/{proc.pid}/cgroup names {path!r}, but the host's tree does not have pid {proc.pid} "
            f"there: {'; '.join(contradicted)}"
        )
    return Layout(version, driver, runtime, qos, naming[3], path, namespace, check.listed, check.looked, view)


def restored(
    pod: str,
    procs: list[discovery.ProcessInfo],
    host_pid: int | None,
    container_id: str | None,
    proc_root: str | os.PathLike[str] = discovery.DEFAULT_PROC_ROOT,
) -> dict[str, Any]:
    """Where a restored engine is, for the restore's last-operation: `cgroup` (its layout), or
    `cgroup_warning` where it is not in its container's cgroup (criu puts it back there; the engine
    runs either way, so this is reported, not undone)."""
    engine = next((p for p in procs if p.pid == host_pid), None)
    if engine is None:
        text = _read(Path(proc_root, str(host_pid), "cgroup")) or "unreadable"
        warning = (
            f"the restored engine (pid {host_pid}) is not in its container's cgroup: {_oneline(text)[:300]}"
        )
        log.warning("%s: %s", pod, warning)
        return {"cgroup_warning": warning}
    try:
        found = detect(engine, container_id, proc_root)
    except LayoutError as e:
        log.warning("%s: after the restore: %s", pod, e)
        return {"cgroup_warning": str(e)[:300]}
    log.info("%s: restored in cgroup layout: %s", pod, found.describe())
    return {"cgroup": found.report()}


def explain_missing(
    pod_uid: str,
    container_id: str | None,
    proc_root: str | os.PathLike[str] = discovery.DEFAULT_PROC_ROOT,
    found: list[cgroups.Hierarchy] | None = None,
) -> str:
    """Why no process of the pod's container was found: every place the agent looked."""
    uid = discovery.normalize_pod_uid(pod_uid)
    wanted = discovery.normalize_container_id(container_id) if container_id else None
    seen: dict[str, int] = {}
    scanned = 0
    for pid_dir in Path(proc_root).iterdir() if Path(proc_root).is_dir() else ():
        if not pid_dir.name.isdigit():
            continue
        text = _read(pid_dir / "cgroup")
        if text is None:
            continue
        scanned += 1
        for line in text.splitlines():
            match = discovery.parse_cgroup_path(line.split(":", 2)[-1])
            if match is not None and match.pod_uid == uid:
                seen[match.path] = seen.get(match.path, 0) + 1
                break
    found = cgroups.hierarchies(proc_root) if found is None else found
    dirs = [f"{d}" for _, d in cgroups.find_pod_dirs(found, lambda n: _names_pod(n, uid))]
    what = f"container {wanted}" if wanted else "any container"
    where = f"the pod's cgroups seen there: {', '.join(sorted(seen))}" if seen else f"none names pod {uid}"
    host = (
        f"its directories in the host's tree: {', '.join(dirs)}"
        if dirs
        else "no directory of the pod below kubepods in the agent's cgroup mounts "
        f"({', '.join(str(h.mount) for h in found) or 'none mounted'})"
    )
    return (
        f"no process of pod {uid} ({what}) on this node: /proc/*/cgroup of {scanned} processes read, "
        f"{where}; {host}; the agent knows the container cgroups {KNOWN}"
    )


def _names_pod(name: str, uid: str) -> bool:
    match = discovery.parse_cgroup_path(f"/kubepods/{name}")
    return match is not None and match.pod_uid == uid and match.container_id is None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _oneline(text: str) -> str:
    return " | ".join(line for line in text.splitlines() if line)[:600]
