"""Run the fake vLLM engine: `python -m hibernate.engine.fake --model NAME --port 8000 --enable-sleep-mode`.

Unknown arguments are ignored, since the operator appends real vLLM arguments. The process is kept
simple for CRIU: one thread, one listening socket, logs on stderr, SIGTERM ends it cleanly.

Fake-only endpoints for tests: `GET /debug/memory` (device and host bytes, RSS, sleep level, whether
the real weights are loaded) and `GET|POST /debug/faults` (switch the fault knobs at run time; at
start they come from --fail-sleep/--hang-sleep/--fail-wake/--hang-wake/--wrong-after-wake or
HIBERNATE_FAKE_FAULTS; `wrong_after_wake` makes every wake leave garbage weights, for the wake check).
`collective_rpc reload_weights` takes kwargs `weights_path` to load other weights (a weight update).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from hibernate.engine.memory import MIB, default_weights_file
from hibernate.engine.model import FakeModel
from hibernate.engine.server import API_VERSIONS, FakeEngineServer, Faults, ServerConfig

log = logging.getLogger("hibernate.engine")

FAULTS_ENV = "HIBERNATE_FAKE_FAULTS"  # e.g. "fail_sleep,hang_wake"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # allow_abbrev=False: a vLLM flag such as --weights... must not be taken for one of ours.
    parser = argparse.ArgumentParser(prog="python -m hibernate.engine.fake", allow_abbrev=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--weights-mib", type=_positive_int, default=64)
    parser.add_argument("--kv-mib", type=_positive_int, default=16)
    parser.add_argument("--weights-file", type=Path, default=None)
    parser.add_argument("--api", choices=API_VERSIONS, default="0.33")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per generated token")
    parser.add_argument("--load-delay", type=float, default=0.0, help="seconds of 'loading' before serving")
    parser.add_argument(
        "--zero-host-mib",
        type=int,
        default=0,
        help="host memory written with zero bytes and kept, as a CUDA driver's checkpoint leaves a context's "
        "(mostly zero) device memory in the process: its CRIU image has zero pages to leave out",
    )
    for fault in ("fail-sleep", "hang-sleep", "fail-wake", "hang-wake", "wrong-after-wake", "refuse-hints"):
        parser.add_argument(f"--{fault}", action="store_true", help="fault injection for tests")
    return parser.parse_known_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _zero_host_memory(size: int) -> mmap.mmap | None:
    """`size` bytes of private anonymous memory, every page written (present) with zero bytes."""
    if size <= 0:
        return None
    zeros = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    zeros.write(bytes(size))
    return zeros


def _dev_mode() -> bool:
    # vLLM parses VLLM_SERVER_DEV_MODE as bool(int(...)).
    try:
        return bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0")))
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by asyncio, whose name lookups would start an executor thread.
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    weights_bytes = args.weights_mib * MIB
    model = FakeModel(
        args.model,
        weights_bytes,
        args.kv_mib * MIB,
        args.weights_file or default_weights_file(args.model, weights_bytes),
    )
    model.load()
    zeros = _zero_host_memory(args.zero_host_mib * MIB)
    faults = Faults.parse(os.environ.get(FAULTS_ENV, ""))
    faults.update({name: True for name in vars(faults) if getattr(args, name)})
    config = ServerConfig(
        served_names=tuple(args.served_model_name or [args.model]),
        api=args.api,
        sleep_api=args.enable_sleep_mode or _dev_mode(),
        token_delay=args.token_delay,
    )
    server = FakeEngineServer(model, config, faults)
    if args.load_delay:
        await asyncio.sleep(args.load_delay)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A short shutdown timeout: requests held by a sleeping engine must not delay the exit.
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.SockSite(runner, _listen(args.host, args.port))
    await site.start()
    log.info(
        "serving %s on %s:%d (weights %d MiB, kv cache %d MiB, api %s, sleep endpoints %s, weights file %s)",
        args.model,
        args.host,
        args.port,
        args.weights_mib,
        args.kv_mib,
        args.api,
        "on" if config.sleep_api else "off",
        model.weights_file,
    )
    try:
        await stop.wait()
        log.info("stopping")
        await server.shutdown()
        await runner.cleanup()
    finally:
        model.close()
        if zeros is not None:
            zeros.close()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s fake-engine: %(message)s"
    )
    args, unknown = parse_args(argv)
    if unknown:
        log.info("ignoring arguments the fake engine does not use: %s", " ".join(unknown))
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
