"""`hibernate-install-tools DIR`: what the engine pods' init container leaves in their tools volume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hibernate import install_tools
from hibernate.agent import criu

SCRIPT = Path(sys.executable).parent / "hibernate-install-tools"
PODINIT = Path(install_tools.__file__).with_name("podinit.py")
BUILT_BUNDLE = Path(os.environ.get("HIBERNATE_CRIU_BUNDLE", criu.DEFAULT_BUNDLE))


def fake_bundle(root: Path) -> Path:
    """A bundle's shape (bin/criu, lib/, plugins/), as hack/build-criu.sh lays it out."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "plugins").mkdir()
    (root / "bin" / "criu").write_text("#!/bin/sh\necho 'Version: 4.2.1'\n")
    (root / "bin" / "criu").chmod(0o755)
    (root / "bin" / "setsid").write_text('#!/bin/sh\nexec "$@"\n')
    (root / "bin" / "setsid").chmod(0o755)
    (root / "lib" / "libprotobuf-c.so.1").write_bytes(b"\x7fELF lib")
    (root / "plugins" / "cuda_plugin.so").write_bytes(b"\x7fELF plugin")
    return root


def no_criu_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HIBERNATE_CRIU", raising=False)
    monkeypatch.setenv("HIBERNATE_CRIU_BUNDLE", str(tmp_path / "no-bundle"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def test_installs_the_pod_init_and_the_criu_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = fake_bundle(tmp_path / "bundle")
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest), "--criu-bundle", str(bundle)]) == 0
    assert (dest / "podinit.py").read_bytes() == PODINIT.read_bytes()
    for rel in ("bin/criu", "bin/setsid", "lib/libprotobuf-c.so.1", "plugins/cuda_plugin.so"):
        assert (dest / "criu" / rel).read_bytes() == (bundle / rel).read_bytes(), rel
    assert os.access(dest / "criu" / "bin" / "criu", os.X_OK)
    assert sorted(p.name for p in dest.iterdir()) == ["criu", "podinit.py"]  # no temporary files left
    out = capsys.readouterr().out
    assert f"installed {dest / 'podinit.py'}" in out and f"installed {dest / 'criu'}" in out


def test_the_agent_finds_the_copy_current_and_does_not_copy_again(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "bundle")
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest), "--criu-bundle", str(bundle)]) == 0
    before = (dest / "criu" / "bin" / "criu").stat().st_ino
    # What the agent does before a level-4 dump (agent/criu.py), on the same volume.
    criu.copy_bundle_into(dest / "criu", criu.Bundle(bundle / "bin" / "criu", bundle))
    assert (dest / "criu" / "bin" / "criu").stat().st_ino == before
    # A second init run (a restarted pod) keeps it too.
    assert install_tools.main([str(dest), "--criu-bundle", str(bundle)]) == 0
    assert (dest / "criu" / "bin" / "criu").stat().st_ino == before


def test_the_installed_pod_init_runs_on_its_own(tmp_path: Path) -> None:
    """The copy needs nothing but python3: the engine image need not have hibernate installed."""
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest), "--criu-bundle", str(fake_bundle(tmp_path / "b"))]) == 0
    result = subprocess.run(
        [sys.executable, "-I", str(dest / "podinit.py"), "--log", str(dest / "engine.log"),
         "--marker", str(dest / "checkpointed"), "--", "sh", "-c", "echo engine says hi; exit 3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "engine says hi" in (dest / "engine.log").read_text()


def test_without_a_bundle_it_warns_and_installs_the_pod_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_criu_anywhere(monkeypatch, tmp_path)
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["podinit.py"]
    assert "warning: no CRIU bundle in this image" in capsys.readouterr().err
    assert install_tools.main([str(dest), "--require-criu"]) == 1
    assert "no CRIU bundle found" in capsys.readouterr().err


def test_finds_the_bundle_where_the_agent_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_criu_anywhere(monkeypatch, tmp_path)
    bundle = fake_bundle(tmp_path / "bundle")
    monkeypatch.setenv("HIBERNATE_CRIU_BUNDLE", str(bundle))  # as the Dockerfile sets it
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest), "--require-criu"]) == 0
    assert (dest / "criu" / "bin" / "criu").read_bytes() == (bundle / "bin" / "criu").read_bytes()


def test_refuses_a_missing_destination_or_a_directory_that_is_no_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        install_tools.main([str(tmp_path / "nowhere"), "--criu-bundle", str(fake_bundle(tmp_path / "b"))])
        == 1
    )
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "tools").mkdir()
    assert install_tools.main([str(tmp_path / "tools"), "--criu-bundle", str(tmp_path)]) == 1
    assert "is not a CRIU bundle" in capsys.readouterr().err


def test_console_script(tmp_path: Path) -> None:
    """The init container runs `hibernate-install-tools /.hibernate` (controller/workload.py)."""
    dest = tmp_path / "tools"
    dest.mkdir()
    result = subprocess.run(
        [str(SCRIPT), str(dest), "--criu-bundle", str(fake_bundle(tmp_path / "b"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (dest / "podinit.py").exists() and (dest / "criu" / "bin" / "criu").exists()


@pytest.mark.skipif(
    not (BUILT_BUNDLE / "bin" / "criu").exists(),
    reason=f"no CRIU bundle at {BUILT_BUNDLE} (hack/build-criu.sh)",
)
def test_a_real_bundle_still_runs_after_the_copy(tmp_path: Path) -> None:
    """Its RPATH ($ORIGIN/../lib) travels with it: criu runs from the pod's volume."""
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest), "--criu-bundle", str(BUILT_BUNDLE)]) == 0
    copied = dest / "criu" / "bin" / "criu"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = subprocess.run(
        [str(copied), "--version"], capture_output=True, text=True, env=env, timeout=30, check=True
    )
    v = criu.version(criu.Bundle(copied, dest / "criu"))  # raises below 4.2
    assert (v.major, v.minor) >= criu.MIN_VERSION, out.stdout
