"""A hostile pod gets nothing from the privileged agent (simulated pod, real CRIU; root only).

The pod replaces what it can reach with recorders (tests/hostile/recorder.c): its dynamic loader, its
python3, /etc/ld.so.preload, CRIU's default plugin directory, a CRIU config that names an action
script, an NSS module. It plants symlinks at every path the agent touches in it, pointing at canary
files on the host. Then the agent's level-4 code checkpoints and restores its engine. Nothing of the
pod's may run (a recorder leaves a line wherever it runs), no canary may change, and the engine must
come back as it was. docs/security.md explains the design these tests hold to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hibernate.agent import criu
from hibernate.localnode.simpod import SimPod
from tests.engine_fixtures import SIMPOD_ENGINE

pytestmark = pytest.mark.criu
RECORDER_SRC = Path(__file__).with_name("hostile") / "recorder.c"
RAN_LOG = "hibernate-hostile-ran.log"  # recorder.c's RECORDER_LOG, relative to whichever root


@pytest.fixture(scope="module")
def bundle() -> criu.Bundle:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc for the planted programs")
    try:
        b = criu.locate()
        criu.version(b)
    except criu.CriuError as e:
        pytest.skip(f"no usable CRIU bundle: {e}")
    if b.nsjoin is None:
        pytest.skip("the bundle has no hibernate-nsjoin.so: rebuild it with hack/build-criu.sh")
    return b


@pytest.fixture(scope="module")
def recorders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("recorders")
    program, library = out / "recorder", out / "librecorder.so"
    if os.uname().machine != "x86_64":
        pytest.skip("the freestanding recorder is written for x86_64")
    freestanding = ["-O2", "-static-pie", "-nostdlib", "-fno-stack-protector"]
    subprocess.run(["gcc", *freestanding, "-o", program, RECORDER_SRC], check=True)
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-DRECORDER_LIBRARY", "-o", library, RECORDER_SRC], check=True
    )
    return {"program": program, "library": library}


@pytest.fixture
def pod(bundle: criu.Bundle) -> Iterator[SimPod]:
    with SimPod.start(SIMPOD_ENGINE, ready_path="/health") as p:
        yield p


@pytest.fixture
def canaries(tmp_path: Path) -> dict[str, Path]:
    host = tmp_path / "host"
    host.mkdir()
    (host / "canary").write_text("host file\n")
    (host / "dir").mkdir()
    (host / "dir" / "inside").write_text("host dir\n")
    return {"file": host / "canary", "dir": host / "dir"}


def loader_of(binary: str) -> Path:
    """The program interpreter (PT_INTERP) a dynamic executable names, e.g. /lib64/ld-linux-x86-64.so.2."""
    with open(binary, "rb") as f:
        data = f.read(1 << 16)
    start = data.index(b"/lib")
    return Path(data[start : data.index(b"\0", start)].decode())


def plant(
    pod: SimPod, recorders: dict[str, Path], canaries: dict[str, Path], *, mapped_too: bool = False
) -> list[Path]:
    """What the engine of a hostile pod can do to its own filesystem. Returns the planted programs.

    `mapped_too` also replaces the files the running engine has mapped (the loader's file itself and
    the engine's own python), which leaves the engine running deleted files."""
    root = pod.root
    program, library = recorders["program"].read_bytes(), recorders["library"].read_bytes()
    planted = []

    def put(path: str | Path, data: bytes, mode: int = 0o755) -> None:
        target = root / str(path).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.write_bytes(data)
        target.chmod(mode)

    # The dynamic loader every dynamic program of the pod names, and the python3s on its PATH.
    loader = loader_of("/bin/true")
    programs = {loader, Path("/usr/bin/python3")}
    if mapped_too:
        programs |= {loader.resolve(), Path(os.path.realpath(sys.executable))}
    for path in programs:
        put(path, program)
        planted.append(path)
    put("/hostile/librecorder.so", library)
    put("/etc/ld.so.preload", b"/hostile/librecorder.so\n", 0o644)
    put("/usr/lib/criu/hostile.so", library)  # CRIU's default plugin directory
    put("/hostile/action-script", program)
    put("/etc/criu/default.conf", b"action-script /hostile/action-script\n", 0o644)
    nss = b"".join(
        f"{db}: hostile\n".encode() for db in ("passwd", "group", "hosts", "protocols", "services")
    )
    put("/etc/nsswitch.conf", nss, 0o644)
    put(loader.resolve().parent / "libnss_hostile.so.2", library)
    # Symlinks where the agent writes: the checkpoint marker and criu's work directory.
    hib = pod.emptydir
    (hib / "checkpointed").symlink_to(canaries["file"])
    (hib / "criu-work").symlink_to(canaries["dir"])
    return planted


def ran_lines(pod: SimPod) -> list[str]:
    lines = []
    for log in (Path("/") / RAN_LOG, pod.root / RAN_LOG):
        if log.exists():
            lines += log.read_text().splitlines()
    return lines


def test_the_recorders_catch_what_entering_the_pod_the_old_way_would_run(
    pod: SimPod, recorders: dict[str, Path], canaries: dict[str, Path]
) -> None:
    """Proof that the planted programs work: `nsenter -m` then exec runs the pod's loader as root."""
    plant(pod, recorders, canaries, mapped_too=True)
    subprocess.run(["nsenter", "-t", str(pod.init_pid), "-m", "-p", "--", "/bin/true"], check=False)
    lines = ran_lines(pod)
    assert lines and all("exe=/bin/true" in ln for ln in lines), lines
    assert "capeff=000001ffffffffff" in lines[0] or "capeff=000001fffeffffff" in lines[0]  # every capability


def test_a_checkpoint_cycle_runs_nothing_of_the_pod_and_writes_nothing_outside_it(
    pod: SimPod, recorders: dict[str, Path], canaries: dict[str, Path], tmp_path: Path, bundle: criu.Bundle
) -> None:
    status, models = pod.http_get("/v1/models")
    assert status == 200
    engine_pid = pod.engine_ns_pid()
    plant(pod, recorders, canaries)
    image = criu.image_dir(tmp_path / "checkpoints", "default", "hostile-0", "engine")

    result = criu.dump(image, engine_pid, criu.Pod(pod.init_pid), bundle=bundle)
    assert pod.engine_host_pid() is None and pod.init_alive()
    # The marker went where the pod init looks for it, as a file of the agent's, not through the link.
    marker = pod.emptydir / "checkpointed"
    assert marker.is_file() and not marker.is_symlink()
    criu.restore(image, criu.Pod(pod.init_pid), bundle=bundle)

    assert pod.engine_ns_pid() == engine_pid
    assert pod.http_get("/v1/models") == (200, models)
    assert ran_lines(pod) == [], "a program the pod planted ran during the checkpoint"
    assert canaries["file"].read_text() == "host file\n"
    assert sorted(p.name for p in canaries["dir"].iterdir()) == ["inside"]
    work = pod.emptydir / "criu-work"
    assert work.is_dir() and not work.is_symlink()
    assert not marker.exists()
    assert result.image == image


def test_a_program_started_the_agents_way_enters_the_pod_and_can_exec_nothing(
    pod: SimPod, bundle: criu.Bundle, recorders: dict[str, Path], canaries: dict[str, Path]
) -> None:
    """criu's launch (nsexec.launch) with /bin/sh in its place: loaded from the host, then inside
    every namespace of the pod (its hostname, pid 2 or more of its pid namespace), with nothing to
    find on $PATH and, as a dump runs, unable to exec anything."""
    plant(pod, recorders, canaries)
    fd = os.open(pod.emptydir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        launched = criu.nsexec.launch(criu.Pod(pod.init_pid), bundle, "dump", fd, [])
    finally:
        os.close(fd)
    try:
        script = (
            'read h < /proc/sys/kernel/hostname; echo "host=$h pid=$$"; '
            'command -v sh || echo "nothing on PATH"; exec /bin/true'
        )
        out = subprocess.run(
            ["/bin/sh", "-c", script],
            env=launched.env,
            pass_fds=launched.fds,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        launched.close()
    assert f"host=simpod-{pod.uid[:8]}" in out.stdout, out.stderr
    pid = int(out.stdout.split("pid=")[1].split()[0])
    assert pid > 1 and pid < 1000  # a small pid of the pod's namespace, not a host pid
    assert "nothing on PATH" in out.stdout, out.stdout  # $PATH is an empty directory of the agent's
    assert out.returncode == 126 and "Operation not permitted" in out.stderr, out.stderr  # seccomp
    assert ran_lines(pod) == []


def test_a_pod_that_replaced_its_own_running_files_fails_cleanly(
    pod: SimPod, recorders: dict[str, Path], canaries: dict[str, Path], tmp_path: Path, bundle: criu.Bundle
) -> None:
    """The engine overwrote the loader and python it runs from: criu will not dump a process that
    maps deleted files (without --link-remap, which we never pass). The dump fails with criu's
    reason, the engine keeps serving, the marker is removed, and still nothing of the pod's ran."""
    assert pod.http_get("/v1/models")[0] == 200
    models = pod.http_get("/v1/models")[1]
    plant(pod, recorders, canaries, mapped_too=True)
    image = criu.image_dir(tmp_path / "checkpoints", "default", "hostile-0", "engine")
    with pytest.raises(criu.CriuError, match=r"(?s)failed .*the engine keeps running.*link.remap"):
        criu.dump(image, pod.engine_ns_pid(), criu.Pod(pod.init_pid), bundle=bundle)
    assert pod.http_get("/v1/models") == (200, models)
    assert not image.exists() and not (pod.emptydir / "checkpointed").exists()
    assert ran_lines(pod) == []
    assert canaries["file"].read_text() == "host file\n"
