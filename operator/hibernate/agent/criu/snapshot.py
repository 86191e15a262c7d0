"""Snapshots: an engine dumped from one pod and restored into a NEW pod of its ModelDeployment.

The in-place restore (restore.py) brings an engine back into the pod it was dumped from. A
snapshot outlives its pod (Stop scales the workload to zero) and is restored into another pod: a
new pod UID and IP, its init (hibernate.podinit, waiting for the restore) PID 1 and nothing else
running. What differs from the in-place path, and why:

- TCP: a connection cannot follow the engine to a new address. The dump neither saves nor locks
  connections (`--tcp-close`), the restore brings them back closed; clients reconnect, and the
  listening socket is bound again in the new pod's network namespace.
- cgroups: the image names the old pod's cgroups. criu is started inside the new container's
  cgroups and told to leave cgroups alone (`--manage-cgroups=ignore`), so the restored tree is
  charged to its new pod, like anything the container's init starts.
- pids: criu gives every task its pid from the image, so each must be free in the new pod (the
  image lists them, threads included), and criu itself, which runs in the pod's pid namespace, must
  not take one: the namespace's last pid is moved past them first (`ns_last_pid`, written from a
  process inside that namespace, which is where the kernel looks).
- spec: the image restores only into a pod of the same engine image, args and model (its spec hash).

Everything that refuses a snapshot raises before criu starts: ImageRefused for an image that can
never restore here (another GPU model or driver, another spec, damaged), CriuError otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from hibernate.agent.criu import images, nsexec, snaplock
from hibernate.agent.criu.bundle import Bundle, CriuError, locate, version
from hibernate.agent.criu.dump import DumpResult, dump, task_pids
from hibernate.agent.criu.images import RESTORE_LOG, RESTORE_OK, GpuInfo, ImageRefused
from hibernate.agent.criu.restore import RestoreResult
from hibernate.agent.podfs import UnsafePath

# Hidden, so the sweep of pods' images passes over it; the sweep removes a snapshot with its model.
SNAPSHOTS = ".snapshots"
# criu's own pid in the new pod comes after the image's last one; threads an engine started while
# the dump began (after the pid list was read) are likely within this margin.
PID_MARGIN = 64
_LOG_LIMIT = 8 << 20
_CLONE_NEWPID = 0x20000000

# Runs before criu, as the agent's own interpreter in the agent's mount namespace: joins the new
# container's cgroups (criu and what it restores are charged there), moves the pod's last pid past
# the image's (from a child in the pod's pid namespace), then execs criu with its real environment
# (the nsjoin preload). argv: [config json, criu command...].
_PRELUDE = r"""
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
for procs in cfg["cgroup_procs"]:
    try:
        with open(procs, "w") as f:
            f.write("0")
    except OSError as e:
        sys.exit(f"hibernate-snapshot: cannot join the container's cgroup {procs}: {e.strerror}")
libc = ctypes.CDLL(None, use_errno=True)
if libc.setns(cfg["pid_ns_fd"], cfg["clone_newpid"]) != 0:
    sys.exit(f"hibernate-snapshot: setns pid: {os.strerror(ctypes.get_errno())}")
child = os.fork()
if child == 0:
    try:
        fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
        os.write(fd, str(cfg["last_pid"]).encode())
        os._exit(0)
    except OSError as e:
        print(f"hibernate-snapshot: ns_last_pid: {e}", file=sys.stderr, flush=True)
        os._exit(1)
if os.waitpid(child, 0)[1] != 0:
    sys.exit(1)
os.execve(sys.argv[2], sys.argv[2:], cfg["env"])
"""


def snapshot_dir(checkpoint_dir: Path | str, namespace: str, model: str) -> Path:
    """`<checkpoint dir>/.snapshots/<namespace>/<model>/`: one snapshot per ModelDeployment."""
    for part in (namespace, model):
        if not part or part in (".", "..") or "/" in part or part.startswith("."):
            raise ValueError(f"invalid path component for a snapshot: {part!r}")
    return Path(checkpoint_dir) / SNAPSHOTS / namespace / model


def take(
    image: Path,
    pid: int,
    pod: nsexec.Pod,
    *,
    spec_hash: str,
    timeout: float = 600.0,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    checkpoint_root: Path | None = None,
) -> DumpResult:
    """Dumps the engine (`pid` in `pod`) into the snapshot `image`; verified as any dump (dump.py),
    with its pids and `spec_hash` in the metadata, and its TCP connections left out. The snapshot's
    lock is held throughout (snaplock): a take by another agent, or a restore, under way is
    SnapshotBusy, and the engine keeps running."""
    images.make_private_dirs(image.parent, checkpoint_root or image.parent)
    with snaplock.held(image, exclusive=True):
        return dump(
            image,
            pid,
            pod,
            timeout=timeout,
            tcp_close=True,
            spec_hash=spec_hash,
            gpu=gpu,
            bundle=bundle,
            checkpoint_root=checkpoint_root,
        )


def restore_into(
    image: Path,
    pod: nsexec.Pod,
    *,
    spec_hash: str,
    timeout: float = 600.0,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    checkpoint_root: Path | None = None,
) -> RestoreResult:
    """Restores the snapshot `image` into `pod`, a pod other than the one it was taken from; the
    engine becomes a child of the pod's init with the pids it had.

    Refuses before criu starts: an image that is incomplete, damaged or not the agent's, taken on
    another GPU model or driver than `gpu` (default: this node's) or from another spec than
    `spec_hash` (ImageRefused); pids of the image already used in the pod, a container whose cgroups
    the agent cannot see (CriuError). A restore that criu fails leaves nothing running (criu kills
    what it had restored). `pod.marker` is not used: the waiting init is told by agent/snapshot.py.
    """
    started = time.monotonic()
    if not image.parent.is_dir():  # no snapshot here: verify_image says so
        return _restore_into(image, pod, spec_hash, timeout, gpu, bundle, checkpoint_root, started)
    # Shared: several new pods may restore one snapshot at once; not while a take replaces it.
    with snaplock.held(image, exclusive=False):
        return _restore_into(image, pod, spec_hash, timeout, gpu, bundle, checkpoint_root, started)


def _restore_into(
    image: Path,
    pod: nsexec.Pod,
    spec_hash: str,
    timeout: float,
    gpu: GpuInfo | None,
    bundle: Bundle | None,
    checkpoint_root: Path | None,
    started: float,
) -> RestoreResult:
    meta = images.verify_image(image, checkpoint_root)
    images.check_compatible(meta, gpu if gpu is not None else images.detect_gpu(), image)
    if meta.spec_hash != spec_hash:
        raise ImageRefused(
            f"snapshot {image} was taken from another engine spec (hash {meta.spec_hash}, this pod's "
            f"{spec_hash}): the engine's image, args or model changed"
        )
    if not meta.pids:
        raise ImageRefused(f"checkpoint image {image} lists no pids: not a snapshot")
    in_use = sorted(set(meta.pids) & set(task_pids([pod.init_pid, *nsexec.descendants(pod.init_pid)])))
    if in_use:
        raise CriuError(
            f"cannot restore snapshot {image}: pids {in_use[:8]} of its engine are in use in the pod "
            "(the pod's init started something, or another restore ran)"
        )
    cgroup_procs = container_cgroups(pod.init_pid)
    bundle = bundle or locate()
    version(bundle)
    work_log = pod.workdir / RESTORE_LOG
    try:
        with pod.root() as root:
            root.reclaim_dir(pod.workdir)
            root.unlink(work_log)
    except OSError as e:
        raise CriuError(f"cannot prepare criu's work directory {pod.workdir} in the pod: {e}") from e
    args = ["-d", "-W", str(pod.workdir), "-o", RESTORE_LOG, "--tcp-close", "--manage-cgroups=ignore"]
    fd = images.detached_dir(image)
    try:
        # Shared: several new pods may restore one snapshot at once; the sweep takes it exclusively.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CriuError(f"snapshot {image} is being removed") from None
    try:
        launched = nsexec.launch(pod, bundle, "restore", fd, args)
        _prelude(launched, cgroup_procs, max(meta.pids) + PID_MARGIN)
        rc, out = nsexec.run(launched, fd, timeout, "restore", fault="agent.criu-restore-running")
    finally:
        os.close(fd)
    log_text = b""
    with contextlib.suppress(OSError, UnsafePath), pod.root() as root:
        log_text = root.read_file(work_log, _LOG_LIMIT)
    log = Path(f"{image}.{RESTORE_LOG}")  # beside the image, which other restores may be reading
    with contextlib.suppress(OSError):
        images.write_private(log, log_text)
    if rc != 0 or RESTORE_OK not in log_text[-2048:].decode(errors="replace"):
        _end_pids(pod.init_pid, meta.pids)  # criu kills what it restored; a timeout may leave some
        raise CriuError(
            f"criu restore of snapshot {image} into the pod of init {pod.init_pid} failed (rc {rc}): "
            f"{out}\n{images.log_tail(log)}"
        )
    host_pid = nsexec.host_pid_in_pod(pod.init_pid, meta.engine_pid)
    if host_pid is None:
        raise CriuError(f"snapshot {image} restored, but its engine (pid {meta.engine_pid}) is not running")
    return RestoreResult(meta.engine_pid, host_pid, time.monotonic() - started, log)


def _end_pids(init_pid: int, pids: list[int]) -> None:
    """Kills the pod's processes that have one of the image's pids: only what a restore made."""
    wanted = set(pids)
    for host in list(nsexec.descendants(init_pid)):
        with contextlib.suppress(OSError, CriuError):
            if nsexec.ns_pid(host) in wanted:
                os.kill(host, signal.SIGKILL)


def _prelude(launched: nsexec.Launch, cgroup_procs: list[Path], last_pid: int) -> None:
    """Makes `launched` start with _PRELUDE, which hands criu its environment (the preload) itself."""
    joined = dict(entry.split(":") for entry in launched.env.get("HIBERNATE_NSJOIN", "").split(",") if entry)
    if "pid" not in joined:
        raise CriuError("criu would not join the pod's pid namespace: cannot restore a snapshot there")
    cfg = {
        "cgroup_procs": [str(p) for p in cgroup_procs],
        "pid_ns_fd": int(joined["pid"]),
        "clone_newpid": _CLONE_NEWPID,
        "last_pid": last_pid,
        "env": launched.env,
    }
    # -I -S: nothing from the environment or site-packages; the interpreter is the agent's own.
    launched.cmd = [sys.executable, "-I", "-S", "-c", _PRELUDE, json.dumps(cfg), *launched.cmd]
    launched.env = {"PATH": launched.env.get("PATH", "")}


# In the agent's own mount namespace, under its temporary directory (the chart's agent has a read-only
# root file system and an emptyDir at /tmp); a mount there does not reach the host.
FRESH_MOUNTS = Path(tempfile.gettempdir()) / "hibernate-cgroups"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_V1_OPTIONS = {"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime", "clone_children", "xattr"}
_fresh: dict[tuple[str, ...], Path] = {}


def fresh_hierarchy(options: set[str], v2: bool, base: Path = FRESH_MOUNTS) -> Path:
    """The whole cgroup hierarchy of these mount `options` (v1: its controllers or name=), mounted
    once at its root under `base`; CriuError where the kernel refuses (no CAP_SYS_ADMIN, another
    cgroup namespace's view)."""
    wanted = tuple(sorted(o for o in options if o not in _V1_OPTIONS and not o.startswith("release_agent")))
    key = ("cgroup2",) if v2 else wanted
    if key in _fresh:
        return _fresh[key]
    target = base / ("unified" if v2 else "-".join(wanted).replace("=", "_"))
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(target) for line in f)
    if not mounted:
        libc = ctypes.CDLL(None, use_errno=True)
        data = b"" if v2 else ",".join(wanted).encode()
        kind = b"cgroup2" if v2 else b"cgroup"
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if libc.mount(b"cgroup", os.fsencode(target), kind, flags, data or None) != 0:
            err = ctypes.get_errno()
            raise CriuError(
                f"cannot mount the cgroup hierarchy {','.join(key)} at {target}: {os.strerror(err)}"
            )
    _fresh[key] = target
    return target


def container_cgroups(init_pid: int, proc: Path = Path("/proc")) -> list[Path]:
    """The cgroup.procs file, in every cgroup hierarchy the agent mounts, of the cgroup that holds
    `init_pid` (the new container's), each checked to list it; CriuError where one cannot be found.

    Read from the host's side only: /proc/<init>/cgroup as the agent's cgroup namespace names it,
    and the agent's own mounts (/proc/self/mountinfo), never the pod's view."""
    mounts: list[tuple[set[str], bool, Path, str]] = []  # (options, is v2, mount point, root)
    for line in (proc / "self" / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            mounts.append((set(tail[2].split(",")), tail[0] == "cgroup2", Path(fields[4]), fields[3]))
    found: list[Path] = []
    for line in (proc / str(init_pid) / "cgroup").read_text().splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        mount = next(
            (
                (point, root)
                for options, v2, point, root in mounts
                if (v2 if hier == "0" and not controllers else set(controllers.split(",")) <= options)
            ),
            None,
        )
        if mount is None:
            continue  # a hierarchy the agent does not mount: nothing to join there
        point, root = mount
        if root != "/" and not path.startswith("/.."):
            # The agent's own mount of this hierarchy is rooted at its own container's cgroup (docker on
            # cgroup v1 mounts a container's hierarchies so): mount the whole hierarchy afresh, as criu
            # does for itself, private to the agent's mount namespace.
            options, v2 = next((o, v) for o, v, pt, _ in mounts if pt == point)
            point, root = fresh_hierarchy(options, v2), "/"
        if root != "/" or not path.startswith("/") or "/.." in path:
            raise CriuError(
                f"the cgroup {path} of pod init {init_pid} is not visible through the agent's mount "
                f"{point} (root {root}): cannot restore a snapshot into it"
            )
        procs = point.joinpath(*Path(path).parts[1:]) / "cgroup.procs"
        try:
            listed = str(init_pid) in procs.read_text().split()
        except OSError:
            listed = False
        if not listed:
            raise CriuError(f"{procs} does not list pod init {init_pid}: cannot restore a snapshot there")
        found.append(procs)
    if not found:
        raise CriuError(f"no cgroup of pod init {init_pid} in the agent's cgroup mounts")
    return found
