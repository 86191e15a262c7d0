"""Async client for an engine's sleep API: vLLM's dev-mode endpoints (notes/vllm-sleep-api.md).

Bodies of `/sleep` and `/wake_up` are optional (empty up to vLLM 0.30, JSON from 0.32), so every
call accepts both; the engine's state is read from `GET /is_sleeping` only. Every attempt has a
deadline (`timeout`), connection errors and 5xx answers are retried with exponential backoff, and
every failure surfaces as one `EngineError` that names the URL, the step and the cause.

A sleep drains first (`drain_seconds`): `POST /sleep?mode=wait` makes vLLM queue new requests and
sleep once the running ones have finished; if they have not within the deadline, `POST
/sleep?mode=abort` aborts them and sleeps at once (the waiting call then finds the engine asleep, a
no-op in vLLM). Engines that refuse `mode=wait` (a 4xx) are slept with `mode=abort`.

A sleep may carry the agent's hint (`hibernate=cuda-suspend|checkpoint`, hibernate.api.constants): what
follows the sleep, for an engine that can prepare for it. vLLM ignores the parameter; an engine that
refuses it (a 4xx) is asked again without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlencode

import httpx

from hibernate.api import constants as c

log = logging.getLogger("hibernate.agent.engine")

SLEEP_LEVELS: Final = (0, 1, 2)
_EXCERPT: Final = 200
# The sleep API answers a few bytes; an engine is hostile input, and an endless answer must not
# fill the agent's memory.
MAX_ANSWER_BYTES: Final = 1 << 20
# A completion's text is kept (the wake check compares answers) up to this many characters.
MAX_COMPLETION_CHARS: Final = 1000


class _TooLarge(Exception):
    pass


class EngineError(Exception):
    """A failed call to the engine; the message says which engine, which step and why."""

    def __init__(self, message: str, *, url: str = "", step: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.step = step
        self.status = status  # the HTTP status where the engine answered one


class EngineClient:
    """One engine, e.g. `EngineClient("http://10.0.0.7:8000")`; use `async with` or call `aclose()`.

    A call takes at most (retries + 1) * (timeout + 1 s) plus the backoff sleeps. Read timeouts are not
    retried: the engine got the request and is stuck in it, and sending it again would only queue
    another. `drain_seconds`: how long `sleep_level` lets the requests in flight finish (0: abort them).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        drain_seconds: float = 0.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.drain_seconds = max(0.0, drain_seconds)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # Building a TLS context costs ~40 ms, a tenth of a level-1 wake: only https needs one.
        verify = self.base_url.startswith("https://")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, verify=verify
        )

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the endpoints ------------------------------------------------------------------------

    async def health(self) -> bool:
        """True when `GET /health` answers 200 (it does while asleep too); one try, never raises."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._http.get("/health")
        except (TimeoutError, httpx.HTTPError):
            return False
        return response.status_code == 200

    async def is_sleeping(self) -> bool:
        body = await self._call("GET", "/is_sleeping")
        if not isinstance(body, dict) or not isinstance(body.get("is_sleeping"), bool):
            raise self._error("GET /is_sleeping", f"unexpected answer {_excerpt(json.dumps(body))}")
        return bool(body["is_sleeping"])

    async def sleep(
        self, level: int, mode: str = "abort", timeout: float | None = None, prepare: str | None = None
    ) -> dict[str, Any] | None:
        """`POST /sleep?level=N&mode=M[&hibernate=P]`; returns the JSON body, or None where the engine
        sends none. `timeout`: for this call instead of the client's (a drain may take longer than a
        sleep). `prepare`: the hint (c.SLEEP_HINTS), dropped if the engine refuses it."""
        params: list[tuple[str, str | int]] = [("level", level), ("mode", mode)]
        if prepare is not None:
            if prepare not in c.SLEEP_HINTS:
                raise ValueError(f"the sleep hints are {c.SLEEP_HINTS}, not {prepare!r}")
            try:
                return await self._sleep([*params, (c.SLEEP_HINT_PARAM, prepare)], timeout)
            except EngineError as e:
                if e.status is None or not 400 <= e.status < 500:
                    raise
                log.info(
                    "engine %s refuses the hint %s=%s (%s); asking without it",
                    self.base_url,
                    c.SLEEP_HINT_PARAM,
                    prepare,
                    e,
                )
        return await self._sleep(params, timeout)

    async def _sleep(
        self, params: list[tuple[str, str | int]], timeout: float | None
    ) -> dict[str, Any] | None:
        step = f"POST /sleep?{urlencode(params)}"
        body = await self._call("POST", "/sleep", params=params, step=step, timeout=timeout)
        return self._object_or_none(step, body)

    async def wake_up(self, tags: Sequence[str] | None = None) -> dict[str, Any] | None:
        """`POST /wake_up`, all tags when `tags` is None; returns the JSON body or None."""
        params = [("tags", tag) for tag in tags or ()]
        step = f"POST /wake_up?{urlencode(params)}" if params else "POST /wake_up"
        return self._object_or_none(step, await self._call("POST", "/wake_up", params=params, step=step))

    async def collective_rpc(
        self, method: str, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> list[Any] | None:
        """`POST /collective_rpc`; returns one result per worker, or None for an empty answer."""
        payload: dict[str, Any] = {"method": method}
        if args is not None:
            payload["args"] = list(args)
        if kwargs is not None:
            payload["kwargs"] = dict(kwargs)
        step = f"POST /collective_rpc {method}"
        body = await self._call("POST", "/collective_rpc", payload=payload, step=step)
        if body is None:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")
        results: list[Any] = body["results"]
        return results

    async def reset_prefix_cache(self) -> None:
        """`POST /reset_prefix_cache`, again while the engine answers success false (blocks in use)."""
        step = "POST /reset_prefix_cache"
        for attempt in range(self.retries + 1):
            body = await self._call("POST", "/reset_prefix_cache")
            if body is None or (isinstance(body, dict) and body.get("success") is True):
                return  # vLLM 0.14 answers with an empty body
            if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
                raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")
            if attempt < self.retries:
                await asyncio.sleep(self._delay(attempt))
        raise self._error(step, f"the engine still answers success false after {self.retries + 1} attempts")

    async def models(self) -> list[str]:
        """`GET /v1/models`: the names the engine serves, in its order (never empty)."""
        step = "GET /v1/models"
        body = await self._call("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if (
            not isinstance(data, list)
            or not data
            or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data)
        ):
            raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")
        return [str(m["id"]) for m in data]

    async def complete(
        self, model: str, prompt: str, max_tokens: int, limit: int = MAX_COMPLETION_CHARS
    ) -> str:
        """`POST /v1/completions`, greedy (temperature 0): the text of its one choice, cut at `limit`
        characters (the wake check keeps it in an annotation)."""
        step = "POST /v1/completions"
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n": 1}
        body = await self._call("POST", "/v1/completions", payload=payload, step=step)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")
        text = choices[0].get("text")
        if not isinstance(text, str):
            raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")
        return text[:limit]

    # --- whole transitions --------------------------------------------------------------------

    async def sleep_level(self, level: int, mode: str | None = None, prepare: str | None = None) -> None:
        """Sleep at `level` (0-2) and check that the engine says it sleeps. Without `mode`, the requests
        in flight get `drain_seconds` to finish first (see `drain_then_sleep`). `prepare`: the hint
        of what follows (see `sleep`)."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"the engine sleeps at levels {SLEEP_LEVELS}, not {level}")
        if mode is None and self.drain_seconds > 0:
            await self.drain_then_sleep(level, prepare)
        else:
            await self.sleep(level, mode or "abort", prepare=prepare)
        if not await self.is_sleeping():
            raise self._error(f"sleep level {level}", "POST /sleep answered, but /is_sleeping is false")

    async def drain_then_sleep(self, level: int, prepare: str | None = None) -> None:
        """`POST /sleep?mode=wait`: new requests queue and the engine sleeps once the running ones are
        done; after `drain_seconds`, `POST /sleep?mode=abort` ends what still runs and sleeps now."""
        try:
            async with asyncio.timeout(self.drain_seconds):
                await self.sleep(level, "wait", timeout=self.drain_seconds + self.timeout, prepare=prepare)
            return
        except TimeoutError:
            log.warning(
                "engine %s: requests still running after the %gs drain; aborting them to sleep",
                self.base_url,
                self.drain_seconds,
            )
        except EngineError as e:
            if e.status is None or not 400 <= e.status < 500:
                raise
            log.warning("engine %s: no drain (%s); sleeping with mode=abort", self.base_url, e)
        await self.sleep(level, "abort", prepare=prepare)

    async def wake(self, from_level: int) -> None:
        """Wake from `from_level` (0-2) with the sequence that level needs, and check it is awake.

        Level 2 discarded the weights: wake them, reload them from disk, wake the KV cache, and
        reset the prefix cache, or the engine answers from garbage.
        """
        if from_level not in SLEEP_LEVELS:
            raise ValueError(f"the engine wakes from levels {SLEEP_LEVELS}, not {from_level}")
        if from_level == 2:
            await self.wake_up(["weights"])
            await self.collective_rpc("reload_weights")
            await self.wake_up(["kv_cache"])
            await self.reset_prefix_cache()
        else:
            await self.wake_up()
        sleeping = await self.is_sleeping()
        if sleeping and from_level == 2:
            # All memory is back; what can remain is scheduling paused by an earlier level-0 sleep.
            await self.wake_up()
            sleeping = await self.is_sleeping()
        if sleeping:
            raise self._error(f"wake from level {from_level}", "the wake answered, but /is_sleeping is true")

    # --- transport ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str | int]] = (),
        payload: Mapping[str, Any] | None = None,
        step: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request with retries; returns the parsed JSON body, or None for an empty body."""
        step = step or (f"{method} {path}?{urlencode(params)}" if params else f"{method} {path}")
        timeout = timeout if timeout is not None else self.timeout
        attempts = self.retries + 1
        cause, status = "", None
        for attempt in range(attempts):
            status = None
            try:
                # httpx times each phase; this hard deadline also stops an engine that trickles bytes.
                async with asyncio.timeout(timeout + 1.0):
                    response, text = await self._send(method, path, params, payload, timeout)
            except _TooLarge:
                raise self._error(step, f"answer larger than {MAX_ANSWER_BYTES} bytes, not read") from None
            except httpx.ConnectTimeout:
                cause = f"connect timed out after {self.timeout:g}s"
            except (TimeoutError, httpx.TimeoutException):
                raise self._error(step, f"no answer within {timeout:g}s (timeout)") from None
            except httpx.TransportError as exc:
                cause = _describe(exc)
            else:
                status = response.status_code
                if status < 400:
                    return self._parse(step, text, status)
                cause = f"HTTP {status}: {_excerpt(text)}"
                if status < 500:
                    raise self._error(step, cause + _hint(status), status)
            if attempt + 1 < attempts:
                log.warning(
                    "engine %s: %s failed (%s); retry %d of %d",
                    self.base_url,
                    step,
                    cause,
                    attempt + 1,
                    self.retries,
                )
                await asyncio.sleep(self._delay(attempt))
        raise self._error(step, f"{cause} (after {attempts} attempts)", status)

    async def _send(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str | int]],
        payload: Mapping[str, Any] | None,
        timeout: float,
    ) -> tuple[httpx.Response, str]:
        """The response and its body, read up to MAX_ANSWER_BYTES (_TooLarge past that)."""
        limits = httpx.Timeout(timeout, connect=self.timeout)
        async with self._http.stream(
            method, path, params=list(params), json=payload, timeout=limits
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise _TooLarge
        return response, body.decode(response.encoding or "utf-8", errors="replace")

    def _parse(self, step: str, text: str, status: int) -> Any:
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise self._error(step, f"garbage answer, not JSON: {_excerpt(text)}", status) from None

    def _object_or_none(self, step: str, body: Any) -> dict[str, Any] | None:
        if body is None or isinstance(body, dict):
            return body
        raise self._error(step, f"unexpected answer {_excerpt(json.dumps(body))}")

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * 2**attempt, self.max_backoff))

    def _error(self, step: str, cause: str, status: int | None = None) -> EngineError:
        return EngineError(
            f"engine {self.base_url}: {step} failed: {cause}", url=self.base_url, step=step, status=status
        )


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError) and _caused_by(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the engine closed the connection ({exc})"
    return f"{type(exc).__name__}: {exc or 'connection error'}"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    # httpx wraps the OS error a few levels down ("All connection attempts failed").
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hint(status: int) -> str:
    if status == 404:
        return " (are the sleep endpoints on? vLLM registers them only with VLLM_SERVER_DEV_MODE=1)"
    return ""


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= _EXCERPT else flat[:_EXCERPT] + "...")
