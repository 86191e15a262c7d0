# mypy: disallow-untyped-calls=False
# (the official client ships no type hints)
"""The gateway's HTTP server: route by `model`, hold while the model wakes, forward, stream back.

One wake per model at a time: the first request for a sleeping model starts it (one annotation
patch: its automatic level, never its spec), later ones join it. Each held request waits at most
--hold-timeout seconds; a full queue, a failed wake or a timeout is answered 503 with Retry-After
and an OpenAI-style error body. Nothing hangs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import aiohttp
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hibernate.api import constants as c
from hibernate.api.auto_level import SOURCE_GATEWAY
from hibernate.api.levels import SleepLevel
from hibernate.controller import kube
from hibernate.controller.auto_level import clear_automatic_level, set_automatic_level
from hibernate.controller.idle import format_time
from hibernate.gateway import metrics as m
from hibernate.gateway.activity import ActivityRecorder
from hibernate.gateway.endpoints import Endpoints
from hibernate.gateway.gpu_switch import GpuSwitch
from hibernate.gateway.registry import ANN_WAKE_ON_REQUEST, Key, ModelView, Registry

log = logging.getLogger("hibernate.gateway")

SOURCE: Final = SOURCE_GATEWAY  # the source of the automatic levels the gateway sets (its wakes)
POLL_SECONDS: Final = 2.0  # while holding, read the object directly this often (in case the watch lags)
# Request headers that belong to one connection, not to the request (RFC 9110 §7.6.1), plus the ones
# the client library sets itself.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_RESPONSE_HEADERS: Final = ("Content-Type", "Content-Encoding", "Cache-Control", "X-Request-Id")


@dataclass(frozen=True)
class Options:
    hold_timeout: float = 300.0  # seconds a request may be held for its model to wake
    max_held: int = 1024  # requests held per model; beyond it 503 at once
    activity_interval: float = 10.0  # at most one last-activity write per model per this many seconds
    connect_timeout: float = 10.0  # seconds to connect to an engine
    connect_retries: int = 3  # connection attempts (a Service whose endpoints are just coming back)
    retry_after_busy: int = 5  # Retry-After of a full queue
    retry_after_timeout: int = 10  # Retry-After of a hold timeout (the wake goes on)
    retry_after_failed: int = 30  # Retry-After of a failed wake
    retry_after_disabled: int = 60  # Retry-After of a sleeping model with wake-on-request "false"


@dataclass(frozen=True)
class Outcome:
    """How a hold ended: `ok`, or the refusal to send (metric result, message, Retry-After)."""

    ok: bool
    result: str = m.RESULT_OK
    message: str = ""
    retry_after: int = 0


OK: Final = Outcome(ok=True)


@dataclass
class _Wake:
    task: asyncio.Task[Outcome]


def error_body(message: str, status: int, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _error(message: str, status: int, kind: str, retry_after: int = 0) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response(error_body(message, status, kind), status=status, headers=headers)


class Gateway:
    def __init__(
        self,
        registry: Registry,
        options: Options,
        metrics: m.GatewayMetrics,
        endpoints: Endpoints | None = None,
    ) -> None:
        self.registry = registry
        # The ready endpoints of each model's Service: requests go only to those. None (an
        # --upstream-template): to the template's URL whenever the status says the model serves.
        self.endpoints = endpoints
        self.options = options
        self.metrics = metrics
        self.activity = ActivityRecorder(self._write_activity, options.activity_interval)
        self.held: dict[Key, int] = {}
        self.wakes: dict[Key, _Wake] = {}
        self.session: aiohttp.ClientSession | None = None
        # GpuGroups: who makes room for a sleeping member (a member with requests in flight never does).
        self.gpu = GpuSwitch(registry, metrics, busy=lambda key: bool(self.activity.in_flight.get(key)))
        self._background: list[asyncio.Task[None]] = []

    # --- application --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.proxy)
        app.router.add_post("/v1/chat/completions", self.proxy)
        app.router.add_post("/v1/{tail:.+}", self.proxy)  # embeddings and the like: routed the same way
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout),
            auto_decompress=False,
        )
        self._background.append(asyncio.create_task(self.activity.keep_marking()))

    async def _stop(self, app: web.Application) -> None:
        for task in self._background:
            task.cancel()
        for wake in list(self.wakes.values()):
            wake.task.cancel()
        await self.activity.close()
        if self.session is not None:
            await self.session.close()

    # --- plain endpoints ----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "synced": self.registry.synced, "models": len(self.registry.models)}
        )

    async def readyz(self, request: web.Request) -> web.Response:
        synced = self.registry.synced
        return web.json_response({"synced": synced}, status=200 if synced else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        """Every ModelDeployment's model, awake or not: a request for any of them is served."""
        data = [
            {
                "id": view.model,
                "object": "model",
                "created": 0,
                "owned_by": "hibernate",
                "root": view.model,
                "parent": None,
                "hibernate": {
                    "namespace": view.namespace,
                    "name": view.name,
                    "sleepLevel": view.desired.label if view.desired is not None else None,
                    "automaticLevel": view.automatic.label if view.automatic is not None else None,
                    "reached": view.reached,
                    "phase": view.phase,
                    "ready": self._serving(view),
                    "wakeOnRequest": view.wake_on_request,
                },
            }
            for view in self.registry.listing()
        ]
        return web.json_response({"object": "list", "data": data})

    # --- inference ----------------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
            self.metrics.requests.labels(result=m.RESULT_BAD_REQUEST).inc()
            return _error("the body must be a JSON object with a string 'model'", 400, "BadRequestError")
        asked = payload["model"]
        view = self.registry.lookup(asked)
        if view is None:
            self.metrics.requests.labels(result=m.RESULT_UNKNOWN_MODEL).inc()
            known = ", ".join(v.model for v in self.registry.listing()) or "none"
            return _error(f"The model `{asked}` does not exist. Known models: {known}.", 404, "NotFoundError")
        if asked != view.model:  # asked by ModelDeployment name: the engine knows its served name
            payload["model"] = view.model
            body = json.dumps(payload).encode()
        key = view.key
        self.activity.started(key)
        self.gpu.touch(key)
        try:
            if not self._serving(view):
                outcome = await self.hold(view)
                if not outcome.ok:
                    self.metrics.requests.labels(result=outcome.result).inc()
                    return _error(outcome.message, 503, "ServiceUnavailableError", outcome.retry_after)
                view = self.registry.get(key) or view
            return await self.forward(request, view, body)
        finally:
            self.activity.finished(key)

    async def hold(self, view: ModelView) -> Outcome:
        """Hold one request until its model serves, its wake fails, or --hold-timeout passes."""
        key = view.key
        if self.held.get(key, 0) >= self.options.max_held:
            return Outcome(
                ok=False,
                result=m.RESULT_QUEUE_FULL,
                message=(
                    f"model `{view.model}` is waking and already holds {self.options.max_held} "
                    "requests; retry later"
                ),
                retry_after=self.options.retry_after_busy,
            )
        self.held[key] = self.held.get(key, 0) + 1
        self.metrics.held.inc()
        started = time.monotonic()
        try:
            wake = self.wakes.get(key)
            if wake is None or wake.task.done():
                wake = _Wake(asyncio.create_task(self._wake(key)))
                self.wakes[key] = wake
                wake.task.add_done_callback(functools.partial(self._forget_wake, key, wake))
            try:
                # The wake ends by itself within the hold timeout; this bound is only a safety net.
                return await asyncio.wait_for(asyncio.shield(wake.task), self.options.hold_timeout + 5)
            except TimeoutError:
                return self._timeout(self.registry.get(key) or view)
            except Exception as e:  # a bug or an unexpected API failure: refuse, never hang or 500
                log.exception("the wake of %s/%s failed", *key)
                return Outcome(
                    ok=False,
                    result=m.RESULT_WAKE_FAILED,
                    message=f"model `{view.model}` could not be woken: {type(e).__name__}: {e}",
                    retry_after=self.options.retry_after_failed,
                )
        finally:
            self.metrics.hold_seconds.observe(time.monotonic() - started)
            self.metrics.held.dec()
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]

    def _forget_wake(self, key: Key, wake: _Wake, _: object = None) -> None:
        if self.wakes.get(key) is wake:
            del self.wakes[key]

    async def _wake(self, key: Key) -> Outcome:
        """Ask for Awake if the model's level is a sleep level, then wait for the status to say Awake."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.hold_timeout
        view = self.registry.get(key)
        if view is None:
            return self._gone(key)
        if view.effective != SleepLevel.AWAKE:
            if not view.wake_on_request:
                how = (
                    f"`kubectl hibernate wake md/{view.name} -n {view.namespace}`"
                    if view.desired == SleepLevel.AWAKE
                    else "setting spec.sleepLevel to Awake"
                )
                return Outcome(
                    ok=False,
                    result=m.RESULT_WAKE_DISABLED,
                    message=(
                        f"model `{view.model}` is asleep at {_level(view)} and its ModelDeployment "
                        f'{view.namespace}/{view.name} has {ANN_WAKE_ON_REQUEST}: "false"; '
                        f"wake it with {how}"
                    ),
                    retry_after=self.options.retry_after_disabled,
                )
            switched_at: float | None = None
            if view.gpu_group is not None:
                room = await self.gpu.make_room(view, deadline)
                if room.refusal is not None:
                    return Outcome(
                        ok=False,
                        result=m.RESULT_WAKE_FAILED,
                        message=room.refusal,
                        retry_after=room.retry_after,
                    )
                switched_at = room.switched_at
                fresh = self.registry.get(key)  # the switch took time: decide the wake on a fresh view
                if fresh is None:
                    return self._gone(key)
                view = fresh
            try:
                await self._ask_for_awake(view)
            except ApiException as e:
                if e.status == 404:
                    return self._gone(key)
                self.metrics.api_errors.labels(call="wake").inc()
                return Outcome(
                    ok=False,
                    result=m.RESULT_WAKE_FAILED,
                    message=f"could not ask for a wake of model `{view.model}`: {e.status} {e.reason}",
                    retry_after=self.options.retry_after_failed,
                )
            if switched_at is not None:
                return await self._served(key, deadline, switched_at)
        return await self._served(key, deadline)

    async def _served(self, key: Key, deadline: float, switched_at: float | None = None) -> Outcome:
        """Wait until the model serves (OK), fails, is set to sleep again, or `deadline` passes."""
        outcome = await self._wait_serving(key, deadline)
        if switched_at is not None and outcome.ok:
            self.metrics.gpu_switch_seconds.observe(time.monotonic() - switched_at)
        return outcome

    async def _wait_serving(self, key: Key, deadline: float) -> Outcome:
        loop = asyncio.get_running_loop()
        last_read = loop.time()
        while True:
            view = self.registry.get(key)
            if view is None:
                return self._gone(key)
            if self.endpoints is not None and self._serving(view):
                return OK  # a replica is ready (its pod Ready: the agent says Awake); serve from it
            if view.caught_up:
                if self._serving(view):
                    return OK
                if view.phase == "Failed":
                    return Outcome(
                        ok=False,
                        result=m.RESULT_WAKE_FAILED,
                        message=(
                            f"model `{view.model}` failed to wake: {view.message or 'phase Failed'} "
                            f"(ModelDeployment {view.namespace}/{view.name})"
                        ),
                        retry_after=self.options.retry_after_failed,
                    )
                if view.effective != SleepLevel.AWAKE:
                    return Outcome(
                        ok=False,
                        result=m.RESULT_WAKE_FAILED,
                        message=(
                            f"model `{view.model}` was set to {_level(view)} again while it woke; retry later"
                        ),
                        retry_after=self.options.retry_after_failed,
                    )
            now = loop.time()
            if now >= deadline:
                return self._timeout(view)
            if now - last_read >= POLL_SECONDS:
                last_read = now
                await self._reread(key)
                continue
            await self.registry.changed(key, min(deadline - now, POLL_SECONDS))

    async def _ask_for_awake(self, view: ModelView) -> None:
        """One annotation patch: the automatic level goes (when the spec says Awake) or becomes Awake
        (when the person's spec says a sleep level: a request wins over it). The spec is not touched."""
        namespace, name = view.key
        if view.desired == SleepLevel.AWAKE:
            done = await asyncio.to_thread(clear_automatic_level, namespace, name)
        else:
            reason = f"a request for model {view.model} woke it from {_level(view)}"
            done = await asyncio.to_thread(
                functools.partial(
                    set_automatic_level,
                    namespace,
                    name,
                    SleepLevel.AWAKE,
                    source=SOURCE,
                    reason=reason,
                    generation=view.generation,
                )
            )
        if not done:
            raise ApiException(status=404, reason="Not Found")
        self.metrics.wakes.labels(level=_level(view)).inc()
        log.info("waking %s/%s (model %s) from %s for a request", namespace, name, view.model, _level(view))
        # The ladder starts again from this request; the answer is the object with the wake in it.
        obj: dict[str, Any] | None = None
        try:
            obj = await self.activity.force(view.key) or await asyncio.to_thread(
                kube.read_model_deployment, namespace, name
            )
        except Exception as e:  # the wake is asked for; the watch brings the object
            log.warning("after waking %s/%s: could not read it back: %s", namespace, name, e)
            return
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        self.registry.refresh(obj, view.key)

    async def _reread(self, key: Key) -> None:
        try:
            obj = await asyncio.to_thread(kube.read_model_deployment, *key)
        except Exception as e:
            self.metrics.api_errors.labels(call="read").inc()
            log.warning("could not read %s/%s: %s", key[0], key[1], e)
            return
        self.registry.refresh(obj, key)

    def _timeout(self, view: ModelView) -> Outcome:
        return Outcome(
            ok=False,
            result=m.RESULT_HOLD_TIMEOUT,
            message=(
                f"model `{view.model}` did not wake within {self.options.hold_timeout:g} s "
                f"(phase {view.phase or 'unknown'}, at {view.reached or 'unknown level'}); "
                "the wake goes on, retry later"
            ),
            retry_after=self.options.retry_after_timeout,
        )

    def _gone(self, key: Key) -> Outcome:
        return Outcome(
            ok=False,
            result=m.RESULT_WAKE_FAILED,
            message=f"ModelDeployment {key[0]}/{key[1]} was deleted while the request was held",
            retry_after=self.options.retry_after_failed,
        )

    async def _write_activity(self, key: Key, when: datetime) -> dict[str, Any] | None:
        try:
            obj = await asyncio.to_thread(_annotate, key, c.ANN_LAST_ACTIVITY, format_time(when))
        except ApiException as e:
            if e.status == 404:
                return None
            self.metrics.api_errors.labels(call="activity").inc()
            raise
        self.metrics.activity_writes.inc()
        return obj

    # --- forwarding ---------------------------------------------------------------------------

    def _serving(self, view: ModelView) -> bool:
        """A request for the model may go now: a replica is in its Service's ready endpoints (with
        --upstream-template: the status says the model serves)."""
        if self.endpoints is not None:
            return bool(self.endpoints.ready(view.key))
        return view.serving

    async def forward(self, request: web.Request, view: ModelView, body: bytes) -> web.StreamResponse:
        assert self.session is not None
        base = view.upstream
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        for attempt in range(1, self.options.connect_retries + 1):
            if self.endpoints is not None:  # a ready replica, the next one at each attempt
                picked = self.endpoints.pick(view.key)
                if picked is None:  # the last ready one left (a sleep) since the request was let go
                    self.metrics.requests.labels(result=m.RESULT_UNREACHABLE).inc()
                    return _error(
                        f"model `{view.model}` has no ready replica now; retry later",
                        503,
                        "ServiceUnavailableError",
                        retry_after=self.options.retry_after_busy,
                    )
                base = picked
            try:
                upstream = await self.session.post(base + request.path_qs, data=body, headers=headers)
                break
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
                # Nothing reached the engine (no connection, or a pooled one it had closed): retry.
                if attempt == self.options.connect_retries:
                    self.metrics.requests.labels(result=m.RESULT_UNREACHABLE).inc()
                    return _error(
                        f"model `{view.model}` is not reachable at {base}: {e}",
                        502,
                        "BadGatewayError",
                        retry_after=self.options.retry_after_busy,
                    )
                await asyncio.sleep(0.2 * attempt)
        async with upstream:
            result = m.RESULT_OK if upstream.status < 400 else m.RESULT_UPSTREAM_ERROR
            out_headers = {h: upstream.headers[h] for h in _RESPONSE_HEADERS if h in upstream.headers}
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                data = await upstream.read()
                self.metrics.requests.labels(result=result).inc()
                return web.Response(body=data, status=upstream.status, headers=out_headers)
            # Server-sent events: each chunk goes on as soon as it comes.
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            self.metrics.requests.labels(result=result).inc()
            return response


def _level(view: ModelView) -> str:
    return view.effective.label if view.effective is not None else "an invalid level"


def _annotate(key: Key, annotation: str, value: str) -> dict[str, Any]:
    patch = {"metadata": {"annotations": {annotation: value}}}
    obj = kube.custom().patch_namespaced_custom_object(c.GROUP, c.VERSION, key[0], c.PLURAL, key[1], patch)
    return cast(dict[str, Any], obj)
