"""`hibernate-install-tools DIR`: fill an engine pod's tools volume (the `hibernate-tools` init container).

The operator gives every engine pod an emptyDir at /.hibernate and an init container from the
hibernate image that runs this command (controller/workload.py). It puts there:

- `DIR/podinit.py`: the pod init, PID 1 of the engine container (`python3 /.hibernate/podinit.py -- ...`),
  standard library only, so any engine image with a python3 runs it;
- `DIR/criu/`: the CRIU bundle (bin/criu, lib/, plugins/; hack/build-criu.sh), which the agent runs
  inside the pod's namespaces for level 4. The agent copies it too before a dump when it is missing
  or differs, so the copy here only saves that time; an image without a bundle still serves levels
  1-3, and this command says so unless `--require-criu` makes it an error.

Each file is written beside its final name and renamed into place, so a pod never sees half a tool.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hibernate.agent import criu

PODINIT_SOURCE = Path(__file__).with_name("podinit.py")
PODINIT_NAME = "podinit.py"
CRIU_DIR_NAME = "criu"  # agent/criu.py: POD_BUNDLE = /.hibernate/criu


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


def find_bundle(explicit: Path | None) -> criu.Bundle | None:
    """The bundle to copy: `explicit` (a bundle directory), else where the agent would look."""
    if explicit is not None:
        binary = explicit / "bin" / "criu"
        if not (binary.is_file() and (explicit / "lib").is_dir()):
            raise InstallError(f"{explicit} is not a CRIU bundle (bin/criu and lib/): see hack/build-criu.sh")
        return criu.Bundle(binary.absolute(), explicit.absolute())
    try:
        bundle = criu.locate()
    except criu.CriuError:
        return None
    return bundle if bundle.root is not None else None


def install(dest: Path, bundle: criu.Bundle | None) -> list[Path]:
    """Install the pod init, and the CRIU bundle when there is one; returns what was installed."""
    if not dest.is_dir():
        raise InstallError(f"{dest} is not a directory (the pod's tools volume should be mounted there)")
    installed = [install_podinit(dest)]
    if bundle is not None:
        try:
            installed.append(criu.copy_bundle_into(dest / CRIU_DIR_NAME, bundle))
        except (criu.CriuError, OSError) as e:
            raise InstallError(f"cannot copy the CRIU bundle {bundle.root} into {dest}: {e}") from e
    return installed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hibernate-install-tools", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="the pod's tools volume, e.g. /.hibernate")
    parser.add_argument(
        "--criu-bundle",
        type=Path,
        default=None,
        help="CRIU bundle directory (default: $HIBERNATE_CRIU, $HIBERNATE_CRIU_BUNDLE, then criu on $PATH)",
    )
    parser.add_argument(
        "--require-criu", action="store_true", help="fail when no CRIU bundle is found (level 4 needs it)"
    )
    args = parser.parse_args(argv)
    try:
        bundle = find_bundle(args.criu_bundle)
        if bundle is None and args.require_criu:
            raise InstallError(
                "no CRIU bundle found (set HIBERNATE_CRIU_BUNDLE or pass --criu-bundle; hack/build-criu.sh builds one)"
            )
        installed = install(args.dest, bundle)
    except InstallError as e:
        print(f"hibernate-install-tools: {e}", file=sys.stderr)
        return 1
    for path in installed:
        print(f"hibernate-install-tools: installed {path}")
    if bundle is None:
        print(
            "hibernate-install-tools: warning: no CRIU bundle in this image; level 4 (Checkpoint) "
            "needs the agent's own copy",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
