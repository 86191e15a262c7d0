"""The fake engine's HTTP API: vLLM's sleep endpoints and OpenAI completions (notes/vllm-sleep-api.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from hibernate.api.constants import SLEEP_HINT_PARAM, SLEEP_HINTS
from hibernate.engine import openai
from hibernate.engine.memory import rss_bytes
from hibernate.engine.model import TAG_SCHEDULING, EngineFault, FakeModel
from hibernate.engine.scheduler import SLEEP_MODES, Scheduler

log = logging.getLogger("hibernate.engine")

API_VERSIONS: Final = ("0.33", "0.30")
SLEEP_LEVELS: Final = (0, 1, 2)

Emit = Callable[[int, str], Awaitable[None]]


@dataclass
class Faults:
    """Failures a test can switch on: the sleep or wake call answers 500, or never answers; or, TEST
    ONLY, every wake_up that wakes memory leaves the weights as garbage (`wrong_after_wake`), so the
    woken engine answers wrong, as one whose restore lost its weights would."""

    fail_sleep: bool = False
    hang_sleep: bool = False
    fail_wake: bool = False
    hang_wake: bool = False
    wrong_after_wake: bool = False
    # An engine stricter than vLLM: a sleep with the agent's hint parameter answers 400.
    refuse_hints: bool = False

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`fail_sleep,hang_wake`-style lists, as given in HIBERNATE_FAKE_FAULTS."""
        faults = cls()
        faults.update({name.strip(): True for name in text.split(",") if name.strip()})
        return faults

    def update(self, changes: object) -> None:
        known = {f.name for f in fields(self)}
        if not isinstance(changes, dict) or not set(changes) <= known:
            raise openai.BadRequest(f"faults must be a JSON object with keys among {sorted(known)}")
        for name, value in changes.items():
            setattr(self, name, bool(value))


@dataclass(frozen=True)
class ServerConfig:
    served_names: tuple[str, ...]
    api: str = "0.33"  # "0.30" answers /sleep and /wake_up with empty bodies
    sleep_api: bool = True  # vLLM registers the dev endpoints only in dev mode
    token_delay: float = 0.0  # seconds per generated token


class FakeEngineServer:
    def __init__(self, model: FakeModel, config: ServerConfig, faults: Faults) -> None:
        self.model = model
        self.config = config
        self.faults = faults
        self.scheduler = Scheduler()
        self._lock = asyncio.Lock()  # one sleep, wake or reload at a time
        # The agent's hints (hibernate=…) on the sleeps so far, in order: tests read them back.
        self.sleep_hints: list[str] = []
        # Finished requests by finish reason: vLLM's counter vllm:request_success.
        self.finished: dict[str, int] = {"length": 0, "stop": 0, "abort": 0}
        self._stopping = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        if self.config.sleep_api:
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
            app.router.add_post("/collective_rpc", self.collective_rpc)
            app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_get("/debug/memory", self.debug_memory)
        app.router.add_get("/debug/faults", self.debug_faults)
        app.router.add_post("/debug/faults", self.debug_faults)
        return app

    async def shutdown(self) -> None:
        """End held and running requests, so that stopping never waits on a sleeping engine."""
        self._stopping.set()
        await self.scheduler.abort_all()

    def sleeping(self) -> bool:
        return self.scheduler.paused or not self.model.resident

    # --- always there -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()  # 200 while asleep too, as vLLM's

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "owned_by": "vllm", "root": self.model.name, "parent": None}
            for name in self.config.served_names
        ]
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'engine="0",model_name="{self.config.served_names[0]}"'
        level = self.model.level
        states = {
            "awake": int(not self.sleeping()),
            "weights_offloaded": int(level == 1 and not self.model.resident),
            "discard_all": int(level == 2 and not self.model.resident),
        }
        lines = ["# TYPE vllm:engine_sleep_state gauge"]
        lines += [f'vllm:engine_sleep_state{{{labels},sleep_state="{k}"}} {v}' for k, v in states.items()]
        lines += ["# TYPE vllm:num_requests_running gauge"]
        lines += [f"vllm:num_requests_running{{{labels}}} {self.scheduler.running}"]
        lines += ["# TYPE vllm:num_requests_waiting gauge"]
        lines += [f"vllm:num_requests_waiting{{{labels}}} {self.scheduler.waiting}"]
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests."]
        lines += ["# TYPE vllm:request_success_total counter"]
        lines += [
            f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {float(count)}'
            for reason, count in self.finished.items()
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    # --- dev-mode sleep API -------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        level_text = request.query.get("level", "1")
        mode = request.query.get("mode", "abort")
        if not level_text.isdigit() or int(level_text) not in SLEEP_LEVELS:
            return _error(f"level must be one of {list(SLEEP_LEVELS)}, got {level_text!r}", 400)
        if mode not in SLEEP_MODES:
            return _error(f"mode must be one of {list(SLEEP_MODES)}, got {mode!r}", 400)
        level = int(level_text)
        hint = request.query.get(SLEEP_HINT_PARAM)
        if hint is not None:
            if self.faults.refuse_hints:
                return _error(f"unknown query parameter {SLEEP_HINT_PARAM!r} (injected fault)", 400)
            if hint not in SLEEP_HINTS:
                return _error(f"{SLEEP_HINT_PARAM} must be one of {list(SLEEP_HINTS)}, got {hint!r}", 400)
        await self._injected("sleep", self.faults.fail_sleep, self.faults.hang_sleep)
        # As vLLM: the pause comes first and outside the lock, so that while a mode=wait sleep waits
        # for the running requests, a mode=abort sleep can end them and sleep at once (the waiting
        # one then finds the engine asleep: a no-op).
        await self.scheduler.pause(mode)
        async with self._lock:
            try:
                self.model.sleep(level)
            except OSError as exc:
                return _error(f"sleep failed: {exc}", 500)
            if hint is not None:
                self.sleep_hints.append(hint)
        if self.config.api == "0.30":
            return web.Response()
        return web.json_response({"status": "sleeping", "level": level})

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", []) or None
        await self._injected("wake_up", self.faults.fail_wake, self.faults.hang_wake)
        async with self._lock:
            woken = self.model.wake(tags)
            if woken and self.faults.wrong_after_wake:
                self.model.garble()  # TEST ONLY: see Faults
            # Scheduling resumes only once every tag is resident (vLLM >= 0.30).
            if self.model.resident and (tags is None or TAG_SCHEDULING in tags or woken):
                self.model.mark_awake()
                await self.scheduler.resume()
        if self.config.api == "0.30":
            return web.Response()
        return web.json_response({"status": "sleeping" if self.sleeping() else "awake", "tags": tags})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping()})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("the body must be JSON", 400)
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            return _error("the body must be a JSON object with a string 'method'", 400)
        kwargs = body.get("kwargs") or {}
        if not isinstance(body.get("args") or [], list) or not isinstance(kwargs, dict):
            return _error("'args' must be a list and 'kwargs' an object", 400)
        method = body["method"]
        if method != "reload_weights":
            return _error(f"worker has no method {method!r}", 500)
        path = kwargs.get("weights_path")
        async with self._lock:
            try:
                self.model.reload_weights(Path(path) if isinstance(path, str) else None)
            except EngineFault as exc:
                return _error(str(exc), 500)
        return web.json_response({"results": [None]})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.model.reset_prefix_cache()
        return web.json_response({"success": True})

    # --- fake-only, for tests -----------------------------------------------------------------

    async def debug_memory(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "device_bytes": self.model.device_bytes(),
                "host_bytes": self.model.host_bytes(),
                "rss_bytes": rss_bytes(),
                "sleep_level": self.model.level,
                "weights_loaded": self.model.weights_loaded,
                "asleep_tags": sorted(self.model.asleep),
                "sleep_hints": self.sleep_hints,
            }
        )

    async def debug_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.faults.update(await request.json())
            except (ValueError, openai.BadRequest) as exc:
                return _error(str(exc), 400)
        return web.json_response(asdict(self.faults))

    # --- helpers ------------------------------------------------------------------------------

    async def _injected(self, call: str, fail: bool, hang: bool) -> None:
        if hang:
            log.warning("%s: hanging (injected fault)", call)
            await self._stopping.wait()
            raise web.HTTPServiceUnavailable(text="stopping")
        if fail:
            log.warning("%s: failing (injected fault)", call)
            raise web.HTTPInternalServerError(
                text=json.dumps(openai.error_body(f"{call} failed (injected fault)", 500)),
                content_type="application/json",
            )

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            req = openai.parse_request(await _json_or_none(request), chat, self.config.served_names)
        except openai.BadRequest as exc:
            return _error(str(exc), exc.status)
        ticket = self.scheduler.ticket()
        name = self.config.served_names[0]
        if req.stream:
            return await self._stream(request, req, ticket)
        outputs: list[list[str]] = [[] for _ in req.prompts]

        async def collect(index: int, token: str) -> None:
            outputs[index].append(token)

        finish = await self._generate(req, ticket, collect)
        body = openai.full_response(req, name, outputs, finish, openai.count_tokens(req.prompts))
        return web.json_response(body)

    async def _stream(self, request: web.Request, req: openai.Request, ticket: int) -> web.StreamResponse:
        name = self.config.served_names[0]
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        # Headers go out at once; while asleep the chunks are what hangs, as with vLLM.
        await response.prepare(request)

        async def send(payload: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        async def emit(index: int, token: str) -> None:
            await send(openai.chunk(req, name, index, token, None))

        if req.chat:
            for index in range(len(req.prompts)):
                await send(openai.role_chunk(req, name, index))
        finish = await self._generate(req, ticket, emit)
        for index in range(len(req.prompts)):
            await send(openai.chunk(req, name, index, None, finish))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _generate(self, req: openai.Request, ticket: int, emit: Emit) -> str:
        """Run one request through the scheduler; returns the finish reason (and counts it)."""
        finish = await self._run(req, ticket, emit)
        self.finished[finish] = self.finished.get(finish, 0) + 1
        return finish

    async def _run(self, req: openai.Request, ticket: int, emit: Emit) -> str:
        if not await self.scheduler.admit(ticket):
            return "abort"
        async with self.scheduler.run():
            answers = [self.model.answer(prompt, req.max_tokens) for prompt in req.prompts]
            for step in range(req.max_tokens):
                if self.config.token_delay:
                    await asyncio.sleep(self.config.token_delay)
                if not await self.scheduler.proceed(ticket):
                    return "abort"
                for index, tokens in enumerate(answers):
                    await emit(index, tokens[step])
        return "length"


async def _json_or_none(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        return None


def _error(message: str, status: int) -> web.Response:
    return web.json_response(openai.error_body(message, status), status=status)
