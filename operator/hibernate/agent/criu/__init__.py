"""CRIU for sleep level 4 (Checkpoint): dump an engine's process tree and restore it in place.

One concern a module:

- `bundle`: where criu is (the agent's own bundle, hack/build-criu.sh) and its version;
- `nsexec`: how criu runs in all of a pod's namespaces without loading anything of the pod's
  (the preload library of nsjoin.c), and the pod's processes as the host sees them;
- `images`: the image directories, their metadata, root-only permissions, verification, and what
  a dead agent left behind;
- `dump` and `restore`: the two operations.

docs/security.md explains why criu runs this way.
"""

from hibernate.agent.criu.bundle import (
    DEFAULT_BUNDLE,
    MIN_VERSION,
    Bundle,
    CriuError,
    CriuVersion,
    locate,
    version,
)
from hibernate.agent.criu.dump import DumpResult, dump
from hibernate.agent.criu.images import (
    COLD_START_ADVICE,
    DUMP_LOG,
    DUMP_OK,
    METADATA,
    RESTORE_LOG,
    RESTORE_OK,
    GpuInfo,
    ImageMetadata,
    ImageRefused,
    check_compatible,
    check_image,
    check_private,
    detect_gpu,
    image_dir,
    remove_image,
    settle,
    verify_image,
    wait_for_criu,
)
from hibernate.agent.criu.nsexec import POD_MARKER, POD_WORKDIR, Pod, host_pid_in_pod, ns_pid
from hibernate.agent.criu.restore import RestoreResult, restore

__all__ = [
    "COLD_START_ADVICE",
    "DEFAULT_BUNDLE",
    "DUMP_LOG",
    "DUMP_OK",
    "METADATA",
    "MIN_VERSION",
    "POD_MARKER",
    "POD_WORKDIR",
    "RESTORE_LOG",
    "RESTORE_OK",
    "Bundle",
    "CriuError",
    "CriuVersion",
    "DumpResult",
    "GpuInfo",
    "ImageMetadata",
    "ImageRefused",
    "Pod",
    "RestoreResult",
    "check_compatible",
    "check_image",
    "check_private",
    "detect_gpu",
    "dump",
    "host_pid_in_pod",
    "image_dir",
    "locate",
    "ns_pid",
    "remove_image",
    "restore",
    "settle",
    "verify_image",
    "version",
    "wait_for_criu",
]
