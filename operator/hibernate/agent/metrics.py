"""The agent's Prometheus metrics, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.operation_seconds = Histogram(
            "hibernate_agent_operation_seconds",
            "Seconds one sleep or wake took, by target level and action.",
            ["level", "action"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.operations = Counter(
            "hibernate_agent_operations_total",
            "Sleep and wake operations, by level, action and result (ok, failed, rolled_back, partial, escalated).",
            ["level", "action", "result"],
            registry=self.registry,
        )
        self.checkpoint_bytes = Counter(
            "hibernate_agent_checkpoint_bytes_total",
            "Bytes of level-4 images written by CRIU.",
            registry=self.registry,
        )
        # Stop with a snapshot (docs/snapshots.md): what this agent took and restored. The age of a
        # snapshot is `time() - hibernate_agent_snapshot_taken_timestamp_seconds`.
        self.snapshot_bytes = Gauge(
            "hibernate_agent_snapshot_bytes",
            "Bytes of the last snapshot this agent took, by ModelDeployment.",
            ["namespace", "model"],
            registry=self.registry,
        )
        self.snapshot_taken = Gauge(
            "hibernate_agent_snapshot_taken_timestamp_seconds",
            "When this agent took the last snapshot of a ModelDeployment (Unix time).",
            ["namespace", "model"],
            registry=self.registry,
        )
        self.snapshots = Counter(
            "hibernate_agent_snapshots_total",
            "Snapshots asked of this agent before a Stop, by result (ok, failed).",
            ["result"],
            registry=self.registry,
        )
        self.restore_seconds = Histogram(
            "hibernate_agent_snapshot_restore_seconds",
            "Seconds from claiming a new pod's restore to its engine woken and checked, by result "
            "(restored, or cold: the pod's init started the engine cold).",
            ["result"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.pods = Gauge(
            "hibernate_agent_pods",
            "Managed pods on this node, by state.",
            ["state"],
            registry=self.registry,
        )
        self.reaction_seconds = Histogram(
            "hibernate_agent_reaction_seconds",
            "From seeing a changed desired level to starting the work.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=self.registry,
        )
