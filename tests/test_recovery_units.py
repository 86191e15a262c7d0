"""The pieces the crash recovery rests on, without a cluster: the fake CUDA driver (a test double,
hibernate.agent.fakecuda) against real processes, and criu.wait_for_criu / criu.settle on image
directories shaped like the ones a dump leaves behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hibernate.agent import criu, cuda, discovery, fakecuda


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_fake_driver_follows_the_drivers_rules_and_stops_a_suspended_process(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    api = fakecuda.FakeCheckpointApi(tmp_path)
    pid = sleeper.pid
    assert api.get_state(pid) is cuda.ProcessState.RUNNING
    with pytest.raises(cuda.CudaCallError, match="ILLEGAL_STATE"):
        api.checkpoint(pid)  # not locked
    report = cuda.suspend_all([pid], api=api)
    assert report.changed and api.get_state(pid) is cuda.ProcessState.CHECKPOINTED
    # SIGSTOP takes effect asynchronously: on a loaded machine /proc may still say R for a moment.
    deadline = time.monotonic() + 5
    while _proc_state(pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _proc_state(pid) == "T", "a suspended CUDA process runs no CUDA call: the fake stops it"
    with pytest.raises(cuda.CudaCallError, match="ILLEGAL_STATE"):
        api.lock(pid)
    cuda.resume_all([pid], api=api)
    assert api.get_state(pid) is cuda.ProcessState.RUNNING
    time.sleep(0.05)
    assert _proc_state(pid) in ("S", "R")
    # The state is kept in a file, so another process (a restarted agent) reads the same.
    assert fakecuda.FakeCheckpointApi(tmp_path).get_state(pid) is cuda.ProcessState.RUNNING


def test_fake_driver_failures_roll_back_like_the_real_one(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    api = fakecuda.FakeCheckpointApi(tmp_path)
    (tmp_path / "fail-checkpoint").touch()
    with pytest.raises(cuda.PodCudaError) as failed:
        cuda.suspend_all([sleeper.pid], api=api)
    assert failed.value.rolled_back, str(failed.value)
    assert "injected" in str(failed.value)
    assert api.get_state(sleeper.pid) is cuda.ProcessState.RUNNING
    assert _proc_state(sleeper.pid) != "T"


def test_fake_driver_names_a_process_by_cgroup_and_inner_pid_and_refuses_a_dead_one(
    tmp_path: Path,
) -> None:
    api = fakecuda.FakeCheckpointApi(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(cuda.CudaCallError, match="NOT_FOUND"):
        api.get_state(proc.pid)
    assert api.key(os.getpid()).endswith(f"-{os.getpid()}")  # no pid namespace here: inner pid = host pid


def test_fake_discovery_counts_the_engine_not_its_init() -> None:
    def info(pid: int, ppid: int, cmdline: tuple[str, ...], nspid: int) -> discovery.ProcessInfo:
        return discovery.ProcessInfo(pid, ppid, cmdline[0], cmdline, "uid", "cid", (pid, nspid), "/x")

    init = info(10, 1, ("python3", "/.hibernate/podinit.py", "--"), 1)
    engine = info(11, 10, ("python3", "-m", "vllm"), 2)
    worker = info(12, 11, ("python3", "-m", "vllm.worker"), 3)
    assert fakecuda.engine_pids([init, engine, worker], "/proc") == [11, 12]
    assert fakecuda.engine_pids([], "/proc") == []


# -- criu.wait_for_criu and criu.settle ----------------------------------------------------------


def _complete_image(path: Path, engine_pid: int = 7) -> Path:
    path.mkdir(parents=True)
    for name in ("inventory.img", "pstree.img", "core-7.img", "pagemap-7.img", "mm-7.img", "pages-1.img"):
        (path / name).write_bytes(b"x" * 100)
    (path / criu.DUMP_LOG).write_text(f"(00.1) something\n(00.2) {criu.DUMP_OK}\n")
    meta = criu.ImageMetadata(None, None, "4.2.0", "6.1", engine_pid, "2026-01-01T00:00:00Z", 0)
    (path / criu.METADATA).write_text(meta.to_json())
    return path


def test_a_dump_finished_after_its_agent_died_is_adopted(tmp_path: Path) -> None:
    image = tmp_path / "ns" / "pod" / "engine"
    _complete_image(image.with_name(".engine.partial-1234abcd"))
    done = criu.settle(image, engine_running=False)
    assert done == ["adopted the complete image that criu finished in .engine.partial-1234abcd"]
    meta = criu.verify_image(image)
    assert meta.image_bytes == 600 and meta.engine_pid == 7
    assert sorted(p.name for p in image.parent.iterdir()) == ["engine"]


def test_a_half_dump_or_one_of_a_running_engine_is_removed(tmp_path: Path) -> None:
    image = tmp_path / "ns" / "pod" / "engine"
    half = _complete_image(image.with_name(".engine.partial-00000001"))
    (half / criu.DUMP_LOG).write_text("(00.1) Dumping started\n")  # criu died mid-way
    whole = _complete_image(image.with_name(".engine.partial-00000002"))
    assert criu.settle(image, engine_running=True) == [
        "removed the unfinished image .engine.partial-00000001",
        "removed the unfinished image .engine.partial-00000002",
    ]
    assert not half.exists() and not whole.exists() and not image.exists()


def test_a_replaced_image_swapped_out_mid_rename_is_put_back_or_removed(tmp_path: Path) -> None:
    image = tmp_path / "ns" / "pod" / "engine"
    old = _complete_image(image.with_name(".engine.old-0000abcd"))
    assert criu.settle(image, engine_running=False) == [
        "put back the image .engine.old-0000abcd that a replacement left swapped out"
    ]
    assert criu.check_image(image) == [] and not old.exists()
    _complete_image(image.with_name(".engine.old-0000abce"))
    assert criu.settle(image, engine_running=False) == ["removed the replaced image .engine.old-0000abce"]


def test_wait_for_criu_waits_while_an_orphaned_criu_holds_the_directory(tmp_path: Path) -> None:
    image = tmp_path / "ns" / "pod" / "engine"
    partial = image.with_name(".engine.partial-feedbeef")
    partial.mkdir(parents=True)
    assert criu.wait_for_criu(image, timeout=5) is False  # nobody holds it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(0.6)",
            str(partial),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    t0 = time.monotonic()
    assert criu.wait_for_criu(image, timeout=10) is True
    assert time.monotonic() - t0 >= 0.3 and holder.wait(5) == 0
    holder.stdout.close()
    with pytest.raises(criu.CriuError, match="still works on"):
        blocker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(5)",
                str(partial),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert blocker.stdout is not None and blocker.stdout.readline().strip() == b"held"
            criu.wait_for_criu(image, timeout=0.3)
        finally:
            blocker.kill()
            blocker.wait()
            if blocker.stdout is not None:
                blocker.stdout.close()
