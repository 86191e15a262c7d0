"""What the agent needs to know of one pod, read from the Pod object (a plain dict from the API)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    ip: str | None
    port: int
    container: str
    container_id: str | None
    annotations: dict[str, str]
    checkpoint_dir: str
    deleting: bool
    awake_condition: str | None = None  # the status of its hibernate.dev/awake condition, if any
    gated: bool = False  # its spec has the readiness gate on that condition (pods the operator made)
    ready: bool = False  # its Ready condition is True (the kubelet's verdict, the gate included)

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> PodRef:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        annotations = dict(meta.get("annotations") or {})
        containers = spec.get("containers") or [{}]
        engine = next((x for x in containers if x.get("name") == c.ENGINE_CONTAINER), containers[0])
        ports = engine.get("ports") or []
        port = next((p["containerPort"] for p in ports if p.get("name") == "http"), None)
        if port is None:
            port = ports[0]["containerPort"] if ports else 8000
        statuses = status.get("containerStatuses") or []
        cid = next((s.get("containerID") for s in statuses if s.get("name") == engine.get("name")), None)
        conditions = {x.get("type"): x.get("status") for x in status.get("conditions") or []}
        gates = {g.get("conditionType") for g in spec.get("readinessGates") or []}
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            ip=status.get("podIP"),
            port=int(port),
            container=engine.get("name", c.ENGINE_CONTAINER),
            container_id=cid or None,
            annotations=annotations,
            checkpoint_dir=annotations.get(c.ANN_CHECKPOINT_DIR, c.DEFAULT_CHECKPOINT_DIR),
            deleting=bool(meta.get("deletionTimestamp")),
            awake_condition=conditions.get(c.CONDITION_AWAKE),
            gated=c.CONDITION_AWAKE in gates,
            ready=conditions.get("Ready") == "True",
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def engine_url(self) -> str:
        if not self.ip:
            raise LookupError(f"pod {self.namespace}/{self.name} has no IP yet")
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"

    def desired(self) -> SleepLevel | None:
        """The level asked for; None when no level is asked. InvalidSleepLevel for garbage."""
        raw = self.annotations.get(c.ANN_SLEEP_LEVEL)
        return None if raw is None else SleepLevel.parse(raw)

    def observed(self) -> SleepLevel | None:
        return SleepLevel.parse_or_none(self.annotations.get(c.ANN_OBSERVED_LEVEL))

    @property
    def state(self) -> str | None:
        return self.annotations.get(c.ANN_STATE)

    @property
    def drain_seconds(self) -> float:
        """How long a sleep waits for the requests in flight (the operator writes spec.drainSeconds
        here); the default when absent or unreadable, at most an hour."""
        try:
            value = float(self.annotations.get(c.ANN_DRAIN_SECONDS, c.DEFAULT_DRAIN_SECONDS))
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            return float(c.DEFAULT_DRAIN_SECONDS)
        return min(max(value, 0.0), 3600.0)

    def last_operation(self) -> dict[str, Any]:
        try:
            op = json.loads(self.annotations.get(c.ANN_LAST_OPERATION, "{}"))
        except json.JSONDecodeError:
            return {}
        return op if isinstance(op, dict) else {}

    def checkpoint_root(self, roots: tuple[Path, ...]) -> Path:
        """The allowed root that holds this pod's checkpoint directory, or PermissionError.

        The directory comes from a pod annotation and the agent writes there as root: a pod must not
        be able to point it at /etc.
        """
        base = Path(self.checkpoint_dir).resolve()
        for r in roots:
            if base == r.resolve() or r.resolve() in base.parents:
                return r.resolve()
        allowed = ", ".join(str(r) for r in roots)
        raise PermissionError(f"checkpoint directory {base} is outside the agent's allowed roots ({allowed})")

    def image_dir(self, roots: tuple[Path, ...]) -> Path:
        """<checkpoint dir>/<namespace>/<pod>/<container>, inside one of the allowed `roots`."""
        self.checkpoint_root(roots)
        return Path(self.checkpoint_dir).resolve() / self.namespace / self.name / self.container
