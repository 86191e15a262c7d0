"""The gateway's Prometheus metrics: `hibernate_gateway_*`, base units, no per-model labels."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Every value the `result` label takes (bounded, so the series count is too).
RESULT_OK: Final = "ok"  # the engine answered (any status below 400)
RESULT_UPSTREAM_ERROR: Final = "upstream_error"  # the engine answered 4xx/5xx
RESULT_UNREACHABLE: Final = "upstream_unreachable"  # no connection to the engine (502)
RESULT_UNKNOWN_MODEL: Final = "unknown_model"  # 404
RESULT_BAD_REQUEST: Final = "bad_request"  # 400: not JSON, no model
RESULT_QUEUE_FULL: Final = "queue_full"  # 503: too many requests already held for the model
RESULT_HOLD_TIMEOUT: Final = "hold_timeout"  # 503: the model did not wake within --hold-timeout
RESULT_WAKE_FAILED: Final = "wake_failed"  # 503: the wake failed (phase Failed) or the model went away
RESULT_WAKE_DISABLED: Final = "wake_disabled"  # 503: asleep with wake-on-request "false"
RESULTS: Final = (
    RESULT_OK,
    RESULT_UPSTREAM_ERROR,
    RESULT_UNREACHABLE,
    RESULT_UNKNOWN_MODEL,
    RESULT_BAD_REQUEST,
    RESULT_QUEUE_FULL,
    RESULT_HOLD_TIMEOUT,
    RESULT_WAKE_FAILED,
    RESULT_WAKE_DISABLED,
)

# The `result` of a GPU switch (a member of a full GpuGroup put to sleep to wake another).
SWITCH_OK: Final = "ok"  # the member made room at its level
SWITCH_STOPPED: Final = "stopped"  # it failed to (or did not in time) and was stopped instead
SWITCH_FAILED: Final = "failed"  # it could not even be stopped: the request was refused
SWITCH_RESULTS: Final = (SWITCH_OK, SWITCH_STOPPED, SWITCH_FAILED)

HOLD_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "hibernate_gateway_requests_total",
            "Inference requests the gateway finished, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self.requests.labels(result=result)
        self.held = Gauge(
            "hibernate_gateway_requests_held",
            "Requests held now, waiting for their model to wake.",
            registry=self.registry,
        )
        self.hold_seconds = Histogram(
            "hibernate_gateway_hold_seconds",
            "How long a request was held for its model to wake (until forwarded or refused).",
            buckets=HOLD_BUCKETS,
            registry=self.registry,
        )
        self.wakes = Counter(
            "hibernate_gateway_wakes_total",
            "Wakes the gateway asked for (its automatic level set to Awake), by the level woken from.",
            ["level"],
            registry=self.registry,
        )
        self.activity_writes = Counter(
            "hibernate_gateway_activity_writes_total",
            "Writes of the last-activity annotation (throttled per model).",
            registry=self.registry,
        )
        self.api_errors = Counter(
            "hibernate_gateway_api_errors_total",
            "Kubernetes API calls of the gateway that failed, by call.",
            ["call"],
            registry=self.registry,
        )
        self.gpu_switches = Counter(
            "hibernate_gateway_gpu_switch_total",
            "GPU switches in GpuGroups: a member put to sleep so that another could wake, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in SWITCH_RESULTS:
            self.gpu_switches.labels(result=result)
        self.gpu_switch_seconds = Histogram(
            "hibernate_gateway_gpu_switch_seconds",
            "From the start of a GPU switch until the member woken for the request serves.",
            buckets=HOLD_BUCKETS,
            registry=self.registry,
        )
