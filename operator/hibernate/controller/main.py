"""`hibernate operator`: run the kopf operator in this process."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf
from prometheus_client import start_http_server
from pydantic import ValidationError

from hibernate.api.pod_fields import PodFieldPolicy
from hibernate.api.v1alpha1 import NetworkPeer
from hibernate.controller import (  # noqa: F401  (register kopf handlers)
    api_session,
    gpu_groups,
    handlers,
    idle_handlers,
)
from hibernate.controller.reconcile import OperatorContext
from hibernate.controller.workload import EngineNetwork

assert handlers  # imported for its side effect: kopf's registry


class ConfigError(Exception):
    pass


def engine_network(args: argparse.Namespace) -> EngineNetwork | None:
    """The peers every engine admits, from the command line (the chart's networkPolicy values)."""
    if not args.network_policy:
        return None
    ns_selector = args.release_namespace_selector
    if ns_selector is None and args.release_namespace:
        ns_selector = {"matchLabels": {"kubernetes.io/metadata.name": args.release_namespace}}
    peers = []
    for flag, labels in (
        ("--agent-pod-labels", args.agent_pod_labels),
        ("--gateway-pod-labels", args.gateway_pod_labels),
        ("--operator-pod-labels", getattr(args, "operator_pod_labels", {})),
    ):
        if not labels:
            continue
        if ns_selector is None:
            raise ConfigError(f"{flag} needs --release-namespace (or $POD_NAMESPACE)")
        peers.append({"namespaceSelector": ns_selector, "podSelector": {"matchLabels": labels}})
    for peer in args.engine_peer:
        try:
            NetworkPeer.model_validate(peer)
        except ValidationError as e:
            raise ConfigError(f"--engine-peer {peer}: {e}") from e
        peers.append(peer)
    return EngineNetwork(peers=tuple(peers))


def context(args: argparse.Namespace) -> OperatorContext:
    return OperatorContext(
        tools_image=args.tools_image,
        network=engine_network(args),
        pod_fields=PodFieldPolicy(
            allow_host_path=args.allow_host_path,
            allow_service_accounts=frozenset(args.allow_service_account),
            allow_unconfined_profiles=args.allow_unconfined_profiles,
        ),
    )


def run(args: argparse.Namespace) -> int:
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the idle timer's reads of engine /metrics
    if args.metrics_port:
        # The operator's metrics (hibernate_operator_*, hibernate_idle_*) on the default registry.
        start_http_server(args.metrics_port)
    try:
        ctx = context(args)
    except ConfigError as e:
        logging.getLogger(__name__).error("%s", e)
        return 2
    if ctx.network is not None:
        handlers.watch_network_policies()
    memo = kopf.Memo(ctx=ctx)
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
