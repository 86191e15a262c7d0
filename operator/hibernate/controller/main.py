"""`hibernate operator`: run the kopf operator in this process."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf
from prometheus_client import start_http_server

from hibernate.controller import api_session, handlers, idle_handlers  # noqa: F401  (register kopf handlers)
from hibernate.controller.reconcile import OperatorContext

assert handlers  # imported for its side effect: kopf's registry


def run(args: argparse.Namespace) -> int:
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if args.metrics_port:
        # The operator's metrics (hibernate_operator_*, hibernate_idle_*) on the default registry.
        start_http_server(args.metrics_port)
    memo = kopf.Memo(ctx=OperatorContext(tools_image=args.tools_image))
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace or [],
            liveness_endpoint=args.liveness or None,
            memo=memo,
        )
    )
    return 0
