"""Activity the engines count themselves: a model used directly through its Service, not through the
gateway, is busy too. The idle timer reads each awake replica's Prometheus `/metrics`:

- `vllm:request_success_total` (every finished request, by finish reason; vLLM's text exposition of
  the counter `vllm:request_success`, which older exports name without `_total`): a total that
  moved since the last read is activity;
- `vllm:num_requests_running`: a request still running (a long stream) is activity too.

Engines that export neither (not vLLM, or unreachable) add nothing, and one that does not answer is
left alone for a while, so a black-holed address cannot slow the timer down at every tick. The totals
are kept in memory: after an operator restart the first read is only a baseline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller.status import PodView

log = logging.getLogger(__name__)

FINISHED: Final = ("vllm:request_success_total", "vllm:request_success")
RUNNING: Final = "vllm:num_requests_running"
MAX_BYTES: Final = 4 << 20  # a /metrics page is some 100 KiB; an engine is untrusted input
CONNECT_SECONDS: Final = 1.0
READ_SECONDS: Final = 2.0
QUIET_SECONDS: Final = 300.0  # after a failed read, leave that replica alone this long

Key = tuple[str, str, str]  # (namespace, model, pod)


@dataclass(frozen=True)
class EngineCounters:
    finished: float  # requests finished since the engine started, every finish reason
    running: float  # requests running now


def parse(text: str) -> EngineCounters | None:
    """The request counters of one `/metrics` page; None when it has none of them (not vLLM)."""
    finished = running = 0.0
    found = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in FINISHED:
                    finished += sample.value
                    found = True
                elif sample.name == RUNNING:
                    running += sample.value
                    found = True
    except ValueError as e:
        log.debug("unreadable /metrics: %s", e)
        return None
    return EngineCounters(finished, running) if found else None


def metrics_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def fetch(url: str) -> str | None:
    """GET one `/metrics` page (bounded in time and size); None when it cannot be read."""
    timeout = httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS)
    try:
        with httpx.stream("GET", url, timeout=timeout) as response:
            if response.status_code != 200:
                return None
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_BYTES:
                    return None
    except httpx.HTTPError as e:
        log.debug("cannot read %s: %s", url, e)
        return None
    return body.decode("utf-8", errors="replace")


class EngineActivity:
    """Remembers each replica's finished-request total between reads; thread-safe."""

    def __init__(
        self, read: Callable[[str], str | None] = fetch, clock: Callable[[], float] = time.monotonic
    ):
        self._read = read
        self._clock = clock
        self._totals: dict[Key, float] = {}
        self._quiet_until: dict[Key, float] = {}
        self._lock = threading.Lock()

    def active(self, namespace: str, model: str, pods: Iterable[PodView], port: int) -> bool:
        """Whether any awake replica of the model counted a request since the last call (or runs one)."""
        busy = False
        seen: set[Key] = set()
        for pod in pods:
            if (
                pod.terminating
                or not pod.ip
                or pod.state != c.STATE_AWAKE
                or pod.observed != SleepLevel.AWAKE
            ):
                continue  # asleep, going, or not reported yet: it serves nothing
            key = (namespace, model, pod.name)
            seen.add(key)
            if self._clock() < self._quiet_until.get(key, 0.0):
                continue
            text = self._read(metrics_url(pod.ip, port))
            counters = parse(text) if text is not None else None
            with self._lock:
                if counters is None:
                    self._quiet_until[key] = self._clock() + QUIET_SECONDS
                    self._totals.pop(key, None)
                    continue
                self._quiet_until.pop(key, None)
                before = self._totals.get(key)
                self._totals[key] = counters.finished
            # A total that went down is a restarted engine: a new baseline, not activity.
            if counters.running > 0 or (before is not None and counters.finished > before):
                busy = True
        with self._lock:  # forget the replicas of this model that are gone or asleep
            for key in [k for k in self._totals if k[:2] == (namespace, model) and k not in seen]:
                del self._totals[key]
            for key in [k for k in self._quiet_until if k[:2] == (namespace, model) and k not in seen]:
                del self._quiet_until[key]
        return busy
