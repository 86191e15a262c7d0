"""Where criu is: the agent's own CRIU bundle (hack/build-criu.sh), and its version.

A bundle is `bin/criu` (DT_RPATH `$ORIGIN/../lib`), `lib/` with its libraries, and
`lib/hibernate-nsjoin.so`, the preload library that moves criu into a pod's namespaces after the
host's loader has loaded it (nsjoin.c). Everything criu runs with comes from here, on the agent's
filesystem; nothing is copied into a pod.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = (4, 2)
DEFAULT_BUNDLE = Path.home() / ".cache" / "hibernate" / "criu-4.2"
NSJOIN = "hibernate-nsjoin.so"


class CriuError(RuntimeError):
    """CRIU is missing or too old, an image is unusable, or a dump or restore failed."""


@dataclass(frozen=True)
class CriuVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Bundle:
    """A criu binary, and the bundle directory around it (bin/, lib/) when it has one."""

    criu: Path
    root: Path | None

    @property
    def nsjoin(self) -> Path | None:
        """The preload library that joins a pod's namespaces, when the bundle has it."""
        if self.root is None:
            return None
        path = self.root / "lib" / NSJOIN
        return path if path.is_file() else None

    def require_nsjoin(self) -> Path:
        if (path := self.nsjoin) is None:
            raise CriuError(
                f"{self.criu} has no {NSJOIN} beside it (lib/{NSJOIN}): criu cannot enter a pod safely "
                "without it; rebuild the bundle with hack/build-criu.sh"
            )
        return path


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


def clean_env() -> dict[str, str]:
    """The environment criu runs with: only what it needs, nothing inherited from the agent.

    No LD_LIBRARY_PATH (it would leak into restored processes; the bundle uses its RPATH), no
    CRIU_CONFIG_FILE, and a PATH of system directories only.
    """
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


@functools.lru_cache(maxsize=8)
def _version_of(binary: Path, mtime_ns: int) -> CriuVersion:
    del mtime_ns  # part of the cache key only: a rebuilt binary is asked again
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, env=clean_env()
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
