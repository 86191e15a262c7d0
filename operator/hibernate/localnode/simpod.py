"""A simulated Kubernetes pod for CRIU tests, without Kubernetes (root only).

    from tests.simpod import SimPod

    with SimPod.start([sys.executable, "/.hibernate/engine.py"], files={"engine.py": src}) as pod:
        pod.http_get("/state")            # HTTP from the test process, inside the pod's netns
        dump(image, pod.engine_ns_pid(), criu.Pod(pod.init_pid))

What a container runtime would give the engine container, per shared/notes/checkpointing.md:
new pid, mount, net, ipc and uts namespaces; an overlay of the host's / (tmpfs upper) as its root,
entered with pivot_root; its own proc, sysfs, a tmpfs /dev with the usual nodes, a tmpfs /dev/shm, a
bind-mounted /etc/hosts; lo up; the hostname set; the cgroup
/sys/fs/cgroup/<ctrl>/kubepods/besteffort/pod<uid>/<container id> in every mounted hierarchy. PID 1 is
hibernate/podinit.py, copied into the pod's emptyDir (mounted at /.hibernate) as the operator does.

A GPU, as a container runtime with the NVIDIA toolkit gives one: `devices` binds host device nodes
(`/dev/nvidiactl`, `/dev/nvidia0`, `/dev/nvidia-uvm`, ... and the `/dev/nvidia-caps` directory; see
`nvidia_devices()`) into the pod's own /dev, each onto an empty file (or directory) made there, so no
mknod right is needed. They are bound into the pod's /dev itself: a bind of a tmpfs that holds them
would drop them (shared/notes/checkpointing.md, "A GPU inside a simulated pod"). `volumes` binds host
directories at the same path, like hostPath volumes: what the overlay of the host's / does not show
(other file systems: the driver's libraries, a Python installation, a checkout), and directories the
engine writes to the host's disk (model weights) rather than into the pod's tmpfs layer.

How the test reaches the engine: no veth and no routed addresses (private ranges are off limits
as traffic targets here). A helper thread of the test process joins the pod's network namespace with
setns(2) (which affects only that thread), creates and connects a TCP socket to 127.0.0.1 there, and
hands it back: a socket stays in the namespace it was created in. The test then speaks HTTP on it
from its own threads. This also gives an established connection from outside the engine's process
tree, which is what a kubelet probe or the gateway would hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

PODINIT = Path(__file__).resolve().parents[1] / "podinit.py"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

# Runs as PID 1 of the new namespaces (under `unshare --fork`), sets up the pod, then execs podinit.
# Kept to plain ctypes calls so it needs nothing but the Python that runs the tests.
_SETUP = r"""
import ctypes, fcntl, json, os, socket, stat, struct, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[os.uname().machine]

def mount(src, dst, fstype, flags=0, data=None):
    if libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {dst} ({fstype}): {os.strerror(e)}")

# Join the pod's cgroups first, so everything below (and every later child) is charged there.
for procs in cfg["cgroup_procs"]:
    with open(procs, "w") as f:
        f.write("0")
# A cgroup namespace of its own, rooted at the container's cgroup (what containerd and CRI-O give a
# container on cgroup v2): the pod sees "0::/" in /proc/self/cgroup, the host the full path.
if cfg["cgroupns"] and libc.unshare(0x02000000) != 0:  # CLONE_NEWCGROUP
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWCGROUP)")
base = cfg["base"]
mount("tmpfs", base, "tmpfs", 0, "mode=0755")
for d in ("upper", "work", "root"):
    os.mkdir(f"{base}/{d}")
root = f"{base}/root"
mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={base}/upper,workdir={base}/work")
mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
mount("sysfs", f"{root}/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
mount("tmpfs", f"{root}/dev", "tmpfs", MS_NOSUID, "mode=0755")
for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
                           ("tty", 5, 0)):
    os.mknod(f"{root}/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.chmod(f"{root}/dev/{name}", 0o666)
# Host devices (a GPU's nodes): each bound onto an empty file, or directory, made in the pod's /dev.
for dev in cfg["devices"]:
    dst = root + dev
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(dev):
        os.makedirs(dst, exist_ok=True)
        mount(dev, dst, None, MS_BIND | MS_REC)
    else:
        if not os.path.lexists(dst):
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o666))
        mount(dev, dst, None, MS_BIND)
os.mkdir(f"{root}/dev/shm")
mount("shm", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
os.symlink("/proc/self/fd", f"{root}/dev/fd")
mount(cfg["hosts"], f"{root}/etc/hosts", None, MS_BIND)
# Host directories at the same path (hostPath volumes), parents first, with what is mounted below them.
for vol in cfg["volumes"]:
    os.makedirs(root + vol, exist_ok=True)
    mount(vol, root + vol, None, MS_BIND | MS_REC)
os.makedirs(f"{root}/.hibernate", exist_ok=True)
mount(cfg["emptydir"], f"{root}/.hibernate", None, MS_BIND)
os.makedirs(f"{root}/.oldroot", exist_ok=True)
if libc.syscall(SYS_PIVOT_ROOT, root.encode(), f"{root}/.oldroot".encode()) != 0:
    raise OSError(ctypes.get_errno(), "pivot_root")
os.chdir("/")
if libc.umount2(b"/.oldroot", MNT_DETACH) != 0:
    raise OSError(ctypes.get_errno(), "umount /.oldroot")
os.rmdir("/.oldroot")
socket.sethostname(cfg["hostname"])
# lo up: SIOCGIFFLAGS / SIOCSIFFLAGS on struct ifreq, IFF_UP | IFF_RUNNING
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    req = struct.pack("16sH14x", b"lo", 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, req))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1 | 0x40))
os.execv(cfg["python"], [cfg["python"], "/.hibernate/podinit.py", "--", *cfg["command"]])
"""


def _host_path(path: str | os.PathLike[str], what: str, under: str | None = None) -> str:
    """An absolute, normalised host path that exists (and lies under `under`), for a bind into the pod."""
    text = os.fspath(path)
    norm = os.path.normpath(text)
    if not os.path.isabs(text) or norm in ("/", under):
        raise ValueError(f"{what} {text!r}: an absolute path below {under or '/'} is needed")
    if under is not None and not norm.startswith(under + "/"):
        raise ValueError(f"{what} {text!r} is not under {under}")
    if under is None and any(norm == p or norm.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
        raise ValueError(f"{what} {text!r}: the pod has its own /proc, /sys and /dev")
    if not os.path.exists(norm):
        raise FileNotFoundError(f"{what} {text!r} does not exist on the host")
    if under is None and not os.path.isdir(norm):
        raise NotADirectoryError(f"{what} {text!r} is not a directory")
    return norm


def nvidia_devices(dev: Path = Path("/dev")) -> list[str]:
    """The NVIDIA device nodes a container runtime with the NVIDIA toolkit gives a GPU container:
    /dev/nvidiactl, /dev/nvidia<N>, /dev/nvidia-uvm, /dev/nvidia-uvm-tools, /dev/nvidia-modeset, and
    the /dev/nvidia-caps directory; those that exist here (an empty list without a GPU)."""
    return sorted(str(p) for p in dev.glob("nvidia*") if p.is_char_device() or p.is_dir())


def _cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, named ones, the v2 one)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(left.split()[4]))
    return out


def _make_cgroup(mount: Path, rel: Path, made: list[Path] | None = None) -> Path:
    """mount/rel, with its parents; the directories it had to make are appended to `made`.

    Another pod's close (another test session's, on the same host) may remove a shared parent
    (kubepods, ...) that it made, once empty, between this one's check and its mkdir below: then
    the walk starts again from the top."""
    for _ in range(9):
        try:
            return _make_cgroup_once(mount, rel, made)
        except FileNotFoundError:
            time.sleep(0.01)
    return _make_cgroup_once(mount, rel, made)


def _make_cgroup_once(mount: Path, rel: Path, made: list[Path] | None) -> Path:
    path = mount
    for part in rel.parts:
        parent, path = path, path / part
        if not path.is_dir():
            try:
                path.mkdir()
            except FileExistsError:
                pass  # made by someone else just now: not ours to remove
            else:
                if made is not None:
                    made.append(path)
        # A new v1 cpuset has no cpus or mems, and a task cannot join it until it has them. (On v2
        # an empty one inherits its parent's, and the root has none to copy.)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (parent / knob).exists() and (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((parent / knob).read_text())
    return path


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def ns_pid(host_pid: int) -> int:
    """The pid inside the innermost pid namespace (last NSpid field)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise LookupError(host_pid)


def _in_netns(ns_path: str, fn: Callable[[], T]) -> T:
    """Runs fn in a fresh thread that has joined the namespace at ns_path; returns its result."""
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns_path}")
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=body, name="pod-netns")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box["result"]


class SimPod:
    """One running simulated pod. Use SimPod.start(...) and close() (or a with block)."""

    def __init__(
        self,
        uid: str,
        container_id: str,
        base: Path,
        proc: subprocess.Popen[bytes],
        cgroups: list[Path],
        port: int,
    ) -> None:
        self.uid = uid
        self.container_id = container_id
        self.base = base  # host temp dir: emptydir/, pod.log, hosts
        self.proc = proc  # the `unshare` process; its only child is the pod's PID 1
        self.cgroups = cgroups
        self.port = port
        self.init_pid = 0
        self.made_cgroups: list[Path] = []  # the cgroup directories start() made, removed by close()

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        command: Sequence[str],
        *,
        files: Mapping[str, bytes | str] | None = None,
        port: int = 8000,
        ready_path: str | None = "/",
        timeout: float = 20.0,
        uid: str | None = None,
        container_id: str | None = None,
        host_network: bool = False,
        env: Mapping[str, str] | None = None,
        devices: Sequence[str | os.PathLike[str]] = (),
        volumes: Sequence[str | os.PathLike[str]] = (),
        cgroup_path: str | None = None,
        cgroupns: bool = False,
    ) -> SimPod:
        """Starts a pod whose engine is `command`, run by podinit; waits until it answers HTTP.

        `files` are written into the emptyDir, visible in the pod under /.hibernate/. `uid` and
        `container_id` name its cgroup (give the UID of a real Pod object to tie the two together).
        `host_network` keeps the host's network namespace, like a hostNetwork pod, so that a process
        on the host (the agent) reaches the engine at 127.0.0.1 without any routed address.
        `devices` are host device nodes (or directories of them) under /dev, bound at the same path in
        the pod's /dev; `volumes` are host directories bound (with their submounts) at the same path.
        `cgroup_path` is the container's cgroup below each hierarchy's root, as a kubelet and runtime
        name it (default `kubepods/besteffort/pod<uid>/<container id>`, cgroupfs with docker or
        containerd; `{uid}`, `{uid_}` (dashes as underscores) and `{id}` are filled in); `cgroupns`
        gives the pod a cgroup namespace of its own, rooted there.
        """
        device_paths = [_host_path(d, "device", under="/dev") for d in devices]
        volume_paths = sorted({_host_path(v, "volume") for v in volumes}, key=lambda v: (v.count("/"), v))
        uid = uid or str(uuid.uuid4())
        container_id = container_id or uuid.uuid4().hex + uuid.uuid4().hex
        template = cgroup_path or "kubepods/besteffort/pod{uid}/{id}"
        rel = Path(template.format(uid=uid, uid_=uid.replace("-", "_"), id=container_id).strip("/"))
        made: list[Path] = []
        cgroups = [_make_cgroup(m, rel, made) for m in _cgroup_mounts()]
        base = Path(tempfile.mkdtemp(prefix="simpod-"))
        emptydir = base / "emptydir"
        emptydir.mkdir()
        (base / "rootfs").mkdir()
        shutil.copy(PODINIT, emptydir / "podinit.py")
        for name, data in (files or {}).items():
            (emptydir / name).write_bytes(data.encode() if isinstance(data, str) else data)
        hostname = f"simpod-{uid[:8]}"
        (base / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n")
        cfg = {
            "base": str(base / "rootfs"),
            "emptydir": str(emptydir),
            "hosts": str(base / "hosts"),
            "hostname": hostname,
            "python": sys.executable,
            "command": list(command),
            "cgroup_procs": [str(c / "cgroup.procs") for c in cgroups],
            "devices": device_paths,
            "volumes": volume_paths,
            "cgroupns": cgroupns,
        }
        with open(base / "pod.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount",
                    *([] if host_network else ["--net"]),
                    "--ipc",
                    "--uts",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-c",
                    _SETUP,
                    json.dumps(cfg),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        pod = cls(uid, container_id, base, proc, cgroups, port)
        pod.made_cgroups = made
        try:
            pod._wait_ready(ready_path, timeout)
        except BaseException:
            pod.close()
            raise
        return pod

    def _wait_ready(self, ready_path: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pod exited with {self.proc.returncode}:\n{self.log()}")
            kids = _children(self.proc.pid)
            if kids and not self.init_pid:
                self.init_pid = kids[0]
            if self.init_pid and self.engine_host_pid():
                if ready_path is None:
                    return
                with contextlib.suppress(OSError, http.client.HTTPException):
                    self.http_get(ready_path, timeout=1.0)
                    return
            time.sleep(0.05)
        raise TimeoutError(f"pod not ready after {timeout} s:\n{self.log()}")

    def close(self) -> None:
        """Kills everything in the pod and removes its cgroups and files."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)  # ends the whole pid namespace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        # A restored tree is in the pod's pid namespace too, so it died with the init; cgroups
        # empty a moment after the last task is reaped.
        made = sorted(set(self.made_cgroups) - set(self.cgroups), key=lambda p: -len(p.parts))
        for cg in self.cgroups:
            for path in (cg, cg.parent):
                for _ in range(100):
                    try:
                        path.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)
        for path in made:  # the parents it made (kubepods.slice, ...), deepest first, if empty now
            with contextlib.suppress(OSError):
                path.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> SimPod:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    # -- processes -------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The pod's root file system as the host sees it."""
        return Path(f"/proc/{self.init_pid}/root")

    @property
    def emptydir(self) -> Path:
        """The host directory mounted at /.hibernate in the pod."""
        return self.base / "emptydir"

    def init_alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.init_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def engine_host_pid(self) -> int | None:
        """Host pid of the engine: the init's first living child, or None while it is gone."""
        for kid in _children(self.init_pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return kid
        return None

    def engine_ns_pid(self) -> int:
        pid = self.engine_host_pid()
        if pid is None:
            raise LookupError("the engine is not running")
        return ns_pid(pid)

    def cgroup(self, controller: str) -> Path:
        """The container's cgroup directory of one v1 controller (or "unified")."""
        for mount in _cgroup_mounts():
            for cg in self.cgroups:
                if mount.name == controller and mount in cg.parents:
                    return cg
        raise LookupError(controller)

    def log(self) -> str:
        """What the pod's PID 1 printed: its own lines and the engine's log it copies."""
        try:
            return (self.base / "pod.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- network ---------------------------------------------------------------------------------

    def connect(self, port: int | None = None, timeout: float = 5.0) -> socket.socket:
        """A TCP socket connected to 127.0.0.1:port inside the pod's network namespace."""
        target = ("127.0.0.1", port or self.port)

        def dial() -> socket.socket:
            return socket.create_connection(target, timeout=timeout)

        return _in_netns(f"/proc/{self.init_pid}/ns/net", dial)

    def http_connection(self, port: int | None = None, timeout: float = 5.0) -> http.client.HTTPConnection:
        """A keep-alive HTTP connection into the pod (reusable across requests)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        conn.sock = self.connect(port, timeout)
        return conn

    def http_get(self, path: str, port: int | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = self.http_connection(port, timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path: str, port: int | None = None, timeout: float = 5.0) -> object:
        status, body = self.http_get(path, port, timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return json.loads(body)


def processes_in(cgroup: Path) -> Iterator[int]:
    """Host pids of the tasks in a cgroup directory."""
    with contextlib.suppress(OSError):
        for line in (cgroup / "cgroup.procs").read_text().split():
            yield int(line)
