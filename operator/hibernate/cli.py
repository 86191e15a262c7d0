"""`hibernate` console script: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _crds(args: argparse.Namespace) -> int:
    from hibernate.api.crd import crd_yaml

    text = crd_yaml(args.resource)
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `hibernate crds -o {args.output}`", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _operator(args: argparse.Namespace) -> int:
    from hibernate.controller.main import run

    return run(args)


def _agent(args: argparse.Namespace) -> int:
    from hibernate.agent.main import run
    from hibernate.api.constants import DEFAULT_CHECKPOINT_DIR

    args.checkpoint_root = args.checkpoint_root or [DEFAULT_CHECKPOINT_DIR]
    return run(args)


def _gateway(args: argparse.Namespace) -> int:
    from hibernate.gateway.main import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from hibernate.demo import run

    return run(args)


def _labels(text: str) -> dict[str, str]:
    """`a=b,c=d` (a label selector's matchLabels)."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def _operator_security_args(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group(
        "engine network",
        "Own a NetworkPolicy per ModelDeployment: only the agent, the gateway, the operator (which reads "
        "the engines' /metrics for the idle ladder), the --engine-peer peers and the model's "
        "spec.network.allowFrom reach its engine port.",
    )
    net.add_argument("--network-policy", action="store_true", help="write the per-model NetworkPolicies")
    net.add_argument(
        "--release-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="where the agent, the gateway and the operator run (default: $POD_NAMESPACE)",
    )
    net.add_argument(
        "--release-namespace-selector",
        type=_json_object,
        default=None,
        help="a LabelSelector (JSON) for that namespace; default: kubernetes.io/metadata.name (1.21+)",
    )
    net.add_argument("--agent-pod-labels", type=_labels, default={}, help="the agent pods' labels, a=b,c=d")
    net.add_argument("--gateway-pod-labels", type=_labels, default={}, help="the gateway pods' labels")
    net.add_argument(
        "--operator-pod-labels",
        type=_labels,
        default={},
        help="the operator's own pod labels (it reads the engines' /metrics for the idle ladder)",
    )
    net.add_argument(
        "--engine-peer",
        type=_json_object,
        action="append",
        default=[],
        help="one more NetworkPolicyPeer (JSON) allowed to reach every engine (repeatable)",
    )
    pods = p.add_argument_group(
        "pod fields", "What a ModelDeployment may put into its pods beyond the defaults (refused otherwise)."
    )
    pods.add_argument("--allow-host-path", action="store_true", help="hostPath volumes")
    pods.add_argument(
        "--allow-service-account",
        action="append",
        default=[],
        metavar="NAME",
        help="a ServiceAccount name engine pods may run as, besides default (repeatable)",
    )
    pods.add_argument(
        "--allow-unconfined-profiles", action="store_true", help="unconfined AppArmor/seccomp annotations"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hibernate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crds", help="print or write the ModelDeployment CRD generated from the API types")
    p.add_argument("-o", "--output", default="-", help="file to write, - for stdout")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated CRD")
    p.add_argument(
        "--resource",
        choices=["modeldeployments", "gpugroups"],
        default="modeldeployments",
        help="which CRD (default: modeldeployments)",
    )
    p.set_defaults(func=_crds)

    p = sub.add_parser("operator", help="run the operator (reconciles ModelDeployments)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces (default: all)")
    p.add_argument(
        "--tools-image", default="", help="image whose init container brings the pod init and CRIU"
    )
    p.add_argument("--liveness", default="", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    p.add_argument("--log-format", choices=["plain", "json"], default="plain")
    p.add_argument("--verbose", action="store_true")
    _operator_security_args(p)
    p.set_defaults(func=_operator)

    p = sub.add_parser("agent", help="run the node agent (performs levels 1-4 on this node's pods)")
    p.add_argument("--node-name", default=None, help="default: $NODE_NAME (downward API)")
    p.add_argument("--metrics-port", type=int, default=9400, help="/metrics and /healthz (0: off)")
    p.add_argument("--bind", default="0.0.0.0", help="address of the metrics server")
    p.add_argument("--proc-root", default="/proc", help="the host's /proc (hostPID)")
    p.add_argument(
        "--checkpoint-root",
        action="append",
        default=None,
        help="directory under which level-4 images may go (repeatable; default /var/lib/hibernate/checkpoints)",
    )
    p.add_argument(
        "--snapshot-dir",
        default=None,
        help="a volume that every node's agent mounts (a ReadWriteMany PVC): Stop's snapshots go there, "
        "so a pod on any node can restore one (default: none, snapshots stay on the node's disk)",
    )
    p.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for CUDA locks")
    p.add_argument("--engine-timeout", type=float, default=300.0, help="seconds one engine call may take")
    p.add_argument(
        "--shutdown-timeout", type=float, default=600.0, help="seconds to finish operations on SIGTERM"
    )
    p.add_argument(
        "--image-sweep-interval",
        type=float,
        default=600.0,
        help="seconds between sweeps of the checkpoint roots for images of pods that are gone or no "
        "longer a ModelDeployment's (one runs at start; 0: never)",
    )
    p.add_argument("--log-format", choices=["plain", "json"], default="plain")
    p.set_defaults(func=_agent)

    p = sub.add_parser("gateway", help="run the wake-on-request OpenAI-compatible gateway")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    p.add_argument("--namespace", action="append", help="serve only these namespaces (default: all)")
    p.add_argument(
        "--hold-timeout", type=float, default=300.0, help="seconds a request may wait for its model to wake"
    )
    p.add_argument("--max-held", type=int, default=1024, help="requests held per model; beyond it 503")
    p.add_argument(
        "--upstream-template",
        default=None,
        help="a model's base URL from its ModelDeployment's name, namespace and engine port, e.g. "
        "http://{name}.{namespace}.svc:{port}; requests then go there whenever the status says the "
        "model serves (default: to the ready endpoints of the model's Service, pod IPs, round robin)",
    )
    p.add_argument(
        "--activity-interval",
        type=float,
        default=10.0,
        help="at most one last-activity write per model per this many seconds",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect to an engine")
    p.add_argument(
        "--shutdown-timeout", type=float, default=15.0, help="seconds for requests in flight on SIGTERM"
    )
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_gateway)

    p = sub.add_parser("demo", help="a local demo: control plane, operator, agent, fake engine, every level")
    p.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
