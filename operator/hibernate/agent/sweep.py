"""The image sweep: checkpoint images left behind by pods that are gone, or no longer a model's.

The agent removes a pod's images when the watch reports the pod deleted. A pod deleted while no agent
ran, or deleted after it left the agent's selection (its `hibernate.dev/managed` label removed),
sends the agent nothing: its image, the engine's whole memory, would stay on the node's disk for
ever. So at start, and then every `--image-sweep-interval` seconds, the agent looks through its
checkpoint roots and removes the images

- whose pod does not exist any more, or
- whose pod exists on this node but that no ModelDeployment owns any more (ownership.py: the chain
  Pod -> ReplicaSet -> Deployment -> ModelDeployment is broken for good, not just unreadable now).

Nothing else goes. An image is a directory `<checkpoint dir>/<namespace>/<pod>/<container>` (the
checkpoint dir may lie anywhere below a root) that holds `metadata.json` and is, with every directory
up to its root, root-only as the agent writes it (criu.check_private); the temporary directories of a
dump (`.<container>.partial-…`, `.<container>.old-…`) count with their image. Symlinks are never
followed, anything else is never touched, and neither is an image that a criu still holds (its lock).
Images of pods this agent serves right now, of pods on another node (a root on shared storage), of
pods whose owners cannot be read right now, and of pods a ModelDeployment owns all stay; so does the
image of a pod that only lost its label: it is restored once the label is back, and swept once the
pod is gone.

Snapshots (`<checkpoint dir>/.snapshots/<namespace>/<model>`, docs/snapshots.md) outlive their pods
by design: one goes, with its temporary directories, restore log and lock file, once its
ModelDeployment does not exist any more (read from the API server now; unreadable: it stays). The
same holds on the shared volume (`snapshot_roots`, the agents' --snapshot-dir), which every node's
agent sweeps: the ModelDeployment is the cluster's, so every agent comes to the same verdict, and
the snapshot's lock (criu.snaplock) lets one of them remove it while the others pass it over, as a
snapshot being taken or restored is passed over.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hibernate.agent import criu, kube
from hibernate.agent.criu import images as criu_images
from hibernate.agent.criu import snaplock
from hibernate.agent.criu import snapshot as criu_snapshot
from hibernate.agent.ownership import Ownership
from hibernate.api import constants as c
from hibernate.faults import fault_point

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 600.0
MAX_DEPTH = 16  # directories below a root that the walk goes into
_TEMPORARY = re.compile(r"^\.(?P<container>[^/]+)\.(?:partial|old)-[0-9a-f]{8}$")
Key = tuple[str, str]
ReadPod = Callable[[str, str], dict[str, Any] | None]


@dataclass(frozen=True)
class Found:
    root: Path
    path: Path
    namespace: str
    pod: str
    container: str
    temporary: bool

    @property
    def key(self) -> Key:
        return (self.namespace, self.pod)


def _private_dirs(path: Path, root: Path) -> bool:
    """Every directory from `path` up to `root` is a real directory, the agent's own and root-only."""
    uid = os.geteuid()
    for d in [path, *(p for p in path.parents if p == root or root in p.parents)]:
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
            return False
    return True


def find(root: Path) -> list[Found]:
    """The images and dump directories under `root` that the agent wrote (see the module's doc)."""
    found: list[Found] = []
    try:
        if not stat.S_ISDIR(root.lstat().st_mode):
            return found
    except OSError:
        return found
    stack = [root]
    while stack:
        here = stack.pop()
        depth = len(here.relative_to(root).parts)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            parts = path.relative_to(root).parts
            temporary = _TEMPORARY.match(entry.name)
            if len(parts) >= 3 and temporary is not None:
                candidate = Found(root, path, parts[-3], parts[-2], temporary["container"], True)
                if _private_dirs(path, root):
                    found.append(candidate)
                continue
            if entry.name.startswith("."):
                continue
            meta = path / criu.METADATA
            is_image = False
            with contextlib.suppress(OSError):
                is_image = stat.S_ISREG(meta.lstat().st_mode)
            if len(parts) >= 3 and is_image:
                try:
                    problems = criu.check_private(path, root)
                except FileNotFoundError:  # removed while it was looked at: nothing to sweep
                    continue
                if problems:
                    log.warning(
                        "image sweep: %s is not one this agent wrote, left alone: %s", path, problems[0]
                    )
                else:
                    found.append(Found(root, path, parts[-3], parts[-2], parts[-1], False))
                continue
            if depth + 1 < MAX_DEPTH:
                stack.append(path)
    return found


@dataclass(frozen=True)
class FoundSnapshot:
    """A ModelDeployment's snapshot: its image directory, or a temporary one of its dump."""

    path: Path
    namespace: str
    model: str


def find_snapshots(root: Path) -> list[FoundSnapshot]:
    """The snapshot directories under `root` that the agent wrote: `<ns>/<model>` (with metadata.json)
    and `<ns>/.<model>.partial-…|.old-…` in every `.snapshots` directory, all root-only to `root`."""
    found: list[FoundSnapshot] = []
    stack = [(root, 0)]
    while stack:
        here, depth = stack.pop()
        for entry in _dirs(here):
            path = Path(entry.path)
            if entry.name != criu_snapshot.SNAPSHOTS:
                if not entry.name.startswith(".") and depth + 1 < MAX_DEPTH:
                    stack.append((path, depth + 1))
                continue
            for ns in _dirs(path):
                for model in _dirs(Path(ns.path)):
                    temporary = _TEMPORARY.match(model.name)
                    name = temporary["container"] if temporary else model.name
                    candidate = Path(model.path)
                    is_image = temporary is not None or (candidate / criu.METADATA).is_file()
                    if is_image and _written_by_an_agent(candidate, root):
                        found.append(FoundSnapshot(candidate, ns.name, name))
    return found


def _written_by_an_agent(snapshot: Path, root: Path) -> bool:
    """The snapshot and its directories up to `root` are root-only, as an agent writes them; False
    for one that vanished while it was looked at: another node's sweep shares the volume."""
    try:
        return _private_dirs(snapshot, root) and not criu.check_private(snapshot, root)
    except FileNotFoundError:
        return False


def _dirs(path: Path) -> list[os.DirEntry[str]]:
    """The real directories in `path` (no symlinks), by name."""
    try:
        return sorted((e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except OSError:
        return []


def _remove_snapshot(found: FoundSnapshot) -> bool:
    """Removes a snapshot (or a temporary directory of its dump) under the snapshot's lock, so that
    it is neither being taken nor restored, by this agent or another node's; its lock file goes with
    the snapshot itself."""
    image = found.path.with_name(found.model)
    try:
        with snaplock.held(image, exclusive=True):
            removed = _remove(found)
            if not image.exists():  # gone (here, or by another node's sweep): nothing left to guard
                snaplock.remove(image)
            return removed
    except criu.CriuError as e:  # busy: taken or restored right now; left for the next sweep
        log.info("image sweep: the snapshot %s stays for now: %s", found.path, e)
        return False


def _remove(found: Found | FoundSnapshot) -> bool:
    """Removes one image or dump directory, unless a criu holds it (its flock)."""
    try:
        fd = os.open(found.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("image sweep: %s is in use by a criu; left for the next sweep", found.path)
            return False
        except OSError as e:
            if e.errno not in criu_images.CANNOT_LOCK_DIRS:
                raise
            # NFS cannot lock a directory exclusively; a snapshot there is under its lock file.
        shutil.rmtree(found.path, ignore_errors=True)
    finally:
        os.close(fd)
    return not found.path.exists()


@dataclass
class Sweeper:
    roots: tuple[Path, ...]
    node: str
    ownership: Ownership
    read_pod: ReadPod = kube.read_pod
    # Where only snapshots are (the shared volume); the checkpoint roots may hold snapshots too.
    snapshot_roots: tuple[Path, ...] = ()

    def verdict(self, key: Key) -> str | None:
        """Why the images of pod `key` go, or None when they stay."""
        namespace, name = key
        try:
            pod = self.read_pod(namespace, name)
        except Exception as e:  # the API unreachable: nothing is known, nothing goes
            log.warning("image sweep: cannot read pod %s/%s (%s); its images stay", namespace, name, e)
            return None
        if pod is None:
            return "the pod does not exist any more"
        if (pod.get("spec") or {}).get("nodeName") != self.node:
            return None  # another node's pod (a checkpoint root on shared storage): not this agent's to judge
        verdict = self.ownership.verify(pod)
        if verdict.owned or verdict.retry:
            return None
        return f"no ModelDeployment owns the pod any more ({verdict.reason})"

    def sweep(self, served: Iterable[Key] = ()) -> list[str]:
        """One sweep (blocking: run it in a thread); returns the directories it removed."""
        keep = set(served)
        by_pod: dict[Key, list[Found]] = {}
        for root in self.roots:
            for found in find(root):
                by_pod.setdefault(found.key, []).append(found)
        removed: list[str] = []
        for key, founds in sorted(by_pod.items()):
            if key in keep:
                continue
            why = self.verdict(key)
            if why is None:
                continue
            done = [found for found in founds if _remove(found)]
            for found in done:
                removed.append(str(found.path))
                log.info("image sweep: removed %s: %s", found.path, why)
                with contextlib.suppress(OSError):
                    found.path.parent.rmdir()  # the pod's directory, once it holds nothing
            if done:
                fault_point("agent.sweep-after-remove")
        for root in dict.fromkeys((*self.roots, *self.snapshot_roots)):
            for snapshot in find_snapshots(root):
                why = self.snapshot_verdict(snapshot.namespace, snapshot.model)
                if why is not None and _remove_snapshot(snapshot):
                    removed.append(str(snapshot.path))
                    log.info("image sweep: removed the snapshot %s: %s", snapshot.path, why)
                    with contextlib.suppress(OSError):
                        Path(f"{snapshot.path}.{criu.RESTORE_LOG}").unlink()
        return removed

    def snapshot_verdict(self, namespace: str, model: str) -> str | None:
        """Why the snapshot of ModelDeployment `model` goes, or None when it stays."""
        try:
            md = self.ownership.lookup(c.KIND, namespace, model)
        except Exception as e:  # the API unreachable: nothing is known, nothing goes
            log.warning(
                "image sweep: cannot read ModelDeployment %s/%s (%s); its snapshot stays", namespace, model, e
            )
            return None
        return "its ModelDeployment does not exist any more" if md is None else None
