"""ModelDeployment `hibernate.dev/v1alpha1`: the single source of the CRD schema (crds/ is generated).

Field names are the API's camelCase; Python attributes are snake_case through aliases.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from datetime import timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from hibernate.api import constants as c
from hibernate.api.levels import STRING_PATTERN, SleepLevel

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# The wire form of a level: 0-5 or a name, checked at admission without CEL (Kubernetes 1.20):
# `minimum`/`maximum` only constrain integers and `pattern` only strings, so side by side they
# accept exactly the valid values. (Typed anyOf branches are not structural; see api/crd.py.)
LevelValue = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "minimum": 0,
            "maximum": 5,
            "pattern": STRING_PATTERN,
        }
    ),
]
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, examples=["10m", "1h30m"])]
# Kubernetes objects we pass through untouched (tolerations, volumes, env valueFrom …).
KubeObject = Annotated[
    dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
]
Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


def parse_duration(text: str) -> timedelta:
    """`1h30m` → 5400 s. The pattern above already guarantees the form."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"invalid duration {text!r}: use a number with ms, s, m, h or d, like 10m or 1h30m")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text)))


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class EnvVar(_Model):
    name: str
    value: str | None = None
    value_from: KubeObject | None = None


class Resources(_Model):
    limits: dict[str, Quantity] = Field(default_factory=dict)
    requests: dict[str, Quantity] = Field(default_factory=dict)


class EngineSpec(_Model):
    """The engine container: vLLM's OpenAI server unless `command` says otherwise."""

    image: str = "vllm/vllm-openai:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: list[str] | None = Field(
        default=None, description="Replaces the default `python3 -m vllm.entrypoints.openai.api_server`."
    )
    args: list[str] = Field(
        default_factory=list, description="Extra engine arguments, after the ones we add."
    )
    env: list[EnvVar] = Field(default_factory=list)
    port: int = Field(default=8000, ge=1, le=65535)
    resources: Resources = Field(default_factory=Resources)
    volume_mounts: list[KubeObject] = Field(default_factory=list)
    volumes: list[KubeObject] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=list)
    affinity: KubeObject | None = None
    runtime_class_name: str | None = None
    service_account_name: str | None = None
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    startup_seconds: int = Field(
        default=1800, ge=1, description="How long the engine may take to become ready after a cold start."
    )


class CheckpointSpec(_Model):
    directory: str = Field(
        default=c.DEFAULT_CHECKPOINT_DIR, description="Where level-4 images go on the node."
    )


class StopSpec(_Model):
    """What a Stop does besides scaling to zero (docs/snapshots.md)."""

    snapshot: bool | None = Field(
        default=None,
        description=(
            "Before the pods go, the agent of one replica takes a snapshot of its engine, and the new "
            "pods of the next wake restore it instead of starting cold. Default (unset): on wherever "
            "Checkpoint is possible, i.e. the operator gives the pods the hibernate pod init "
            "(--tools-image, as the chart does); false: off."
        ),
    )
    timeout_seconds: int = Field(
        default=120,
        ge=1,
        le=3600,
        description=(
            "How long a Stop waits for the snapshot before it scales to zero without a new one "
            "(a Warning event says why): a Stop never fails because of its snapshot."
        ),
    )
    restore_wait_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description=(
            "How long a new pod's init waits for the agent to restore the snapshot before it starts "
            "the engine cold."
        ),
    )


class IdleStep(_Model):
    after: Duration = Field(description="Time without requests, counted from the last activity.")
    level: LevelValue


class IdleSpec(_Model):
    """Auto-sleep: after `after` without requests go to `level`, then down the `ladder`."""

    after: Duration
    level: LevelValue = "L1"
    ladder: list[IdleStep] = Field(default_factory=list, description="Later, deeper steps.")

    def steps(self) -> list[tuple[timedelta, SleepLevel]]:
        """All steps in order of time; validated to be increasing in both time and depth."""
        out = [(parse_duration(self.after), SleepLevel.parse(self.level))]
        out += [(parse_duration(s.after), SleepLevel.parse(s.level)) for s in self.ladder]
        return out


def needs_values_message(operator: str) -> str:
    return f"matchExpressions: {operator} needs values"


def takes_no_values_message(operator: str) -> str:
    return f"matchExpressions: {operator} takes no values"


def cel_rules(*rules: tuple[str, str, str]) -> dict[str, Any]:
    """CEL validation rules (x-kubernetes-validations) for the CRD: (rule, message, messageExpression).

    The API server checks them at admission from Kubernetes 1.25 (GA 1.29) with the message the
    operator gives for the same refusal (the model validators beside them); older API servers drop
    the field (1.20 does, silently), and there the operator refuses the object (a permanent
    error, posted as an event). Only base CEL: a function of a newer Kubernetes CEL library would
    make an older API server refuse the whole CRD. messageExpression needs 1.27; `message` stands
    in before.
    """
    return {
        "x-kubernetes-validations": [
            {"rule": rule, "message": message, **({"messageExpression": expr} if expr else {})}
            for rule, message, expr in rules
        ]
    }


class LabelSelectorRequirement(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
                "matchExpressions: In and NotIn need values",
                "'matchExpressions: ' + self.operator + ' needs values'",
            ),
            (
                "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
                "matchExpressions: Exists and DoesNotExist take no values",
                "'matchExpressions: ' + self.operator + ' takes no values'",
            ),
        )
    )

    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> Self:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(needs_values_message(self.operator))
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(takes_no_values_message(self.operator))
        return self


class LabelSelector(_Model):
    """A Kubernetes LabelSelector; `{}` selects everything."""

    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


CIDR_PATTERN = r"^[0-9a-fA-F.:]+/[0-9]{1,3}$"


class IPBlock(_Model):
    cidr: str = Field(pattern=CIDR_PATTERN, examples=["10.0.0.0/8"])
    except_: list[Annotated[str, Field(pattern=CIDR_PATTERN)]] | None = Field(default=None, alias="except")

    @field_validator("cidr")
    @classmethod
    def _is_a_network(cls, v: str) -> str:
        ipaddress.ip_network(v, strict=False)  # ValueError names the bad address
        return v


PEER_SAYS_NOTHING = "a peer needs podSelector, namespaceSelector or ipBlock"
PEER_SAYS_TOO_MUCH = "a peer with ipBlock takes no podSelector or namespaceSelector"


class NetworkPeer(_Model):
    """A NetworkPolicyPeer: pods (of this namespace, or of the namespaces selected), or an IP block."""

    # At least one field, and ipBlock alone: CEL rules with the operator's messages (they replace a
    # `minProperties` and a `not`/`required` schema whose refusals named no field).
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",
                PEER_SAYS_NOTHING,
                "",
            ),
            (
                "!has(self.ipBlock) || !(has(self.podSelector) || has(self.namespaceSelector))",
                PEER_SAYS_TOO_MUCH,
                "",
            ),
        )
    )

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _says_who(self) -> Self:
        if self.pod_selector is None and self.namespace_selector is None and self.ip_block is None:
            raise ValueError(PEER_SAYS_NOTHING)
        if self.ip_block is not None and (self.pod_selector or self.namespace_selector):
            raise ValueError(PEER_SAYS_TOO_MUCH)
        return self


class NetworkSpec(_Model):
    allow_from: list[NetworkPeer] = Field(
        default_factory=list,
        description=(
            "Who else may reach the engine port (NetworkPolicyPeer objects), besides the hibernate "
            "agent and gateway: clients that call the Service directly. They reach the engine's "
            "unauthenticated sleep endpoints too."
        ),
    )


class GpuGroupRef(_Model):
    """Membership of a GpuGroup (docs/gpu-sharing.md): the models of a group take turns on one GPU."""

    name: str = Field(min_length=1, max_length=63, description="A GpuGroup in this namespace.")
    make_room_level: LevelValue | None = Field(
        default=None,
        description="The level this model goes to when it must make room; default: the group's makeRoomLevel.",
    )
    gpu_memory: Quantity | None = Field(
        default=None, description="GPU memory this model holds awake (e.g. 40Gi), for the group's gpuMemory."
    )

    @field_validator("make_room_level")
    @classmethod
    def _sleep_level(cls, v: int | str | None) -> int | str | None:
        if v is not None and SleepLevel.parse(v) == SleepLevel.AWAKE:
            raise ValueError("makeRoomLevel must be a sleep level, not Awake")
        return v


class ModelDeploymentSpec(_Model):
    model: str = Field(min_length=1, description="What the engine serves (a model name or path).")
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas while awake.")
    sleep_level: LevelValue = Field(
        default="Awake", description="Desired level: 0-5 or Awake, L1, L2, CudaSuspend, Checkpoint, Stop."
    )
    engine: EngineSpec = Field(default_factory=EngineSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    stop: StopSpec = Field(default_factory=StopSpec)
    idle: IdleSpec | None = None
    drain_seconds: int = Field(
        default=c.DEFAULT_DRAIN_SECONDS,
        ge=0,
        le=3600,
        description=(
            "How long a sleep waits for the requests in flight to finish before it aborts them "
            "(0: abort at once)."
        ),
    )
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    verify_wake: bool = Field(
        default=True,
        description=(
            "After a wake from CudaSuspend or Checkpoint, a replica serves only once a short greedy "
            "completion gives the same tokens as before its sleep; otherwise it is restarted cold. "
            "false: no check (changing it rolls the pods, like any pod template change)."
        ),
    )

    gpu_group: GpuGroupRef | None = Field(
        default=None, description="Take turns on one GPU with the other members of this GpuGroup."
    )

    @field_validator("sleep_level")
    @classmethod
    def _level_is_valid(cls, v: int | str) -> int | str:
        SleepLevel.parse(v)
        return v

    @property
    def level(self) -> SleepLevel:
        return SleepLevel.parse(self.sleep_level)

    def engine_hash(self) -> str:
        """The spec hash of a snapshot: the engine's image, command, args, port and model. A snapshot
        restores only into a pod of the same hash; any change of these makes it outdated."""
        engine = self.engine
        body = [engine.image, engine.command, engine.args, engine.port, self.model]
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()[:16]


Phase = Literal["Pending", "Awake", "Sleeping", "Asleep", "Waking", "Stopped", "Failed"]
ConditionType = Literal["Ready", "Asleep", "Progressing", "Degraded", "SnapshotReady"]


class Condition(_Model):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Transition(_Model):
    from_: str | None = Field(default=None, alias="from")
    to: str
    started: str
    finished: str | None = None
    seconds: float | None = None


class IdleStatus(_Model):
    last_activity: str | None = None
    next_level: str | None = None
    next_at: str | None = None


class AutomaticLevelStatus(_Model):
    """The automatic level in effect (hibernate.api.auto_level): what an automaton decided, not the spec."""

    level: str
    source: str = Field(
        description="Who decided: idle (the idle ladder), gateway (a wake on request), or another automaton."
    )
    reason: str | None = None
    since: str | None = None


class SnapshotCheck(_Model):
    """The canary of a snapshot: the engine's answer before it, which the restored engine must give again."""

    model: str
    prompt: str
    max_tokens: int
    text: str


class SnapshotStatus(_Model):
    """The snapshot a wake from Stop restores (docs/snapshots.md), as the agent reported it."""

    node: str = Field(
        description="The node it was taken on; unless shared, its disk holds it and new pods prefer that node."
    )
    shared: bool | None = Field(
        default=None,
        description=(
            "True: on the volume that every node's agent mounts (the chart's agent.snapshots.sharedClaim): "
            "a new pod on any node restores it, and no node is preferred."
        ),
    )
    pod: str | None = Field(default=None, description="The replica it was taken from.")
    spec_hash: str = Field(description="The engine spec it was taken from (image, command, args, model).")
    bytes: int | None = None
    taken: str = Field(description="When it was taken (RFC 3339 UTC).")
    seconds: float | None = Field(default=None, description="How long taking it took.")
    check: SnapshotCheck | None = Field(
        default=None,
        description="The engine's answer before the snapshot; a restored engine must give it again.",
    )


class ModelDeploymentStatus(_Model):
    phase: Phase | None = None
    sleep_level: str | None = Field(default=None, description="The level every replica has reached.")
    effective_level: str | None = Field(
        default=None,
        description="The level the operator applies: automaticLevel while one is set, else spec.sleepLevel.",
    )
    automatic_level: AutomaticLevelStatus | None = Field(
        default=None,
        description="The level the idle ladder or a wake on request set, outside the spec; absent when none.",
    )
    replicas: int | None = None
    ready_replicas: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    last_transition: Transition | None = None
    observed_generation: int | None = None
    idle: IdleStatus | None = None
    snapshot: SnapshotStatus | None = Field(
        default=None,
        description="The last snapshot taken at a Stop; the SnapshotReady condition says if it is usable.",
    )
    gpu: str | None = Field(
        default=None,
        description=(
            "In a GpuGroup: Holding (it has the GPU: awake, or not yet settled asleep), Released, or "
            "Refused (the group cannot place it; the Degraded condition says why)."
        ),
    )
