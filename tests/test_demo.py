"""The README's main command, end to end: `hibernate demo` walks a model through every level here."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.k8s
def test_the_demo_walks_every_level_and_answers_the_same_after_each_wake() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hibernate", "demo"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("== summary", 1)[1]
    for level in ("L1", "L2", "Stop"):
        assert any(line.startswith(level) and line.endswith("yes") for line in summary.splitlines()), summary
    assert "NAME   MODEL" in out.stdout and "Asleep" in out.stdout and "Stopped" in out.stdout
