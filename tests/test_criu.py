"""Level 4 plumbing: the CRIU wrapper (hibernate.agent.criu), the pod init, and both together on a
simulated pod (tests/simpod.py).

CRIU tests need root and the bundle from hack/build-criu.sh; they are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hibernate.agent import criu
from hibernate.localnode.simpod import SimPod
from tests.engine_fixtures import SIMPOD_ENGINE

PODINIT = Path(criu.__file__).resolve().parents[2] / "podinit.py"
ENGINE_MIB = 256

# The engine under test: an HTTP counter, ENGINE_MIB of touched memory and its hash, and a forked
# worker on a pipe (an engine is a process tree). Stdlib only, so it runs with any python.
ENGINE = r"""
import hashlib, http.server, json, os, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
host = "127.0.0.1" if "--loopback" in sys.argv else "0.0.0.0"
worker = 0
if "--no-worker" not in sys.argv:
    r, w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.close(w)
        os.read(r, 1)  # returns when the engine ends
        os._exit(0)
    os.close(r)
blob = bytearray(os.urandom(1 << 20) * mib)
for i in range(0, len(blob), 4096):  # a distinct first word per page: nothing zero or deduplicated
    blob[i:i + 8] = i.to_bytes(8, "little")
digest = hashlib.sha256(blob).hexdigest()
count = 0

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, for the established-connection checks

    def do_GET(self):
        global count
        count += 1
        body = {"count": count, "pid": os.getpid(), "digest": digest,
                "worker_alive": worker == 0 or os.waitpid(worker, os.WNOHANG) == (0, 0)}
        if self.path == "/hash":
            body["hash"] = hashlib.sha256(blob).hexdigest()
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)

print(f"engine pid {os.getpid()} on {host}:{port}, {mib} MiB, digest {digest}", flush=True)
http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
"""


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> criu.Bundle:
    if os.geteuid() != 0:
        pytest.skip("CRIU tests need root")
    for tool in ("unshare",):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is missing")
    try:
        b = criu.locate()
        criu.version(b)
    except criu.CriuError as e:
        pytest.skip(f"no usable CRIU bundle: {e}")
    if b.root is None or b.nsjoin is None:
        pytest.skip(f"{b.criu} is not a bundle with hibernate-nsjoin.so; build one with hack/build-criu.sh")
    return b


@pytest.fixture(scope="module")
def pod(bundle: criu.Bundle) -> Iterator[SimPod]:
    """One pod for the module (starting one costs ~1 s); every test leaves its engine serving."""
    with SimPod.start(
        [sys.executable, "/.hibernate/engine.py", "8000", str(ENGINE_MIB)], files={"engine.py": ENGINE}
    ) as p:
        yield p


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return criu.image_dir(tmp_path / "checkpoints", "default", "llama-0", "engine")


def state(pod: SimPod, path: str = "/state") -> dict[str, Any]:
    data = pod.get_json(path)
    assert isinstance(data, dict)
    return data


def ask(conn: http.client.HTTPConnection, path: str = "/state") -> dict[str, Any]:
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    assert isinstance(data, dict)
    return data


def rss_bytes(pod: SimPod) -> int:
    """Resident anonymous memory charged to the container (v1 memory.stat), 0 without it."""
    with contextlib.suppress(LookupError, OSError):
        for line in (pod.cgroup("memory") / "memory.stat").read_text().splitlines():
            if line.startswith("rss "):
                return int(line.split()[1])
    return 0


def leftovers(image: Path) -> list[str]:
    """Hidden partial/old siblings a dump must never leave behind."""
    return [p.name for p in image.parent.iterdir() if p.name.startswith(".")] if image.parent.exists() else []


# -- the wrapper itself ---------------------------------------------------------------------------


def test_version_requires_a_binary(tmp_path: Path) -> None:
    env = {"HIBERNATE_CRIU": str(tmp_path / "nope"), "HIBERNATE_CRIU_BUNDLE": str(tmp_path), "PATH": ""}
    with pytest.raises(criu.CriuError, match=r"CRIU 4\.2 or newer is required"):
        criu.locate(env)


def test_version_refuses_old_criu(tmp_path: Path) -> None:
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    b = criu.locate({"HIBERNATE_CRIU": str(old), "PATH": ""})
    with pytest.raises(criu.CriuError, match=r"CRIU 4\.2 or newer is required: .* is 3\.17\.1"):
        criu.version(b)


def test_the_end_of_a_criu_run_wakes_the_agent_instead_of_being_polled_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Popen.wait(timeout) sleeps up to 50 ms between looks: each dump and restore paid for it.
    from hibernate.agent.criu import nsexec

    def no_sleeping(seconds: float) -> None:
        raise AssertionError(f"polled with a {seconds} s sleep")

    monkeypatch.setattr(time, "sleep", no_sleeping)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import os, select; select.select([], [], [], 0.3); os._exit(7)"]
    )
    assert nsexec.wait_exit(proc, timeout=30) == 7
    assert proc.returncode == 7


def test_a_criu_run_past_its_timeout_raises_and_is_left_for_the_caller_to_kill() -> None:
    from hibernate.agent.criu import nsexec

    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            nsexec.wait_exit(proc, timeout=0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_image_dir_layout(tmp_path: Path) -> None:
    assert criu.image_dir(tmp_path, "ns", "pod-1", "engine") == tmp_path / "ns" / "pod-1" / "engine"
    for bad in ("..", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            criu.image_dir(tmp_path, "ns", bad, "engine")


@pytest.mark.criu
def test_finds_criu_bundle(bundle: criu.Bundle) -> None:
    v = criu.version(bundle)
    assert (v.major, v.minor) >= (4, 2)
    assert bundle.nsjoin is not None  # the preload library that enters a pod (nsjoin.c)
    out = subprocess.run([str(bundle.criu), "check"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# -- a plain process on the host ------------------------------------------------------------------


@pytest.mark.criu
def test_plain_process_dump_and_restore(bundle: criu.Bundle, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free loopback port (a race with others is unlikely)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As the design asks of an engine: stdin /dev/null, logs appended to a file, its own session.
    # No worker child: its zombie would hold the pid (as a session id) until the host init reaps it.
    log = os.open(tmp_path / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    src = tmp_path / "engine.py"
    src.write_text(ENGINE)
    engine = subprocess.Popen(
        [sys.executable, str(src), str(port), "16", "--loopback", "--no-worker"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    os.close(log)
    url = f"http://127.0.0.1:{port}/state"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                before = json.loads(urllib.request.urlopen(url, timeout=2).read())
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"engine did not start: {(tmp_path / 'engine.log').read_text()}")
        image = tmp_path / "img"
        result = criu.dump(image, engine.pid, bundle=bundle)
        assert engine.wait(timeout=5) == -signal.SIGKILL  # criu ends the tree after a good dump
        assert result.metadata.engine_pid == engine.pid
        assert list(result.steps) == ["prepare", "criu", "verify", "gone"], "where the dump's time went"
        assert sum(result.steps.values()) == pytest.approx(result.seconds)
        assert result.steps["criu"] > 0
        restored = criu.restore(image, bundle=bundle)
        assert restored.pid == engine.pid and restored.warnings == []
        after = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert after["pid"] == engine.pid
        assert after["count"] == before["count"] + 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            engine.wait(timeout=5)


# -- the simulated pod ----------------------------------------------------------------------------


@pytest.mark.criu
def test_pod_dump_and_restore_in_place(pod: SimPod, ckpt: Path) -> None:
    conn = pod.http_connection()  # an established connection from outside the engine's tree
    before = ask(conn)
    assert before["worker_alive"] is True
    ns_pid, host_pid = pod.engine_ns_pid(), pod.engine_host_pid()
    assert host_pid is not None
    rss_awake = rss_bytes(pod)

    result = criu.dump(ckpt, ns_pid, criu.Pod(pod.init_pid), checkpoint_root=ckpt.parents[2])

    # The engine and its worker are gone, their memory freed; the pod's init lives on.
    assert pod.engine_host_pid() is None and not Path(f"/proc/{host_pid}").exists()
    assert pod.init_alive()
    if rss_awake:
        assert rss_bytes(pod) < rss_awake - ENGINE_MIB * 2**20 // 2
    assert (pod.root / ".hibernate" / "checkpointed").exists()
    # A complete image with its metadata, at its final path, and nothing partial beside it.
    assert criu.check_image(ckpt) == []
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["engine_pid"] == ns_pid and meta["criu_version"].startswith("4.")
    assert meta["kernel_release"] == os.uname().release
    assert meta["gpu_model"] is None and meta["driver_version"] is None  # no GPU here
    assert meta["image_bytes"] == result.metadata.image_bytes > ENGINE_MIB * 2**20
    assert leftovers(ckpt) == []
    # Process memory is private: root-only directories from the checkpoint root down, files 0600.
    for d in (ckpt, ckpt.parent, ckpt.parent.parent, ckpt.parent.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert {stat.S_IMODE(f.stat().st_mode) for f in ckpt.iterdir()} == {0o600}
    assert criu.check_private(ckpt) == []

    restored = criu.restore(ckpt, criu.Pod(pod.init_pid))

    # Same pid in the pod, a child of the pod's init again, in the container's cgroup.
    assert restored.pid == ns_pid and pod.engine_ns_pid() == ns_pid
    new_host_pid = pod.engine_host_pid()
    assert new_host_pid == restored.host_pid
    status = Path(f"/proc/{new_host_pid}/status").read_text()
    assert f"PPid:\t{pod.init_pid}\n" in status
    assert pod.container_id in Path(f"/proc/{new_host_pid}/cgroup").read_text()
    assert not (pod.root / ".hibernate" / "checkpointed").exists()
    # State intact: the counter goes on over the old connection, memory hashes the same.
    after = ask(conn)
    assert after["count"] == before["count"] + 1 and after["worker_alive"] is True
    hashed = state(pod, "/hash")
    assert hashed["hash"] == before["digest"]
    conn.close()
    # A second restore of the same image would clash with the running engine.
    with pytest.raises(criu.CriuError, match="is the engine already running"):
        criu.restore(ckpt, criu.Pod(pod.init_pid))


@pytest.mark.criu
def test_restore_refuses_another_gpu_or_driver(pod: SimPod, ckpt: Path) -> None:
    taken_on = criu.GpuInfo("NVIDIA A100-SXM4-80GB", "570.86.15")
    criu.dump(ckpt, pod.engine_ns_pid(), criu.Pod(pod.init_pid), gpu=taken_on)
    meta = criu.verify_image(ckpt)
    assert (meta.gpu_model, meta.driver_version) == (taken_on.model, taken_on.driver)
    try:
        for node in (
            criu.GpuInfo("NVIDIA H100 80GB HBM3", "570.86.15"),
            criu.GpuInfo(taken_on.model, "580.1"),
        ):
            with pytest.raises(criu.CriuError, match="same GPU model and driver; refusing to restore"):
                criu.restore(ckpt, criu.Pod(pod.init_pid), gpu=node)
        with pytest.raises(criu.CriuError, match="refusing to restore"):
            criu.restore(ckpt, criu.Pod(pod.init_pid))  # this node: no GPU at all
        assert pod.engine_host_pid() is None  # nothing was started
    finally:
        criu.restore(ckpt, criu.Pod(pod.init_pid), gpu=taken_on)
    assert state(pod)["worker_alive"] is True


@pytest.mark.criu
def test_restore_refuses_incomplete_image(pod: SimPod, ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(criu.CriuError, match=r"incomplete: .* does not exist"):
        criu.restore(tmp_path / "missing", criu.Pod(pod.init_pid))
    criu.dump(ckpt, pod.engine_ns_pid(), criu.Pod(pod.init_pid))
    try:
        broken = tmp_path / "broken"
        broken.mkdir(mode=0o700)
        for f in ckpt.iterdir():  # everything but the page data and the process tree
            if not f.name.startswith(("pages-", "pstree")):
                shutil.copy(f, broken / f.name)
        with pytest.raises(criu.CriuError, match=r"incomplete: no pstree\.img"):
            criu.restore(broken, criu.Pod(pod.init_pid))
        shutil.copy(ckpt / "pstree.img", broken / "pstree.img")
        next(broken.glob("core-*.img")).write_bytes(b"")
        with pytest.raises(criu.CriuError, match=r"incomplete: core-\d+\.img is empty"):
            criu.restore(broken, criu.Pod(pod.init_pid))
        (broken / "metadata.json").unlink()
        next(broken.glob("core-*.img")).write_bytes(b"x")
        with pytest.raises(criu.CriuError, match=r"unreadable metadata\.json"):
            criu.restore(broken, criu.Pod(pod.init_pid))
        assert pod.engine_host_pid() is None
    finally:
        criu.restore(ckpt, criu.Pod(pod.init_pid))
    assert state(pod)["worker_alive"] is True


@pytest.mark.criu
def test_dump_to_a_full_disk_fails_cleanly(pod: SimPod, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        image = criu.image_dir(small, "default", "llama-0", "engine")
        before = state(pod)
        host_pid = pod.engine_host_pid()
        with pytest.raises(criu.CriuError, match="No space left on device"):
            criu.dump(image, pod.engine_ns_pid(), criu.Pod(pod.init_pid))
        # criu resumed the tree: same process, still serving, state intact; no image, no marker.
        assert pod.engine_host_pid() == host_pid
        after = state(pod)
        assert after["count"] == before["count"] + 1 and after["worker_alive"] is True
        assert not image.exists() and leftovers(image) == []
        assert not (pod.root / ".hibernate" / "checkpointed").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.criu
def test_fake_engine_in_a_pod(bundle: criu.Bundle, tmp_path: Path) -> None:
    """The project's fake vLLM engine survives a checkpoint in a pod (if it is importable)."""
    probe = subprocess.run([sys.executable, "-c", "import hibernate.engine.fake"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("hibernate.engine.fake is not importable")
    with SimPod.start(SIMPOD_ENGINE, ready_path="/health") as p:
        image = criu.image_dir(tmp_path, "default", "tiny-0", "engine")
        status, models = p.http_get("/v1/models")
        assert status == 200
        criu.dump(image, p.engine_ns_pid(), criu.Pod(p.init_pid), bundle=bundle)
        assert p.engine_host_pid() is None
        criu.restore(image, criu.Pod(p.init_pid), bundle=bundle)
        assert p.http_get("/v1/models") == (200, models)


# -- a pod given host devices and volumes (a GPU's nodes, a weights directory) ----------------------

# Runs in the pod: stats and opens each path, writes a file into the volume, reports to the emptyDir.
DEVICE_PROBE = r"""
import json, os, stat, sys, time
paths, volume = json.loads(sys.argv[1]), sys.argv[2]
seen = {}
for path in paths:
    try:
        st = os.stat(path)
    except OSError as e:
        seen[path] = {"error": str(e)}
        continue
    entry = {"chr": stat.S_ISCHR(st.st_mode), "dir": stat.S_ISDIR(st.st_mode), "rdev": st.st_rdev}
    if stat.S_ISCHR(st.st_mode) and path != "/dev/net/tun":
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            entry["opened"] = True
        except OSError as e:
            entry["opened"] = str(e)
    seen[path] = entry
with open(os.path.join(volume, "from-host")) as f:
    seen["volume read"] = f.read()
with open(os.path.join(volume, "from-pod"), "w") as f:
    f.write("pod")
with open("/.hibernate/devices.json.tmp", "w") as f:
    json.dump(seen, f)
os.rename("/.hibernate/devices.json.tmp", "/.hibernate/devices.json")
time.sleep(600)
"""


def test_simpod_binds_host_devices_and_volumes(tmp_path: Path) -> None:
    """SimPod.start(devices=..., volumes=...), as the GPU tests use it for /dev/nvidia* and the weights:
    host device nodes show up in the pod's own /dev as the host's (same device numbers, usable, though
    the pod made none of them with mknod), a directory of devices with its nodes, and a host directory
    at the same path, written through to the host."""
    if os.geteuid() != 0:
        pytest.skip("a simulated pod needs root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    # A char device the pod does not make itself, harmless to open for reading.
    fresh = next(
        (d for d in ("/dev/kmsg", "/dev/loop-control", "/dev/fuse") if Path(d).is_char_device()), None
    )
    if fresh is None:
        pytest.skip("no harmless host char device to bind (/dev/kmsg, /dev/loop-control, /dev/fuse)")
    devices = ["/dev/full", fresh]  # /dev/full is also one the pod mknods: the bind goes over it
    if Path("/dev/net/tun").is_char_device():
        devices.append("/dev/net")  # a directory of devices, as /dev/nvidia-caps
    volume = tmp_path / "weights"
    volume.mkdir()
    (volume / "from-host").write_text("host")
    paths = [*devices, "/dev/null", *(["/dev/net/tun"] if "/dev/net" in devices else [])]

    with pytest.raises(ValueError, match="not under /dev"):
        SimPod.start(["true"], devices=["/etc/passwd"])
    with pytest.raises(NotADirectoryError):
        SimPod.start(["true"], volumes=[volume / "from-host"])

    cmd = [sys.executable, "/.hibernate/probe.py", json.dumps(paths), str(volume)]
    with SimPod.start(
        cmd, files={"probe.py": DEVICE_PROBE}, ready_path=None, devices=devices, volumes=[volume]
    ) as p:
        report = p.emptydir / "devices.json"
        deadline = time.monotonic() + 20
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report.exists(), p.log()
        seen = json.loads(report.read_text())
        for path in paths:
            host = os.stat(path)
            if stat.S_ISDIR(host.st_mode):
                assert seen[path]["dir"], (path, seen[path])
                continue
            assert seen[path]["chr"] and seen[path]["rdev"] == host.st_rdev, (path, seen[path])
            if path != "/dev/net/tun":
                assert seen[path]["opened"] is True, (path, seen[path])
        assert seen["volume read"] == "host"
        assert (volume / "from-pod").read_text() == "pod", "the volume writes through to the host"
        # The binds stay in the pod's mount namespace (private propagation): none shows on the host.
        assert str(p.base) not in Path("/proc/self/mountinfo").read_text()


# -- the pod init ---------------------------------------------------------------------------------


def run_init(tmp_path: Path, *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(PODINIT),
            "--log",
            str(tmp_path / "engine.log"),
            "--marker",
            str(tmp_path / "mark"),
            "--",
            *command,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_podinit_exits_with_engine_status_and_copies_its_log(tmp_path: Path) -> None:
    init = run_init(tmp_path, "sh", "-c", "echo to-log; echo err >&2; ls -l /proc/self/fd/0; exit 3")
    out, err = init.communicate(timeout=10)
    assert init.returncode == 3, err
    log = (tmp_path / "engine.log").read_text()
    assert "to-log" in log and "err" in log and "/dev/null" in log  # stdin is /dev/null
    assert "engine pid" in err and "exited: code 3" in err
    # stdout copying is best effort (a thread that polls): the engine may end first
    assert out == "" or "to-log" in out


def test_podinit_forwards_sigterm(tmp_path: Path) -> None:
    init = run_init(tmp_path, "sleep", "30")
    # The init installs its handlers before it starts the engine: wait for the engine.
    for _ in range(500):
        if Path(f"/proc/{init.pid}/task/{init.pid}/children").read_text().strip():
            break
        time.sleep(0.01)
    init.send_signal(signal.SIGTERM)
    init.communicate(timeout=10)
    assert init.returncode == 128 + signal.SIGTERM


def test_podinit_outlives_a_checkpointed_engine(tmp_path: Path) -> None:
    (tmp_path / "mark").write_text("")
    init = run_init(tmp_path, "sh", "-c", "exit 0")
    time.sleep(1.0)
    assert init.poll() is None  # engine gone, marker there: the pod stays
    (tmp_path / "mark").unlink()
    init.communicate(timeout=10)  # marker gone and no engine: the container ends
    assert init.returncode == 0


@pytest.mark.criu
@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (
            lambda image: next(image.glob("pages-*.img")).chmod(0o644),
            r"pages-\d+\.img is owned by uid 0 with mode 0644",
        ),
        (lambda image: os.chown(image / "core-2.img", 1000, 1000), r"core-2\.img is owned by uid 1000"),
        (lambda image: image.chmod(0o755), r"with mode 0755"),
        (lambda image: (image / "extra.img").symlink_to("/etc/passwd"), r"extra\.img is not a regular file"),
    ],
    ids=["world-readable file", "foreign owner", "open directory", "planted symlink"],
)
def test_restore_refuses_an_image_the_agent_did_not_write(
    pod: SimPod, ckpt: Path, tamper: Callable[[Path], None], says: str
) -> None:
    criu.dump(ckpt, pod.engine_ns_pid(), criu.Pod(pod.init_pid))
    try:
        if not (ckpt / "core-2.img").exists():  # the engine's pid in the pod names the core image
            next(ckpt.glob("core-*.img")).rename(ckpt / "core-2.img")
        tamper(ckpt)
        with pytest.raises(criu.CriuError, match=rf"not one this agent wrote .*{says}.*refusing to restore"):
            criu.restore(ckpt, criu.Pod(pod.init_pid))
    finally:
        for f in ckpt.iterdir():  # undo, so the module's pod serves again
            if f.is_symlink():
                f.unlink()
            else:
                os.chown(f, 0, 0)
                f.chmod(0o600)
        ckpt.chmod(0o700)
        criu.restore(ckpt, criu.Pod(pod.init_pid))
    assert state(pod)["worker_alive"] is True


@pytest.mark.criu
def test_restore_refuses_a_cut_pages_image_at_once(pod: SimPod, ckpt: Path) -> None:
    """criu's restorer would spin on a pages image cut short until the agent's criu timeout (seen on an
    H200, bench/RESULTS.md): the sizes recorded at the dump refuse it before criu starts."""
    criu.dump(ckpt, pod.engine_ns_pid(), criu.Pod(pod.init_pid))
    pages = max(ckpt.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    whole = pages.read_bytes()
    try:
        with open(pages, "r+b") as f:
            f.truncate(len(whole) // 2)
        started = time.monotonic()
        with pytest.raises(
            criu.CriuError, match=rf"is damaged: {pages.name} has {len(whole) // 2} bytes, {len(whole)}"
        ):
            criu.restore(ckpt, criu.Pod(pod.init_pid), timeout=60)
        assert time.monotonic() - started < 5
    finally:
        pages.write_bytes(whole)
        criu.restore(ckpt, criu.Pod(pod.init_pid))
    assert state(pod)["worker_alive"] is True
