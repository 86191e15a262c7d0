"""Paths in a pod's root are resolved inside it: what a pod plants cannot send the agent's writes,
reads or deletions onto the host (hibernate.agent.podfs)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from hibernate.agent import podfs

MARKER = PurePosixPath("/.hibernate/checkpointed")


@pytest.fixture
def pod_root(tmp_path: Path) -> Path:
    root = tmp_path / "pod"
    (root / ".hibernate").mkdir(parents=True)
    return root


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host file the pod would like the agent to overwrite."""
    path = tmp_path / "host" / "canary"
    path.parent.mkdir()
    path.write_text("host secret\n")
    return path


def test_an_absolute_symlink_resolves_inside_the_pod_not_on_the_host(pod_root: Path, canary: Path) -> None:
    (pod_root / ".hibernate" / "checkpointed").symlink_to(canary)
    with podfs.PodRoot(str(pod_root)) as root:
        root.write_file(MARKER, b"image\n")
    assert canary.read_text() == "host secret\n"
    marker = pod_root / ".hibernate" / "checkpointed"
    assert not marker.is_symlink() and marker.read_text() == "image\n"  # the name was taken back
    assert oct(marker.stat().st_mode & 0o777) == oct(0o600)


def test_a_symlinked_directory_on_the_way_is_refused(pod_root: Path, canary: Path) -> None:
    (pod_root / ".hibernate").rmdir()
    (pod_root / ".hibernate").symlink_to(canary.parent)  # /.hibernate -> /<host dir>
    with podfs.PodRoot(str(pod_root)) as root, pytest.raises(podfs.UnsafePath, match="where a directory"):
        root.write_file(MARKER, b"image\n")
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]


def test_dot_dot_cannot_climb_out(pod_root: Path, canary: Path) -> None:
    up = "/".join([".."] * (len(pod_root.parts) + 2))
    (pod_root / ".hibernate" / "checkpointed").symlink_to(f"{up}{canary}")
    with podfs.PodRoot(str(pod_root)) as root:
        root.write_file(MARKER, b"x")
        assert root.read_file(PurePosixPath("/.hibernate/../../.hibernate/checkpointed")) == b"x"
    assert canary.read_text() == "host secret\n"


def test_proc_magic_links_are_refused(pod_root: Path, canary: Path) -> None:
    """`/proc/self/root` inside the agent would be the host's root."""
    (pod_root / "escape").symlink_to("/proc/self/root")
    with podfs.PodRoot(str(pod_root)) as root, pytest.raises(OSError):
        root.read_file(PurePosixPath(f"/escape{canary}"))


def test_reads_refuse_fifos_and_stop_at_a_limit(pod_root: Path) -> None:
    os.mkfifo(pod_root / "fifo")
    (pod_root / "big").write_bytes(b"x" * 5000)
    with podfs.PodRoot(str(pod_root)) as root:
        with pytest.raises(podfs.UnsafePath, match="not a regular file"):
            root.read_file(PurePosixPath("/fifo"))  # would block for ever
        assert root.read_file(PurePosixPath("/big"), limit=100) == b"x" * 100


def test_unlink_removes_the_planted_link_not_its_target(pod_root: Path, canary: Path) -> None:
    (pod_root / ".hibernate" / "checkpointed").symlink_to(canary)
    with podfs.PodRoot(str(pod_root)) as root:
        assert root.unlink(MARKER) is True
        assert root.unlink(MARKER) is False
    assert canary.exists()


def test_reclaim_dir_replaces_a_planted_symlink_with_a_directory(pod_root: Path, canary: Path) -> None:
    work = PurePosixPath("/.hibernate/criu-work")
    (pod_root / ".hibernate" / "criu-work").symlink_to(canary.parent)
    with podfs.PodRoot(str(pod_root)) as root:
        root.reclaim_dir(work)
        root.write_file(work / "restore.log", b"log")
    assert (pod_root / ".hibernate" / "criu-work").is_dir()
    assert not (pod_root / ".hibernate" / "criu-work").is_symlink()
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]


def test_the_fallback_walk_refuses_any_symlink(pod_root: Path, canary: Path) -> None:
    """Kernels before 5.6 have no openat2: then no symlink is followed at all."""
    (pod_root / "link").symlink_to(".hibernate")
    fd = os.open(pod_root, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(podfs.UnsafePath):
            podfs._walk(fd, "/link/checkpointed", os.O_RDONLY, 0)
        with pytest.raises(podfs.UnsafePath):
            podfs._walk(fd, "/../etc/passwd", os.O_RDONLY, 0)
        (pod_root / ".hibernate" / "x").write_text("ok")
        out = podfs._walk(fd, "/.hibernate/x", os.O_RDONLY, 0)
        assert os.read(out, 10) == b"ok"
        os.close(out)
    finally:
        os.close(fd)
