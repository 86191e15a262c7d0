"""A pod's GPUs, and how a CUDA checkpoint's GPUs map onto another pod's (a snapshot restored into a
new pod, docs/snapshots.md).

A CUDA checkpoint holds the device memory of particular GPUs. Restored into a new pod, which the
device plugin may have given other GPUs of the node (or another node's), the driver must be told
where each goes: pairs of GPU UUIDs, the checkpointed GPU and the one to restore onto, every
checkpointed GPU named (cuCheckpointProcessRestore's arguments, NVIDIA driver 580 / CUDA 13.0 or
newer). The GPU to restore onto must be of the same chip and have room.

A pod's GPUs are the NVIDIA device nodes (`/dev/nvidia<minor>`) in its container: the runtime makes
only those the pod was given. Each is named by the driver's own files (`/proc/driver/nvidia/gpus/
<bus>/information`: model, UUID, minor). Read from the agent's side: the pod's /dev is reached
through its root without following its symlinks (podfs), and only character devices of the NVIDIA
major count. Where the node has no NVIDIA driver files at all (the CUDA test double's nodes), the
GPU UUIDs in NVIDIA_VISIBLE_DEVICES of the container's init stand in.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hibernate.agent.podfs import PodRoot

NVIDIA_MAJOR = 195  # the driver's character devices: /dev/nvidia<minor>, /dev/nvidiactl (255)
REMAP_MIN_DRIVER = 580
_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DEVICE = re.compile(r"^nvidia(\d+)$")


@dataclass(frozen=True)
class Gpu:
    """One GPU as the agent records it with an image: its UUID ("GPU-…", as nvidia-smi prints it)
    and model (None where unknown)."""

    uuid: str
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "model": self.model}

    @classmethod
    def from_json(cls, raw: Any) -> Gpu | None:
        if not isinstance(raw, dict) or not is_uuid(raw.get("uuid")):
            return None
        model = raw.get("model")
        return cls(str(raw["uuid"]), model if isinstance(model, str) else None)


class RemapRefused(Exception):
    """The checkpoint's GPUs cannot be mapped onto the pod's: its reason is the cold start's."""


def is_uuid(text: Any) -> bool:
    return isinstance(text, str) and _UUID.match(text) is not None


# -- what the node has, what a pod has ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeGpu:
    gpu: Gpu
    minor: int | None
    bus: str


def node_gpus(proc: Path = Path("/proc")) -> list[NodeGpu]:
    """The node's NVIDIA GPUs from the driver's /proc files, by PCI bus (CUDA's order for GPUs of
    one model); [] without a driver."""
    found = []
    with contextlib.suppress(OSError):
        for info in sorted((proc / "driver" / "nvidia" / "gpus").glob("*/information")):
            with contextlib.suppress(OSError):
                fields = _fields(info.read_text())
                uuid = fields.get("GPU UUID", "")
                if is_uuid(uuid):
                    minor = fields.get("Device Minor", "")
                    found.append(
                        NodeGpu(
                            Gpu(uuid, fields.get("Model") or None),
                            int(minor) if minor.isdigit() else None,
                            info.parent.name,
                        )
                    )
    return found


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def pod_gpus(init_pid: int, proc: Path = Path("/proc")) -> list[Gpu]:
    """The GPUs of the container whose init is `init_pid` (the module's doc says how), by PCI bus."""
    node = node_gpus(proc)
    if not node:
        return _visible_devices(init_pid, proc)
    minors = _device_minors(init_pid, proc)
    return [n.gpu for n in node if n.minor is not None and n.minor in minors]


def _device_minors(init_pid: int, proc: Path) -> set[int]:
    """Minors of the NVIDIA GPU character devices in the container's /dev (not followed through links)."""
    minors: set[int] = set()
    with contextlib.suppress(OSError), PodRoot.of_process(init_pid, str(proc)) as root:
        fd = root.open("/dev", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for entry in os.scandir(fd):
                if not _DEVICE.match(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR:
                        minors.add(os.minor(st.st_rdev))
        finally:
            os.close(fd)
    return minors


def _visible_devices(init_pid: int, proc: Path) -> list[Gpu]:
    """The GPU UUIDs of NVIDIA_VISIBLE_DEVICES in the init's environment, in their order."""
    try:
        environ = (proc / str(init_pid) / "environ").read_bytes()[: 1 << 20]
    except OSError:
        return []
    for entry in environ.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name == b"NVIDIA_VISIBLE_DEVICES":
            words = value.decode(errors="replace").split(",")
            return [Gpu(w.strip()) for w in words if is_uuid(w.strip())]
    return []


# -- the map ------------------------------------------------------------------------------------------


def plan(dumped: Sequence[Gpu], now: Sequence[Gpu], driver: str | None) -> tuple[tuple[str, str], ...]:
    """The (checkpointed GPU, GPU to restore onto) UUID pairs that restore a checkpoint taken on
    `dumped` into a pod that has `now`, on a node with `driver`; () where none is needed (the same
    GPUs, or a checkpoint that recorded none: the driver restores onto the GPUs it had).

    Pairs go by position, both lists in PCI bus order, so the engine's CUDA device ordinals keep
    naming GPUs in the same order. RemapRefused, with the reason: another count of GPUs, another
    model, or a driver older than 580 (which restores only onto the same GPUs)."""
    if not dumped or {g.uuid for g in dumped} == {g.uuid for g in now}:
        return ()
    took = ", ".join(g.uuid for g in dumped)
    if not now:
        raise RemapRefused(
            f"the snapshot was taken on GPU {took}, and this pod has no GPU the agent can see (no NVIDIA "
            "device in its container): its CUDA state cannot be restored here"
        )
    if len(now) != len(dumped):
        raise RemapRefused(
            f"the snapshot was taken on {len(dumped)} GPU(s) ({took}) and this pod has {len(now)} "
            f"({', '.join(g.uuid for g in now)}): a CUDA checkpoint is restored onto as many GPUs"
        )
    for old, new in zip(dumped, now, strict=True):
        if old.model and new.model and old.model != new.model:
            raise RemapRefused(
                f"the snapshot's GPU {old.uuid} is a {old.model}, this pod's {new.uuid} a {new.model}: a "
                "CUDA checkpoint is restored only onto a GPU of the same model"
            )
    major = _major(driver)
    if major is not None and major < REMAP_MIN_DRIVER:
        raise RemapRefused(
            f"the snapshot was taken on GPU {took} and this pod has {', '.join(g.uuid for g in now)}: "
            f"restoring onto other GPUs needs NVIDIA driver {REMAP_MIN_DRIVER} or newer, this node has {driver}"
        )
    return tuple((old.uuid, new.uuid) for old, new in zip(dumped, now, strict=True))


def _major(driver: str | None) -> int | None:
    head = (driver or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None
