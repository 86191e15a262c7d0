"""How criu runs: in all of a pod's namespaces, from the agent's own filesystem.

criu is executed by the host's kernel and loader from the agent's bundle, in the agent's mount
namespace, so no binary, loader, library or configuration file of the pod is ever loaded. The
preload library `hibernate-nsjoin.so` (nsjoin.c) then joins the pod's net, ipc, uts, pid, cgroup
and mount namespaces (descriptors the agent opened from /proc/<init>/ns) and forks criu into the
pod's pid namespace as a session leader, before criu's main(). Inside, criu shares every namespace
with the engine: the image holds no namespace state, and the restored tree gets the same pids, IP
address, mounts and cgroups, as a child of the pod's init (hibernate.podinit). The cgroup namespace
matters where the runtime gives containers one of their own (containerd and CRI-O on cgroup v2):
criu then sees the container's cgroup as `/`, as the engine does, and the restored tree shares the
init's namespace instead of getting a new one.

Paths criu is given are descriptors of the agent's (`-D /proc/self/fd/N` for the image directory,
`-L` for an empty plugin directory), so criu never reads plugins from the pod's /usr/lib/criu, and
`--no-default-config` keeps it from reading the pod's /etc/criu/default.conf. The same empty
directory is criu's whole $PATH, so criu finds no program of the pod's to run by name (it execs `sh`
to probe iptables at every start), and the bundle's criu is built with its kerndat cache under /proc,
where no pod can plant one (hack/build-criu.sh). Each descriptor is the
root of a detached mount (images.detached_dir), so a path through it cannot climb into the host's
tree with `..`. A dump also runs with
exec forbidden (seccomp): see nsjoin.c.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hibernate.agent.criu import images
from hibernate.agent.criu.bundle import Bundle, CriuError, clean_env
from hibernate.agent.podfs import PodRoot
from hibernate.faults import fault_point

# In-pod paths, under the emptyDir the operator mounts at /.hibernate (podinit uses the same).
POD_WORKDIR = PurePosixPath("/.hibernate/criu-work")
POD_MARKER = PurePosixPath("/.hibernate/checkpointed")
# The namespaces criu joins, in this order: the mount namespace last, once the others are joined.
JOINED_NAMESPACES = ("net", "ipc", "uts", "pid", "cgroup", "mnt")
NSJOIN_FAILED = 125  # nsjoin.c's exit status when it could not enter the pod


@dataclass(frozen=True)
class Pod:
    """The pod whose namespaces criu enters; all paths are as the pod sees them."""

    init_pid: int  # host pid of the container's PID 1 (hibernate.podinit)
    workdir: PurePosixPath = POD_WORKDIR
    # Written before a dump and removed after a restore, so the init outlives its engine;
    # None when the caller manages it.
    marker: PurePosixPath | None = POD_MARKER

    def root(self) -> PodRoot:
        """The pod's root filesystem; every path under it is resolved inside it (podfs)."""
        return PodRoot.of_process(self.init_pid)

    def write_marker(self, text: str) -> None:
        if self.marker is not None:
            with self.root() as root:
                root.write_file(self.marker, text.encode())

    def remove_marker(self) -> None:
        if self.marker is not None:
            with self.root() as root:
                root.unlink(self.marker)


# -- the pod's processes, seen from the host --------------------------------------------------------


def ns_pid(host_pid: int) -> int:
    """A process's pid in its innermost pid namespace (the last NSpid field)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise CriuError(f"no NSpid for pid {host_pid}")


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def descendants(pid: int) -> Iterator[int]:
    for kid in children(pid):
        yield from descendants(kid)
        yield kid


def alive(host_pid: int) -> bool:
    try:
        stat = Path(f"/proc/{host_pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def host_pid_in_pod(init_pid: int, pid_in_pod: int) -> int | None:
    """The host pid of the pod's process `pid_in_pod`, looked up among the init's descendants."""
    for host in descendants(init_pid):
        with contextlib.suppress(OSError, CriuError):
            if ns_pid(host) == pid_in_pod and alive(host):
                return host
    return None


# -- the command ----------------------------------------------------------------------------------


@dataclass
class Launch:
    """A criu command line with what it inherits: the fds named in it, and its environment."""

    cmd: list[str]
    env: dict[str, str]
    fds: list[int]
    empty_dir: str

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.empty_dir)


def _namespace_fds(init_pid: int) -> list[tuple[str, int]]:
    me = os.stat("/proc/self/ns/user").st_ino
    if os.stat(f"/proc/{init_pid}/ns/user").st_ino != me:
        raise CriuError(
            f"the pod of init {init_pid} runs in a user namespace of its own; Checkpoint does not "
            "support user-namespaced pods (hostUsers: false)"
        )
    opened: list[tuple[str, int]] = []
    try:
        for ns in JOINED_NAMESPACES:
            opened.append((ns, os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)))
    except OSError as e:
        for _, fd in opened:
            os.close(fd)
        raise CriuError(f"cannot open the namespaces of pod init {init_pid}: {e}") from e
    return opened


def launch(pod: Pod | None, bundle: Bundle, action: str, dir_fd: int, args: Sequence[str]) -> Launch:
    """The criu command for `action`, in `pod`'s namespaces (or on the host when None).

    The caller must `close()` the result once criu has started (its fds are inherited then).
    """
    empty = tempfile.mkdtemp(prefix="hibernate-noplugins-")
    plugins_fd = images.detached_dir(Path(empty))
    fds = [plugins_fd]
    env = clean_env()
    try:
        if pod is not None:
            nsjoin = bundle.require_nsjoin()
            joined = _namespace_fds(pod.init_pid)
            fds += [fd for _, fd in joined]
            # criu runs helpers by name through $PATH (`sh -c "iptables -n -w -L"` while it probes the
            # kernel, ip, tar): inside the pod those would be the pod's. An empty directory of the
            # agent's as the whole $PATH leaves nothing to find.
            env["PATH"] = f"/proc/self/fd/{plugins_fd}"
            env["LD_PRELOAD"] = str(nsjoin)
            env["HIBERNATE_NSJOIN"] = ",".join(f"{ns}:{fd}" for ns, fd in joined)
            if action == "dump":
                env["HIBERNATE_NSJOIN_NOEXEC"] = "1"
    except BaseException:
        Launch([], env, fds, empty).close()
        raise
    cmd = [str(bundle.criu), action, "-D", f"/proc/self/fd/{dir_fd}", "-v4", "--shell-job"]
    cmd += ["--no-default-config", "-L", f"/proc/self/fd/{plugins_fd}", *args]
    return Launch(cmd, env, fds, empty)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """`proc.wait(timeout)`, woken by the kernel the moment the process exits (a pidfd).

    Popen.wait with a timeout polls before Python 3.14, sleeping up to 50 ms between looks: every
    criu dump and restore of the agent came back up to 50 ms after criu was done (on the 2-core VM,
    34 ms late at the median against 4 ms on a pidfd; bench/RESULTS.md). Raises TimeoutExpired.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (kernel < 5.3): the polling wait
        return proc.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def run(launched: Launch, dir_fd: int, timeout: float, what: str, fault: str) -> tuple[int, str]:
    """Runs criu; on timeout kills it and raises. Returns (rc, stdout+stderr).

    criu inherits `dir_fd`, which carries the agent's flock on the directory (images.locked_dir),
    and writes its output to a file, not a pipe: should the agent die while criu runs, criu
    finishes on its own (no SIGPIPE) and holds the lock until it exits, so the next agent waits for
    it (images.wait_for_criu) before it reads the directory.
    """
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                launched.cmd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(dir_fd, *launched.fds),
                env=launched.env,
                start_new_session=True,
            )
        finally:
            launched.close()
        fault_point(fault)
        try:
            wait_exit(proc, timeout)
        except subprocess.TimeoutExpired:
            # criu runs as a child of the joining process, in the pod: kill by pid, deepest first.
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            fate = (
                "the tree it had seized resumes once criu is gone"
                if what == "dump"
                else "what it had restored was killed with it"
            )
            raise CriuError(f"criu {what} timed out after {timeout:.0f} s and was killed; {fate}") from None
        output.seek(0)
        out = output.read().decode(errors="replace").strip()
    if proc.returncode == NSJOIN_FAILED and "hibernate-nsjoin" in out:
        raise CriuError(f"criu {what} could not enter the pod's namespaces: {out[-500:]}")
    return proc.returncode, out
