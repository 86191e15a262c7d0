"""`hibernate-install-tools DIR`: fill an engine pod's tools volume (the `hibernate-tools` init container).

The operator gives every engine pod an emptyDir at /.hibernate and an init container from the
hibernate image that runs this command (controller/workload.py). It puts there `DIR/podinit.py`,
the pod init, PID 1 of the engine container (`python3 /.hibernate/podinit.py -- ...`), standard
library only, so any engine image with a python3 runs it. The init runs with the container's own
rights, as the engine does.

Nothing the agent executes goes there: CRIU runs from the agent's own filesystem and enters the
pod's namespaces itself (docs/security.md), because whatever sits in a pod's volume is the pod's to
change.

The file is written beside its final name and renamed into place, so a pod never sees half a tool.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PODINIT_SOURCE = Path(__file__).with_name("podinit.py")
PODINIT_NAME = "podinit.py"


class InstallError(RuntimeError):
    pass


def install_podinit(dest: Path) -> Path:
    target = dest / PODINIT_NAME
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{PODINIT_NAME}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(PODINIT_SOURCE.read_bytes())
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def install(dest: Path) -> list[Path]:
    """Install the pod init; returns what was installed."""
    if not dest.is_dir():
        raise InstallError(f"{dest} is not a directory (the pod's tools volume should be mounted there)")
    return [install_podinit(dest)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hibernate-install-tools", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="the pod's tools volume, e.g. /.hibernate")
    args = parser.parse_args(argv)
    try:
        installed = install(args.dest)
    except InstallError as e:
        print(f"hibernate-install-tools: {e}", file=sys.stderr)
        return 1
    for path in installed:
        print(f"hibernate-install-tools: installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
