"""Admission of inference requests, as vLLM >= 0.20 does it around sleep.

A sleep pauses scheduling: new requests are accepted but held (no error, no timeout) until a full
wake resumes it. The sleep's `mode` decides what happens to requests already there: `abort` ends
them all, held ones included; `wait` lets running ones finish first; `keep` freezes them in place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

SLEEP_MODES: Final = ("abort", "wait", "keep")


class Scheduler:
    def __init__(self) -> None:
        self.paused = False
        self.running = 0
        self.waiting = 0
        self._frozen = False  # running requests stop between tokens (mode=keep)
        self._epoch = 0  # bumped by every abort; a request remembers the epoch it arrived in
        self._changed = asyncio.Condition()

    def ticket(self) -> int:
        return self._epoch

    async def admit(self, ticket: int) -> bool:
        """Hold a new request while paused; False when it was aborted meanwhile."""
        self.waiting += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: not self.paused or self._epoch != ticket)
        finally:
            self.waiting -= 1
        return self._epoch == ticket

    async def proceed(self, ticket: int) -> bool:
        """Between two tokens of a running request: wait while frozen; False when aborted."""
        if self._frozen:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._frozen or self._epoch != ticket)
        return self._epoch == ticket

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Count a request as running; must be entered right after `admit`, with no await between."""
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            await self._notify()

    async def pause(self, mode: str) -> None:
        self.paused = True
        self._frozen = mode == "keep"
        if mode == "abort":
            await self.abort_all()
        elif mode == "wait":
            async with self._changed:
                await self._changed.wait_for(lambda: self.running == 0)

    async def resume(self) -> None:
        self.paused = False
        self._frozen = False
        await self._notify()

    async def abort_all(self) -> None:
        self._epoch += 1
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
