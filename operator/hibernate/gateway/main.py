"""`hibernate gateway`: run the wake-on-request gateway in this process (flags: docs/gateway.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading

from aiohttp import web
from prometheus_client import REGISTRY

from hibernate.gateway.endpoints import Endpoints
from hibernate.gateway.metrics import GatewayMetrics
from hibernate.gateway.registry import DEFAULT_UPSTREAM_TEMPLATE, Registry
from hibernate.gateway.server import Gateway, Options

log = logging.getLogger("hibernate.gateway")


def options_from(args: argparse.Namespace) -> Options:
    defaults = Options()
    return Options(
        hold_timeout=float(getattr(args, "hold_timeout", defaults.hold_timeout)),
        max_held=int(getattr(args, "max_held", defaults.max_held)),
        activity_interval=float(getattr(args, "activity_interval", defaults.activity_interval)),
        connect_timeout=float(getattr(args, "connect_timeout", defaults.connect_timeout)),
    )


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    template = getattr(args, "upstream_template", None)
    registry = Registry(template or DEFAULT_UPSTREAM_TEMPLATE)
    # Without a template, requests go to the ready endpoints of each model's Service (pod IPs).
    endpoints = None if template else Endpoints(on_change=registry.notify)
    gateway = Gateway(registry, options_from(args), GatewayMetrics(REGISTRY), endpoints)
    stop_watching = threading.Event()
    registry.start_watching(loop, getattr(args, "namespace", None) or None, stop_watching)
    if endpoints is not None:
        endpoints.start_watching(loop, getattr(args, "namespace", None) or None, stop_watching)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        gateway.app(),
        access_log=None,
        shutdown_timeout=float(getattr(args, "shutdown_timeout", 15.0)),
    )
    await runner.setup()
    site = web.TCPSite(runner, getattr(args, "bind", "0.0.0.0"), args.port, reuse_address=True)
    await site.start()
    log.info(
        "gateway on %s:%d for %s; upstream %s; hold timeout %g s, at most %d held per model",
        getattr(args, "bind", "0.0.0.0"),
        args.port,
        ", ".join(getattr(args, "namespace", None) or []) or "all namespaces",
        registry.template if template else "the ready endpoints of each model's Service",
        gateway.options.hold_timeout,
        gateway.options.max_held,
    )
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        stop_watching.set()
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    asyncio.run(serve(args))
    return 0
