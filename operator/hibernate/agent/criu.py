"""CRIU for sleep level 4 (Checkpoint): dump an engine's process tree and restore it in place.

criu runs inside all of the pod's namespaces (shared/notes/checkpointing.md, "Restoring into a
running pod's namespaces", approach A):

    nsenter -t <init host pid> -p -m -n -i -u -- <B>/bin/setsid -w <B>/bin/criu dump \
        -t <engine pid in the pod> -D /proc/self/fd/<n> ...

`<B>` is the CRIU bundle (hack/build-criu.sh) copied into the pod's emptyDir, and fd <n> is the
host's image directory, opened by the agent before entering the pod. Sharing every namespace
with the engine means the image holds no namespace state, and the restored tree gets the same
pids, IP address and mounts, as a child of the pod's init (hibernate.podinit).

Images live at `<checkpoint dir>/<namespace>/<pod>/<container>/`, with `metadata.json` beside
the CRIU files. A dump writes into a hidden sibling and renames it into place only once the image
is verified, so the final path never holds a partial image.

What criu does on failure (measured on kernel 6.18, criu 4.2.1, and tested in tests/test_criu.py):
a dump that fails (disk full, an undumpable resource) resumes the tree where it was, and it keeps
serving; only a dump that succeeds kills it (we never pass --leave-running: resuming a CUDA
process costs seconds, and the TCP state it would keep running diverges from the image).

Network lock: with --tcp-established criu 4.2 (whose netns it does not dump) drops only the
dumped connections' 4-tuples, in an nftables table `inet CRIU-<run id>` of the pod's netns. The
table stays from a good dump until the restore removes it; the listening port stays usable, so
a container restarted cold after an abandoned image is reachable.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from hibernate.faults import fault_point

MIN_VERSION = (4, 2)
DEFAULT_BUNDLE = Path.home() / ".cache" / "hibernate" / "criu-4.2"
METADATA = "metadata.json"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
# criu's last info line of a dump or restore that worked (logged at -v3 and above).
DUMP_OK = "Dumping finished successfully"
RESTORE_OK = "Restore finished successfully"
# In-pod paths, under the emptyDir the operator mounts at /.hibernate (podinit uses the same).
POD_BUNDLE = PurePosixPath("/.hibernate/criu")
POD_WORKDIR = PurePosixPath("/.hibernate/criu-work")
POD_MARKER = PurePosixPath("/.hibernate/checkpointed")
_BUNDLE_STAMP = ".bundle-id"


class CriuError(RuntimeError):
    """CRIU is missing or too old, an image is unusable, or a dump or restore failed."""


# -- locating the binary --------------------------------------------------------------------------


@dataclass(frozen=True)
class CriuVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Bundle:
    """A criu binary, and the bundle directory around it (bin/, lib/, plugins/) when it has one."""

    criu: Path
    root: Path | None

    @property
    def plugins(self) -> Path | None:
        if self.root is None or not (self.root / "plugins").is_dir():
            return None
        return self.root / "plugins"


def _bundle_of(binary: Path) -> Bundle:
    root = binary.parent.parent
    is_bundle = binary.parent.name == "bin" and (root / "lib").is_dir()
    return Bundle(binary, root if is_bundle else None)


def locate(env: Mapping[str, str] | None = None) -> Bundle:
    """Finds criu: $HIBERNATE_CRIU (binary or bundle dir), the default bundle, then $PATH."""
    env = os.environ if env is None else env
    candidates: list[Path] = []
    if explicit := env.get("HIBERNATE_CRIU"):
        # Configured explicitly: that one or none, so a wrong setting is not hidden by a fallback.
        p = Path(explicit)
        candidates.append(p / "bin" / "criu" if p.is_dir() else p)
    else:
        candidates.append(Path(env.get("HIBERNATE_CRIU_BUNDLE", DEFAULT_BUNDLE)) / "bin" / "criu")
        if found := shutil.which("criu", path=env.get("PATH")):
            candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return _bundle_of(c.absolute())
    raise CriuError(
        f"CRIU {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer is required: no criu binary found "
        f"(looked at {', '.join(map(str, candidates)) or '$PATH'}); build one with hack/build-criu.sh "
        "or set HIBERNATE_CRIU"
    )


def _run_env(bundle_bin: PurePosixPath | Path) -> dict[str, str]:
    # The cuda plugin execs `cuda-checkpoint` from $PATH, so the bundle's bin comes first.
    # LD_LIBRARY_PATH would leak into restored processes; the bundle uses its RPATH instead.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PATH"] = f"{bundle_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@functools.lru_cache(maxsize=8)
def _version_of(binary: Path, mtime_ns: int) -> CriuVersion:
    del mtime_ns  # part of the cache key only: a rebuilt binary is asked again
    try:
        out = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_run_env(binary.parent),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CriuError(f"CRIU {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer is required: {binary}: {e}") from e
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not m:
        raise CriuError(
            f"CRIU {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer is required: {binary} --version failed "
            f"(rc {out.returncode}): {(out.stdout + out.stderr).strip()[:300]}"
        )
    return CriuVersion(int(m[1]), int(m[2]), int(m[3] or 0))


def version(bundle: Bundle | None = None) -> CriuVersion:
    """The version of criu; CriuError if it is missing or older than 4.2.

    4.2 is the floor because older releases fail on recent kernels: 3.17 on the rt vDSO, 4.1 on
    any process with an inet socket (SO_PASSCRED on a non-unix socket).
    """
    bundle = bundle or locate()
    v = _version_of(bundle.criu, bundle.criu.stat().st_mtime_ns)
    if (v.major, v.minor) < MIN_VERSION:
        raise CriuError(
            f"CRIU {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer is required: {bundle.criu} is {v} "
            "(older releases cannot dump inet sockets on recent kernels); build one with hack/build-criu.sh"
        )
    return v


# -- the bundle inside a pod ----------------------------------------------------------------------


def _bundle_id(root: Path) -> str:
    """A digest of every file of a bundle, so a changed bundle is copied again."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != _BUNDLE_STAMP):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_bundle_id(root: Path, mtime_ns: int) -> str:
    del mtime_ns
    return _bundle_id(root)


_SHIM_MODULES = ("agent/cuda.py", "agent/cuda_checkpoint_cli.py")
_SHIM = """#!/bin/sh
# cuda-checkpoint for CRIU's cuda plugin: hibernate's stand-in over the driver API (stdlib only,
# so any python3 runs it; inside a pod, the engine image's).
here=$(dirname "$0")
exec python3 -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); \
from hibernate.agent.cuda_checkpoint_cli import main; sys.exit(main())' "$here/../py" "$@"
"""


def install_cuda_shim(root: Path) -> None:
    """Put a `cuda-checkpoint` into a bundle's bin/ for CRIU's cuda plugin, which execs it from $PATH.

    NVIDIA's binary is rarely installed (it is not on our GPU machine); the stand-in speaks its command
    line over the same driver calls the agent makes. Idempotent: files are rewritten only if they differ.
    """
    package = Path(__file__).resolve().parents[1]
    files = {f"py/hibernate/{m}": (package / m).read_bytes() for m in _SHIM_MODULES}
    files["py/hibernate/__init__.py"] = b""
    files["py/hibernate/agent/__init__.py"] = b""
    files["bin/cuda-checkpoint"] = _SHIM.encode()
    for rel, data in files.items():
        path = root / rel
        with contextlib.suppress(OSError):
            if path.read_bytes() == data:
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if rel.startswith("bin/"):
            path.chmod(0o755)


def copy_bundle_into(dest: Path, bundle: Bundle | None = None) -> Path:
    """Makes `dest` (the pod's emptyDir as the host sees it, e.g. /proc/<init>/root/.hibernate/criu)
    a copy of the bundle, unless an identical copy is already there. Returns dest.

    The copy is assembled beside dest and renamed into place, so a pod never sees half a bundle.
    """
    bundle = bundle or locate()
    if bundle.root is None:
        raise CriuError(
            f"{bundle.criu} is not part of a bundle (bin/criu + lib/): build one with hack/build-criu.sh"
        )
    want = _cached_bundle_id(bundle.root, bundle.criu.stat().st_mtime_ns)
    with contextlib.suppress(OSError):
        if (dest / _BUNDLE_STAMP).read_text().strip() == want:
            return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(bundle.root, tmp, symlinks=True)
        install_cuda_shim(tmp)
        (tmp / _BUNDLE_STAMP).write_text(want + "\n")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


# -- GPU identity and image metadata --------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """What a checkpoint image is bound to: the GPU model and the NVIDIA driver version."""

    model: str | None
    driver: str | None


def detect_gpu(proc: Path = Path("/proc")) -> GpuInfo:
    """The node's NVIDIA GPU model(s) and driver version from the driver's /proc files; None without."""
    driver = None
    with contextlib.suppress(OSError):
        text = (proc / "driver" / "nvidia" / "version").read_text()
        if m := re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text):
            driver = m[1]
    models: set[str] = set()
    with contextlib.suppress(OSError):
        for info in (proc / "driver" / "nvidia" / "gpus").glob("*/information"):
            if m := re.search(r"^Model:\s*(.+?)\s*$", info.read_text(), re.MULTILINE):
                models.add(m[1])
    return GpuInfo(" + ".join(sorted(models)) or None, driver)


@dataclass(frozen=True)
class ImageMetadata:
    """metadata.json, written beside every image."""

    gpu_model: str | None
    driver_version: str | None
    criu_version: str
    kernel_release: str
    engine_pid: int  # the root task's pid as criu saw it: inside the pod's pid namespace
    created: str  # RFC 3339, UTC
    image_bytes: int
    format: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, image: Path) -> ImageMetadata:
        try:
            raw = json.loads((image / METADATA).read_text())
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (OSError, ValueError, TypeError) as e:
            raise CriuError(f"checkpoint image {image} is incomplete: unreadable {METADATA}: {e}") from e


def image_dir(checkpoint_dir: Path | str, namespace: str, pod: str, container: str) -> Path:
    """`<checkpoint dir>/<namespace>/<pod>/<container>/`; refuses names that would escape it."""
    for part in (namespace, pod, container):
        if not part or part in (".", "..") or "/" in part or part.startswith("."):
            raise ValueError(f"invalid path component for a checkpoint image: {part!r}")
    return Path(checkpoint_dir) / namespace / pod / container


def _image_bytes(image: Path) -> int:
    return sum(p.stat().st_size for p in image.glob("*.img"))


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    keep = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in keep if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    # criu's first real error says more than its last lines; the RLIMIT one is always there.
    picked = [*errors[:5], "...", *keep[-lines:]] if errors else keep[-lines:]
    return "\n".join(picked)


def _logged_at_end(log: Path, marker: str) -> bool:
    """Whether `marker` is among the log's last lines (a restore logs a few more after it)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2048))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return marker in tail


def check_image(image: Path) -> list[str]:
    """What is wrong with a CRIU image directory, as a list of problems (empty when complete)."""
    problems = []
    if not image.is_dir():
        return [f"{image} does not exist"]
    if not _logged_at_end(image / DUMP_LOG, DUMP_OK):
        problems.append(f"{DUMP_LOG} does not end with {DUMP_OK!r}")
    for pattern in ("inventory.img", "pstree.img", "core-*.img", "pagemap-*.img", "mm-*.img"):
        found = list(image.glob(pattern))
        if not found:
            problems.append(f"no {pattern}")
        problems += [f"{p.name} is empty" for p in found if p.stat().st_size == 0]
    return problems


def verify_image(image: Path) -> ImageMetadata:
    """The image's metadata, or CriuError naming what makes it unusable."""
    problems = check_image(image)
    if problems:
        raise CriuError(f"checkpoint image {image} is incomplete: {'; '.join(problems)}")
    return ImageMetadata.load(image)


def check_compatible(meta: ImageMetadata, node: GpuInfo, image: Path | str = "") -> None:
    """Refuses an image taken on another GPU model or driver: CUDA state does not carry over.

    An image of a process that had no GPU (both fields None) restores anywhere.
    """
    took = GpuInfo(meta.gpu_model, meta.driver_version)
    if took.model is None and took.driver is None:
        return
    if took != node:
        raise CriuError(
            f"checkpoint image {image} was taken on GPU {took.model!r} with driver {took.driver!r}, "
            f"but this node has GPU {node.model!r} with driver {node.driver!r}: a CUDA checkpoint is "
            "only valid on the same GPU model and driver; refusing to restore (delete the image for a cold start)"
        )


def remove_image(image: Path) -> None:
    shutil.rmtree(image, ignore_errors=True)


# -- where criu runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """The pod whose namespaces criu enters; all paths are as the pod sees them."""

    init_pid: int  # host pid of the container's PID 1 (hibernate.podinit)
    bundle: PurePosixPath = POD_BUNDLE
    workdir: PurePosixPath = POD_WORKDIR
    # Written before a dump and removed after a restore, so the init outlives its engine;
    # None when the caller manages it.
    marker: PurePosixPath | None = POD_MARKER

    def host_path(self, p: PurePosixPath) -> Path:
        """The host's view of a path inside the pod's mount namespace."""
        return Path(f"/proc/{self.init_pid}/root") / p.relative_to("/")


def ns_pid(host_pid: int) -> int:
    """A process's pid in its innermost pid namespace (the last NSpid field)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise CriuError(f"no NSpid for pid {host_pid}")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _descendants(pid: int) -> Iterator[int]:
    for kid in _children(pid):
        yield from _descendants(kid)
        yield kid


def _alive(host_pid: int) -> bool:
    try:
        stat = Path(f"/proc/{host_pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def host_pid_in_pod(init_pid: int, pid_in_pod: int) -> int | None:
    """The host pid of the pod's process `pid_in_pod`, looked up among the init's descendants."""
    for host in _descendants(init_pid):
        with contextlib.suppress(OSError, CriuError):
            if ns_pid(host) == pid_in_pod and _alive(host):
                return host
    return None


@dataclass(frozen=True)
class DumpResult:
    image: Path
    metadata: ImageMetadata
    seconds: float
    log: Path


@dataclass(frozen=True)
class RestoreResult:
    pid: int  # the engine's pid as criu saw it (inside the pod for a Pod)
    host_pid: int | None
    seconds: float
    log: Path
    warnings: list[str] = field(default_factory=list)


def _criu_command(
    pod: Pod | None, bundle: Bundle, action: str, dir_fd: int, args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    if pod is None:
        # On the host: criu leads its own session (start_new_session) for --shell-job.
        plugins = bundle.plugins
        if plugins is not None and bundle.root is not None:
            install_cuda_shim(bundle.root)
        cmd = [str(bundle.criu), action]
        bin_dir: PurePosixPath | Path = bundle.criu.parent
    else:
        bin_dir = pod.bundle / "bin"
        plugin_dir = pod.bundle / "plugins"
        plugins = Path(str(plugin_dir)) if pod.host_path(plugin_dir).is_dir() else None
        # setsid inside the pod's pid namespace: on restore, --shell-job makes the tree join criu's
        # session, whose leader must live in that namespace. -w: if setsid has to fork, wait.
        cmd = ["nsenter", "-t", str(pod.init_pid), "-p", "-m", "-n", "-i", "-u", "--"]
        cmd += [str(bin_dir / "setsid"), "-w", str(bin_dir / "criu"), action]
    cmd += ["-D", f"/proc/self/fd/{dir_fd}", "-v4", "--shell-job"]
    if plugins is not None:
        cmd += ["-L", str(plugins)]
    return cmd + list(args), _run_env(bin_dir)


def _run(
    cmd: list[str], env: dict[str, str], dir_fd: int, timeout: float, what: str, fault: str
) -> tuple[int, str]:
    """Runs criu; on timeout kills it (and nsenter) and raises. Returns (rc, stdout+stderr).

    criu inherits `dir_fd`, which carries the agent's flock on the directory (`_locked_dir`), and
    writes its output to a file, not a pipe: should the agent die while criu runs, criu finishes
    on its own (no SIGPIPE) and holds the lock until it exits, so the next agent waits for it
    (`wait_for_criu`) before it reads the directory.
    """
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(dir_fd,),
            env=env,
            start_new_session=True,
        )
        fault_point(fault)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # criu is nsenter's child in its own session inside the pod: kill by pid, deepest first.
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            raise CriuError(
                f"criu {what} timed out after {timeout:.0f} s and was killed; the tree it had seized resumes "
                "once criu is gone"
            ) from None
        output.seek(0)
        out = output.read()
    return proc.returncode, out.decode(errors="replace").strip()


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _locked_dir(path: Path) -> int:
    """An fd of `path` holding an exclusive flock, for criu to inherit (see `_run`)."""
    fd = _open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CriuError(f"{path} is in use by another criu (an earlier agent's dump or restore)") from None
    return fd


# -- after an agent died mid-way ------------------------------------------------------------------


def _partials(image: Path) -> list[Path]:
    return sorted(image.parent.glob(f".{image.name}.partial-*"))


def _swapped_out(image: Path) -> list[Path]:
    return sorted(image.parent.glob(f".{image.name}.old-*"))


def wait_for_criu(image: Path, timeout: float = 600.0) -> bool:
    """Waits until no criu works on `image` or its temporary directories; True if it had to wait.

    An agent that dies during a dump or restore leaves criu running (its own session, output to a
    file); criu holds the directory's flock until it exits. Only then does the directory say what
    happened. Raises CriuError after `timeout` (a criu that hangs holds the engine frozen).
    """
    waited = False
    deadline = time.monotonic() + timeout
    for path in [*_partials(image), image]:
        try:
            fd = _open_dir(path)
        except OSError:
            continue
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CriuError(
                            f"a criu left by an earlier agent still works on {path} after {timeout:.0f} s"
                        ) from None
                    waited = True
                    time.sleep(0.05)
        finally:
            os.close(fd)  # releases the lock
    return waited


def settle(image: Path, engine_running: bool) -> list[str]:
    """After an agent died mid-dump: leave `image` complete or absent, and no temporary directory.

    Call after `wait_for_criu`. A dump that criu finished after its agent died (a complete image
    in the temporary directory, the engine gone) is the only copy of the engine: it is completed
    (metadata) and renamed into place. Any other temporary directory is removed, and so is a
    swapped-out older image once `image` is there. Returns what it did, for the log.
    """
    done: list[str] = []
    for tmp in _partials(image):
        if not engine_running and not image.exists() and not check_image(tmp):
            try:
                meta = ImageMetadata.load(tmp)
            except CriuError:
                meta = None
            if meta is not None:
                meta = ImageMetadata(**{**asdict(meta), "image_bytes": _image_bytes(tmp)})
                (tmp / METADATA).write_text(meta.to_json())
                tmp.rename(image)
                done.append(f"adopted the complete image that criu finished in {tmp.name}")
                continue
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the unfinished image {tmp.name}")
    for old in _swapped_out(image):
        if not image.exists() and not engine_running and not check_image(old):
            old.rename(image)
            done.append(f"put back the image {old.name} that a replacement left swapped out")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the replaced image {old.name}")
    return done


# -- dump -----------------------------------------------------------------------------------------


def dump(
    image: Path,
    pid: int,
    pod: Pod | None = None,
    *,
    timeout: float = 600.0,
    tcp_established: bool = True,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    extra_args: Sequence[str] = (),
) -> DumpResult:
    """Checkpoints the process tree rooted at `pid` into `image`; the tree ends.

    `pid` is as criu sees it: the engine's pid inside the pod's pid namespace when `pod` is
    given (criu then runs in all of its namespaces), a host pid otherwise. Returns only after
    the image is verified complete (criu exited 0, its log ends with success, the core, pstree,
    mm and pagemap images are there and nonempty) and metadata.json is written; only then is
    the image renamed to `image`, replacing an older one. On any failure the partial image is
    removed and CriuError carries the log's errors; when criu itself failed (disk full, timeout)
    the tree keeps running and the pod's marker is removed. Should criu report success for an
    image that then fails verification, the tree has already ended: the error says so.

    tcp_established: connections to the engine (probes, the gateway) are dumped and restored
    instead of failing the dump; the network is locked with nftables, which criu links in, so
    the container needs no iptables.
    """
    started = time.monotonic()
    bundle = bundle or locate()
    criu_version = version(bundle)
    gpu = gpu if gpu is not None else detect_gpu()
    host_pid = pid
    if pod is not None:
        copy_bundle_into(pod.host_path(pod.bundle), bundle)
        found = host_pid_in_pod(pod.init_pid, pid)
        if found is None:
            raise CriuError(f"no process with pid {pid} in the pod of init {pod.init_pid}")
        host_pid = found
    elif not _alive(pid):
        raise CriuError(f"no process with pid {pid}")
    tree = [host_pid, *_descendants(host_pid)]

    image.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.with_name(f".{image.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    marker = pod.host_path(pod.marker) if pod is not None and pod.marker is not None else None
    # Written first, so that a dump criu finishes after its agent died can be completed (`settle`).
    meta = ImageMetadata(
        gpu_model=gpu.model,
        driver_version=gpu.driver,
        criu_version=str(criu_version),
        kernel_release=os.uname().release,
        engine_pid=pid,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        image_bytes=0,
    )
    try:
        (tmp / METADATA).write_text(meta.to_json())
        if marker is not None:
            # Before criu ends the engine, so the init does not take the container down with it.
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{image}\n")
        fd = _locked_dir(tmp)
        try:
            args = ["-t", str(pid), "-o", DUMP_LOG]
            if tcp_established:
                args += ["--tcp-established", "--network-lock", "nftables"]
            cmd, env = _criu_command(pod, bundle, "dump", fd, [*args, *extra_args])
            rc, out = _run(cmd, env, fd, timeout, "dump", fault="agent.criu-dump-running")
        finally:
            os.close(fd)
        if rc == 0:
            fault_point("agent.criu-after-dump")
        if rc != 0:
            tail = _log_tail(tmp / DUMP_LOG)
            raise CriuError(
                f"criu dump of pid {pid} failed (rc {rc}){_cause(out + tail, image.parent)}{_fate(host_pid)}: "
                f"{out}\n{tail}"
            )
        problems = check_image(tmp)
        if problems:
            raise CriuError(
                f"criu dump of pid {pid} left an incomplete image{_fate(host_pid)}: {'; '.join(problems)}"
            )
        meta = ImageMetadata(**{**asdict(meta), "image_bytes": _image_bytes(tmp)})
        (tmp / METADATA).write_text(meta.to_json())
        _replace_dir(tmp, image)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if marker is not None and _alive(host_pid):
            marker.unlink(missing_ok=True)  # the engine still runs: back to normal
        raise
    _wait_gone(tree, reaped=pod is not None)
    return DumpResult(image, meta, time.monotonic() - started, image / DUMP_LOG)


def _wait_gone(host_pids: Sequence[int], reaped: bool, timeout: float = 5.0) -> None:
    """Waits until criu's kill has taken the dumped tree down.

    In a pod, until the init has reaped every process: a pid of the image that is still a
    zombie (or a session or group id held by one) makes the next restore fail with
    "Can't fork for N: File exists". On the host, the reaper is the caller's business.
    """
    deadline = time.monotonic() + timeout
    for pid in host_pids:
        while time.monotonic() < deadline and (Path(f"/proc/{pid}").exists() if reaped else _alive(pid)):
            time.sleep(0.005)


def _cause(text: str, directory: Path) -> str:
    """The reason of a failed dump, first in the message (criu's log follows), where it is a known one."""
    if "No space left on device" in text or "Disk quota exceeded" in text:
        free = ""
        with contextlib.suppress(OSError):
            st = os.statvfs(directory)
            free = (
                f", {st.f_bavail * st.f_frsize // 2**20} MiB free of {st.f_blocks * st.f_frsize // 2**20} MiB"
            )
        return f": No space left on device for the image under {directory}{free}"
    return ""


def _fate(host_pid: int) -> str:
    """What became of the engine after a failed dump, for the error message."""
    if _alive(host_pid):
        return "; the engine keeps running"
    return "; the engine has ended and no image was kept (remove the checkpoint marker for a cold start)"


def _replace_dir(new: Path, final: Path) -> None:
    """Moves `new` to `final`; an existing `final` is swapped out first, then deleted."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# -- restore --------------------------------------------------------------------------------------


def restore(
    image: Path,
    pod: Pod | None = None,
    *,
    timeout: float = 600.0,
    tcp_established: bool = True,
    gpu: GpuInfo | None = None,
    bundle: Bundle | None = None,
    extra_args: Sequence[str] = (),
) -> RestoreResult:
    """Restores the tree in `image`: into the pod's namespaces when `pod` is given (same pids,
    reparented to the pod's init), on the host otherwise.

    Refuses, with CriuError and before touching anything, an image that is missing or
    incomplete, or one taken on another GPU model or driver than `gpu` (default: this node's).
    The pids of the image must be free. On success the pod's checkpoint marker is removed; on
    failure it stays (the engine is still gone, and the init must keep the pod alive until the
    agent retries or gives up).
    """
    started = time.monotonic()
    meta = verify_image(image)
    check_compatible(meta, gpu if gpu is not None else detect_gpu(), image)
    bundle = bundle or locate()
    version(bundle)
    # criu would fail with "Can't fork for N: File exists"; say what is going on instead.
    taken = host_pid_in_pod(pod.init_pid, meta.engine_pid) if pod is not None else None
    if pod is None and _alive(meta.engine_pid):
        taken = meta.engine_pid
    if taken is not None:
        raise CriuError(
            f"cannot restore {image}: pid {meta.engine_pid} is in use (host pid {taken}); "
            "is the engine already running?"
        )
    log = image / RESTORE_LOG
    tcp = ["--tcp-established", "--network-lock", "nftables"] if tcp_established else []
    warnings = []
    fd = _locked_dir(image)
    try:
        rc, out = _restore_once(pod, bundle, fd, timeout, [*extra_args, *tcp], log)
        if tcp_established and (rc != 0 or not _logged_at_end(log, RESTORE_OK)) and _tcp_trouble(log):
            # A connection its peer had half closed when the engine was dumped (a client that died
            # during the dump) cannot be restored under the network lock: criu's FIN is dropped
            # ("Unable to send a fin packet"). Restore with the TCP connections closed instead;
            # clients reconnect. The failed attempt's processes must be reaped first.
            _wait_pid_free(pod, meta.engine_pid)
            first = _tcp_trouble_line(log)
            rc, out = _restore_once(
                pod, bundle, fd, timeout, [*extra_args, "--tcp-close", "--network-lock", "nftables"], log
            )
            warnings.append(f"restored with its TCP connections closed, after: {first}")
    finally:
        os.close(fd)
    if rc != 0 or not _logged_at_end(log, RESTORE_OK):
        raise CriuError(f"criu restore from {image} failed (rc {rc}): {out}\n{_log_tail(log)}")
    host_pid = host_pid_in_pod(pod.init_pid, meta.engine_pid) if pod is not None else meta.engine_pid
    if pod is not None and pod.marker is not None:
        pod.host_path(pod.marker).unlink(missing_ok=True)
    if host_pid is None or not _alive(host_pid):
        warnings.append(f"restored pid {meta.engine_pid} is not running after the restore")
    return RestoreResult(meta.engine_pid, host_pid, time.monotonic() - started, log, warnings)


def _restore_once(
    pod: Pod | None, bundle: Bundle, fd: int, timeout: float, extra: list[str], log: Path
) -> tuple[int, str]:
    if pod is None:
        args = ["-d", "-o", RESTORE_LOG]
        cmd, env = _criu_command(None, bundle, "restore", fd, args + extra)
        return _run(cmd, env, fd, timeout, "restore", fault="agent.criu-restore-running")
    copy_bundle_into(pod.host_path(pod.bundle), bundle)
    # The work dir (criu's cgroup yard is mounted there) must be inside the pod's mount
    # namespace, and criu writes its log there; the log is copied beside the image.
    work = pod.host_path(pod.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / RESTORE_LOG).unlink(missing_ok=True)
    args = ["-d", "-W", str(pod.workdir), "-o", RESTORE_LOG]
    cmd, env = _criu_command(pod, bundle, "restore", fd, args + extra)
    rc, out = _run(cmd, env, fd, timeout, "restore", fault="agent.criu-restore-running")
    with contextlib.suppress(OSError):
        shutil.copyfile(work / RESTORE_LOG, log)
    return rc, out


_TCP_ERROR = re.compile(r"^.*Error \((?:soccr/|criu/sk-tcp).*$", re.MULTILINE)


def _tcp_trouble_line(log: Path) -> str:
    """The line of a failed restore's log that blames a TCP connection (criu's soccr or sk-tcp), or ''."""
    try:
        found = _TCP_ERROR.search(log.read_text(errors="replace"))
    except OSError:
        return ""
    return found.group(0).strip() if found else ""


def _tcp_trouble(log: Path) -> bool:
    return bool(_tcp_trouble_line(log))


def _wait_pid_free(pod: Pod | None, pid_in_pod: int, timeout: float = 5.0) -> None:
    """Until no process of the pod, a zombie included, has `pid_in_pod` (a failed restore's leftovers)."""
    if pod is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        taken = False
        for host in _descendants(pod.init_pid):
            with contextlib.suppress(OSError, CriuError):
                taken = taken or ns_pid(host) == pid_in_pod
        if not taken:
            return
        time.sleep(0.02)
