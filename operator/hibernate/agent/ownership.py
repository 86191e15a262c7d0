"""Which pods the agent may act on: those that a ModelDeployment owns (issue 14, design.md).

The label `hibernate.dev/managed=true` only selects the pods to look at: anyone who may create a pod
can put it on one. The agent, root on the node, acts on a pod only when its chain of controller
ownerReferences reaches a ModelDeployment through live objects, each link checked by UID:

    Pod -> ReplicaSet (apps) -> Deployment (apps) -> ModelDeployment (hibernate.dev)

Each object is read from the API server (a GET, never a cache that a client fills), and its UID
must be the one the child's ownerReference names: a reference to an object that does not exist, or
to a same-named object with another UID, breaks the chain. The pod's labels must match the
ReplicaSet's selector (a pod that does not match is released by the ReplicaSet controller), and the
Deployment must carry its ModelDeployment's name, as the operator names it (controller/workload.py):
the operator's own Deployment holds that name, so no other Deployment can claim the link.

Verdicts are cached per pod UID (with the pod's controller reference and labels, so a change of
either is checked again), and what is known of an owner is cached per owner UID: after the first pod
of a ReplicaSet, the check costs no API call. A chain that breaks at an object that does not exist is
not final (it may appear, or the pod is about to be collected): the caller checks again with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from hibernate.agent import kube
from hibernate.api import constants as c

log = logging.getLogger(__name__)

REASON: Final = "NotOwnedByModelDeployment"
# The controller each kind must have: (API group, kind). "" is the core group.
PARENT: Final[Mapping[str, tuple[str, str]]] = {
    "Pod": ("apps", "ReplicaSet"),
    "ReplicaSet": ("apps", "Deployment"),
    "Deployment": (c.GROUP, c.KIND),
}
Lookup = Callable[[str, str, str], dict[str, Any] | None]  # (kind, namespace, name) -> object or None
OwnerKey = tuple[str, str, str, str]  # kind, namespace, name, uid


@dataclass(frozen=True)
class Verdict:
    owned: bool
    reason: str = ""  # the broken link, for people (the Warning event, the log)
    retry: bool = False  # not final: an owner not found (yet) or the API unreachable; check again later
    warn: bool = True  # the reason is about the pod (not an API error of ours): worth a Warning on it


OWNED: Final = Verdict(owned=True)


def controller_ref(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    return next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels; an empty or absent one matches
    nothing here (a ReplicaSet always has one)."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def _identity(meta: Mapping[str, Any]) -> tuple[object, ...]:
    """What a pod's verdict depends on: its controller reference and its labels."""
    ref = controller_ref(meta) or {}
    labels = meta.get("labels") or {}
    return (
        ref.get("apiVersion"),
        ref.get("kind"),
        ref.get("name"),
        ref.get("uid"),
        tuple(sorted(labels.items())),
    )


class Ownership:
    """The check, with its caches. `verify` blocks (API reads): call it in a thread."""

    def __init__(self, lookup: Lookup | None = None, max_entries: int = 10_000) -> None:
        self.lookup: Lookup = lookup or kube.read_owner
        self.max_entries = max_entries
        self._pods: dict[str, tuple[tuple[object, ...], Verdict]] = {}  # pod uid -> (identity, verdict)
        self._objects: dict[OwnerKey, dict[str, Any]] = {}  # owners read and found with the named UID
        self._chains: dict[OwnerKey, Verdict] = {}  # does the chain above this owner reach a ModelDeployment

    def cached(self, pod: Mapping[str, Any]) -> Verdict | None:
        """The verdict on this pod as it is now, if it was checked: no API call. None: check it."""
        meta = pod.get("metadata") or {}
        entry = self._pods.get(meta.get("uid", ""))
        if entry is None or entry[0] != _identity(meta):
            return None
        return entry[1]

    def forget(self, uid: str) -> None:
        self._pods.pop(uid, None)

    def verify(self, pod: Mapping[str, Any]) -> Verdict:
        meta = pod.get("metadata") or {}
        verdict = self._verify(meta)
        if len(self._pods) >= self.max_entries:
            self._pods.clear()
        self._pods[meta.get("uid", "")] = (_identity(meta), verdict)
        return verdict

    def _verify(self, meta: Mapping[str, Any]) -> Verdict:
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        if not meta.get("uid"):
            return Verdict(False, f"pod {name} has no uid")
        ref = self._parent_ref(meta, "Pod", name)
        if isinstance(ref, Verdict):
            return ref
        replicaset = self._read("Pod", name, namespace, ref)
        if isinstance(replicaset, Verdict):
            return replicaset
        if not selector_matches((replicaset.get("spec") or {}).get("selector"), meta.get("labels") or {}):
            return Verdict(
                False, f"pod {name}: its labels do not match the selector of ReplicaSet {ref['name']}"
            )
        return self._chain_above("ReplicaSet", namespace, replicaset)

    def _parent_ref(self, meta: Mapping[str, Any], kind: str, name: str) -> dict[str, Any] | Verdict:
        group, parent = PARENT[kind]
        ref = controller_ref(meta)
        if ref is None:
            return Verdict(False, f"{kind} {name} has no controller ownerReference (expected a {parent})")
        if (_group(str(ref.get("apiVersion", ""))), ref.get("kind")) != (group, parent):
            return Verdict(
                False,
                f"{kind} {name} is controlled by {ref.get('apiVersion')} {ref.get('kind')} "
                f"{ref.get('name')}, not by a {parent}",
            )
        if not ref.get("name") or not ref.get("uid"):
            return Verdict(False, f"{kind} {name}: its ownerReference to a {parent} lacks a name or uid")
        return ref

    def _read(
        self, child_kind: str, child: str, namespace: str, ref: Mapping[str, Any]
    ) -> dict[str, Any] | Verdict:
        """The live owner that `ref` names, if it has the UID `ref` says."""
        _, kind = PARENT[child_kind]
        key: OwnerKey = (kind, namespace, ref["name"], ref["uid"])
        known = self._objects.get(key)
        if known is not None:
            return known
        link = f"{child_kind} {child} names {kind} {ref['name']} (uid {ref['uid']}) as its controller"
        try:
            obj = self.lookup(kind, namespace, ref["name"])
        except Exception as e:  # the API unreachable or refusing: nothing is known of the pod yet
            log.warning("cannot read %s %s/%s to check a pod's owners: %s", kind, namespace, ref["name"], e)
            return Verdict(False, f"{link}, which cannot be read: {e}", retry=True, warn=False)
        if obj is None:
            return Verdict(False, f"{link}, which does not exist", retry=True)
        live = (obj.get("metadata") or {}).get("uid")
        if live != ref["uid"]:
            return Verdict(False, f"{link}, but the live {kind} {ref['name']} has uid {live}")
        if len(self._objects) >= self.max_entries:
            self._objects.clear()
            self._chains.clear()
        self._objects[key] = obj
        return obj

    def _chain_above(self, kind: str, namespace: str, obj: Mapping[str, Any]) -> Verdict:
        """Does the controller chain above `obj` (a ReplicaSet or Deployment) reach a ModelDeployment?"""
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        key: OwnerKey = (kind, namespace, name, meta.get("uid", ""))
        known = self._chains.get(key)
        if known is not None:
            return known
        verdict: Verdict
        ref = self._parent_ref(meta, kind, name)
        if isinstance(ref, Verdict):
            verdict = ref
        elif PARENT[kind][1] == c.KIND and ref["name"] != name:
            verdict = Verdict(
                False,
                f"Deployment {name} names {c.KIND} {ref['name']} as its controller, but the operator "
                f"names a {c.KIND}'s Deployment after it ({ref['name']})",
            )
        else:
            parent = self._read(kind, name, namespace, ref)
            if isinstance(parent, Verdict):
                verdict = parent
            elif PARENT[kind][1] == c.KIND:
                verdict = OWNED
            else:
                verdict = self._chain_above(PARENT[kind][1], namespace, parent)
        if not verdict.retry:
            self._chains[key] = verdict
        return verdict
