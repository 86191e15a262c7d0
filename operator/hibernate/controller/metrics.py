"""The operator's Prometheus metrics (served on `hibernate operator --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TRANSITIONS = Counter(
    "hibernate_operator_transitions_total",
    "Model transitions the operator saw complete, by the level reached.",
    ["level"],
)
TRANSITION_SECONDS = Histogram(
    "hibernate_operator_transition_seconds",
    "From a new desired level to every replica reaching it, by level.",
    ["level"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
FAILURES = Counter(
    "hibernate_operator_failed_total",
    "Times a model entered phase Failed.",
)
