"""Activity marks for the idle ladder: the `hibernate.dev/last-activity` annotation, throttled.

A request marks its model at start and at end; a model with requests in flight is marked again
every interval (a long stream is activity too). At most one write per model per interval: the first
mark writes at once, later ones within the interval are folded into one trailing write at its end,
so the annotation is never more than one interval behind the real last request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from hibernate.gateway.registry import Key

log = logging.getLogger("hibernate.gateway")

# Writes the annotation; returns the object as the API server answered (None if it is gone).
Writer = Callable[[Key, datetime], Awaitable[dict[str, Any] | None]]


class ActivityRecorder:
    def __init__(self, writer: Writer, interval: float) -> None:
        self.writer = writer
        self.interval = interval
        self.in_flight: dict[Key, int] = {}
        self._latest: dict[Key, datetime] = {}  # the newest mark, written or not
        self._written_at: dict[Key, float] = {}  # monotonic time of the last write
        self._pending: dict[Key, asyncio.Task[None]] = {}  # the trailing write, if one is due
        self._tasks: set[asyncio.Task[None]] = set()

    def mark(self, key: Key) -> None:
        self._latest[key] = datetime.now(UTC)
        if key in self._pending:
            return  # the trailing write will carry it
        wait = self._written_at.get(key, -1e9) + self.interval - time.monotonic()
        self._pending[key] = self._spawn(self._write_after(key, max(0.0, wait)))

    async def force(self, key: Key) -> dict[str, Any] | None:
        """Write now, whatever the throttle says (a wake: the ladder must start again from now)."""
        self._latest[key] = datetime.now(UTC)
        self._written_at[key] = time.monotonic()
        return await self.writer(key, self._latest[key])

    def started(self, key: Key) -> None:
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.mark(key)

    def finished(self, key: Key) -> None:
        left = self.in_flight.get(key, 1) - 1
        if left > 0:
            self.in_flight[key] = left
        else:
            self.in_flight.pop(key, None)
        self.mark(key)

    async def keep_marking(self) -> None:
        """Mark the models with requests in flight, every interval (run as a task)."""
        while True:
            await asyncio.sleep(self.interval)
            for key in list(self.in_flight):
                self.mark(key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _write_after(self, key: Key, wait: float) -> None:
        try:
            if wait:
                await asyncio.sleep(wait)
        finally:
            self._pending.pop(key, None)
        self._written_at[key] = time.monotonic()
        try:
            await self.writer(key, self._latest[key])
        except Exception as e:  # a lost mark costs at most an early sleep; never a request
            log.warning("could not write the activity of %s/%s: %s", key[0], key[1], e)
