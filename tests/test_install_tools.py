"""`hibernate-install-tools DIR`: what the engine pods' init container leaves in their tools volume.

Only the pod init goes there. Whatever is in a pod's volume is the pod's to change, so nothing the
privileged agent runs may come from it: CRIU stays on the agent's filesystem (docs/security.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hibernate import install_tools

SCRIPT = Path(sys.executable).parent / "hibernate-install-tools"
PODINIT = Path(install_tools.__file__).with_name("podinit.py")


def test_installs_the_pod_init_and_nothing_else(tmp_path: Path) -> None:
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest)]) == 0
    assert (dest / "podinit.py").read_bytes() == PODINIT.read_bytes()
    assert os.access(dest / "podinit.py", os.X_OK)
    assert sorted(p.name for p in dest.iterdir()) == ["podinit.py"]  # no CRIU, no temporary files


def test_a_second_run_replaces_the_pod_init_in_place(tmp_path: Path) -> None:
    dest = tmp_path / "tools"
    dest.mkdir()
    (dest / "podinit.py").write_text("tampered with\n")
    assert install_tools.main([str(dest)]) == 0
    assert (dest / "podinit.py").read_bytes() == PODINIT.read_bytes()


def test_the_installed_pod_init_runs_on_its_own(tmp_path: Path) -> None:
    """The copy needs nothing but python3: the engine image need not have hibernate installed."""
    dest = tmp_path / "tools"
    dest.mkdir()
    assert install_tools.main([str(dest)]) == 0
    result = subprocess.run(
        [sys.executable, "-I", str(dest / "podinit.py"), "--log", str(dest / "engine.log"),
         "--marker", str(dest / "checkpointed"), "--", "sh", "-c", "echo engine says hi; exit 3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "engine says hi" in (dest / "engine.log").read_text()


def test_refuses_a_missing_destination(tmp_path: Path) -> None:
    assert install_tools.main([str(tmp_path / "nowhere")]) == 1


def test_console_script(tmp_path: Path) -> None:
    """The init container runs `hibernate-install-tools /.hibernate` (controller/workload.py)."""
    dest = tmp_path / "tools"
    dest.mkdir()
    result = subprocess.run([str(SCRIPT), str(dest)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"installed {dest / 'podinit.py'}" in result.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["podinit.py"]
