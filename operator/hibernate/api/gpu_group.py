"""GpuGroup `hibernate.dev/v1alpha1`: ModelDeployments that take turns on one GPU (docs/gpu-sharing.md).

The types (the CRD is generated from them), the lease that says who holds the GPU, and the pure
decision of who makes room for whom. No API calls here: the gateway (hibernate.gateway.gpu_switch)
and the operator (hibernate.controller.gpu_groups) do those.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.api.v1alpha1 import LevelValue, Quantity, _Model

PlacementMode = Literal["TimeSlicing", "DRA", "SameNode"]
DEFAULT_SHARED_RESOURCE = "nvidia.com/gpu.shared"  # the device plugin's time-sliced GPU (renameByDefault)
DEFAULT_DEVICE_CLASS = "gpu.nvidia.com"  # NVIDIA's DRA driver


def make_room_level(value: int | str) -> SleepLevel:
    """A level a member may be sent to: any sleep level (1-5), never Awake."""
    level = SleepLevel.parse(value)
    if level == SleepLevel.AWAKE:
        raise ValueError("makeRoomLevel must be a sleep level (L1, L2, CudaSuspend, Checkpoint or Stop)")
    return level


class GpuPlacement(_Model):
    """How the members land on the same node and GPU."""

    mode: PlacementMode = Field(
        default="TimeSlicing",
        description=(
            "TimeSlicing: each member asks for one replica of `resourceName`, the time-sliced GPU the "
            "NVIDIA device plugin advertises, on a node with one GPU. DRA: every member's pod uses one "
            "shared ResourceClaim (resource.k8s.io/v1, Kubernetes 1.34+). SameNode: the members are only "
            "kept on one node, their resources left as the engine says (the GPU given another way, or "
            "fake engines on a CPU node)."
        ),
    )
    resource_name: str = Field(
        default=DEFAULT_SHARED_RESOURCE,
        description="TimeSlicing: the extended resource each member asks for one of.",
    )
    device_class_name: str = Field(
        default=DEFAULT_DEVICE_CLASS, description="DRA: the DeviceClass of the shared claim's one GPU."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels every member's pod needs (a node with one GPU)."
    )


class GpuGroupSpec(_Model):
    max_awake: int = Field(default=1, ge=1, le=64, description="How many members may hold the GPU at once.")
    gpu_memory: Quantity | None = Field(
        default=None,
        description=(
            "Optional budget of GPU memory (e.g. 80Gi): the awake members' spec.gpuGroup.gpuMemory "
            "must fit in it, besides maxAwake."
        ),
    )
    make_room_level: LevelValue = Field(
        default="L1",
        description=(
            "The level a member goes to when it must make room: L1 keeps the switch fast, CudaSuspend "
            "frees the GPU fully, Checkpoint frees host RAM too. A member may override it."
        ),
    )
    min_awake_seconds: int = Field(
        default=30,
        ge=0,
        le=86400,
        description="A member that serves is not put to sleep for this long after it first served.",
    )
    switch_timeout_seconds: int = Field(
        default=120,
        ge=1,
        le=3600,
        description="How long a member may take to make room before it is stopped instead.",
    )
    placement: GpuPlacement = Field(default_factory=GpuPlacement)

    @field_validator("make_room_level")
    @classmethod
    def _is_a_sleep_level(cls, v: int | str) -> int | str:
        make_room_level(v)
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _is_a_quantity(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_bytes(v)
        return v


class GpuHolder(_Model):
    name: str
    since: str | None = Field(default=None, description="When it took the GPU.")
    last_used: str | None = Field(default=None, description="Its last request through the gateway.")


class GpuSwitchStatus(_Model):
    from_: str | None = Field(default=None, alias="from")
    to: str
    at: str
    seconds: float | None = None
    result: str | None = None


class GroupCondition(_Model):
    type: Literal["Placeable", "WithinBudget"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class GpuGroupStatus(_Model):
    members: list[str] = Field(default_factory=list, description="ModelDeployments in the group.")
    holders: list[GpuHolder] = Field(default_factory=list, description="Who holds the GPU now.")
    awake: int = 0
    holding: str | None = Field(default=None, description="The holders' names, comma-separated (a column).")
    switching: GpuSwitchStatus | None = Field(default=None, description="A switch under way.")
    last_switch: GpuSwitchStatus | None = None
    conditions: list[GroupCondition] = Field(default_factory=list)
    observed_generation: int | None = None


# --- quantities -----------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_bytes(value: int | str) -> int:
    """`16Gi` → 17179869184; a bare number is bytes."""
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"invalid memory quantity {value!r}: use a number with Ki, Mi, Gi, Ti, k, M, G or T")
    return int(float(match[1]) * _FACTORS[match[2]])


# --- the lease ------------------------------------------------------------------------------------


def now_text(when: float | None = None) -> str:
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class LeaseEntry(BaseModel):
    """One member that holds the GPU (or is handing it over to `handover_to`)."""

    name: str
    since: float  # epoch seconds: when it took the GPU
    last_used: float = 0.0
    handover_to: str | None = None  # it is being put to sleep to make room for this member
    handover_since: float | None = None


class Lease(BaseModel):
    holders: list[LeaseEntry] = Field(default_factory=list)
    last_switch: dict[str, Any] | None = None

    def entry(self, name: str) -> LeaseEntry | None:
        return next((e for e in self.holders if e.name == name), None)

    def dump(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"), sort_keys=True)


def read_lease(group: dict[str, Any]) -> Lease:
    """The lease on a GpuGroup object; an empty one when absent or unreadable (it heals at the next write)."""
    raw = ((group.get("metadata") or {}).get("annotations") or {}).get(c.ANN_GPU_LEASE)
    if not raw:
        return Lease()
    try:
        return Lease.model_validate_json(raw)
    except ValidationError:
        return Lease()


# --- who makes room for whom ----------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """What the decision needs of one member, as the caller sees it now."""

    name: str
    holds: bool  # awake, waking, or not yet settled asleep: it has (or is taking) GPU memory
    last_used: float = 0.0  # epoch seconds of its last request
    memory: int | None = None  # spec.gpuGroup.gpuMemory in bytes
    busy: bool = False  # requests in flight through this gateway
    waking: bool = False  # set to Awake and not serving yet: the request that woke it still waits
    awake_since: float = 0.0  # epoch seconds it has served since (its Ready condition), 0 if not serving


@dataclass(frozen=True)
class Decision:
    """`hold`: `name` holds the GPU already; `join`: room is free; `evict`: put `victim` to sleep
    first; `wait`: everyone who could make room is protected until `until` (epoch seconds), or busy."""

    action: Literal["hold", "join", "evict", "wait"]
    victim: str | None = None
    until: float | None = None
    reason: str = ""


def current_holders(lease: Lease, members: dict[str, Member], now: float, grace: float) -> list[LeaseEntry]:
    """The lease's holders that still hold, plus members that hold without being in it (a person
    woke them by hand). An entry younger than `grace` stays although its member still sleeps: it
    was just given the GPU and its wake has not shown yet."""
    out: list[LeaseEntry] = []
    for entry in lease.holders:
        member = members.get(entry.name)
        if member is None:
            continue  # deleted, or left the group
        if member.holds or entry.handover_to is not None or now - entry.since < grace:
            out.append(entry)
    listed = {e.name for e in out}
    for member in members.values():
        if member.holds and member.name not in listed:
            out.append(LeaseEntry(name=member.name, since=0.0, last_used=member.last_used))
    return out


def decide(
    spec: GpuGroupSpec,
    holders: list[LeaseEntry],
    members: dict[str, Member],
    want: str,
    now: float,
    switch_timeout: float,
) -> Decision:
    """Whether `want` may take the GPU now, and if not, who goes to sleep for it (least recently used
    first, never one woken less than minAwakeSeconds ago, nor one with requests in flight).

    "Woken" counts from when the member serves, not from when it was given the GPU: a wake slower
    than minAwakeSeconds would otherwise be undone before it served the request it was woken for (a
    request another gateway replica holds, whose in-flight count this one cannot see). A member
    still waking is not put to sleep either, for up to `switch_timeout` after it was given the GPU."""
    if any(e.name == want and e.handover_to is None for e in holders):
        return Decision("hold")
    pending = [e for e in holders if e.handover_to is not None]
    if any(e.handover_to == want for e in pending):
        return Decision("wait", until=now + 0.5, reason=f"{want} is already being given the GPU")
    budget = parse_bytes(spec.gpu_memory) if spec.gpu_memory is not None else None

    def fits(entries: list[LeaseEntry]) -> bool:
        if len(entries) + 1 > spec.max_awake:
            return False
        if budget is None:
            return True
        used = sum(_memory(members.get(e.name), budget) for e in entries)
        return used + _memory(members.get(want), budget) <= budget

    if fits(holders):
        return Decision("join")
    candidates = []
    protected_until: list[float] = []
    for entry in holders:
        if entry.handover_to is not None and now - (entry.handover_since or 0.0) < switch_timeout * 2:
            continue  # someone is making room with it now
        member = members.get(entry.name)
        if member is not None and member.waking and now - entry.since < switch_timeout:
            protected_until.append(now + 0.5)
            continue
        woken = max(entry.since, member.awake_since if member else 0.0)
        free_at = woken + spec.min_awake_seconds
        if free_at > now:
            protected_until.append(free_at)
            continue
        if member is not None and member.busy:
            protected_until.append(now + 0.5)
            continue
        last = max(entry.last_used, member.last_used if member else 0.0, entry.since)
        candidates.append((last, entry.name))
    if candidates:
        candidates.sort()
        return Decision("evict", victim=candidates[0][1])
    until = min(protected_until) if protected_until else now + 0.5
    return Decision("wait", until=until, reason="every holder is protected, busy or already making room")


def _memory(member: Member | None, budget: int) -> int:
    """A member that does not say how much it takes counts as the whole budget."""
    return member.memory if member is not None and member.memory is not None else budget
