"""`hibernate agent`: the node agent (a privileged, hostPID DaemonSet pod on every GPU node)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hibernate.agent import fakecuda
from hibernate.agent.coldstart import ColdStarts
from hibernate.agent.levels import Host, Levels
from hibernate.agent.sweep import Sweeper
from hibernate.agent.wakecheck import WakeCheck
from hibernate.agent.watch import PodWatch
from hibernate.agent.worker import Agent, Reporter

log = logging.getLogger("hibernate.agent")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def http_app(agent: Agent, pod_watch: PodWatch) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        agent.update_gauges()
        body = generate_latest(agent.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        if pod_watch.healthy():
            return web.json_response({"ok": True, "pods": len(agent.pods)})
        return web.json_response({"ok": False, "reason": "the pod watch is not connected"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(args: argparse.Namespace, node: str) -> None:
    host = Host(
        proc_root=args.proc_root,
        checkpoint_roots=tuple(Path(p) for p in args.checkpoint_root),
        lock_timeout_s=args.lock_timeout,
        engine_timeout_s=args.engine_timeout,
        snapshot_dir=Path(args.snapshot_dir).resolve() if args.snapshot_dir else None,
    )
    if fake_cuda := os.environ.get(fakecuda.ENV):
        api = fakecuda.FakeCheckpointApi(Path(fake_cuda), args.proc_root)
        host.cuda_api = lambda: api
        host.find_cuda_pids = fakecuda.engine_pids
        log.warning(
            "%s is set: CUDA is the file-backed TEST DOUBLE in %s, not the NVIDIA driver",
            fakecuda.ENV,
            fake_cuda,
        )
    agent = Agent(
        levels=Levels(host),
        reporter=Reporter(node=node),
        wake_check=WakeCheck(timeout_s=min(60.0, args.engine_timeout)),
        cold_starts=ColdStarts(host),
    )
    loop = asyncio.get_running_loop()

    def on_event(kind: str, pod: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(agent.observe, kind, pod)

    pod_watch = PodWatch(node, on_event)
    pod_watch.start()
    runner = web.AppRunner(http_app(agent, pod_watch))
    await runner.setup()
    if args.metrics_port:
        await web.TCPSite(runner, args.bind, args.metrics_port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("agent on node %s: watching managed pods; metrics on :%s", node, args.metrics_port)
    sweeps = None
    if args.image_sweep_interval > 0:
        shared = (host.snapshot_dir,) if host.snapshot_dir is not None else ()
        sweeper = Sweeper(host.checkpoint_roots, node, agent.ownership, snapshot_roots=shared)
        sweeps = loop.create_task(
            _sweep_forever(sweeper, agent, args.image_sweep_interval), name="image sweep"
        )
    await stop.wait()
    if sweeps is not None:
        sweeps.cancel()
    pod_watch.stopping.set()
    # Operations in flight finish (or roll back) before the process ends: never leave half a level.
    # A worker that only waits to retry ends now (Agent.stop): the next agent process retries.
    agent.stop()
    running = [t for t in agent.workers.values() if not t.done()]
    if running:
        log.info("waiting for %d operation(s) in flight", len(running))
        await asyncio.wait(running, timeout=args.shutdown_timeout)
    await runner.cleanup()


async def _sweep_forever(sweeper: Sweeper, agent: Agent, interval: float) -> None:
    """The image sweep (sweep.py): at start, then every `interval` seconds."""
    while True:
        try:
            await asyncio.to_thread(sweeper.sweep, set(agent.pods))
        except Exception:  # never let a sweep end the agent; the next one tries again
            log.exception("the image sweep failed")
        await asyncio.sleep(interval)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    node = args.node_name or os.environ.get("NODE_NAME")
    if not node:
        print("hibernate agent: the node name is unknown: pass --node-name or set NODE_NAME", file=sys.stderr)
        return 2
    if os.environ.get(fakecuda.ENV) and (why := fakecuda.refusal()):
        log.error("%s", why)  # before anything is watched or served
        return 2
    asyncio.run(serve(args, node))
    return 0
